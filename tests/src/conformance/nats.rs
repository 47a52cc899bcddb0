//! NATS JetStream in the conformance suite, and what the `nats_*` tests share: the local
//! server (127.0.0.1:4222, JetStream on), private servers of a test's own (to restart one
//! with its stream kept on disk), a stream's consumer counts, its dead letters.
//!
//! On the local server the bridge connects through a [`Proxy`] so that the suite can cut
//! it off mid-stream; a private server ([`NatsServer`]) is for restarting the server
//! itself (stopped, then started again on the same port and store directory).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::{self, stream, AckKind, Context};
use bytes::Bytes;
use futures::StreamExt;

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::proxy::Proxy;

/// The local server.
pub const ADDR: &str = "127.0.0.1:4222";

/// The durable consumer every bridge in the tests reads with.
pub const CONSUMER: &str = "ferry";

/// `ack_wait` of the consumers the bridges make: far longer than any delivery in the
/// suite, short enough that a killed bridge's messages come back within the tests' waits.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// Messages a pull asks for at most (`batch_size`); the bridge holds two pulls' worth.
pub const BATCH: usize = 100;

/// Connects the tests' own client to `addr`; panics with a clear message when no server
/// answers there.
pub async fn connect(addr: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(addr)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "NATS is not reachable at {addr} ({e}); start it with \
                 `nats-server -js -a 127.0.0.1 -p 4222` or run scripts/services.sh"
            )
        })
}

/// A `nats-server -js` of a test's own on a free loopback port, its store in a scratch
/// directory so that a restart keeps the streams; killed when dropped.
pub struct NatsServer {
    port: u16,
    store: PathBuf,
    child: Mutex<Option<Child>>,
}

impl NatsServer {
    /// Starts one and waits until it accepts connections.
    pub async fn start() -> Self {
        let server = Self {
            port: crate::free_port(),
            store: crate::ferry::scratch("nats-store"),
            child: Mutex::new(None),
        };
        server.up().await;
        server
    }

    /// `host:port`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) and waits for its port.
    pub async fn up(&self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run nats-server ({e}); install the nats-server package")
            });
        *self.child.lock().expect("lock") = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server did not listen on {} within 5 s", self.addr());
    }

    /// Stops the server as an operator does (SIGTERM), which writes every stream's and
    /// consumer's state to its store first, and waits until it exited.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// `kill -9` of the server.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Creates (or finds) a file stream `name` capturing `subjects`.
pub async fn create_stream(js: &Context, name: &str, subjects: Vec<String>) {
    js.get_or_create_stream(stream::Config {
        name: name.to_owned(),
        subjects,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
}

/// `(num_pending, num_ack_pending)` of the bridges' consumer; `None` before one made it.
pub async fn consumer_counts(js: &Context, stream: &str) -> Option<(u64, u64)> {
    let stream = js.get_stream(stream).await.ok()?;
    let info = stream.consumer_info(CONSUMER).await.ok()?;
    Some((info.num_pending, info.num_ack_pending as u64))
}

/// Messages the bridges' consumer has not acknowledged (the whole stream while there is
/// no consumer yet).
pub async fn unacked(js: &Context, stream: &str) -> u64 {
    match consumer_counts(js, stream).await {
        Some((pending, ack_pending)) => pending + ack_pending,
        None => match js.get_stream(stream).await {
            Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        },
    }
}

/// Publishes `messages` in order, each confirmed by the stream; a message with a key goes
/// to `<prefix>.<key>` (and carries it as header `Key`), the others to `<prefix>.m`.
pub async fn publish(js: &Context, prefix: &str, messages: &[Outgoing]) {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let mut headers = async_nats::HeaderMap::new();
        let subject = match &m.key {
            Some(key) => {
                headers.insert("Key", key.as_str());
                format!("{prefix}.{key}")
            }
            None => format!("{prefix}.m"),
        };
        let ack = js
            .publish_with_headers(subject, headers, Bytes::from(m.body.clone()))
            .await
            .expect("publish");
        acks.push(ack);
    }
    for ack in acks {
        ack.await.expect("publish ack");
    }
}

/// Takes every message the stream `dead` holds past what earlier calls took, with
/// ferry's headers.
pub async fn take_dead(js: &Context, dead: &str) -> Vec<async_nats::Message> {
    let Ok(stream) = js.get_stream(dead).await else {
        return Vec::new();
    };
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            "test",
            pull::Config {
                durable_name: Some("test".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .expect("dead-letter consumer");
    let mut taken = Vec::new();
    let mut batch = consumer
        .fetch()
        .max_messages(10_000)
        .messages()
        .await
        .expect("fetch dead letters");
    while let Some(Ok(m)) = batch.next().await {
        m.double_ack().await.expect("ack dead letter");
        taken.push(m.message);
    }
    taken
}

/// A header of a message, or "".
pub fn header(m: &async_nats::Message, name: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// The local server; queues are reached through a proxy the suite can cut.
pub struct Nats {
    js: Context,
}

impl Nats {
    /// Connects; panics with a clear message when the server is not running.
    pub async fn connect() -> Self {
        Self {
            js: jetstream::new(connect(ADDR).await),
        }
    }
}

/// A stream with its dead-letter stream, and how the bridge reaches its server.
pub struct NatsStream {
    /// The tests' own connection (straight to the server).
    pub js: Context,
    /// The stream's name, also the first token of its subjects.
    pub stream: String,
    /// What the bridge connects to.
    pub addr: String,
    /// More `[routes.r.source]` lines.
    pub extra: String,
    proxy: Option<Proxy>,
}

impl NatsStream {
    /// A fresh stream `<name>` capturing `<name>.>` and its dead-letter stream, on the
    /// server `js` talks to; `addr` is where the bridge connects.
    pub async fn create(js: Context, prefix: &str, addr: String) -> Self {
        let stream = crate::unique(prefix);
        create_stream(&js, &stream, vec![format!("{stream}.>")]).await;
        create_stream(
            &js,
            &format!("{stream}_DEAD_LETTERS"),
            vec![format!("{stream}_dead")],
        )
        .await;
        Self {
            js,
            stream,
            addr,
            extra: String::new(),
            proxy: None,
        }
    }

    /// A fresh stream on the local server, the bridge going through a proxy.
    pub async fn on_local(prefix: &str) -> Self {
        let proxy = Proxy::start(ADDR).await;
        let js = jetstream::new(connect(ADDR).await);
        let mut s = Self::create(js, prefix, proxy.addr().to_string()).await;
        s.proxy = Some(proxy);
        s
    }

    /// The dead-letter subject.
    pub fn dead_subject(&self) -> String {
        format!("{}_dead", self.stream)
    }

    /// The `[routes.r.source]` body of a bridge on this stream.
    pub fn source(&self) -> String {
        format!(
            "type = \"nats\"\nurl = \"nats://{}\"\nstream = \"{}\"\nconsumer = \"{CONSUMER}\"\n\
             declare = true\nack_wait = \"{}s\"\nbatch_size = {BATCH}\nkey = \"subject\"\n\
             dead_letter_subject = \"{}\"\n{}\n",
            self.addr,
            self.stream,
            ACK_WAIT.as_secs(),
            self.dead_subject(),
            self.extra
        )
    }

    /// Publishes to `<stream>.m` (or `<stream>.<key>`).
    pub async fn publish(&self, messages: &[Outgoing]) {
        publish(&self.js, &self.stream, messages).await;
    }

    /// What the bridges' consumer could hand out right now, found by taking it: a pull
    /// that does not wait, each message then handed back at once (`-NAK`). Only while no
    /// bridge runs.
    pub async fn takeable(&self) -> u64 {
        let Ok(stream) = self.js.get_stream(&self.stream).await else {
            return 0;
        };
        let Ok(consumer) = stream.get_consumer::<pull::Config>(CONSUMER).await else {
            return unacked(&self.js, &self.stream).await;
        };
        let Ok(mut batch) = consumer.fetch().max_messages(10_000).messages().await else {
            return 0;
        };
        let mut taken = Vec::new();
        while let Some(Ok(m)) = batch.next().await {
            taken.push(m);
        }
        for m in &taken {
            m.ack_with(AckKind::Nak(None)).await.expect("nak");
        }
        self.js.client().flush().await.expect("flush");
        taken.len() as u64
    }
}

impl Backend for Nats {
    type Queue = NatsStream;
    /// The server counts deliveries (`delivered` of the message's metadata).
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> NatsStream {
        let proxy = Proxy::start(ADDR).await;
        let mut s = NatsStream::create(self.js.clone(), "conf", proxy.addr().to_string()).await;
        s.proxy = Some(proxy);
        s
    }
}

impl TestQueue for NatsStream {
    fn bridge(&self) -> Bridge {
        Bridge::Ferry {
            source: self.source(),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        NatsStream::publish(self, messages).await;
    }

    async fn ready(&self) -> u64 {
        self.takeable().await
    }

    async fn remaining(&self) -> u64 {
        unacked(&self.js, &self.stream).await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        take_dead(&self.js, &format!("{}_DEAD_LETTERS", self.stream))
            .await
            .iter()
            .map(|m| DeadLettered {
                body: String::from_utf8_lossy(&m.payload).into_owned(),
                reason: format!(
                    "status {}: {}",
                    header(m, "Ferry-Status"),
                    header(m, "Ferry-Reason")
                ),
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy
            .as_ref()
            .expect("a stream on the local server, behind its proxy")
            .cut(down)
            .await;
    }

    fn max_unacked(&self, settings: &Settings) -> usize {
        // In flight plus two pulls' worth waiting for a slot.
        settings.concurrency + 2 * BATCH
    }
}

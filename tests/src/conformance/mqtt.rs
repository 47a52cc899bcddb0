//! MQTT 5 (the local Mosquitto) in the conformance suite, and what the `mqtt_*` tests
//! share: publishing, counting what a session holds, collecting dead letters, a private
//! broker to restart. The bridge reaches the broker through a [`Proxy`] so that the suite
//! can cut it off mid-stream; the tests' own clients go straight to it.
//!
//! MQTT cannot be asked how many messages a session holds. [`held`] counts them the only
//! way there is: it resumes the session under the bridge's client id (the bridge must be
//! stopped), takes everything the broker sends without acknowledging any of it, and leaves
//! the session as it found it (the broker sends those again, DUP flag set, to the next
//! connection).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::proxy::Proxy;

/// The local Mosquitto.
pub const ADDR: &str = "127.0.0.1:1883";

/// The `receive_maximum` of the suite's bridges: what one may hold unacknowledged.
pub const WINDOW: usize = 100;

/// The session expiry every test client of a bridge's session uses (as the bridge does).
const EXPIRY: u32 = 3600;

fn split(addr: &str) -> (String, u16) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    (host.to_owned(), port.parse().expect("port"))
}

/// Options of a test client on `addr`.
fn options(addr: &str, client_id: &str, persistent: bool, receive_maximum: u16) -> MqttOptions {
    let (host, port) = split(addr);
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(10))
        .set_clean_start(!persistent)
        .set_manual_acks(true);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = Some(if persistent { EXPIRY } else { 0 });
    props.receive_maximum = Some(receive_maximum);
    props.max_packet_size = Some(16 * 1024 * 1024);
    o.set_connect_properties(props);
    o
}

/// Panics with a clear message when no MQTT broker answers at `addr`.
pub async fn require_broker(addr: &str) {
    let (client, mut events) =
        AsyncClient::new(options(addr, &crate::unique("ping"), false, 10), 10);
    let connected = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => {
            let _ = client.try_disconnect();
            let _ = events.poll().await;
        }
        Ok(Err(e)) => panic!("no MQTT broker at {addr} ({e}); start it with `mosquitto -d` or run scripts/services.sh"),
        Err(_) => panic!("no MQTT broker answers at {addr}; start it with `mosquitto -d` or run scripts/services.sh"),
    }
}

/// One message a test publishes: topic, payload, user properties.
pub type Item = (String, String, Vec<(String, String)>);

/// Publishes each item with QoS 1, in order, and returns once the broker has
/// acknowledged every one.
pub async fn publish(addr: &str, items: &[Item]) {
    if items.is_empty() {
        return;
    }
    let mut o = options(addr, &crate::unique("pub"), false, 100);
    o.set_manual_acks(false);
    let (client, mut events) = AsyncClient::new(o, items.len() + 10);
    let want = items.len();
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if ack.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::NoMatchingSubscribers
                    {
                        return Err(
                            "no subscriber for the topic: the broker discarded the message"
                                .to_owned(),
                        );
                    }
                    acked += 1;
                    if acked == want {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    });
    for (topic, payload, user) in items {
        let props = PublishProperties {
            user_properties: user.clone(),
            ..PublishProperties::default()
        };
        client
            .publish_with_properties(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                payload.clone(),
                props,
            )
            .await
            .expect("queue a publish");
    }
    match tokio::time::timeout(Duration::from_secs(60), poller).await {
        Ok(Ok(Ok(()))) => {}
        other => panic!("publishing {want} messages to {addr} failed: {other:?}"),
    }
    let _ = client.try_disconnect();
}

/// How many messages the session `client_id` holds: resumes it (the bridge using it must
/// be stopped), counts what the broker sends within a quiet spell, acknowledges nothing,
/// and disconnects with the session kept.
pub async fn held(addr: &str, client_id: &str) -> u64 {
    let (client, mut events) = AsyncClient::new(options(addr, client_id, true, 65_535), 10);
    let mut seen = std::collections::BTreeSet::new();
    let mut connected = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let quiet = if connected {
            Duration::from_millis(700)
        } else {
            Duration::from_secs(5)
        };
        match tokio::time::timeout(quiet, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = true,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                seen.insert(p.pkid);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("counting the messages of session {client_id}: {e}"),
            Err(_) => break,
        }
        if tokio::time::Instant::now() > deadline {
            break;
        }
    }
    assert!(connected, "could not resume session {client_id} at {addr}");
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(e) = events.poll().await {
            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    seen.len() as u64
}

/// Ends the session `client_id` (connects with a clean start and no expiry).
pub async fn end_session(addr: &str, client_id: &str) {
    let (client, mut events) = AsyncClient::new(options(addr, client_id, false, 10), 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(e) = events.poll().await {
            if matches!(e, Event::Incoming(Packet::ConnAck(_))) {
                let _ = client.try_disconnect();
            }
            if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

/// A message taken from a dead-letter topic.
#[derive(Debug, Clone)]
pub struct Letter {
    /// The payload.
    pub body: String,
    /// Its user properties.
    pub properties: BTreeMap<String, String>,
}

/// A persistent subscriber of a dead-letter topic that acknowledges and keeps what comes:
/// MQTT keeps nothing for a topic no one subscribes to, so it subscribes before any
/// bridge runs.
pub struct DeadLetterTopic {
    letters: Arc<Mutex<Vec<Letter>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeadLetterTopic {
    /// Subscribes to `topic` at `addr` and waits until the broker has the subscription.
    pub async fn subscribe(addr: &str, topic: &str) -> Self {
        let mut o = options(addr, &crate::unique("dl"), false, 1000);
        o.set_manual_acks(false);
        let (client, mut events) = AsyncClient::new(o, 100);
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("queue the subscription");
        let letters: Arc<Mutex<Vec<Letter>>> = Arc::default();
        let kept = letters.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut ready = Some(ready_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let properties = p
                            .properties
                            .map(|props| props.user_properties.into_iter().collect())
                            .unwrap_or_default();
                        kept.lock().expect("letters").push(Letter {
                            body: String::from_utf8_lossy(&p.payload).into_owned(),
                            properties,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscribed to the dead-letter topic in time")
            .expect("subscriber alive");
        Self { letters, task }
    }

    /// Takes what arrived so far.
    pub fn take(&self) -> Vec<Letter> {
        std::mem::take(&mut *self.letters.lock().expect("letters"))
    }
}

impl Drop for DeadLetterTopic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `[routes.r.source]` body of a bridge on `topic/#` at `addr`, shared in group
/// `ferry`, dead letters to `dead_letter_topic`; `extra` adds keys.
pub fn source(
    addr: &str,
    topic: &str,
    client_id: &str,
    dead_letter_topic: &str,
    extra: &str,
) -> String {
    format!(
        "type = \"mqtt\"\nurl = \"mqtt://{addr}\"\ntopics = [\"{topic}/#\"]\nshared_group = \"ferry\"\n\
         client_id = \"{client_id}\"\nsession_expiry = \"{EXPIRY}s\"\nreceive_maximum = {WINDOW}\n\
         dead_letter_topic = \"{dead_letter_topic}\"\n{extra}\n"
    )
}

/// The topic of a message: `<base>/<key>` for a keyed one, so that the key is the topic
/// ferry orders by, else `<base>/m`.
pub fn topic_of(base: &str, m: &Outgoing) -> String {
    match &m.key {
        Some(k) => format!("{base}/{k}"),
        None => format!("{base}/m"),
    }
}

/// The local Mosquitto.
pub struct Mqtt;

impl Mqtt {
    /// Checks that the broker answers; panics with a clear message when it does not.
    pub async fn connect() -> Self {
        require_broker(ADDR).await;
        Self
    }
}

/// A topic tree `<base>/#` with its dead-letter topic, and the session of its bridge.
pub struct MqttTopic {
    base: String,
    client_id: String,
    dead_topic: String,
    dead: DeadLetterTopic,
    proxy: Proxy,
}

impl Backend for Mqtt {
    type Queue = MqttTopic;
    /// A copy the broker sends again carries the DUP flag, which ferry counts as a second
    /// delivery at least.
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> MqttTopic {
        let base = crate::unique("conf");
        let dead_topic = format!("dead/{base}");
        MqttTopic {
            client_id: format!("{base}-bridge"),
            dead: DeadLetterTopic::subscribe(ADDR, &dead_topic).await,
            dead_topic,
            base,
            proxy: Proxy::start(ADDR).await,
        }
    }
}

impl TestQueue for MqttTopic {
    fn bridge(&self) -> Bridge {
        Bridge::Ferry {
            source: source(
                &self.proxy.addr().to_string(),
                &self.base,
                &self.client_id,
                &self.dead_topic,
                "",
            ),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        let items: Vec<_> = messages
            .iter()
            .map(|m| (topic_of(&self.base, m), m.body.clone(), Vec::new()))
            .collect();
        publish(ADDR, &items).await;
    }

    /// What the bridge's session holds: all of it is ready for the bridge that comes back
    /// (the broker sends it at once on reconnect).
    async fn ready(&self) -> u64 {
        held(ADDR, &self.client_id).await
    }

    async fn remaining(&self) -> u64 {
        held(ADDR, &self.client_id).await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        self.dead
            .take()
            .into_iter()
            .map(|l| {
                let p = |k: &str| l.properties.get(k).cloned().unwrap_or_default();
                DeadLettered {
                    body: l.body.clone(),
                    reason: format!("status {}: {}", p("ferry_status"), p("ferry_reason")),
                }
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy.cut(down).await;
    }

    fn max_unacked(&self, _settings: &Settings) -> usize {
        // The broker sends no more than the receive window unacknowledged.
        WINDOW
    }
}

/// A private Mosquitto on a free loopback port, with persistence (sessions and their
/// messages survive its restart), for the tests that restart the broker.
pub struct PrivateBroker {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts it and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with("allow_anonymous true\n", |_| String::new()).await
    }

    /// Starts it with these access lines, and more lines made from its folder (an ACL
    /// file, say), and waits until it answers.
    pub async fn start_with(access: &str, more: impl FnOnce(&std::path::Path) -> String) -> Self {
        let port = crate::free_port();
        let dir = crate::ferry::scratch("mosquitto");
        std::fs::create_dir_all(&dir).expect("broker dir");
        // Mosquitto started as root drops to its own user, which must write its database
        // (and read the files) there.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .expect("broker dir permissions");
        }
        let config = format!(
            "listener {port} 127.0.0.1\n{access}persistence true\n\
             persistence_location {}/\nautosave_interval 1\nmax_queued_messages 0\n{}",
            dir.display(),
            more(&dir)
        );
        std::fs::write(dir.join("mosquitto.conf"), config).expect("broker config");
        let mut broker = Self {
            addr: format!("127.0.0.1:{port}"),
            dir,
            child: None,
        };
        broker.run().await;
        broker
    }

    async fn run(&mut self) {
        let program = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|p| !p.contains('/') || std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(program)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto ({e}): install the mosquitto package")
            });
        self.child = Some(child);
        let up = crate::wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(&self.addr).is_ok()
        })
        .await;
        assert!(up, "the private mosquitto did not come up on {}", self.addr);
    }

    /// Stops it (SIGTERM: it saves its state), waits `down`, starts it again.
    pub async fn restart(&mut self, down: Duration) {
        self.stop();
        tokio::time::sleep(down).await;
        self.run().await;
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

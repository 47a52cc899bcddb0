//! MQTT 5: the native drain rate (one client resuming a persistent session, QoS 1, a
//! `PUBACK` for each message as it arrives; no HTTP) against ferry end to end into the
//! counting sink, both with the same receive window.
//!
//! The bench starts its own Mosquitto on a free loopback port: an ordinary one keeps at
//! most 1,000 messages for a session that is away (`max_queued_messages`) and drops the
//! rest, and a phase fills the session before it drains it. Each phase makes a fresh
//! session: it subscribes under a new client id, disconnects keeping the session,
//! publishes `--messages` to the topic (the broker queues them for the session), then the
//! consumer (the plain one or ferry) resumes the session and takes them. There are no
//! paced phases.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

use crate::latency::{Pace, Percentiles};
use crate::sweep::{measure_ferry, sweep, Case, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, unique, Args};

/// Unacknowledged messages the broker may have out to a consumer (MQTT's Receive Maximum),
/// for the plain consumer and ferry (`receive_maximum`) alike.
const WINDOW: u16 = 1_000;

/// How long the broker keeps a phase's session while nobody is connected to it.
const EXPIRY_SECS: u32 = 3_600;

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let broker = Broker::start()?;
    sweep(args, &Mqtt { port: broker.port }).await
}

/// A Mosquitto of this run, stopped when dropped.
struct Broker {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Broker {
    fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir =
            std::env::temp_dir().join(format!("ferry-bench-mosquitto-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("mosquitto.conf");
        // Unlimited queues and in-flight windows: the session holds every message of a
        // phase, and only the clients' receive maximum limits what is in flight.
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 0\n"
            ),
        )?;
        let program = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(program)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {program} (install the mosquitto package)"))?;
        let mut broker = Self { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = broker.child.try_wait()? {
                bail!("mosquitto exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not come up on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Mqtt {
    port: u16,
}

impl Mqtt {
    /// A client of the bench's broker: a persistent session under `client_id`, manual acks.
    fn client(&self, client_id: &str, persistent: bool) -> (AsyncClient, EventLoop) {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", self.port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(!persistent)
            .set_manual_acks(true)
            .set_max_packet_size(Some(16 * 1024 * 1024));
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(if persistent { EXPIRY_SECS } else { 0 });
        props.receive_maximum = Some(WINDOW);
        props.max_packet_size = Some(16 * 1024 * 1024);
        o.set_connect_properties(props);
        AsyncClient::new(o, usize::from(WINDOW) + 16)
    }

    /// A fresh session subscribed (QoS 1) to a fresh topic and holding `args.messages()`
    /// messages of `size` bytes; returns its client id and topic.
    async fn filled(&self, prefix: &str, args: &Args, size: usize) -> Result<(String, String)> {
        let id = unique(prefix);
        let topic = format!("bench/{id}");
        let (client, mut events) = self.client(&id, true);
        client
            .subscribe(topic.clone(), QoS::AtLeastOnce)
            .await
            .context("subscribing")?;
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
                break;
            }
        }
        disconnect(&client, &mut events).await;

        let (publisher, mut events) = self.client(&unique("bench-pub"), false);
        let want = args.messages();
        let acks = tokio::spawn(async move {
            let mut acked = 0;
            while acked < want {
                if let Event::Incoming(Packet::PubAck(_)) = events.poll().await? {
                    acked += 1;
                }
            }
            anyhow::Ok(events)
        });
        let body = bytes::Bytes::from(vec![b'x'; size]);
        for _ in 0..want {
            let sent = publisher
                .publish(topic.clone(), QoS::AtLeastOnce, false, body.clone())
                .await;
            // The event loop only goes away on an error: that error is the one to show.
            if sent.is_err() {
                break;
            }
        }
        let mut events = acks.await?.context("publishing the phase's messages")?;
        disconnect(&publisher, &mut events).await;
        Ok((id, topic))
    }
}

/// Disconnects and lets the event loop send it (with any acks still queued before it).
async fn disconnect(client: &AsyncClient, events: &mut EventLoop) {
    if client.disconnect().await.is_err() {
        return;
    }
    let until_sent = async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), until_sent).await;
}

impl Phases for Mqtt {
    fn title(&self, args: &Args) -> String {
        format!(
            "MQTT 5 (Mosquitto, QoS 1, receive maximum {WINDOW}), {} messages per phase, {} round(s)",
            args.messages(),
            args.rounds()
        )
    }

    async fn native(&self, args: &Args, size: usize, _which: usize) -> Result<f64> {
        let (id, _topic) = self.filled("bench-native", args, size).await?;
        let (client, mut events) = self.client(&id, true);
        // The event loop hands out what it has read before it takes the next request, so
        // the acks are queued from a task of their own while this one keeps polling.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let acker = {
            let client = client.clone();
            tokio::spawn(async move {
                while let Some(publish) = rx.recv().await {
                    client.ack(&publish).await?;
                }
                anyhow::Ok(())
            })
        };
        let mut started = None;
        let mut count = 0u64;
        while count < args.messages() {
            let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .with_context(|| format!("the session ran dry after {count} messages"))??;
            if let Event::Incoming(Packet::Publish(publish)) = event {
                started.get_or_insert_with(Instant::now);
                tx.send(publish)?;
                count += 1;
            }
        }
        drop(tx);
        // The last acks leave before the disconnect does.
        let draining = async {
            while !acker.is_finished() {
                events.poll().await?;
            }
            anyhow::Ok(())
        };
        draining.await?;
        acker.await??;
        disconnect(&client, &mut events).await;
        Ok(started.map_or(0.0, |s| s.elapsed().as_secs_f64()))
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        let (id, topic) = self.filled("bench-ferry", args, case.size).await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let sink = counting_sink(delivered.clone(), case.latency()).await?;
        let source = format!(
            "type = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\ntopics = [\"{topic}\"]\n\
             client_id = \"{id}\"\nsession_expiry = \"{EXPIRY_SECS}s\"\nreceive_maximum = {WINDOW}\n\
             dead_letters = \"drop\"\n",
            self.port
        );
        let (child, pid) = spawn_ferry(args, &source, sink, case.setting)?;
        measure_ferry(child, pid, delivered, args.messages()).await
    }

    fn paced(&self) -> bool {
        false
    }

    async fn native_paced(&self, _args: &Args, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phases on MQTT")
    }

    async fn ferry_paced(&self, _args: &Args, _case: &Case, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phases on MQTT")
    }
}

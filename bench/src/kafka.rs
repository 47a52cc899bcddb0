//! Kafka: the native drain rate (a consumer-group member that only stores and
//! auto-commits offsets, no HTTP) against ferry end to end into the counting sink, on
//! librdkafka's mock cluster in this process (the real Kafka protocol on a loopback
//! port). Each phase gets a fresh topic filled with all its messages first.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::sweep::{measure_ferry, sweep, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, Args};

/// Partitions per topic: parallelism for both sides.
const PARTITIONS: i32 = 4;

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let mock = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let bootstrap = mock.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    sweep(
        args,
        &Kafka {
            mock,
            bootstrap,
            producer,
        },
    )
    .await
}

struct Kafka {
    mock: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
    producer: FutureProducer,
}

fn unique(prefix: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!("{prefix}-{}-{now}", std::process::id())
}

impl Kafka {
    /// A fresh topic holding `messages` payloads of `size` bytes.
    async fn filled_topic(&self, args: &Args, prefix: &str) -> Result<String> {
        let topic = unique(prefix);
        self.mock.create_topic(&topic, PARTITIONS, 1)?;
        let payload = vec![b'x'; args.size];
        let mut pending = Vec::new();
        for _ in 0..args.messages() {
            loop {
                match self
                    .producer
                    .send_result(FutureRecord::<(), _>::to(&topic).payload(&payload))
                {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            if pending.len() >= 10_000 {
                for d in pending.drain(..) {
                    d.await?.map_err(|(e, _)| e)?;
                }
            }
        }
        for d in pending {
            d.await?.map_err(|(e, _)| e)?;
        }
        Ok(topic)
    }
}

impl Phases for Kafka {
    fn title(&self, args: &Args) -> String {
        format!(
            "Kafka (mock cluster, {PARTITIONS} partitions), {} messages of {} B per phase, {} round(s)",
            args.messages(),
            args.size,
            args.rounds
        )
    }

    async fn native(&self, args: &Args) -> Result<f64> {
        let topic = self.filled_topic(args, "bench-native").await?;
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique("bench-native"))
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&topic])?;
        let mut started = None;
        let mut count = 0u64;
        while count < args.messages() {
            let message = consumer.recv().await?;
            started.get_or_insert_with(Instant::now);
            drop(message);
            count += 1;
        }
        Ok(started.map_or(0.0, |s| s.elapsed().as_secs_f64()))
    }

    async fn ferry(&self, args: &Args, concurrency: usize, latency_ms: u64) -> Result<FerryRun> {
        let topic = self.filled_topic(args, "bench-ferry").await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let sink = counting_sink(delivered.clone(), Duration::from_millis(latency_ms)).await?;
        let source = format!(
            "type = \"kafka\"\nbrokers = \"{}\"\ngroup_id = \"{}\"\ntopics = [\"{topic}\"]\n",
            self.bootstrap,
            unique("bench-ferry")
        );
        let (child, pid) = spawn_ferry(args, &source, sink, concurrency)?;
        measure_ferry(child, pid, delivered, args.messages()).await
    }
}

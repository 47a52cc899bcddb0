//! Kafka: the native drain rate (a consumer-group member that only commits, asynchronously
//! and in batches as ferry does, no HTTP) against ferry end to end into the counting sink, on
//! librdkafka's mock cluster in this process (the real Kafka protocol on a loopback
//! port). Each drain phase gets a fresh topic and publishes into it while it drains, at most
//! [`WINDOW_BYTES`] ahead of the consumer: the mock cluster keeps only the last 5 MiB of each
//! partition (fixed in librdkafka), so a topic filled with everything first lost its oldest
//! messages and the drain never finished. The paced (latency) phases start on an empty
//! topic and publish at their pace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::latency::{paced, timing_sink, Pace, Percentiles, Recorder};
use crate::sweep::{measure_ferry, sweep, Case, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, Args};

/// Partitions per topic: parallelism for both sides.
const PARTITIONS: i32 = 4;

/// Bytes published and not yet consumed, at most: below the 5 MiB the mock cluster keeps of
/// a partition even if every outstanding message went to the same one.
const WINDOW_BYTES: usize = 4 * 1024 * 1024;

/// librdkafka's `fetch.wait.max.ms`, for the native consumer and ferry alike. The mock
/// cluster does not answer a waiting fetch when a message arrives, so with the default
/// (500 ms) a paced message waits out the fetch, and a drain phase, which publishes within a
/// window, waits half a second per window: the figures would be librdkafka's poll interval,
/// not ferry's.
const FETCH_WAIT_MS: &str = "5";

/// How often the native consumer commits, as ferry's Kafka source does.
const COMMIT_EVERY: Duration = Duration::from_millis(100);

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let mock = MockCluster::new(1).context("starting librdkafka's mock cluster")?;
    let bootstrap = mock.bootstrap_servers();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    // Paced messages go out one by one: no linger adding to their latency.
    let paced_producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "0")
        .create()?;
    sweep(
        args,
        &Kafka {
            mock,
            bootstrap,
            producer,
            paced_producer,
        },
    )
    .await
}

struct Kafka {
    mock: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
    producer: FutureProducer,
    paced_producer: FutureProducer,
}

fn unique(prefix: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!("{prefix}-{}-{now}", std::process::id())
}

impl Kafka {
    /// Publishes `args.messages()` payloads of `size` bytes into `topic`, staying at most
    /// [`WINDOW_BYTES`] ahead of `consumed`.
    fn publish(
        &self,
        topic: &str,
        args: &Args,
        size: usize,
        consumed: Arc<AtomicU64>,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let (producer, topic, total) = (self.producer.clone(), topic.to_owned(), args.messages());
        let window = (WINDOW_BYTES / size.max(1)).max(1) as u64;
        tokio::spawn(async move {
            let payload = vec![b'x'; size];
            let mut pending = Vec::new();
            for sent in 0..total {
                while sent.saturating_sub(consumed.load(Ordering::Relaxed)) >= window {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                loop {
                    match producer.send_result(FutureRecord::<(), _>::to(&topic).payload(&payload))
                    {
                        Ok(delivery) => {
                            pending.push(delivery);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
                if pending.len() >= 1_000 {
                    for d in pending.drain(..) {
                        d.await?.map_err(|(e, _)| e)?;
                    }
                }
            }
            for d in pending {
                d.await?.map_err(|(e, _)| e)?;
            }
            Ok(())
        })
    }

    /// A fresh topic with nothing in it.
    fn empty_topic(&self, prefix: &str) -> Result<String> {
        let topic = unique(prefix);
        self.mock.create_topic(&topic, PARTITIONS, 1)?;
        Ok(topic)
    }

    /// A consumer-group member of its own group on `topic`, from the earliest offset, that
    /// commits what it was handed itself, as ferry does (no automatic offset store).
    fn consumer(&self, topic: &str, group: &str, fetch_wait_ms: &str) -> Result<StreamConsumer> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", unique(group))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", fetch_wait_ms)
            .create()?;
        consumer.subscribe(&[topic])?;
        Ok(consumer)
    }

    /// Commits the offsets after the records handed out since the last commit, without
    /// waiting for the broker's answer.
    fn commit(
        &self,
        consumer: &StreamConsumer,
        topic: &str,
        next: &mut HashMap<i32, i64>,
    ) -> Result<()> {
        if next.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in next.drain() {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        consumer.commit(&list, CommitMode::Async)?;
        Ok(())
    }

    /// Publishes a paced phase into `topic`; each send is handed to librdkafka at once.
    async fn publish_paced(
        &self,
        topic: &str,
        pace: Pace,
        recorder: &Recorder,
    ) -> Result<Percentiles> {
        let producer = &self.paced_producer;
        paced(pace, recorder, |payload| async move {
            producer
                .send_result(FutureRecord::<(), _>::to(topic).payload(&payload))
                .map_err(|(e, _)| e)?;
            Ok::<_, anyhow::Error>(())
        })
        .await
    }

    /// ferry's source section for `topic`, in a group of its own.
    fn source(&self, topic: &str) -> String {
        format!(
            "type = \"kafka\"\nbrokers = \"{}\"\ngroup_id = \"{}\"\ntopics = [\"{topic}\"]\n\
             dead_letters = \"drop\"\n\
             librdkafka = {{ \"fetch.wait.max.ms\" = \"{FETCH_WAIT_MS}\" }}\n",
            self.bootstrap,
            unique("bench-ferry")
        )
    }
}

impl Phases for Kafka {
    fn title(&self, args: &Args) -> String {
        format!(
            "Kafka (mock cluster, {PARTITIONS} partitions), {} messages per phase, {} round(s)",
            args.messages(),
            args.rounds()
        )
    }

    /// A consumer that keeps the offset of each record it was handed and commits them
    /// asynchronously every 100 ms, as ferry commits what it delivered.
    fn natives(&self) -> &'static [&'static str] {
        &["drain with async batch commits"]
    }

    async fn native(&self, args: &Args, size: usize, _which: usize) -> Result<f64> {
        let topic = self.empty_topic("bench-native")?;
        let consumer = self.consumer(&topic, "bench-native", FETCH_WAIT_MS)?;
        let consumed = Arc::new(AtomicU64::new(0));
        let publisher = self.publish(&topic, args, size, consumed.clone());
        let mut started = None;
        let mut count = 0u64;
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut commit = tokio::time::interval(COMMIT_EVERY);
        commit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while count < args.messages() {
            tokio::select! {
                biased;
                _ = commit.tick() => self.commit(&consumer, &topic, &mut next)?,
                message = consumer.recv() => {
                    let message = message?;
                    started.get_or_insert_with(Instant::now);
                    next.insert(message.partition(), message.offset() + 1);
                    count += 1;
                    consumed.store(count, Ordering::Relaxed);
                }
            }
        }
        self.commit(&consumer, &topic, &mut next)?;
        let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        publisher.await??;
        Ok(secs)
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        let topic = self.empty_topic("bench-ferry")?;
        let delivered = Arc::new(AtomicU64::new(0));
        let sink = counting_sink(delivered.clone(), case.latency()).await?;
        let (child, pid) = spawn_ferry(args, &self.source(&topic), sink, case.setting)?;
        let publisher = self.publish(&topic, args, case.size, delivered.clone());
        let run = measure_ferry(child, pid, delivered, args.messages()).await?;
        publisher.await??;
        Ok(run)
    }

    async fn native_paced(&self, _args: &Args, pace: Pace) -> Result<Percentiles> {
        let topic = self.empty_topic("bench-native-paced")?;
        let consumer = self.consumer(&topic, "bench-native-paced", FETCH_WAIT_MS)?;
        let recorder = Recorder::default();
        let consuming = {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                while let Ok(message) = consumer.recv().await {
                    recorder.record(message.payload().unwrap_or_default());
                }
            })
        };
        let result = self.publish_paced(&topic, pace, &recorder).await;
        // Every paced message has been recorded (or waited for): the consumer may go.
        consuming.abort();
        result
    }

    async fn ferry_paced(&self, args: &Args, case: &Case, pace: Pace) -> Result<Percentiles> {
        let topic = self.empty_topic("bench-ferry-paced")?;
        let recorder = Recorder::default();
        let sink = timing_sink(recorder.clone(), case.latency()).await?;
        let (child, pid) = spawn_ferry(args, &self.source(&topic), sink, case.setting)?;
        let result = self.publish_paced(&topic, pace, &recorder).await;
        crate::stop_ferry(child, pid)?;
        result
    }
}

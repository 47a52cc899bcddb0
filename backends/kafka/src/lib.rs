//! The Kafka source of ferry.
//!
//! One consumer-group member per route. Deliveries finish out of order, so offsets are
//! committed per partition only up to the lowest record still unfinished: asynchronously
//! as deliveries finish, synchronously when partitions are revoked and at shutdown. A
//! rebalance or crash can therefore make a record be read twice, never skipped. Retries
//! wait in ferry (Kafka cannot hide one record); dead letters are produced to
//! `dead_letter_topic` with the reason in headers before their offset counts as done.
//! librdkafka is polled by a thread of its own (see [`poller`]), so neither a full or
//! paused route nor a rebalance blocks the async workers or costs the group membership.

mod context;
mod convert;
mod offsets;
mod poller;
mod settle;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Delivery, Source, SourceContext, SourceError};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use convert::KeyFrom;

use context::FerryContext;
use offsets::Offsets;
use poller::Poller;
use settle::DeadLetters;

/// Where a route's dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterTarget {
    /// Produced to this topic, then committed.
    Topic(String),
    /// Logged, counted and dropped (`dead_letters = "drop"`).
    Drop,
}

impl DeadLetterTarget {
    fn topic(&self) -> Option<&str> {
        match self {
            DeadLetterTarget::Topic(topic) => Some(topic),
            DeadLetterTarget::Drop => None,
        }
    }
}

/// The `[routes.x.source]` section of a `kafka` route, validated.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port,host:port`.
    pub brokers: String,
    /// The consumer group; replicas with the same group share the partitions.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Where dead letters go.
    pub dead_letters: DeadLetterTarget,
    /// The route's `shutdown_grace`: at shutdown a dead letter waits that long at most
    /// for the broker, whatever the dead-letter topic does.
    pub shutdown_grace: Duration,
    /// Extra librdkafka settings (`security.protocol`, `sasl.password`, ...); values may
    /// hold secrets and are never logged.
    pub librdkafka: BTreeMap<String, String>,
    /// What `ordering = "key"` orders by.
    pub key_from: KeyFrom,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("dead_letters", &self.dead_letters)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("librdkafka", &self.librdkafka.keys().collect::<Vec<_>>())
            .field("key_from", &self.key_from)
            .finish()
    }
}

impl KafkaConfig {
    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // A new group starts from the oldest record rather than skipping what was
        // published before its first start; settings below may say otherwise.
        c.set("auto.offset.reset", "earliest");
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set_log_level(RDKafkaLogLevel::Warning);
        c
    }

    /// The dead-letter producer shares the security settings; librdkafka ignores the
    /// consumer-only ones (with a debug-level warning).
    fn producer(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set_log_level(RDKafkaLogLevel::Error);
        c
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaSourceError {
    /// librdkafka refused a setting.
    #[error("librdkafka: {0}")]
    Settings(String),
    /// No broker answered.
    #[error("brokers: cannot reach {brokers}: {detail}")]
    Unreachable {
        /// The bootstrap list.
        brokers: String,
        /// What librdkafka said.
        detail: String,
    },
    /// A topic does not exist.
    #[error("{key}: topic {topic:?} does not exist on {brokers}")]
    NoTopic {
        /// `topics` or `dead_letter_topic`.
        key: &'static str,
        /// The topic.
        topic: String,
        /// The bootstrap list.
        brokers: String,
    },
}

impl KafkaSourceError {
    /// True when the configuration is wrong rather than the brokers unreachable.
    pub fn is_config(&self) -> bool {
        !matches!(self, KafkaSourceError::Unreachable { .. })
    }
}

/// A checked Kafka source; build it with [`KafkaSource::connect`].
pub struct KafkaSource {
    config: Arc<KafkaConfig>,
    source: Arc<str>,
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
}

fn fatal(what: &str, e: &impl std::fmt::Display) -> SourceError {
    SourceError::Fatal {
        what: what.to_owned(),
        detail: one_line(e),
    }
}

impl KafkaSource {
    /// Reaches the brokers and checks that every topic exists, so a typo is reported at
    /// start rather than as a consumer that silently receives nothing.
    pub async fn connect(config: KafkaConfig) -> Result<Self, KafkaSourceError> {
        let checked = config.clone();
        tokio::task::spawn_blocking(move || check(&checked))
            .await
            .map_err(|e| KafkaSourceError::Settings(e.to_string()))??;
        Ok(Self {
            source: Arc::from(config.topics.join(",")),
            config: Arc::new(config),
        })
    }
}

fn check(config: &KafkaConfig) -> Result<(), KafkaSourceError> {
    let consumer: BaseConsumer<context::Quiet> = config
        .client()
        .create_with_context(context::Quiet)
        .map_err(|e| KafkaSourceError::Settings(one_line(&e)))?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| KafkaSourceError::Unreachable {
            brokers: config.brokers.clone(),
            detail: one_line(&e),
        })?;
    let exists = |t: &str| {
        metadata
            .topics()
            .iter()
            .any(|m| m.name() == t && m.error().is_none())
    };
    let wanted = config.topics.iter().map(|t| ("topics", t.as_str())).chain(
        config
            .dead_letters
            .topic()
            .map(|t| ("dead_letter_topic", t)),
    );
    for (key, topic) in wanted {
        if !exists(topic) {
            return Err(KafkaSourceError::NoTopic {
                key,
                topic: topic.to_owned(),
                brokers: config.brokers.clone(),
            });
        }
    }
    Ok(())
}

/// How often finished offsets are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(100);

impl Source for KafkaSource {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    /// Kafka's default largest record batch (`message.max.bytes`, about 1 MiB).
    fn max_message_bytes(&self) -> Option<usize> {
        Some(1024 * 1024)
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let offsets = Arc::new(Offsets::default());
        let context = FerryContext {
            offsets: offsets.clone(),
            source: ctx.clone(),
            down: AtomicBool::new(false),
        };
        let config = self.config.clone();
        // librdkafka's calls wait on its threads and the network: never on an async worker.
        let (consumer, producer) = tokio::task::spawn_blocking(move || clients(&config, context))
            .await
            .map_err(|e| fatal("creating the consumer", &e))??;
        let keep_original = producer.is_some();
        ctx.set_connected(true);
        info!(route = %ctx.route, topics = %self.source, group = %self.config.group_id, "consuming");

        let (dead_tx, dead_rx) = mpsc::unbounded_channel();
        let give_up = CancellationToken::new();
        let dead_letters = tokio::spawn(
            DeadLetters {
                producer,
                offsets: offsets.clone(),
                ctx: ctx.clone(),
                give_up: give_up.clone(),
            }
            .run(dead_rx),
        );
        let stop = CancellationToken::new();
        let committer = tokio::spawn(commit_loop(consumer.clone(), offsets.clone(), stop.clone()));
        let lag = tokio::spawn(poll_lag(
            consumer.clone(),
            offsets.clone(),
            ctx.clone(),
            stop.clone(),
        ));
        let handed_over = CancellationToken::new();
        let stop_polling = CancellationToken::new();
        let polling = tokio::task::spawn_blocking({
            let poller = Poller {
                consumer: consumer.clone(),
                offsets: offsets.clone(),
                source: self.source.clone(),
                key_from: self.config.key_from,
                keep_original,
                shutdown: ctx.shutdown.clone(),
                handed_over: handed_over.clone(),
                stop: stop_polling.clone(),
                runtime: tokio::runtime::Handle::current(),
            };
            move || poller.run(out, dead_tx)
        });

        // Shutdown: every handle settles (in-flight ones within the grace, the rest as
        // releases that stay uncommitted), dead letters finish or are given up at the end
        // of the grace, then one last commit. The poller keeps serving the group meanwhile.
        handed_over.cancelled().await;
        let grace = self.config.shutdown_grace;
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            give_up.cancel();
        });
        let producer = dead_letters.await.ok().flatten();
        deadline.abort();
        stop.cancel();
        let _ = committer.await;
        lag.abort();
        let positions = offsets.due();
        if !positions.is_empty() {
            let consumer = consumer.clone();
            let committed = tokio::task::spawn_blocking(move || {
                consumer.commit(&context::list(&positions), CommitMode::Sync)
            })
            .await;
            if let Ok(Err(e)) = committed {
                warn!(route = %ctx.route, error = %one_line(&e),
                    "final commit failed; records after the last commit will be read again");
            }
        }
        stop_polling.cancel();
        let _ = polling.await;
        ctx.set_connected(false);
        // Leaving the group here (rather than when the route's memory is freed) hands the
        // partitions to the other members at once. Closing the producer purges and waits.
        tokio::task::spawn_blocking(move || {
            drop(producer);
            consumer.unsubscribe();
            drop(consumer);
        })
        .await
        .map_err(|e| fatal("leaving the group", &e))?;
        Ok(())
    }
}

/// The consumer, shared by the receive thread, the commit loop and the lag gauge.
type SharedConsumer = Arc<BaseConsumer<FerryContext>>;

/// The route's consumer, subscribed, and its dead-letter producer (none when dead
/// letters are dropped).
fn clients(
    config: &KafkaConfig,
    context: FerryContext,
) -> Result<(SharedConsumer, Option<settle::Producer>), SourceError> {
    let consumer: BaseConsumer<FerryContext> = config
        .client()
        .create_with_context(context)
        .map_err(|e| fatal("creating the consumer", &e))?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| fatal("subscribing", &e))?;
    let producer = match config.dead_letters.topic() {
        Some(topic) => {
            let producer: FutureProducer<context::Quiet> = config
                .producer()
                .create_with_context(context::Quiet)
                .map_err(|e| fatal("creating the dead-letter producer", &e))?;
            Some((producer, topic.to_owned()))
        }
        None => None,
    };
    Ok((Arc::new(consumer), producer))
}

/// Commits finished offsets as they move. Each commit waits for the broker's answer (on
/// a blocking thread), so a refused commit is known at once and retried with the next one.
async fn commit_loop(consumer: SharedConsumer, offsets: Arc<Offsets>, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(COMMIT_EVERY) => {}
        }
        let positions = offsets.due();
        if positions.is_empty() {
            continue;
        }
        let list = context::list(&positions);
        let committer = consumer.clone();
        let result = tokio::task::spawn_blocking(move || committer.commit(&list, CommitMode::Sync))
            .await
            .unwrap_or(Err(KafkaError::Canceled));
        match result {
            Ok(()) => {
                consumer.context().reached();
                if std::mem::take(&mut failing) {
                    info!(route = %consumer.context().source.route, "offset commits succeed again");
                }
            }
            Err(e) => {
                offsets.uncommit(&positions);
                if !std::mem::replace(&mut failing, true) {
                    warn!(route = %consumer.context().source.route, error = %one_line(&e),
                        "offset commit failed; retrying with the next (records after the last commit may be read again)");
                }
            }
        }
    }
}

/// Keeps `ferry_source_backlog` at the group's lag over the partitions this member holds.
async fn poll_lag(
    consumer: SharedConsumer,
    offsets: Arc<Offsets>,
    ctx: SourceContext,
    stop: CancellationToken,
) {
    loop {
        let consumer = consumer.clone();
        let positions = offsets.positions();
        let lag = tokio::task::spawn_blocking(move || {
            let mut lag = 0i64;
            let committed = consumer.committed(Duration::from_secs(2)).ok();
            for ((topic, partition), position) in positions {
                let Ok((low, high)) =
                    consumer.fetch_watermarks(&topic, partition, Duration::from_secs(2))
                else {
                    return None;
                };
                let from = position
                    .or_else(|| {
                        let tpl = committed.as_ref()?;
                        match tpl.find_partition(&topic, partition)?.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        }
                    })
                    .unwrap_or(low);
                lag += (high - from).max(0);
            }
            Some(lag)
        })
        .await;
        if let Ok(Some(lag)) = lag {
            ctx.backlog.set(lag);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

//! The Redis Streams source of ferry.
//!
//! Each replica reads a stream as one consumer of a consumer group, so replicas share the
//! stream. An entry is acknowledged (`XACK`, batched by a settling task) only once the
//! engine settles it; until then it is pending for this consumer. What is pending is never
//! lost:
//! - at start a consumer reads its own pending entries first (a previous run's), then new
//!   ones;
//! - entries idle longer than `claim_idle` (a consumer that died, or one that restarted
//!   under a new name) are taken over with `XAUTOCLAIM` by any replica, periodically;
//! - entries ferry holds are kept from looking idle (a lease, renewed by resetting their
//!   idle time), so a slow endpoint does not get them claimed away from under it.
//!
//! Redis has no delayed redelivery, so retries wait in ferry. Dead letters are `XADD`ed to
//! a dead-letter stream and acknowledged in one atomic script.

mod backlog;
mod convert;
mod dead_letter;
mod lease;
mod link;
mod read;
mod settle;
mod setup;

pub use dead_letter::DEAD_LETTER_FIELDS;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Delivery, Source, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::link::Link;
use crate::settle::State;

/// The `[routes.x.source]` section of a `redis` route, validated.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; holds a secret, never logged as is.
    pub url: String,
    /// The stream key.
    pub stream: String,
    /// The consumer group the replicas share.
    pub group: String,
    /// This replica's consumer name; [`default_consumer`] when `None`.
    pub consumer: Option<String>,
    /// Create the stream and the group when missing (at `start`) instead of refusing.
    pub declare: bool,
    /// Where a group created by `declare` starts.
    pub start: GroupStart,
    /// The entry field that holds the payload.
    pub body_field: String,
    /// The entry field that holds the ordering key, when there is one.
    pub key_field: Option<String>,
    /// How long an entry may stay pending without a sign of life before any consumer of the
    /// group takes it over; longer than the longest delivery should ever take.
    pub claim_idle: Duration,
    /// Entries asked for per `XREADGROUP` (`COUNT`).
    pub batch_size: usize,
    /// Where dead letters go.
    pub dead_letters: DeadLetters,
}

/// Where a group made by `declare = true` starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// `0`: every entry already in the stream, then new ones.
    Oldest,
    /// `$`: only entries added from now on.
    New,
}

impl GroupStart {
    fn id(self) -> &'static str {
        match self {
            GroupStart::Oldest => "0",
            GroupStart::New => "$",
        }
    }
}

/// Where a dead-lettered entry goes. There is no default: dropping must be a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// `XADD`ed to this stream (with the original fields and ferry's), acknowledged in
    /// the same atomic script.
    Stream {
        /// The dead-letter stream key.
        stream: String,
        /// `MAXLEN ~ n` on each `XADD`, when set: the stream keeps about that many.
        max_len: Option<u64>,
    },
    /// Acknowledged and discarded, logged and counted as dropped.
    Drop,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &ferry_core::redact::url(&self.url))
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("consumer", &self.consumer)
            .field("declare", &self.declare)
            .field("start", &self.start)
            .field("body_field", &self.body_field)
            .field("key_field", &self.key_field)
            .field("claim_idle", &self.claim_idle)
            .field("batch_size", &self.batch_size)
            .field("dead_letters", &self.dead_letters)
            .finish()
    }
}

/// The consumer name of a replica that does not set one: the host name, which in a
/// Kubernetes pod is the pod's name (`HOSTNAME`), else `ferry`.
pub fn default_consumer() -> String {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_kernel = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    from_env
        .or_else(from_kernel)
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ferry".to_owned())
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// The URL is not one the client takes.
    #[error("url: {0}")]
    Url(String),
    /// Redis could not be reached (or did not answer in time).
    #[error("url: cannot reach {url}: {detail}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// Redis refused the login or a command for lack of permission.
    #[error("url: {url} refused: {detail}")]
    Refused {
        /// The URL, password redacted.
        url: String,
        /// What Redis said.
        detail: String,
    },
    /// A key is missing or holds something else than a stream, or the group is missing.
    #[error("{key}: {detail}")]
    Setup {
        /// The configuration key at fault (`stream`, `group`, `dead_letter_stream`).
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl RedisError {
    /// True when the configuration is wrong rather than Redis unreachable.
    pub fn is_config(&self) -> bool {
        !matches!(self, RedisError::Unreachable { .. })
    }
}

/// A connected Redis Streams source; build it with [`RedisSource::connect`].
pub struct RedisSource {
    config: Arc<RedisConfig>,
    consumer: Arc<str>,
    client: redis::Client,
}

impl RedisSource {
    /// Connects and checks the stream, the group and the dead-letter stream (creating the
    /// first two with `declare`), so a wrong setting is one line at start.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisError> {
        let client = setup::check(&config).await?;
        let consumer = config.consumer.clone().unwrap_or_else(default_consumer);
        Ok(Self {
            consumer: Arc::from(consumer),
            config: Arc::new(config),
            client,
        })
    }

    /// This replica's consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }
}

/// How long one Redis call may take before its connection counts as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The wait before retry number `failures`: 100 ms doubling up to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(5))
}

impl Source for RedisSource {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// Two read batches: one in the engine's hands while the next is read.
    fn buffer(&self) -> usize {
        2 * self.config.batch_size
    }

    /// Redis's largest string (`proto-max-bulk-len`, 512 MiB).
    fn max_message_bytes(&self) -> Option<usize> {
        Some(512 * 1024 * 1024)
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let state = Arc::new(State::new(self.config.clone(), self.consumer.clone()));
        let link = |timeout| Link::new(self.client.clone(), timeout);
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (dead, dead_rx) = mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(settle::run(
            link(CALL_TIMEOUT),
            state.clone(),
            ops_rx,
            ctx.clone(),
        ));
        tasks.spawn(dead_letter::run(
            link(CALL_TIMEOUT),
            state.clone(),
            dead_rx,
            ctx.clone(),
        ));
        // Renewals and the backlog gauge stop with the reader's last handle, not at the
        // shutdown signal: in-flight deliveries finish within the grace, held all along.
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(ferry_core::lease::keep_renewed(
            state.leases.clone(),
            lease::Idle::new(link(CALL_TIMEOUT), state.clone(), ctx.clone()),
            stop.clone(),
        ));
        let gauge = tokio::spawn(backlog::run(link(CALL_TIMEOUT), state.clone(), ctx.clone()));
        let senders = Arc::new(settle::Senders {
            ops,
            dead: matches!(self.config.dead_letters, DeadLetters::Stream { .. }).then_some(dead),
        });
        read::Reader::new(
            link(read::BLOCK + CALL_TIMEOUT),
            state.clone(),
            senders,
            &ctx,
        )
        .run(&out)
        .await;
        // Every handle is gone once the engine returns the channel; the settling tasks
        // then flush what is queued and end.
        drop(out);
        while tasks.join_next().await.is_some() {}
        stop.cancel();
        gauge.abort();
        let _ = renewer.await;
        ctx.set_connected(false);
        Ok(())
    }
}

//! The NATS JetStream source of ferry.
//!
//! Every replica pulls from one durable pull consumer of a stream, so replicas share the
//! stream's messages (competing consumers on the server). A message is acknowledged
//! (`+ACK`, explicit ack policy) only once the engine settles it after the 2xx; until then
//! it is pending on the consumer and comes back after `ack_wait` if this replica dies.
//! - retries are held on the server: a delayed `-NAK`, so retry state survives a restart;
//! - a slow request is kept from being redelivered by `+WPI` (in progress) every half
//!   `ack_wait`, through core's lease service;
//! - dead letters are published to a dead-letter subject (captured by a stream, confirmed
//!   by its publish ack) with why in headers, then acknowledged; or terminated (`+TERM`)
//!   when the route says so;
//! - `X-Ferry-Attempt` is the server's delivery count.

mod backlog;
mod convert;
mod dead_letter;
mod lease;
mod receive;
mod settle;
mod setup;

pub use dead_letter::DEAD_LETTER_HEADERS;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Delivery, Source, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::settle::State;

/// The `[routes.x.source]` section of a `nats` route, validated.
#[derive(Clone)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:port`; may hold a secret, never logged as is.
    pub url: String,
    /// The stream's name.
    pub stream: String,
    /// The subjects of a stream made by `declare` (default `<stream>.>`).
    pub subjects: Vec<String>,
    /// The durable consumer the replicas share.
    pub consumer: String,
    /// The filter subject of a consumer made by `declare`, when it takes only part of the
    /// stream.
    pub filter_subject: Option<String>,
    /// Create the stream, the consumer and the dead-letter stream when missing (at start)
    /// instead of refusing.
    pub declare: bool,
    /// `ack_wait` of a consumer made by `declare`; an existing consumer's own is used.
    pub ack_wait: Duration,
    /// `max_ack_pending` of a consumer made by `declare`: what all replicas together may
    /// hold unacknowledged.
    pub max_ack_pending: i64,
    /// Messages asked for per pull request.
    pub batch_size: usize,
    /// Where the ordering key comes from, when there is one.
    pub key: Option<KeyFrom>,
    /// Where dead letters go.
    pub dead_letters: DeadLetters,
}

/// Where a message's ordering key ([`ferry_core::Message::group`]) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFrom {
    /// The subject it was published on.
    Subject,
    /// This header (messages without it have no key).
    Header(String),
}

/// Where a dead-lettered message goes. There is no default: dropping must be a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// Published to this subject (a stream must capture it; the publish ack is awaited)
    /// with the original headers and ferry's, then the original is acknowledged.
    Subject(String),
    /// Terminated (`+TERM`): the server never redelivers it; it stays in the stream
    /// until the stream's retention removes it. Logged and counted as dropped.
    Term,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &ferry_core::redact::url(&self.url))
            .field("stream", &self.stream)
            .field("subjects", &self.subjects)
            .field("consumer", &self.consumer)
            .field("filter_subject", &self.filter_subject)
            .field("declare", &self.declare)
            .field("ack_wait", &self.ack_wait)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("batch_size", &self.batch_size)
            .field("key", &self.key)
            .field("dead_letters", &self.dead_letters)
            .finish()
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The URL is not one the client takes.
    #[error("url: {0}")]
    Url(String),
    /// The server could not be reached, or JetStream did not answer.
    #[error("url: cannot reach {url}: {detail}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The server refused the login.
    #[error("url: {url} refused: {detail}")]
    Refused {
        /// The URL, password redacted.
        url: String,
        /// What the server said.
        detail: String,
    },
    /// The stream, the consumer or the dead-letter stream is missing or unfit.
    #[error("{key}: {detail}")]
    Setup {
        /// The configuration key at fault (`stream`, `consumer`, `dead_letter_subject`).
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl NatsError {
    /// True when the configuration is wrong rather than the server unreachable.
    pub fn is_config(&self) -> bool {
        !matches!(self, NatsError::Unreachable { .. })
    }
}

/// A connected JetStream source; build it with [`NatsSource::connect`].
pub struct NatsSource {
    config: Arc<NatsConfig>,
    client: async_nats::Client,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    ack_wait: Duration,
}

impl NatsSource {
    /// Connects and checks the stream, the consumer and the dead-letter subject (creating
    /// them with `declare`), so that a wrong setting is one line at start.
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        let setup::Ready {
            client,
            consumer,
            ack_wait,
        } = setup::check(&config).await?;
        Ok(Self {
            config: Arc::new(config),
            client,
            consumer,
            ack_wait,
        })
    }

    /// The consumer's `ack_wait`, as the server has it: the lease ferry renews.
    pub fn ack_wait(&self) -> Duration {
        self.ack_wait
    }
}

/// The wait before retry number `failures`: 100 ms doubling up to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(5))
}

impl Source for NatsSource {
    fn kind(&self) -> &'static str {
        "nats"
    }

    /// Two pull batches: one in the engine's hands while the next is pulled.
    fn buffer(&self) -> usize {
        2 * self.config.batch_size
    }

    /// The server's `max_payload`.
    fn max_message_bytes(&self) -> Option<usize> {
        Some(self.client.server_info().max_payload).filter(|n| *n > 0)
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let state = Arc::new(State::new(
            self.config.clone(),
            self.client.clone(),
            self.ack_wait,
        ));
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let (dead, dead_rx) = mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(settle::run(state.clone(), ops_rx, ctx.clone()));
        tasks.spawn(dead_letter::run(state.clone(), dead_rx, ctx.clone()));
        // Renewals and the backlog gauge stop once every handle is settled, not at the
        // shutdown signal: in-flight deliveries finish within the grace, held all along.
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(ferry_core::lease::keep_renewed(
            state.leases.clone(),
            lease::InProgress::new(state.clone(), ctx.clone()),
            stop.clone(),
        ));
        let gauge = tokio::spawn(backlog::run(
            self.consumer.clone(),
            state.clone(),
            ctx.clone(),
            stop.clone(),
        ));
        let senders = Arc::new(settle::Senders {
            ops,
            dead: matches!(self.config.dead_letters, DeadLetters::Subject(_)).then_some(dead),
        });
        receive::Receiver::new(self.consumer, state.clone(), senders, &ctx)
            .run(&out)
            .await;
        // Every handle is gone once the engine returns the channel; the settling tasks
        // then flush what is queued and end.
        drop(out);
        while tasks.join_next().await.is_some() {}
        stop.cancel();
        let _ = gauge.await;
        let _ = renewer.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await;
        ctx.set_connected(false);
        Ok(())
    }
}

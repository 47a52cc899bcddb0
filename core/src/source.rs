//! Where messages come from.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::ack::AckHandle;
use crate::error::SourceError;
use crate::message::Message;
use crate::metrics::{BrokerErrors, RouteMetrics};

/// A message and the handle that settles it on its broker.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Settles the message; releases it if dropped.
    pub ack: AckHandle,
}

/// What the engine gives a source to run with.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// The route's name, for logs.
    pub route: Arc<str>,
    /// Cancelled when the route must stop receiving.
    pub shutdown: CancellationToken,
    /// The broker's backlog (`ferry_source_backlog`), kept current by the source.
    pub backlog: Gauge,
    /// Counts what only the source knows happened: dead letters that landed, failed
    /// broker calls. Detached counters unless [`SourceContext::with_counts`] set them.
    pub counts: SourceCounts,
    connected: Arc<AtomicBool>,
    paused: Arc<watch::Sender<bool>>,
    error: Arc<Mutex<Option<String>>>,
}

impl SourceContext {
    /// A context for a source run outside the engine (tests, embedding).
    pub fn new(route: Arc<str>, shutdown: CancellationToken, backlog: Gauge) -> Self {
        Self {
            route,
            shutdown,
            backlog,
            counts: SourceCounts::default(),
            connected: Arc::new(AtomicBool::new(false)),
            paused: Arc::new(watch::Sender::new(false)),
            error: Arc::default(),
        }
    }

    /// Counts into these counters (the route's own, when the engine's caller has them).
    pub fn with_counts(mut self, counts: SourceCounts) -> Self {
        self.counts = counts;
        self
    }

    /// Pauses or resumes the route: while paused the engine hands nothing new to the
    /// endpoint (in-flight deliveries finish) and the source, finding no room for more,
    /// stops asking the broker. Returns whether the state changed.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused
            .send_if_modified(|now| std::mem::replace(now, paused) != paused)
    }

    /// Whether the route is paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Waits until the route is not paused.
    pub async fn resumed(&self) {
        let mut rx = self.paused.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|paused| !paused).await;
    }

    /// Changes of the paused state, for whoever reports it.
    pub fn pause_changes(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }

    /// Reports whether the source currently reaches its broker (`/readyz`).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Whether the source last said it reaches its broker.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Reports a broker problem the route runs on with but an operator must fix (a dead
    /// letter the broker refuses for good), shown by `/routes`; `None` once it is gone.
    pub fn set_error(&self, error: Option<String>) {
        *self.error.lock().unwrap_or_else(PoisonError::into_inner) = error;
    }

    /// The problem last reported with [`SourceContext::set_error`], if any.
    pub fn error(&self) -> Option<String> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The counters a source keeps itself, because only it knows when the broker call behind
/// them succeeded.
#[derive(Debug, Clone, Default)]
pub struct SourceCounts {
    /// `ferry_deliveries_total{outcome="dead_lettered"}`: a source whose handles say
    /// [`crate::Settle::counts_dead_letters`] counts here once the dead letter has landed.
    pub dead_lettered: Counter,
    /// `ferry_deliveries_total{outcome="dropped"}`: dead letters a route is configured to
    /// drop, counted as the source drops them.
    pub dropped: Counter,
    /// `ferry_broker_errors_total{operation}`.
    pub broker_errors: BrokerErrors,
}

impl From<&RouteMetrics> for SourceCounts {
    fn from(metrics: &RouteMetrics) -> Self {
        Self {
            dead_lettered: metrics.dead_lettered.clone(),
            dropped: metrics.dropped.clone(),
            broker_errors: metrics.broker_errors.clone(),
        }
    }
}

/// A broker consumer.
///
/// `run` receives until `ctx.shutdown` is cancelled or `out` is closed, sending each
/// message with its [`AckHandle`]. It should wait for room in `out` before asking the
/// broker for more (that is the backpressure), and before returning it must finish every
/// settlement the handles it gave out have queued (they are all dropped by then).
pub trait Source: Send + 'static {
    /// Short kind name for metrics labels (`sqs`, `amqp`, ...).
    fn kind(&self) -> &'static str;

    /// How many received messages may wait for a free concurrency slot. Enough for every
    /// receive loop to have one batch in hand keeps the endpoint busy while the broker is
    /// polled; more only holds messages away from other consumers.
    fn buffer(&self) -> usize {
        16
    }

    /// The largest message the broker carries, in bytes: the default of a route's
    /// `max_message_bytes`, beyond which a message is dead-lettered before any request.
    /// `None`: no limit unless the route sets one.
    fn max_message_bytes(&self) -> Option<usize> {
        None
    }

    /// Receives until shutdown; see the trait documentation.
    fn run(
        self,
        out: mpsc::Sender<Delivery>,
        ctx: SourceContext,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

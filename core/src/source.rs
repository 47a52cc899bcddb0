//! Where messages come from.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::AckHandle;
use crate::error::SourceError;
use crate::message::Message;

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
    connected: Arc<AtomicBool>,
}

impl SourceContext {
    /// A context for a source run outside the engine (tests, embedding).
    pub fn new(route: Arc<str>, shutdown: CancellationToken, backlog: Gauge) -> Self {
        Self {
            route,
            shutdown,
            backlog,
            connected: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Reports whether the source currently reaches its broker (`/readyz`).
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Whether the source last said it reaches its broker.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
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

    /// Receives until shutdown; see the trait documentation.
    fn run(
        self,
        out: mpsc::Sender<Delivery>,
        ctx: SourceContext,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

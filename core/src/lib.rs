//! The broker-independent heart of ferry.
//!
//! A [`Source`] hands out [`Delivery`] values (a [`Message`] plus its [`AckHandle`]), a
//! [`Sink`] pushes one message to the endpoint and reports what it answered, and the engine
//! ([`run_route`]) sits between them: bounded concurrency, the response table, retries with
//! backoff, dead-lettering and graceful shutdown. Nothing here knows about SQS or HTTP
//! clients, so a new broker is a new crate that implements [`Source`].
//!
//! A source of three messages held in memory and a sink that takes every one, run as a
//! route until the source has nothing more and every message is settled:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use ferry_core::{
//!     run_route, AckHandle, Delivery, DeliveryPolicy, Message, Metrics, Route, RouteLabels,
//!     CancellationToken, Settle, Settlement, Sink, SinkResponse, Source, SourceContext,
//!     SourceError,
//! };
//! use tokio::sync::mpsc;
//!
//! type Log = Arc<Mutex<Vec<String>>>;
//!
//! /// The broker's side of one message: what became of it.
//! struct Receipt(String, Log);
//!
//! impl Settle for Receipt {
//!     fn settle(self: Box<Self>, settlement: Settlement) {
//!         let done = matches!(settlement, Settlement::Ack);
//!         self.1.lock().expect("log").push(format!("{} acked: {done}", self.0));
//!     }
//! }
//!
//! struct Memory(Log);
//!
//! impl Source for Memory {
//!     fn kind(&self) -> &'static str {
//!         "memory"
//!     }
//!
//!     async fn run(self, out: mpsc::Sender<Delivery>, _: SourceContext) -> Result<(), SourceError> {
//!         for id in ["a", "b", "c"] {
//!             let message = Message::new(id, "hello", Arc::from("memory"));
//!             let ack = AckHandle::new(Receipt(id.to_owned(), self.0.clone()));
//!             if out.send(Delivery { message, ack }).await.is_err() {
//!                 break;
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! /// An endpoint that answers 200 to everything.
//! struct Accept;
//!
//! impl Sink for Accept {
//!     async fn deliver(&self, _: &Message) -> SinkResponse {
//!         SinkResponse::Status { status: 200, retry_after: None, action: None, detail: String::new() }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let log = Log::default();
//! let metrics = Metrics::default().route(&RouteLabels {
//!     route: "demo".into(),
//!     source: "memory".into(),
//!     sink: "accept".into(),
//! });
//! let ctx = SourceContext::new(Arc::from("demo"), CancellationToken::new(), metrics.backlog.clone());
//! let route = Route {
//!     name: Arc::from("demo"),
//!     source: Memory(log.clone()),
//!     sink: Accept,
//!     policy: DeliveryPolicy::default(),
//!     metrics,
//!     audit: None,
//!     tracer: None,
//! };
//! run_route(route, ctx).await.expect("the route ends cleanly");
//! let mut settled = log.lock().expect("log").clone();
//! settled.sort();
//! assert_eq!(settled, ["a acked: true", "b acked: true", "c acked: true"]);
//! # }
//! ```

pub mod ack;
pub mod audit;
pub mod backoff;
pub mod engine;
pub mod error;
pub mod lease;
pub mod message;
pub mod metrics;
pub mod policy;
pub mod redact;
pub mod sink;
pub mod source;
pub mod trace;

pub use ack::{AckHandle, DeadLetter, Settle, Settlement};
pub use audit::{AuditOutcome, AuditRecord, AuditTrail};
pub use backoff::Backoff;
pub use engine::{
    run_route, Batching, CircuitBreaker, Concurrency, DeliveryPolicy, FleetRate, MessageOrder,
    RateLimit, Route, SharedRate,
};
pub use error::{error_chain, EngineError, SourceError};
pub use message::Message;
pub use metrics::{
    histogram_buckets, BrokerErrors, LastFailure, Metrics, RouteLabels, RouteMetrics,
};
pub use policy::{Action, ResponsePolicy, Verdict};
pub use sink::{BatchResponse, Sink, SinkResponse};
pub use source::{Delivery, Source, SourceContext, SourceCounts};
pub use trace::{AttemptSpan, DeliveryTracer};

// Re-exported so that backends written outside the workspace use the same types as the engine.
pub use tokio_util::sync::CancellationToken;

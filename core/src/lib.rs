//! The broker-independent heart of ferry.
//!
//! A [`Source`] hands out [`Delivery`] values (a [`Message`] plus its [`AckHandle`]), a
//! [`Sink`] pushes one message to the endpoint and reports what it answered, and the engine
//! ([`run_route`]) sits between them: bounded concurrency, the response table, retries with
//! backoff, dead-lettering and graceful shutdown. Nothing here knows about SQS or HTTP
//! clients, so a new broker is a new crate that implements [`Source`].

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
pub use metrics::{BrokerErrors, Metrics, RouteLabels, RouteMetrics};
pub use policy::{Action, ResponsePolicy, Verdict};
pub use sink::{BatchResponse, Sink, SinkResponse};
pub use source::{Delivery, Source, SourceContext, SourceCounts};
pub use trace::{AttemptSpan, DeliveryTracer};

// Re-exported so that backends written outside the workspace use the same types as the engine.
pub use tokio_util::sync::CancellationToken;

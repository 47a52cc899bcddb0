//! The tracing hook: one span per delivery attempt, for teams that follow a message from
//! its publisher through ferry to their endpoint in a tracing backend.
//!
//! The core knows no tracing library: the binary plugs in an exporter (OpenTelemetry OTLP)
//! through [`DeliveryTracer`]. Each attempt's span is a child of the trace context the
//! message carried, and the endpoint receives that span as its parent (`traceparent`), so
//! the endpoint's own spans hang below ferry's request rather than beside it.

use std::sync::Arc;

use crate::message::Message;
use crate::sink::SinkResponse;

/// Starts the span of each delivery attempt. Called on the delivery path: it must not wait.
pub trait DeliveryTracer: Send + Sync + std::fmt::Debug + 'static {
    /// Starts the span of one attempt of `message` on `route`, as a child of `parent` (the
    /// W3C `traceparent` the message arrived with, with its `tracestate`), or as the root of
    /// a new trace.
    fn start(
        &self,
        route: &Arc<str>,
        message: &Message,
        parent: Option<&str>,
    ) -> Box<dyn AttemptSpan>;
}

/// One attempt under way.
pub trait AttemptSpan: Send {
    /// The `traceparent` to send with this attempt: this span as the endpoint's parent.
    fn traceparent(&self) -> Option<String>;
    /// Ends the span with what the endpoint answered.
    fn finish(self: Box<Self>, response: &SinkResponse);
}

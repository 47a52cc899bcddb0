//! Where messages go.

use std::future::Future;
use std::time::Duration;

use crate::message::Message;
use crate::policy::Action;

/// What the endpoint did with one delivery attempt, in terms the engine can classify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkResponse {
    /// The endpoint answered.
    Status {
        /// HTTP status code.
        status: u16,
        /// `Retry-After`, if the endpoint sent one.
        retry_after: Option<Duration>,
        /// The endpoint's per-message decision (`Ferry-Action`), if any.
        action: Option<Action>,
        /// The start of the response body (at most 1 KB), kept as a dead-letter reason.
        detail: String,
    },
    /// No answer within the sink's timeout.
    Timeout,
    /// The connection broke, or the request failed in a way that may have reached the
    /// endpoint.
    Error(String),
    /// No connection could be made (refused, unreachable, connect timeout), so the request
    /// never left: it is not an attempt, counts toward no `max_attempts` and raises no
    /// `X-Ferry-Attempt`.
    Unreachable(String),
}

impl SinkResponse {
    /// The HTTP status, when the endpoint answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            SinkResponse::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The `class` label of `ferry_http_responses_total`.
    pub fn class(&self) -> &'static str {
        match self {
            SinkResponse::Status { status, .. } => match status {
                200..=299 => "2xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "error",
            },
            SinkResponse::Timeout => "timeout",
            SinkResponse::Error(_) | SinkResponse::Unreachable(_) => "error",
        }
    }

    /// Whether the request reached (or may have reached) the endpoint.
    pub fn was_sent(&self) -> bool {
        !matches!(self, SinkResponse::Unreachable(_))
    }
}

/// What the endpoint answered to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchResponse {
    /// The answer to the request as a whole, classified like a single message's.
    pub response: SinkResponse,
    /// Ids the endpoint reported as failed in a 2xx answer (a partial success): only these
    /// are retried, the rest are acked.
    pub failed: Vec<String>,
}

/// Pushes one message to the endpoint.
///
/// A sink never retries by itself: it reports each attempt so the engine alone decides
/// between ack, retry and dead-letter, the same way for every sink.
pub trait Sink: Send + Sync + 'static {
    /// Makes one delivery attempt of `message`.
    fn deliver(&self, message: &Message) -> impl Future<Output = SinkResponse> + Send;

    /// Whether the endpoint is up, by a check of its own (an HTTP health URL). `None`:
    /// the sink has no such check, and a downed endpoint is probed with a real message.
    fn healthy(&self) -> impl Future<Output = Option<bool>> + Send {
        std::future::ready(None)
    }

    /// Makes one attempt of several messages in one request, for routes with
    /// [`crate::Batching`]. A sink that cannot batch keeps this default, which refuses every
    /// batch as an error; configuration should not let such a route start.
    fn deliver_batch(&self, messages: &[Message]) -> impl Future<Output = BatchResponse> + Send {
        let _ = messages;
        std::future::ready(BatchResponse {
            response: SinkResponse::Error("this sink does not deliver batches".to_owned()),
            failed: Vec::new(),
        })
    }
}

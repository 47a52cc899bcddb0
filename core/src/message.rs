//! The unit that travels from a broker to the endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

/// One message as the endpoint will see it, independent of the broker it came from.
///
/// Sources fill in what the broker knows; fields the broker cannot provide stay `None`.
/// `id` is what the endpoint deduplicates on, so a source must give a redelivered message
/// the same id it had the first time.
#[derive(Debug, Clone)]
pub struct Message {
    /// Stable id across redeliveries (SNS `MessageId`, SQS `MessageId`, ...).
    pub id: String,
    /// The payload bytes, unchanged.
    pub payload: Bytes,
    /// When the message was published (SNS `Timestamp`, SQS `SentTimestamp`, ...).
    pub timestamp: SystemTime,
    /// String attributes; sorted so that envelopes and headers are deterministic.
    pub attributes: BTreeMap<String, String>,
    /// 1-based delivery attempt; taken from the broker where it counts receives.
    pub attempt: u32,
    /// The queue, topic or exchange the message came from.
    pub source: Arc<str>,
    /// When the broker first handed the message out, if it tracks that.
    pub first_received_at: Option<SystemTime>,
    /// Ordering key (SQS FIFO `MessageGroupId`, Kafka key), when there is one.
    pub group: Option<String>,
    /// W3C trace context carried by the message, when there is one.
    pub traceparent: Option<String>,
}

impl Message {
    /// A message with only the fields every broker has; the rest can be set afterwards.
    pub fn new(id: impl Into<String>, payload: impl Into<Bytes>, source: Arc<str>) -> Self {
        Self {
            id: id.into(),
            payload: payload.into(),
            timestamp: SystemTime::now(),
            attributes: BTreeMap::new(),
            attempt: 1,
            source,
            first_received_at: None,
            group: None,
            traceparent: None,
        }
    }
}

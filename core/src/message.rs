//! The unit that travels from a broker to the endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Why the source will not vouch for this message (a forged or unverifiable envelope,
    /// say), when it will not: the engine then dead-letters it with this reason before any
    /// request, through the route's normal dead-letter path (metrics, audit, the broker's
    /// dead-letter queue). A source that knows a message is not genuine must hand it over
    /// refused rather than drop it or deliver it, so that it is neither lost nor trusted.
    pub refused: Option<String>,
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
            refused: None,
        }
    }

    /// Marks the message as refused by its source, with the reason its dead letter carries
    /// (see [`Message::refused`]).
    pub fn refuse(&mut self, reason: impl Into<String>) {
        self.refused = Some(reason.into());
    }
}

/// A time a broker or publisher gave, unless it is more than a day ahead: a clock that far
/// off would make end-to-end lag meaningless, and a time past the year 9999 (a garbage or
/// forged timestamp) cannot even be written as RFC 3339, which sinks do with it. Every
/// source filters its message times through this.
pub fn plausible_time(at: SystemTime) -> Option<SystemTime> {
    (at <= SystemTime::now() + Duration::from_secs(86_400)).then_some(at)
}

/// [`plausible_time`] of a time given as a distance from the Unix epoch (overflow-safe).
pub fn plausible_since_epoch(since: Duration) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(since).and_then(plausible_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_far_ahead_or_overflowing_are_refused() {
        assert!(plausible_since_epoch(Duration::from_secs(1_700_000_000)).is_some());
        assert!(plausible_since_epoch(Duration::from_secs(u64::MAX)).is_none());
        assert!(plausible_time(SystemTime::now() + Duration::from_secs(2 * 86_400)).is_none());
    }
}

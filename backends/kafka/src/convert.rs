//! From a Kafka record to a ferry [`Message`].

use std::sync::Arc;
use std::time::Duration;

use ferry_core::message::plausible_since_epoch;
use ferry_core::Message;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message as _;

/// Which ordering key a message carries under `ordering = "key"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyFrom {
    /// The record key (records without one are unordered).
    #[default]
    RecordKey,
    /// The partition: the whole partition in order, like a plain Kafka consumer.
    Partition,
}

/// Builds the message. The id is `topic-partition-offset`, the one name a record keeps
/// however often it is read again.
pub(crate) fn convert(
    record: &BorrowedMessage<'_>,
    source: &Arc<str>,
    key_from: KeyFrom,
) -> Message {
    let id = format!(
        "{}-{}-{}",
        record.topic(),
        record.partition(),
        record.offset()
    );
    let payload = bytes::Bytes::copy_from_slice(record.payload().unwrap_or_default());
    let mut message = Message::new(id, payload, source.clone());
    if let Some(ms) = record
        .timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
    {
        if let Some(at) = plausible_since_epoch(Duration::from_millis(ms)) {
            message.timestamp = at;
        }
    }
    if let Some(headers) = record.headers() {
        for header in headers.iter() {
            if let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                message
                    .attributes
                    .insert(header.key.to_owned(), value.to_owned());
            }
        }
    }
    message.traceparent = message.attributes.get("traceparent").cloned();
    message.group = match key_from {
        KeyFrom::RecordKey => record
            .key()
            .filter(|k| !k.is_empty())
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        KeyFrom::Partition => Some(format!("{}-{}", record.topic(), record.partition())),
    };
    message
}

//! From an SQS message to a ferry [`Message`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName as Sys};
use bytes::Bytes;
use ferry_core::Message;

use crate::sns;

/// What the dead-letter queue needs to get an exact copy of the original.
#[derive(Debug)]
pub(crate) struct Original {
    pub(crate) body: String,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
    pub(crate) group: Option<String>,
}

/// A received message: the ferry view, its receipt handle and (if kept) the original.
pub(crate) struct Received {
    pub(crate) message: Message,
    pub(crate) receipt: String,
    pub(crate) original: Option<Box<Original>>,
}

fn epoch_millis(v: &str) -> Option<SystemTime> {
    v.parse::<u64>()
        .ok()
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Converts one SQS message; `None` when SQS left out the id or receipt handle.
pub(crate) fn convert(
    m: aws_sdk_sqs::types::Message,
    source: &Arc<str>,
    keep_original: bool,
) -> Option<Received> {
    let receipt = m.receipt_handle?;
    let sqs_id = m.message_id?;
    let body = m.body.unwrap_or_default();
    let system = m.attributes.unwrap_or_default();
    let message_attributes = m.message_attributes.unwrap_or_default();

    let mut message = match sns::unwrap(&body) {
        Some(n) => {
            let mut message = Message::new(n.id, Bytes::from(n.message), source.clone());
            if let Some(ts) = n
                .timestamp
                .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
            {
                message.timestamp = ts;
            }
            message.attributes = n.attributes;
            message
        }
        None => {
            let mut message = Message::new(sqs_id, Bytes::from(body.clone()), source.clone());
            if let Some(ts) = system
                .get(&Sys::SentTimestamp)
                .and_then(|v| epoch_millis(v))
            {
                message.timestamp = ts;
            }
            message
        }
    };
    for (name, value) in &message_attributes {
        if let Some(text) = &value.string_value {
            message.attributes.insert(name.clone(), text.clone());
        }
    }
    message.traceparent = message.attributes.get("traceparent").cloned();
    message.attempt = system
        .get(&Sys::ApproximateReceiveCount)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    message.first_received_at = system
        .get(&Sys::ApproximateFirstReceiveTimestamp)
        .and_then(|v| epoch_millis(v));
    message.group = system.get(&Sys::MessageGroupId).cloned();

    let original = keep_original.then(|| {
        Box::new(Original {
            body,
            attributes: message_attributes,
            group: message.group.clone(),
        })
    });
    Some(Received {
        message,
        receipt,
        original,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqs_message(body: &str) -> aws_sdk_sqs::types::Message {
        aws_sdk_sqs::types::Message::builder()
            .message_id("sqs-id")
            .receipt_handle("rh")
            .body(body)
            .attributes(Sys::ApproximateReceiveCount, "3")
            .attributes(Sys::SentTimestamp, "1700000000000")
            .build()
    }

    #[test]
    fn raw_body_keeps_sqs_id_and_receive_count() {
        let source: Arc<str> = Arc::from("q");
        let r = convert(sqs_message("plain"), &source, true).expect("converted");
        assert_eq!(r.message.id, "sqs-id");
        assert_eq!(&r.message.payload[..], b"plain");
        assert_eq!(r.message.attempt, 3);
        assert_eq!(
            r.message.timestamp,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
        );
        assert_eq!(r.receipt, "rh");
        assert_eq!(r.original.expect("kept").body, "plain");
    }

    #[test]
    fn sns_body_takes_sns_id_and_message() {
        let body = r#"{"Type":"Notification","MessageId":"sns-id","Message":"hello","Timestamp":"2024-01-02T03:04:05.678Z"}"#;
        let source: Arc<str> = Arc::from("q");
        let r = convert(sqs_message(body), &source, false).expect("converted");
        assert_eq!(r.message.id, "sns-id");
        assert_eq!(&r.message.payload[..], b"hello");
        assert_eq!(
            humantime::format_rfc3339_millis(r.message.timestamp).to_string(),
            "2024-01-02T03:04:05.678Z"
        );
        assert!(r.original.is_none());
    }
}

//! From an SQS message to a ferry [`Message`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName as Sys};
use bytes::Bytes;
use ferry_core::message::{plausible_since_epoch, plausible_time};
use ferry_core::Message;
use tracing::debug;

use crate::signature::Judgement;
use crate::sns;

/// What is known of a body's SNS envelope before it is converted.
#[derive(Debug)]
pub(crate) enum Envelope {
    /// The source checks nothing: every body that is a `Notification` is unwrapped.
    Trusted,
    /// The source's `sns` section judged it (never [`Judgement::Later`]: such a message is
    /// not converted).
    Judged(Judgement),
}

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

/// Whether `id` goes into an HTTP header unchanged: visible ASCII, inner spaces allowed.
/// Anything else would be refused by the HTTP client, or cut or changed on the way.
fn usable_as_key(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with(' ')
        && !id.ends_with(' ')
        && id.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

fn epoch_millis(v: &str) -> Option<SystemTime> {
    v.parse::<u64>()
        .ok()
        .and_then(|ms| plausible_since_epoch(Duration::from_millis(ms)))
}

/// The ferry [`Message`] one received SQS message becomes: an SNS `Notification` body is
/// unwrapped (the SNS `MessageId` is the id, its `Message` the payload), any other body is
/// the payload as it is under the SQS `MessageId`. An SNS `MessageId` that is empty or
/// could not be sent as the `Idempotency-Key` header (control characters such as CR/LF,
/// non-ASCII, surrounding spaces) gives way to the SQS `MessageId`, stable across
/// redeliveries too. `None` when SQS left out the id or the receipt handle.
///
/// Public because this is where untrusted bytes (anyone who may send to the queue or publish
/// to the topic) enter ferry: fuzz targets and programs that embed the source decode exactly
/// as the receive loop does.
pub fn decode(m: aws_sdk_sqs::types::Message, source: &Arc<str>) -> Option<Message> {
    convert(m, source, false, Envelope::Trusted).map(|r| r.message)
}

/// Converts one SQS message; `None` when SQS left out the id or receipt handle. A body
/// whose envelope was refused keeps its SQS id and body (not what the envelope claims) and
/// is handed over refused, for the engine to dead-letter.
pub(crate) fn convert(
    m: aws_sdk_sqs::types::Message,
    source: &Arc<str>,
    keep_original: bool,
    envelope: Envelope,
) -> Option<Received> {
    let receipt = m.receipt_handle?;
    let sqs_id = m.message_id?;
    let body = m.body.unwrap_or_default();
    let system = m.attributes.unwrap_or_default();
    let message_attributes = m.message_attributes.unwrap_or_default();

    let mut refused = None;
    let notification = match envelope {
        Envelope::Trusted => sns::unwrap(&body),
        Envelope::Judged(Judgement::Genuine(n)) => Some(n),
        Envelope::Judged(Judgement::NotSns) => None,
        Envelope::Judged(Judgement::Refused(reason) | Judgement::Later(reason)) => {
            refused = Some(reason);
            None
        }
    };
    let mut message = match notification {
        Some(n) => {
            let id = if usable_as_key(&n.id) {
                n.id
            } else {
                debug!(sqs_id = %sqs_id, sns_id = ?n.id,
                    "SNS MessageId is empty or not a valid header value; the SQS MessageId stands in");
                sqs_id
            };
            let mut message = Message::new(id, Bytes::from(n.message), source.clone());
            if let Some(ts) = n
                .timestamp
                .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
                .and_then(plausible_time)
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
    message.refused = refused;

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
    use std::time::UNIX_EPOCH;

    fn convert_trusted(
        m: aws_sdk_sqs::types::Message,
        source: &Arc<str>,
        keep: bool,
    ) -> Option<Received> {
        convert(m, source, keep, Envelope::Trusted)
    }

    /// A refused envelope keeps the SQS id and body, not what the envelope claims.
    #[test]
    fn a_refused_envelope_is_handed_over_as_it_came_and_refused() {
        let source: Arc<str> = Arc::from("q");
        let body = r#"{"Type":"Notification","MessageId":"chosen","Message":"hi"}"#;
        let judged = Envelope::Judged(Judgement::Refused("forged".into()));
        let r = convert(sqs_message(body), &source, true, judged).expect("converted");
        assert_eq!(r.message.id, "sqs-id");
        assert_eq!(&r.message.payload[..], body.as_bytes());
        assert_eq!(r.message.refused.as_deref(), Some("forged"));
        assert_eq!(r.original.expect("kept").body, body);
        let judged = Envelope::Judged(Judgement::NotSns);
        let r = convert(sqs_message(body), &source, false, judged).expect("converted");
        assert_eq!(r.message.id, "sqs-id");
        assert_eq!(r.message.refused, None);
    }

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
        let r = convert_trusted(sqs_message("plain"), &source, true).expect("converted");
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

    /// Found by fuzzing: a time past the year 9999 made every sink panic when it wrote the
    /// timestamp as RFC 3339.
    #[test]
    fn times_far_ahead_are_ignored() {
        let source: Arc<str> = Arc::from("q");
        let m = aws_sdk_sqs::types::Message::builder()
            .message_id("sqs-id")
            .receipt_handle("rh")
            .body("plain")
            .attributes(Sys::SentTimestamp, "1700000000000000")
            .attributes(
                Sys::ApproximateFirstReceiveTimestamp,
                "18446744073709551615",
            )
            .build();
        let r = convert_trusted(m, &source, false).expect("converted");
        let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
        assert!(r.message.timestamp <= tomorrow);
        assert_eq!(r.message.first_received_at, None);
        let body = r#"{"Type":"Notification","MessageId":"sns-id","Message":"hi","Timestamp":"9999-12-31T23:59:60Z"}"#;
        let r = convert_trusted(sqs_message(body), &source, false).expect("converted");
        assert_eq!(r.message.id, "sns-id");
        assert!(r.message.timestamp <= tomorrow);
    }

    #[test]
    fn an_sns_id_unfit_for_a_header_gives_way_to_the_sqs_id() {
        let source: Arc<str> = Arc::from("q");
        for id in [
            "",
            " ",
            "a\\r\\nb",
            "a\\nb",
            "tab\\there",
            "caf\\u00e9",
            " lead",
            "trail ",
        ] {
            let body = format!(r#"{{"Type":"Notification","MessageId":"{id}","Message":"hi"}}"#);
            let r = convert_trusted(sqs_message(&body), &source, false).expect("converted");
            assert_eq!(r.message.id, "sqs-id", "{id:?}");
            assert_eq!(&r.message.payload[..], b"hi");
        }
        let body = r#"{"Type":"Notification","MessageId":"an id/with:odd=chars","Message":"hi"}"#;
        let r = convert_trusted(sqs_message(body), &source, false).expect("converted");
        assert_eq!(r.message.id, "an id/with:odd=chars");
    }

    #[test]
    fn sns_body_takes_sns_id_and_message() {
        let body = r#"{"Type":"Notification","MessageId":"sns-id","Message":"hello","Timestamp":"2024-01-02T03:04:05.678Z"}"#;
        let source: Arc<str> = Arc::from("q");
        let r = convert_trusted(sqs_message(body), &source, false).expect("converted");
        assert_eq!(r.message.id, "sns-id");
        assert_eq!(&r.message.payload[..], b"hello");
        assert_eq!(
            humantime::format_rfc3339_millis(r.message.timestamp).to_string(),
            "2024-01-02T03:04:05.678Z"
        );
        assert!(r.original.is_none());
    }
}

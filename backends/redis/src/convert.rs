//! From a stream entry to a ferry [`Message`], and the entries out of Redis's replies.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferry_core::message::plausible_since_epoch;
use ferry_core::Message;
use redis::Value;

use crate::backlog::bytes;
use crate::settle::Fields;

/// One entry as Redis gave it: `fields` is `None` for an id still pending whose entry was
/// deleted from the stream (`XDEL`, trimming).
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: Arc<str>,
    pub(crate) fields: Option<Fields>,
}

/// The entries of a reply's list of `[id, [field, value, ...]]`.
pub(crate) fn entries(list: Value) -> Vec<Entry> {
    let Value::Array(items) = list else {
        return Vec::new();
    };
    items.into_iter().filter_map(entry).collect()
}

fn entry(item: Value) -> Option<Entry> {
    let Value::Array(mut parts) = item else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let values = parts.pop()?;
    let id = Arc::from(String::from_utf8_lossy(bytes(&parts[0])?).as_ref());
    let fields = match values {
        Value::Array(flat) => Some(pairs(flat)),
        Value::Map(map) => Some(
            map.into_iter()
                .filter_map(|(k, v)| Some((owned(k)?, owned(v)?)))
                .collect(),
        ),
        _ => None,
    };
    Some(Entry { id, fields })
}

fn pairs(flat: Vec<Value>) -> Fields {
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (owned(k), owned(v)) {
            out.push((k, v));
        }
    }
    out
}

fn owned(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}

/// What the message is made of besides the fields: where it came from and which
/// delivery of the entry this is.
pub(crate) struct Origin<'a> {
    pub(crate) stream: &'a Arc<str>,
    pub(crate) body_field: &'a str,
    pub(crate) key_field: Option<&'a str>,
}

/// Builds the message: the body field is the payload, every other field an attribute
/// (text; bytes that are not UTF-8 are replaced by U+FFFD), the key field also the
/// ordering key, the entry id the id and its milliseconds the timestamp. An entry without
/// the body field is handed over refused, so it is dead-lettered with the reason.
pub(crate) fn message(id: &str, fields: &Fields, attempt: u32, origin: &Origin<'_>) -> Message {
    let body = fields
        .iter()
        .find(|(k, _)| k.as_ref() == origin.body_field.as_bytes())
        .map(|(_, v)| v.clone());
    let mut message = Message::new(id, body.clone().unwrap_or_default(), origin.stream.clone());
    for (k, v) in fields {
        if k.as_ref() != origin.body_field.as_bytes() {
            message.attributes.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
    }
    if body.is_none() {
        message.refuse(format!("the entry has no field {:?}", origin.body_field));
    }
    message.attempt = attempt.max(1);
    message.group = origin
        .key_field
        .and_then(|k| message.attributes.get(k).cloned());
    message.traceparent = message.attributes.get("traceparent").cloned();
    message.timestamp = timestamp(id);
    message
}

/// An entry id starts with the milliseconds at which it was added.
fn timestamp(id: &str) -> SystemTime {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .and_then(|ms| plausible_since_epoch(Duration::from_millis(ms)))
        .unwrap_or_else(SystemTime::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entries_become_messages_and_deleted_ones_are_told_apart() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1700000000000-0"),
                Value::Array(vec![bulk("body"), bulk("hello"), bulk("key"), bulk("k1")]),
            ]),
            Value::Array(vec![bulk("1700000000001-0"), Value::Nil]),
        ]);
        let got = entries(reply);
        assert_eq!(got.len(), 2);
        assert!(got[1].fields.is_none(), "a deleted entry has no fields");
        let stream: Arc<str> = Arc::from("orders");
        let origin = Origin {
            stream: &stream,
            body_field: "body",
            key_field: Some("key"),
        };
        let fields = got[0].fields.as_ref().expect("fields");
        let m = message(&got[0].id, fields, 2, &origin);
        assert_eq!(m.id, "1700000000000-0");
        assert_eq!(&m.payload[..], b"hello");
        assert_eq!(m.group.as_deref(), Some("k1"));
        assert_eq!(m.attempt, 2);
        assert_eq!(m.attributes.get("key").map(String::as_str), Some("k1"));
        assert!(!m.attributes.contains_key("body"));
        assert_eq!(
            m.timestamp,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)
        );
        assert!(m.refused.is_none());
    }

    #[test]
    fn an_entry_without_its_body_field_is_refused_not_dropped() {
        let stream: Arc<str> = Arc::from("orders");
        let origin = Origin {
            stream: &stream,
            body_field: "payload",
            key_field: None,
        };
        let fields = vec![(Bytes::from("body"), Bytes::from("x"))];
        let m = message("1-0", &fields, 1, &origin);
        assert!(m.refused.as_deref().is_some_and(|r| r.contains("payload")));
        assert_eq!(m.attributes.get("body").map(String::as_str), Some("x"));
    }
}

//! A JetStream message as the engine sees it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::message::Info;
use ferry_core::message::plausible_time;
use ferry_core::Message;

use crate::{KeyFrom, NatsConfig};

/// The message's id: the publisher's `Nats-Msg-Id` (its own deduplication id) when it set
/// one, else `<stream>:<stream sequence>`, which the server keeps across redeliveries.
pub(crate) fn id(headers: Option<&async_nats::HeaderMap>, stream: &str, sequence: u64) -> String {
    headers
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{stream}:{sequence}"))
}

/// Converts one message; `info` is what its reply subject says (stream, sequence,
/// delivery count, publish time).
pub(crate) fn message(msg: &async_nats::Message, info: &Info<'_>, config: &NatsConfig) -> Message {
    let headers = msg.headers.as_ref();
    let mut message = Message::new(
        id(headers, &config.stream, info.stream_sequence),
        msg.payload.clone(),
        Arc::from(msg.subject.as_str()),
    );
    message.attempt = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
    let nanos = info.published.unix_timestamp_nanos();
    if let Ok(nanos) = u64::try_from(nanos) {
        if let Some(at) = UNIX_EPOCH
            .checked_add(Duration::from_nanos(nanos))
            .and_then(plausible_time)
        {
            message.timestamp = at;
        }
    } else {
        message.timestamp = SystemTime::now();
    }
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            let name = name.to_string();
            let Some(value) = values.first().map(|v| v.as_str().to_owned()) else {
                continue;
            };
            if name.eq_ignore_ascii_case("traceparent") {
                message.traceparent = Some(value);
            } else if !name.starts_with("Nats-") {
                message.attributes.insert(name, value);
            }
        }
    }
    message.group = match &config.key {
        Some(KeyFrom::Subject) => Some(msg.subject.to_string()),
        Some(KeyFrom::Header(name)) => headers
            .and_then(|h| h.get(name.as_str()))
            .map(|v| v.as_str().to_owned()),
        None => None,
    };
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publishers_id_wins_else_stream_and_sequence() {
        let mut headers = async_nats::HeaderMap::new();
        assert_eq!(id(Some(&headers), "ORDERS", 7), "ORDERS:7");
        headers.insert("Nats-Msg-Id", "order-42");
        assert_eq!(id(Some(&headers), "ORDERS", 7), "order-42");
        assert_eq!(id(None, "ORDERS", 8), "ORDERS:8");
    }
}

//! The `cloudevents` mode: CloudEvents 1.0 over HTTP in binary mode — the payload is the
//! body and the event's attributes travel as `ce-*` headers — so endpoints built on a
//! CloudEvents SDK take ferry's requests as events without an adapter.
//!
//! A message that already is a CloudEvent (Kafka's binary mode puts `ce_*` headers on the
//! record; other producers use `ce-*` attributes) keeps its own attributes; ferry only fills
//! in what is missing from the message's id, source and timestamp.

use ferry_core::Message;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

/// The `ce-type` of a message that does not carry its own.
pub const DEFAULT_TYPE: &str = "ferry.message";

/// Adds the `ce-*` headers and the content type of the payload.
pub fn cloudevent_headers(message: &Message, headers: &mut HeaderMap) {
    for (name, value) in &message.attributes {
        let Some(attribute) = name
            .strip_prefix("ce_")
            .or_else(|| name.strip_prefix("ce-"))
        else {
            continue;
        };
        let header = format!("ce-{}", attribute.to_ascii_lowercase());
        if let (Ok(header), Ok(value)) = (
            HeaderName::from_bytes(header.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(header, value);
        }
    }
    let time = humantime::format_rfc3339_millis(message.timestamp).to_string();
    let defaults: [(&'static str, &str); 5] = [
        ("ce-specversion", "1.0"),
        ("ce-id", &message.id),
        ("ce-source", &message.source),
        ("ce-type", DEFAULT_TYPE),
        ("ce-time", &time),
    ];
    for (name, value) in defaults {
        if !headers.contains_key(name) {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
    }
    let content_type = message
        .attributes
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type") || k.as_str() == "ce_datacontenttype")
        .and_then(|(_, v)| HeaderValue::from_str(v).ok())
        .unwrap_or_else(|| HeaderValue::from_static(sniff(&message.payload)));
    headers.insert(CONTENT_TYPE, content_type);
}

/// The content type of a payload that does not say: JSON, text or bytes.
fn sniff(payload: &[u8]) -> &'static str {
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            "application/json"
        }
        Ok(_) => "text/plain; charset=utf-8",
        Err(_) => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn required_attributes_from_the_message() {
        let mut m = Message::new("id-1", r#"{"a":1}"#, Arc::from("orders"));
        m.timestamp = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let mut h = HeaderMap::new();
        cloudevent_headers(&m, &mut h);
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-id"], "id-1");
        assert_eq!(h["ce-source"], "orders");
        assert_eq!(h["ce-type"], DEFAULT_TYPE);
        assert_eq!(h["ce-time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(h[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn a_message_that_is_a_cloudevent_keeps_its_attributes() {
        let mut m = Message::new("id-2", "plain", Arc::from("topic"));
        m.attributes
            .insert("ce_type".into(), "com.example.order.created".into());
        m.attributes.insert("ce_source".into(), "/shop".into());
        m.attributes.insert("ce_id".into(), "evt-9".into());
        m.attributes.insert("tenant".into(), "acme".into());
        let mut h = HeaderMap::new();
        cloudevent_headers(&m, &mut h);
        assert_eq!(h["ce-type"], "com.example.order.created");
        assert_eq!(h["ce-source"], "/shop");
        assert_eq!(h["ce-id"], "evt-9");
        assert!(!h.contains_key("ce-tenant"));
        assert_eq!(h[CONTENT_TYPE], "text/plain; charset=utf-8");
        let m = Message::new("id-3", vec![0xff, 0], Arc::from("q"));
        let mut h = HeaderMap::new();
        cloudevent_headers(&m, &mut h);
        assert_eq!(h[CONTENT_TYPE], "application/octet-stream");
    }
}

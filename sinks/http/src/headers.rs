//! The per-message headers of the delivery contract.

use ferry_core::Message;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

// Names built once: parsing and validating a name on every insert cost more than the rest
// of the header map on the hot path.
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const MESSAGE_ID: HeaderName = HeaderName::from_static("x-ferry-message-id");
const ATTEMPT: HeaderName = HeaderName::from_static("x-ferry-attempt");
const ROUTE: HeaderName = HeaderName::from_static("x-ferry-route");
const SOURCE: HeaderName = HeaderName::from_static("x-ferry-source");
const FIRST_RECEIVED_AT: HeaderName = HeaderName::from_static("x-ferry-first-received-at");
const GROUP: HeaderName = HeaderName::from_static("x-ferry-group");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const ATTRIBUTES_OMITTED: HeaderName = HeaderName::from_static("x-ferry-attributes-omitted");

/// At most this many `X-Ferry-Attr-*` headers per request, and at most this many bytes of
/// them (names and values): servers refuse requests with more than about 100 headers
/// (hyper) or 8 to 16 KiB of them (nginx, Node) with a 431, which no retry would change.
/// The attributes left out travel only in the envelope body.
pub const MAX_ATTRIBUTE_HEADERS: usize = 64;
/// See [`MAX_ATTRIBUTE_HEADERS`].
pub const MAX_ATTRIBUTE_HEADER_BYTES: usize = 8 * 1024;

/// Adds the contract's per-message headers to `headers`.
///
/// A value that cannot travel in a header (non-visible characters) is left out of the
/// headers rather than mangled; the body still carries every attribute. Attributes beyond
/// [`MAX_ATTRIBUTE_HEADERS`] or [`MAX_ATTRIBUTE_HEADER_BYTES`] are left out too (in name
/// order, each one that still fits is sent), and `X-Ferry-Attributes-Omitted` says how
/// many were.
pub fn message_headers(message: &Message, route: &HeaderValue, headers: &mut HeaderMap) {
    headers.reserve(9 + message.attributes.len().min(MAX_ATTRIBUTE_HEADERS));
    if let Ok(id) = HeaderValue::from_str(&message.id) {
        headers.insert(IDEMPOTENCY_KEY, id.clone());
        headers.insert(MESSAGE_ID, id);
    }
    headers.insert(ATTEMPT, HeaderValue::from(message.attempt));
    headers.insert(ROUTE, route.clone());
    put(headers, SOURCE, &message.source);
    if let Some(at) = message.first_received_at {
        put(
            headers,
            FIRST_RECEIVED_AT,
            &humantime::format_rfc3339_millis(at).to_string(),
        );
    }
    if let Some(group) = &message.group {
        put(headers, GROUP, group);
    }
    if let Some(tp) = &message.traceparent {
        put(headers, TRACEPARENT, tp);
        // W3C trace context: vendor state travels with its parent, never alone.
        if let Some(state) = message.attributes.get("tracestate") {
            put(headers, TRACESTATE, state);
        }
    }
    let (mut sent, mut bytes, mut omitted) = (0usize, 0usize, 0usize);
    for (name, value) in &message.attributes {
        let size = "x-ferry-attr-".len() + name.len() + value.len();
        if sent == MAX_ATTRIBUTE_HEADERS || bytes + size > MAX_ATTRIBUTE_HEADER_BYTES {
            omitted += 1;
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(format!("x-ferry-attr-{name}").as_bytes()) else {
            continue;
        };
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.append(name, value);
            sent += 1;
            bytes += size;
        }
    }
    if omitted > 0 {
        headers.insert(ATTRIBUTES_OMITTED, HeaderValue::from(omitted));
    }
}

fn put(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn contract_headers() {
        let mut m = Message::new("abc", "x", Arc::from("orders-consumer"));
        m.attempt = 3;
        m.group = Some("g1".into());
        m.attributes.insert("tenant".into(), "acme".into());
        m.attributes.insert("bad name".into(), "x".into());
        m.attributes.insert("newline".into(), "a\nb".into());
        let mut h = HeaderMap::new();
        message_headers(&m, &HeaderValue::from_static("orders"), &mut h);
        assert_eq!(h["idempotency-key"], "abc");
        assert_eq!(h["x-ferry-message-id"], "abc");
        assert_eq!(h["x-ferry-attempt"], "3");
        assert_eq!(h["x-ferry-route"], "orders");
        assert_eq!(h["x-ferry-source"], "orders-consumer");
        assert_eq!(h["x-ferry-group"], "g1");
        assert_eq!(h["x-ferry-attr-tenant"], "acme");
        assert!(!h.contains_key("x-ferry-attr-newline"));
        assert!(!h.contains_key("x-ferry-first-received-at"));
        assert!(!h.contains_key("traceparent"));
        assert!(!h.contains_key("x-ferry-attributes-omitted"));
    }

    #[test]
    fn attribute_headers_are_capped_in_number_and_bytes() {
        let mut m = Message::new("abc", "x", Arc::from("q"));
        for i in 0..500 {
            m.attributes.insert(format!("a{i:03}"), "v".into());
        }
        let mut h = HeaderMap::new();
        message_headers(&m, &HeaderValue::from_static("r"), &mut h);
        let attrs = |h: &HeaderMap| {
            h.keys()
                .filter(|k| k.as_str().starts_with("x-ferry-attr-"))
                .count()
        };
        assert_eq!(attrs(&h), MAX_ATTRIBUTE_HEADERS);
        assert_eq!(h["x-ferry-attr-a000"], "v", "the first names in order");
        assert_eq!(h["x-ferry-attributes-omitted"], "436");

        let mut m = Message::new("abc", "x", Arc::from("q"));
        for i in 0..16 {
            m.attributes.insert(format!("big{i:02}"), "x".repeat(4096));
        }
        m.attributes.insert("small".into(), "s".into());
        let mut h = HeaderMap::new();
        message_headers(&m, &HeaderValue::from_static("r"), &mut h);
        let bytes: usize = h
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("x-ferry-attr-"))
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        assert!(bytes <= MAX_ATTRIBUTE_HEADER_BYTES, "{bytes} bytes");
        assert_eq!(
            h["x-ferry-attr-small"], "s",
            "a later one that fits is sent"
        );
        assert_eq!(h["x-ferry-attributes-omitted"], "15");
    }

    #[test]
    fn trace_context_travels_as_w3c_headers() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut m = Message::new("abc", "x", Arc::from("q"));
        m.attributes
            .insert("tracestate".into(), "congo=t61rcWkgMzE".into());
        let mut h = HeaderMap::new();
        message_headers(&m, &HeaderValue::from_static("r"), &mut h);
        assert!(
            !h.contains_key("tracestate"),
            "tracestate without a traceparent"
        );
        m.traceparent = Some(tp.into());
        message_headers(&m, &HeaderValue::from_static("r"), &mut h);
        assert_eq!(h["traceparent"], tp);
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
    }
}

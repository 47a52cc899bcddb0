//! The `envelope` body format.

use std::collections::BTreeMap;

use base64::Engine as _;
use ferry_core::Message;
use serde::Serialize;

#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg_base64: Option<String>,
    timestamp: String,
    attributes: &'a BTreeMap<String, String>,
    /// Only in a batch, where there is no `X-Ferry-Attempt` per message.
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
}

/// Encodes `{"id", "msg", "timestamp", "attributes"}`; a payload that is not UTF-8 goes
/// as `msg_base64` so that no byte is lost or replaced.
pub fn encode_envelope(message: &Message) -> Vec<u8> {
    let envelope = envelope(message, None);
    let mut body = Vec::with_capacity(envelope.encoded_len());
    // Serializing strings and a string map into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, &envelope);
    body
}

/// Encodes a batch: a JSON array of envelopes, each with its `attempt`.
pub fn encode_batch(messages: &[Message]) -> Vec<u8> {
    let envelopes: Vec<Envelope<'_>> = messages
        .iter()
        .map(|m| envelope(m, Some(m.attempt)))
        .collect();
    let len = envelopes.iter().map(|e| e.encoded_len() + 1).sum::<usize>() + 2;
    let mut body = Vec::with_capacity(len);
    let _ = serde_json::to_writer(&mut body, &envelopes);
    body
}

impl Envelope<'_> {
    /// Its JSON's length when nothing in it needs escaping: the body is written into a
    /// buffer of this size, so that a big payload is copied once rather than again at
    /// every doubling of a growing buffer (escaping may still grow it once).
    fn encoded_len(&self) -> usize {
        // Field names, quotes, braces and the attempt.
        const FIXED: usize = 80;
        let payload =
            self.msg.map_or(0, str::len) + self.msg_base64.as_ref().map_or(0, String::len);
        let attributes: usize = self
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum();
        FIXED + self.id.len() + self.timestamp.len() + payload + attributes
    }
}

fn envelope(message: &Message, attempt: Option<u32>) -> Envelope<'_> {
    let (msg, msg_base64) = match std::str::from_utf8(&message.payload) {
        Ok(text) => (Some(text), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
        ),
    };
    Envelope {
        id: &message.id,
        msg,
        msg_base64,
        timestamp: humantime::format_rfc3339_millis(message.timestamp).to_string(),
        attributes: &message.attributes,
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn utf8_and_binary_payloads() {
        let mut m = Message::new("id-1", "héllo \"x\"", Arc::from("q"));
        m.timestamp = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        m.attributes.insert("k".into(), "v".into());
        let v: serde_json::Value = serde_json::from_slice(&encode_envelope(&m)).expect("json");
        assert_eq!(v["id"], "id-1");
        assert_eq!(v["msg"], "héllo \"x\"");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["attributes"]["k"], "v");
        assert!(v.get("msg_base64").is_none());

        let m = Message::new("id-2", vec![0xff, 0x00, 0x80], Arc::from("q"));
        let v: serde_json::Value = serde_json::from_slice(&encode_envelope(&m)).expect("json");
        assert!(v.get("msg").is_none());
        assert_eq!(v["msg_base64"], "/wCA");
        assert!(v.get("attempt").is_none());
    }

    #[test]
    fn the_buffer_is_sized_for_a_big_payload_up_front() {
        let m = Message::new("id-3", "x".repeat(256 * 1024), Arc::from("q"));
        let body = encode_envelope(&m);
        // One allocation of about the body's size: not grown by doubling past it.
        assert!(body.capacity() >= body.len(), "{}", body.capacity());
        assert!(
            body.capacity() < body.len() + 256,
            "{} for {}",
            body.capacity(),
            body.len()
        );
    }

    #[test]
    fn a_batch_is_an_array_of_envelopes_with_attempts() {
        let mut second = Message::new("id-2", "two", Arc::from("q"));
        second.attempt = 3;
        let batch = [Message::new("id-1", "one", Arc::from("q")), second];
        let v: serde_json::Value = serde_json::from_slice(&encode_batch(&batch)).expect("json");
        assert_eq!(v[0]["id"], "id-1");
        assert_eq!(v[0]["msg"], "one");
        assert_eq!(v[0]["attempt"], 1);
        assert_eq!(v[1]["id"], "id-2");
        assert_eq!(v[1]["attempt"], 3);
    }
}

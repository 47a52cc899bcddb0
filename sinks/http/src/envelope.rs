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
    // Serializing strings and a string map cannot fail.
    serde_json::to_vec(&envelope(message, None)).unwrap_or_default()
}

/// Encodes a batch: a JSON array of envelopes, each with its `attempt`.
pub fn encode_batch(messages: &[Message]) -> Vec<u8> {
    let envelopes: Vec<Envelope<'_>> = messages
        .iter()
        .map(|m| envelope(m, Some(m.attempt)))
        .collect();
    serde_json::to_vec(&envelopes).unwrap_or_default()
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

//! Messages that must not be delivered, dead-lettered with a reason before any request is
//! made: a message its source refused (see [`Message::refused`]: a forged envelope, say),
//! which the endpoint must never see as if genuine, and a message beyond the route's
//! `max_message_bytes` (by default the broker's own maximum), so that an endpoint that
//! refuses it, or a proxy that cuts it off, never sees it come round again and again.

use std::time::Instant;

use super::{dead_letter, Shared};
use crate::ack::AckHandle;
use crate::message::Message;
use crate::sink::SinkResponse;
use crate::source::Source;

/// The limit a route delivers up to: its own `max_message_bytes`, else the source's maximum.
pub(super) fn limit(configured: Option<usize>, source: &impl Source) -> Option<usize> {
    configured.or_else(|| source.max_message_bytes())
}

/// What a message weighs against the limit: its payload and its attributes (names and
/// values), as brokers count a message's size.
pub(super) fn size(message: &Message) -> usize {
    let attributes: usize = message
        .attributes
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum();
    message.payload.len() + attributes
}

/// Why the message may not be delivered, if it may not: its source's refusal, else its
/// size against the limit.
fn refusal(message: &Message, max: Option<usize>) -> Option<String> {
    if let Some(reason) = &message.refused {
        return Some(reason.clone());
    }
    let max = max?;
    let bytes = size(message);
    (bytes > max)
        .then(|| format!("message of {bytes} bytes is larger than max_message_bytes ({max})"))
}

/// Hands the message's handle back if it may be delivered; otherwise dead-letters it (with
/// the source's refusal, or its size and the limit, as the reason) and returns `None`.
pub(super) fn admit<K>(shared: &Shared<K>, message: &Message, ack: AckHandle) -> Option<AckHandle> {
    let Some(reason) = refusal(message, shared.policy.max_message_bytes) else {
        return Some(ack);
    };
    // No request was made: the dead letter carries no status.
    let none = SinkResponse::Error(reason.clone());
    dead_letter(shared, message, ack, &none, reason, Instant::now());
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn payload_and_attributes_count() {
        let mut m = Message::new("id", vec![0u8; 100], Arc::from("q"));
        assert_eq!(size(&m), 100);
        m.attributes.insert("tenant".into(), "acme".into());
        assert_eq!(size(&m), 110);
    }

    #[test]
    fn a_refusal_wins_over_any_size() {
        let mut m = Message::new("id", vec![0u8; 10], Arc::from("q"));
        assert_eq!(refusal(&m, None), None);
        assert_eq!(refusal(&m, Some(10)), None);
        assert!(refusal(&m, Some(9)).is_some_and(|r| r.contains("max_message_bytes")));
        m.refuse("forged");
        assert_eq!(refusal(&m, None).as_deref(), Some("forged"));
        assert_eq!(refusal(&m, Some(9)).as_deref(), Some("forged"));
    }
}

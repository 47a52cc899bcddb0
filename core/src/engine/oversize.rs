//! Messages too large to deliver: a message beyond the route's `max_message_bytes` (by
//! default the broker's own maximum) is dead-lettered with a reason before any request is
//! made, so an endpoint that refuses it, or a proxy that cuts it off, never sees it come
//! round again and again.

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

/// Hands the message's handle back if it may be delivered; otherwise dead-letters it (with
/// its size and the limit as the reason) and returns `None`.
pub(super) fn admit<K>(shared: &Shared<K>, message: &Message, ack: AckHandle) -> Option<AckHandle> {
    let Some(max) = shared.policy.max_message_bytes else {
        return Some(ack);
    };
    let bytes = size(message);
    if bytes <= max {
        return Some(ack);
    }
    let reason = format!("message of {bytes} bytes is larger than max_message_bytes ({max})");
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
}

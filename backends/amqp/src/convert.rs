//! From an AMQP delivery to a ferry [`Message`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::message::plausible_since_epoch;
use ferry_core::Message;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use tracing::debug;

/// The header quorum queues use to count earlier deliveries.
const DELIVERY_COUNT: &str = "x-delivery-count";

fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        _ => return None,
    })
}

/// Numbers messages that carry no usable `message_id`, within this process.
static SYNTHETIC: AtomicU64 = AtomicU64::new(0);

/// 128 random bits drawn once per process. The process id and a counter alone repeat:
/// in a container ferry is PID 1 in every replica and after every restart, and an
/// endpoint that deduplicates on `Idempotency-Key` would drop real messages.
fn instance_id() -> &'static str {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTANCE.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

/// An id for a message without a usable `message_id`: unique across processes, hosts
/// and restarts (the instance id), and within the process (the counter).
fn made_up_id(source: &str) -> String {
    format!(
        "{source}-{}-{}",
        instance_id(),
        SYNTHETIC.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when `id` can travel as the `Idempotency-Key` header as it is: not blank, and no
/// control characters (CR/LF would split the header, the HTTP client refuses the rest).
fn is_header_value(id: &str) -> bool {
    !id.trim().is_empty() && id.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Builds the message; `group_header` names the header that carries the ordering key
/// (the routing key when absent).
/// Takes the delivery: its body becomes the payload without a copy, and its properties
/// come back as they are (a dead letter is published with them).
pub(crate) fn convert(
    mut delivery: Delivery,
    source: &Arc<str>,
    group_header: Option<&str>,
) -> (Message, BasicProperties) {
    let props = &delivery.properties;
    // Publishers should set message_id: it is the only id that survives redelivery.
    let id = match props.message_id() {
        Some(id) if is_header_value(id.as_str()) => id.as_str().to_owned(),
        Some(id) => {
            let made_up = made_up_id(source);
            debug!(queue = %source, id = %made_up, length = id.as_str().len(),
                "message_id is not a valid header value (blank or control characters); using a made-up id");
            made_up
        }
        None => made_up_id(source),
    };
    let mut message = Message::new(id, std::mem::take(&mut delivery.data), source.clone());
    if let Some(at) = props
        .timestamp()
        .and_then(|ts| plausible_since_epoch(Duration::from_secs(ts)))
    {
        message.timestamp = at;
    }
    let mut delivery_count = None;
    if let Some(headers) = props.headers() {
        for (name, value) in headers.inner() {
            if name.as_str() == DELIVERY_COUNT {
                delivery_count = text(value).and_then(|v| v.parse::<u32>().ok());
                continue;
            }
            if let Some(v) = text(value) {
                message.attributes.insert(name.as_str().to_owned(), v);
            }
        }
    }
    message.attempt = match delivery_count {
        Some(n) => n.saturating_add(1),
        None if delivery.redelivered => 2,
        None => 1,
    };
    message.traceparent = message.attributes.get("traceparent").cloned();
    message.group = match group_header {
        Some(h) => message.attributes.get(h).cloned(),
        None => Some(delivery.routing_key.as_str().to_owned()).filter(|k| !k.is_empty()),
    };
    (message, delivery.properties)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_ids_carry_an_instance_id_and_never_repeat_here() {
        let a = made_up_id("q");
        let b = made_up_id("q");
        assert_ne!(a, b);
        let instance = instance_id();
        assert_eq!(instance.len(), 32);
        assert!(a.starts_with(&format!("q-{instance}-")), "{a}");
    }

    #[test]
    fn only_ids_that_are_header_values_are_kept() {
        assert!(is_header_value("order-42"));
        assert!(is_header_value("a b\tc"));
        assert!(is_header_value("ümlaut"));
        for bad in ["", "  ", "a\r\nX-Evil: 1", "a\nb", "nul\0", "del\x7f"] {
            assert!(!is_header_value(bad), "{bad:?}");
        }
    }
}

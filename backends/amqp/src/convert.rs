//! From an AMQP delivery to a ferry [`Message`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::message::plausible_since_epoch;
use ferry_core::Message;
use lapin::message::Delivery;
use lapin::types::AMQPValue;

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

/// Numbers messages that carry no `message_id`, so that every message has an id.
static SYNTHETIC: AtomicU64 = AtomicU64::new(0);

/// The process id, asked of the kernel once (it is a system call, and every message
/// without an id would ask again).
fn process_id() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// Builds the message; `group_header` names the header that carries the ordering key
/// (the routing key when absent).
/// Takes the delivery: its body becomes the payload without a copy.
pub(crate) fn convert(
    mut delivery: Delivery,
    source: &Arc<str>,
    group_header: Option<&str>,
) -> Message {
    let props = &delivery.properties;
    // Publishers should set message_id: it is the only id that survives redelivery.
    let id = match props.message_id() {
        Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
        _ => format!(
            "{source}-{}-{}",
            process_id(),
            SYNTHETIC.fetch_add(1, Ordering::Relaxed)
        ),
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
    message
}

//! From an MQTT `PUBLISH` to a ferry [`Message`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ferry_core::Message;
use rumqttc::v5::mqttbytes::v5::Publish;

/// Numbers messages that carry no usable id, within this process.
static MADE_UP: AtomicU64 = AtomicU64::new(0);

/// 128 random bits drawn once per process: with the counter, made-up ids never repeat
/// across replicas or restarts (in a container ferry is PID 1 every time).
fn instance_id() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

/// An id for a message without one: MQTT has none of its own.
fn made_up_id() -> String {
    format!(
        "mqtt-{}-{}",
        instance_id(),
        MADE_UP.fetch_add(1, Ordering::Relaxed)
    )
}

/// True when `id` can travel as the `Idempotency-Key` header as it is.
fn is_header_value(id: &str) -> bool {
    !id.trim().is_empty() && id.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// How the route reads messages.
pub(crate) struct Reading<'a> {
    pub(crate) id_property: &'a str,
    pub(crate) key_property: Option<&'a str>,
}

/// Builds the message: the payload unchanged, user properties as attributes (a name given
/// twice keeps its last value), the content type as `content-type`, the id from
/// `id_property` (else made up), the ordering key from `key_property` (else the topic).
/// MQTT carries no publish time, so the timestamp is when ferry received it. A copy the
/// broker sends again (DUP flag) is at least the second delivery.
pub(crate) fn message(p: &Publish, reading: &Reading<'_>) -> Message {
    let topic: Arc<str> = Arc::from(String::from_utf8_lossy(&p.topic).as_ref());
    let mut message = Message::new(String::new(), p.payload.clone(), topic.clone());
    if let Some(props) = &p.properties {
        for (k, v) in &props.user_properties {
            message.attributes.insert(k.clone(), v.clone());
        }
        if let Some(ct) = &props.content_type {
            message
                .attributes
                .entry("content-type".to_owned())
                .or_insert_with(|| ct.clone());
        }
    }
    message.id = match message.attributes.get(reading.id_property) {
        Some(id) if is_header_value(id) => id.clone(),
        _ => made_up_id(),
    };
    message.group = match reading.key_property {
        Some(k) => message.attributes.get(k).cloned(),
        None => Some(topic.to_string()),
    };
    message.traceparent = message.attributes.get("traceparent").cloned();
    message.attempt = if p.dup { 2 } else { 1 };
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;

    #[test]
    fn properties_become_attributes_and_the_id_comes_from_one() {
        let props = PublishProperties {
            user_properties: vec![
                ("message-id".into(), "abc".into()),
                ("k".into(), "v".into()),
            ],
            ..PublishProperties::default()
        };
        let mut p = Publish::new("orders/eu", QoS::AtLeastOnce, "hi", Some(props));
        p.dup = true;
        let reading = Reading {
            id_property: "message-id",
            key_property: None,
        };
        let m = message(&p, &reading);
        assert_eq!(m.id, "abc");
        assert_eq!(&*m.source, "orders/eu");
        assert_eq!(m.group.as_deref(), Some("orders/eu"));
        assert_eq!(m.attempt, 2);
        assert_eq!(m.attributes.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn made_up_ids_never_repeat() {
        let p = Publish::new("t", QoS::AtLeastOnce, "x", None);
        let reading = Reading {
            id_property: "message-id",
            key_property: Some("key"),
        };
        let (a, b) = (message(&p, &reading), message(&p, &reading));
        assert_ne!(a.id, b.id);
        assert!(a.id.contains(instance_id()));
        assert_eq!(a.group, None);
        assert_eq!(a.attempt, 1);
    }
}

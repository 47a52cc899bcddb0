//! Dead letters ferry publishes itself (`dead_letter_exchange`).
//!
//! RabbitMQ discards a message rejected without requeue on a queue that has no dead-letter
//! exchange, and nothing tells the consumer. So ferry publishes the dead letter to the
//! configured exchange on a channel of its own with publisher confirms (and `mandatory`, so
//! that a message no queue is bound for comes back instead of vanishing), and acks the
//! original only once the broker confirmed. A failure leaves the original unacked and the
//! publish is retried with backoff until it lands, the channel it came on is lost (the
//! broker then hands it out again) or ferry stops (likewise).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_core::{DeadLetter, SourceContext};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{backoff, one_line, AmqpConfig, AmqpError, DeadLetters};

/// The headers ferry adds to a dead letter: why (the endpoint's answer or the engine's
/// reason, cut to 1 KB), the last HTTP status (or `timeout`, `error`, ... when there was
/// none), the attempts made and the route. A redrive
/// removes them again.
pub const DEAD_LETTER_HEADERS: [&str; 4] = [
    "ferry_reason",
    "ferry_status",
    "ferry_attempts",
    "ferry_route",
];

/// How long the broker may take to confirm one dead letter before it counts as failed
/// (a broker under a memory alarm blocks publishers without answering).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The parts of a delivery a dead letter is published with.
pub(crate) struct Original {
    pub(crate) payload: Bytes,
    pub(crate) properties: BasicProperties,
}

/// One dead letter to publish, then ack by its delivery tag.
pub(crate) struct Op {
    pub(crate) tag: u64,
    pub(crate) original: Box<Original>,
    pub(crate) why: DeadLetter,
}

/// Declares the dead-letter exchange and its queue (`declare = true`).
pub(crate) async fn declare(channel: &Channel, config: &AmqpConfig) -> Result<(), AmqpError> {
    let DeadLetters::Exchange {
        exchange,
        routing_key,
    } = &config.dead_letters
    else {
        return Ok(());
    };
    let failed = |e: lapin::Error| AmqpError::DeadLetterExchange {
        exchange: exchange.clone(),
        detail: one_line(&e),
    };
    let queue = config.dead_letter_queue().unwrap_or_default();
    if !exchange.is_empty() {
        declare_exchange(channel, exchange, false)
            .await
            .map_err(failed)?;
    }
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(failed)?;
    if !exchange.is_empty() {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed)?;
    }
    Ok(())
}

/// Checks that the dead-letter exchange exists, on a channel of its own (a passive declare
/// of a missing exchange closes its channel).
pub(crate) async fn check(connection: &Connection, config: &AmqpConfig) -> Result<(), AmqpError> {
    let DeadLetters::Exchange { exchange, .. } = &config.dead_letters else {
        return Ok(());
    };
    if exchange.is_empty() {
        return Ok(());
    }
    let failed = |e: lapin::Error| AmqpError::DeadLetterExchange {
        exchange: exchange.clone(),
        detail: one_line(&e),
    };
    let channel = connection.create_channel().await.map_err(failed)?;
    declare_exchange(&channel, exchange, true)
        .await
        .map_err(failed)?;
    let _ = channel.close(200, "checked".into()).await;
    Ok(())
}

/// Declares the exchange durable and direct, or with `passive` only checks that it exists.
async fn declare_exchange(channel: &Channel, exchange: &str, passive: bool) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive,
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Publishes the dead letters of one consuming channel.
pub(crate) struct Publisher {
    pub(crate) connection: Arc<Connection>,
    /// The channel the originals came on; once it is lost they are back on the queue.
    pub(crate) consumer: Arc<Channel>,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    /// Where the original is acked once its dead letter is confirmed.
    pub(crate) settle: mpsc::UnboundedSender<crate::settle::Op>,
    pub(crate) ctx: SourceContext,
}

impl Publisher {
    /// Publishes each dead letter, then acks its original; ends when every handle of the
    /// channel is gone.
    pub(crate) async fn run(self, mut ops: mpsc::UnboundedReceiver<Op>) {
        let mut channel = None;
        let mut failing = false;
        while let Some(op) = ops.recv().await {
            let mut failures = 0u32;
            loop {
                if !self.consumer.status().connected() {
                    debug!(route = %self.ctx.route, tag = op.tag,
                        "the original's channel is gone; the broker hands it out again");
                    break;
                }
                match self.publish(&mut channel, &op).await {
                    Ok(()) => {
                        self.ctx.counts.dead_lettered.inc();
                        let _ = self.settle.send((op.tag, ferry_core::Settlement::Ack));
                        if failing {
                            info!(route = %self.ctx.route, exchange = %self.exchange,
                                "dead letters land on the dead-letter exchange again");
                            failing = false;
                        }
                        break;
                    }
                    Err(detail) => {
                        self.ctx.counts.broker_errors.count("dead_letter", 1);
                        channel = None;
                        failures += 1;
                        if !failing {
                            warn!(route = %self.ctx.route, exchange = %self.exchange, error = %detail,
                                "cannot publish a dead letter; the original stays unacked and the publish is retried");
                            failing = true;
                        } else {
                            debug!(route = %self.ctx.route, error = %detail, "dead-letter publish failed again");
                        }
                        // Stopping: the original goes back to the queue with the channel.
                        tokio::select! {
                            _ = self.ctx.shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff(failures)) => {}
                        }
                    }
                }
            }
        }
        if let Some(channel) = channel {
            let _ = channel.close(200, "ferry done".into()).await;
        }
    }

    /// One publish and its confirm, on `channel` (opened first when there is none).
    async fn publish(&self, channel: &mut Option<Channel>, op: &Op) -> Result<(), String> {
        let open = match channel.take() {
            Some(c) if c.status().connected() => c,
            _ => {
                let c = self
                    .connection
                    .create_channel()
                    .await
                    .map_err(|e| one_line(&e))?;
                c.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| one_line(&e))?;
                c
            }
        };
        let properties = with_reasons(&op.original.properties, &op.why, &self.ctx.route);
        let confirm = async {
            open.basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &op.original.payload,
                properties,
            )
            .await?
            .await
        };
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| format!("no confirm within {CONFIRM_TIMEOUT:?}"))?
            .map_err(|e| one_line(&e))?;
        *channel = Some(open);
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(format!(
                "unroutable: no queue is bound to exchange {:?} for routing key {:?}",
                self.exchange, self.routing_key
            )),
            Confirmation::Nack(_) => Err("the broker refused the dead letter (nack)".into()),
            Confirmation::NotRequested => Err("publisher confirms are off".into()),
        }
    }
}

/// The original properties, with ferry's dead-letter headers added to its headers.
fn with_reasons(properties: &BasicProperties, why: &DeadLetter, route: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut reason: String = why.reason.chars().take(1024).collect();
    if reason.is_empty() {
        reason.push('-');
    }
    let [reason_key, status_key, attempts_key, route_key] = DEAD_LETTER_HEADERS;
    headers.insert(reason_key.into(), AMQPValue::LongString(reason.into()));
    // The status, or what the last attempt came to (`timeout`, `error`) without one.
    headers.insert(
        status_key.into(),
        AMQPValue::LongString(why.last_status().into()),
    );
    headers.insert(attempts_key.into(), AMQPValue::LongUInt(why.attempts));
    headers.insert(route_key.into(), AMQPValue::LongString(route.into()));
    properties.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::ShortString;

    #[test]
    fn a_dead_letter_keeps_the_original_properties_and_says_why() {
        let mut original_headers = FieldTable::default();
        original_headers.insert("tenant".into(), AMQPValue::LongString("t1".into()));
        let original = BasicProperties::default()
            .with_message_id(ShortString::from("m-1"))
            .with_delivery_mode(2)
            .with_headers(original_headers);
        let why = DeadLetter {
            reason: "x".repeat(2000),
            status: Some(422),
            last_class: "4xx",
            attempts: 3,
        };
        let props = with_reasons(&original, &why, "orders");
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(props.delivery_mode(), &Some(2));
        let headers = props.headers().clone().unwrap_or_default();
        let get = |k: &str| headers.inner().get(k).cloned();
        assert_eq!(get("tenant"), Some(AMQPValue::LongString("t1".into())));
        assert_eq!(
            get("ferry_status"),
            Some(AMQPValue::LongString("422".into()))
        );
        assert_eq!(get("ferry_attempts"), Some(AMQPValue::LongUInt(3)));
        assert_eq!(
            get("ferry_route"),
            Some(AMQPValue::LongString("orders".into()))
        );
        match get("ferry_reason") {
            Some(AMQPValue::LongString(s)) => assert_eq!(s.as_bytes().len(), 1024),
            other => panic!("ferry_reason: {other:?}"),
        }
        let timed_out = DeadLetter {
            reason: "timeout".into(),
            status: None,
            last_class: "timeout",
            attempts: 10,
        };
        let props = with_reasons(&original, &timed_out, "orders");
        let headers = props.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get("ferry_status"),
            Some(&AMQPValue::LongString("timeout".into()))
        );
    }
}

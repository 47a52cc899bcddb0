//! RabbitMQ through lapin: queues with a dead-letter queue, publishing with confirms, depth.

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::conformance::Outgoing;

/// The local broker (`FERRY_TEST_AMQP_URI`, default guest on 127.0.0.1:5672).
pub fn amqp_uri() -> String {
    std::env::var("FERRY_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A publishing and inspecting connection to the local broker.
pub struct Rabbit {
    _connection: Connection,
    channel: Channel,
}

/// An exclusive consumer of a queue; [`ExclusiveHolder::release`] lets others consume
/// (what it held unacked goes back to the queue).
pub struct ExclusiveHolder {
    connection: Connection,
    _consumer: lapin::Consumer,
}

impl ExclusiveHolder {
    /// Closes its connection.
    pub async fn release(self) {
        self.connection
            .close(200, "released".into())
            .await
            .expect("close the holder");
    }
}

/// A test queue and its dead-letter queue.
pub struct RabbitQueue {
    /// The queue ferry consumes.
    pub name: String,
    /// Where rejected messages go (through the default exchange).
    pub dead_letter: String,
}

impl Rabbit {
    /// Connects; panics with a clear message when the broker is not running.
    pub async fn connect() -> Self {
        let uri = amqp_uri();
        let connection = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ is not reachable at 127.0.0.1:5672 ({e}); start it with `rabbitmq-server -detached`")
            });
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self {
            _connection: connection,
            channel,
        }
    }

    /// Declares a fresh queue whose rejected messages go to a fresh dead-letter queue.
    pub async fn queue(&self, prefix: &str) -> RabbitQueue {
        let name = crate::unique(prefix);
        let dead_letter = format!("{name}-dlq");
        self.declare(&dead_letter, FieldTable::default()).await;
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(dead_letter.as_str().into()),
        );
        self.declare(&name, args).await;
        RabbitQueue { name, dead_letter }
    }

    async fn declare(&self, name: &str, args: FieldTable) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .expect("declare queue");
    }

    /// Publishes each message persistent with a unique `message_id` and its ordering
    /// key in the `key` header, and waits for the broker's confirms.
    pub async fn publish(&self, queue: &str, messages: &[Outgoing]) {
        let batch = messages.iter().map(|message| {
            let mut props = BasicProperties::default()
                .with_message_id(ShortString::from(crate::unique(queue)))
                .with_delivery_mode(2);
            if let Some(key) = &message.key {
                let mut headers = FieldTable::default();
                headers.insert("key".into(), AMQPValue::LongString(key.as_str().into()));
                props = props.with_headers(headers);
            }
            (props, message.body.as_bytes())
        });
        self.publish_confirmed(queue, batch).await;
    }

    /// Publishes each body persistent with `message_id` as given (`None`: no id at all,
    /// as publishers that never set one do), and waits for the broker's confirms.
    pub async fn publish_with_ids(&self, queue: &str, messages: &[(Option<&str>, String)]) {
        let batch = messages.iter().map(|(id, body)| {
            let mut props = BasicProperties::default().with_delivery_mode(2);
            if let Some(id) = id {
                props = props.with_message_id(ShortString::from(*id));
            }
            (props, body.as_bytes())
        });
        self.publish_confirmed(queue, batch).await;
    }

    async fn publish_confirmed<'a>(
        &self,
        queue: &str,
        batch: impl Iterator<Item = (BasicProperties, &'a [u8])>,
    ) {
        let mut confirms = Vec::new();
        for (props, body) in batch {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .expect("publish");
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.expect("confirm");
            assert!(confirmation.is_ack(), "broker refused a publish");
        }
    }

    /// Publishes `n` plain messages `PREFIX-i` (in confirmed chunks) and returns their bodies.
    pub async fn publish_numbered(
        &self,
        queue: &str,
        prefix: &str,
        n: usize,
    ) -> std::collections::BTreeSet<String> {
        let messages: Vec<Outgoing> = (0..n)
            .map(|i| Outgoing::plain(format!("{prefix}-{i}")))
            .collect();
        for chunk in messages.chunks(1000) {
            self.publish(queue, chunk).await;
        }
        messages.into_iter().map(|m| m.body).collect()
    }

    /// Publishes one message with an arbitrary (not necessarily UTF-8) payload.
    pub async fn publish_bytes(&self, queue: &str, payload: &[u8]) {
        self.publish_with_headers(queue, payload, &[]).await;
    }

    /// Publishes one message with these AMQP headers (string values), confirmed.
    pub async fn publish_with_headers(
        &self,
        queue: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut props = BasicProperties::default()
            .with_message_id(ShortString::from(crate::unique(queue)))
            .with_delivery_mode(2);
        if !headers.is_empty() {
            let mut table = FieldTable::default();
            for (name, value) in headers {
                table.insert((*name).into(), AMQPValue::LongString((*value).into()));
            }
            props = props.with_headers(table);
        }
        self.publish_confirmed(queue, std::iter::once((props, payload)))
            .await;
    }

    /// Messages in a queue, ready or handed out and not yet acked. The AMQP protocol only
    /// reports the ready ones, so this asks the broker's own command line.
    pub async fn held(&self, queue: &str) -> u64 {
        let out = tokio::task::spawn_blocking(|| {
            std::process::Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "--quiet",
                    "--no-table-headers",
                    "name",
                    "messages",
                ])
                .output()
        })
        .await
        .expect("rabbitmqctl task")
        .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl list_queues failed: {out:?}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("queue {queue} not listed by rabbitmqctl: {text}"))
    }

    /// Ready messages in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Takes every ready message off a queue: bodies and string headers.
    pub async fn drain(&self, queue: &str) -> Vec<(String, FieldTable)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let headers = m.delivery.properties.headers().clone().unwrap_or_default();
            out.push((
                String::from_utf8_lossy(&m.delivery.data).into_owned(),
                headers,
            ));
        }
        out
    }

    /// Declares a durable direct exchange and a queue bound to it with `routing_key`.
    pub async fn bound_exchange(&self, exchange: &str, queue: &str, routing_key: &str) {
        self.exchange(exchange).await;
        self.declare(queue, FieldTable::default()).await;
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind queue");
    }

    /// Declares a durable direct exchange, bound to nothing.
    pub async fn exchange(&self, exchange: &str) {
        self.channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare exchange");
    }

    /// Deletes an exchange (its bindings go with it).
    pub async fn delete_exchange(&self, exchange: &str) {
        self.channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete exchange");
    }

    /// Consumes `queue` exclusively on a connection of its own (one unacked message at
    /// most), so that nobody else can consume it until the holder is released.
    pub async fn hold_exclusively(queue: &str) -> ExclusiveHolder {
        let connection = Connection::connect(&amqp_uri(), ConnectionProperties::default())
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let consumer = channel
            .basic_consume(
                queue.into(),
                "exclusive-holder".into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exclusive consume");
        ExclusiveHolder {
            connection,
            _consumer: consumer,
        }
    }

    /// Deletes a queue.
    pub async fn delete(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
}

/// A header's value as text (strings and integers), for checking what ferry added.
pub fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    Some(match headers.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

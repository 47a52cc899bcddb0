//! The RabbitMQ (AMQP 0-9-1) source of ferry.
//!
//! One consumer per route with `prefetch` unacked deliveries at most. Acks are coalesced
//! into `multiple` acks where the order allows; dead letters are published by ferry to the
//! configured dead-letter exchange with publisher confirms and acked only once confirmed
//! (or, by explicit choice, rejected to the queue's own dead-letter exchange, or dropped);
//! retries wait in ferry (the broker has no delayed redelivery), never in a hot requeue
//! loop. A lost connection is re-established with backoff while the route, its state and
//! its metrics carry on.

mod convert;
mod dead_letter;
mod redrive;
mod settle;

pub use dead_letter::DEAD_LETTER_HEADERS;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{AckHandle, Delivery, Source, SourceContext, SourceError};
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The `[routes.x.source]` section of an `amqp` route, validated.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost`; holds a secret, never logged.
    pub uri: String,
    /// The queue to consume.
    pub queue: String,
    /// Unacked deliveries at most (`basic.qos`); keep it at least `concurrency`.
    pub prefetch: u16,
    /// Declare the queue (durable) instead of requiring that it exists.
    pub declare: bool,
    /// Header that carries the ordering key; the routing key when `None`.
    pub ordering_header: Option<String>,
    /// Where dead letters go.
    pub dead_letters: DeadLetters,
}

/// Where a dead-lettered message goes. There is no default: RabbitMQ discards a message
/// rejected on a queue without a dead-letter exchange, so dropping must be a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// ferry publishes it to `exchange` with `routing_key` on a channel with publisher
    /// confirms, with ferry's headers added, and acks the original only once confirmed.
    Exchange {
        /// The exchange (`""` is the default exchange: the routing key names the queue).
        exchange: String,
        /// The routing key of the dead letters.
        routing_key: String,
    },
    /// `basic.reject(requeue = false)`: the queue's own `x-dead-letter-exchange` takes it
    /// (the broker discards it when the queue has none).
    Queue,
    /// Acked and discarded.
    Drop,
}

impl AmqpConfig {
    /// The queue dead letters land in, where ferry knows it: the one the routing key names
    /// on the default exchange, or the `<queue>.dead-letter` that `declare = true` binds to
    /// the exchange. Elsewhere the exchange's bindings decide, which AMQP does not tell.
    pub fn dead_letter_queue(&self) -> Option<String> {
        match &self.dead_letters {
            DeadLetters::Exchange {
                exchange,
                routing_key,
            } if exchange.is_empty() => Some(routing_key.clone()),
            DeadLetters::Exchange { .. } if self.declare => {
                Some(format!("{}.dead-letter", self.queue))
            }
            DeadLetters::Exchange { .. } | DeadLetters::Queue | DeadLetters::Drop => None,
        }
    }
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("uri", &redact(&self.uri))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .field("ordering_header", &self.ordering_header)
            .field("dead_letters", &self.dead_letters)
            .finish()
    }
}

/// The URI without its password (nor query values), for messages.
pub fn redact(uri: &str) -> String {
    ferry_core::redact::url(uri)
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// The broker could not be reached or refused the login.
    #[error("uri: cannot connect to {uri}: {detail}")]
    Connect {
        /// The URI, password redacted.
        uri: String,
        /// What went wrong.
        detail: String,
        /// The broker refused the credentials or the vhost.
        refused: bool,
    },
    /// The queue does not exist (and `declare` is off) or could not be declared.
    #[error("queue: {queue:?}: {detail}")]
    Queue {
        /// The queue name.
        queue: String,
        /// What the broker said.
        detail: String,
    },
    /// The dead-letter exchange does not exist (and `declare` is off) or could not be
    /// declared, bound or used.
    #[error("dead_letter_exchange: {exchange:?}: {detail}")]
    DeadLetterExchange {
        /// The exchange name.
        exchange: String,
        /// What the broker said.
        detail: String,
    },
}

impl AmqpError {
    /// True when the configuration is wrong rather than the broker unreachable.
    pub fn is_config(&self) -> bool {
        match self {
            AmqpError::Connect { refused, .. } => *refused,
            AmqpError::Queue { .. } | AmqpError::DeadLetterExchange { .. } => true,
        }
    }
}

/// A connected RabbitMQ source; build it with [`AmqpSource::connect`].
pub struct AmqpSource {
    config: Arc<AmqpConfig>,
    queue_name: Arc<str>,
    connection: Option<(Arc<Connection>, Channel)>,
}

fn one_line(e: &lapin::Error) -> String {
    e.to_string().replace('\n', " ")
}

/// The frame size asked for when the URI names none: RabbitMQ's own default, so what is
/// negotiated does not change. lapin sizes its two I/O buffers (32 frames each) by it. Asked
/// for up front, they are allocated zeroed and untouched, and only what a busy connection
/// uses becomes resident; left to the broker's answer, lapin grows them after the
/// handshake by writing zeros into all 8 MiB, and every route cost 8.5 MiB of RSS, idle
/// or not.
const FRAME_MAX: u32 = 131_072;

async fn open(config: &AmqpConfig) -> Result<(Arc<Connection>, Channel), AmqpError> {
    // After the login, a failure is the broker's or the network's, not the credentials'.
    let unavailable = |e: lapin::Error| AmqpError::Connect {
        uri: redact(&config.uri),
        detail: one_line(&e),
        refused: false,
    };
    let mut uri: lapin::uri::AMQPUri =
        config.uri.parse().map_err(|e: String| AmqpError::Connect {
            uri: redact(&config.uri),
            detail: e.replace('\n', " "),
            refused: false,
        })?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let connection = Connection::connect_uri(uri, ConnectionProperties::default())
        .await
        .map_err(|e| {
            let detail = one_line(&e);
            let refused = detail.contains("ACCESS_REFUSED")
                || detail.contains("NOT_ALLOWED")
                || detail.to_ascii_lowercase().contains("auth");
            AmqpError::Connect {
                uri: redact(&config.uri),
                detail,
                refused,
            }
        })?;
    let channel = connection.create_channel().await.map_err(unavailable)?;
    channel
        .queue_declare(
            config.queue.as_str().into(),
            QueueDeclareOptions {
                passive: !config.declare,
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::Queue {
            queue: config.queue.clone(),
            detail: one_line(&e),
        })?;
    if config.declare {
        dead_letter::declare(&channel, config).await?;
    }
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(unavailable)?;
    Ok((Arc::new(connection), channel))
}

impl AmqpSource {
    /// Connects and checks the queue, so a wrong queue or login is reported at start.
    pub async fn connect(config: AmqpConfig) -> Result<Self, AmqpError> {
        let connection = open(&config).await?;
        // A dead-letter exchange that is not there is a configuration error at start;
        // later (it was deleted) publishes to it are retried until it is back.
        if !config.declare {
            dead_letter::check(&connection.0, &config).await?;
        }
        Ok(Self {
            queue_name: Arc::from(config.queue.as_str()),
            config: Arc::new(config),
            connection: Some(connection),
        })
    }
}

/// Why a route is not consuming, so each change is logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// The connection or the channel could not be opened.
    Unreachable,
    /// Connected, but `basic.consume` was refused.
    CannotConsume,
    /// Consuming stopped (connection lost, consumer cancelled).
    Lost,
}

/// The wait before retry number `failures`: 200 ms doubling up to 10 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(10))
}

impl Source for AmqpSource {
    fn kind(&self) -> &'static str {
        "amqp"
    }

    /// RabbitMQ's largest message (`max_message_size`, 128 MiB).
    fn max_message_bytes(&self) -> Option<usize> {
        Some(128 * 1024 * 1024)
    }

    fn buffer(&self) -> usize {
        usize::from(self.config.prefetch.max(1))
    }

    async fn run(
        mut self,
        out: mpsc::Sender<Delivery>,
        ctx: SourceContext,
    ) -> Result<(), SourceError> {
        let mut failures = 0u32;
        // What is wrong while not consuming; logged when it changes, not on every retry.
        let mut down: Option<Down> = None;
        let mut settlers = tokio::task::JoinSet::new();
        let mut last: Option<(Arc<Connection>, Channel)> = None;
        'connect: loop {
            let (connection, channel) = match self.connection.take() {
                Some(c) => c,
                None => {
                    let attempt = tokio::select! {
                        _ = ctx.shutdown.cancelled() => break 'connect,
                        r = open(&self.config) => r,
                    };
                    match attempt {
                        Ok(c) => c,
                        Err(e) => {
                            failures += 1;
                            if down != Some(Down::Unreachable) {
                                warn!(route = %ctx.route, error = %e, "cannot reach the broker; retrying with backoff");
                                down = Some(Down::Unreachable);
                            }
                            tokio::select! {
                                _ = ctx.shutdown.cancelled() => break 'connect,
                                _ = tokio::time::sleep(backoff(failures)) => {}
                            }
                            continue 'connect;
                        }
                    }
                }
            };
            let consumer = channel
                .basic_consume(
                    self.config.queue.as_str().into(),
                    format!("ferry-{}", ctx.route).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await;
            let mut consumer = match consumer {
                Ok(c) => c,
                Err(e) => {
                    // The queue is held by an exclusive consumer, a quorum queue has no
                    // leader, ...: retrying at once would only hammer the broker.
                    failures += 1;
                    ctx.counts.broker_errors.count("consume", 1);
                    if down != Some(Down::CannotConsume) {
                        warn!(route = %ctx.route, queue = %self.queue_name, error = %one_line(&e),
                            "cannot consume from the queue; retrying with backoff");
                        down = Some(Down::CannotConsume);
                    }
                    ctx.set_connected(false);
                    let _ = connection.close(320, "ferry retrying".into()).await;
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => break 'connect,
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                    continue 'connect;
                }
            };
            failures = 0;
            ctx.set_connected(true);
            match down.take() {
                Some(_) => {
                    info!(route = %ctx.route, queue = %self.queue_name, prefetch = self.config.prefetch, "consuming again")
                }
                None => {
                    info!(route = %ctx.route, queue = %self.queue_name, prefetch = self.config.prefetch, "consuming")
                }
            }
            let (settle_tx, settle_rx) = mpsc::unbounded_channel();
            settlers.spawn(settle::run(
                channel.clone(),
                settle_rx,
                ctx.route.clone(),
                ctx.counts.broker_errors.clone(),
            ));
            let backlog = tokio::spawn(poll_backlog(
                channel.clone(),
                self.config.queue.clone(),
                ctx.clone(),
            ));
            let group_header = self.config.ordering_header.as_deref();
            // One handle shared by every delivery of this channel: a `Channel` clone is a
            // dozen reference counts, bumped and dropped once per message otherwise.
            let current = Arc::new(channel.clone());
            let dead_letters = match &self.config.dead_letters {
                DeadLetters::Exchange {
                    exchange,
                    routing_key,
                } => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    settlers.spawn(
                        dead_letter::Publisher {
                            connection: connection.clone(),
                            consumer: current.clone(),
                            exchange: exchange.clone(),
                            routing_key: routing_key.clone(),
                            settle: settle_tx.clone(),
                            ctx: ctx.clone(),
                        }
                        .run(rx),
                    );
                    settle::DeadLetterPath::Publish(tx)
                }
                DeadLetters::Queue => settle::DeadLetterPath::Reject,
                DeadLetters::Drop => settle::DeadLetterPath::Drop,
            };
            let keep_original = matches!(dead_letters, settle::DeadLetterPath::Publish(_));
            let queue_name = &self.queue_name;
            let wrap = |delivery: lapin::message::Delivery| {
                let tag = delivery.delivery_tag;
                let (message, properties) = convert::convert(delivery, queue_name, group_header);
                // Only a dead letter ferry publishes needs the original again.
                let original = keep_original.then(|| {
                    Box::new(dead_letter::Original {
                        payload: message.payload.clone(),
                        properties,
                    })
                });
                Delivery {
                    message,
                    ack: AckHandle::new(settle::AmqpAck {
                        tag,
                        settle: settle_tx.clone(),
                        channel: current.clone(),
                        dead_letters: dead_letters.clone(),
                        original,
                    }),
                }
            };
            loop {
                let permit = tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => {
                        backlog.abort();
                        hand_over_rest(&channel, &mut consumer, &out, &wrap).await;
                        last = Some((connection, channel));
                        break 'connect;
                    }
                    p = out.reserve() => match p {
                        Ok(p) => p,
                        Err(_) => {
                            backlog.abort();
                            last = Some((connection, channel));
                            break 'connect;
                        }
                    },
                };
                let next = tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => {
                        drop(permit);
                        backlog.abort();
                        hand_over_rest(&channel, &mut consumer, &out, &wrap).await;
                        last = Some((connection, channel));
                        break 'connect;
                    }
                    d = consumer.next() => d,
                };
                match next {
                    Some(Ok(delivery)) => permit.send(wrap(delivery)),
                    Some(Err(e)) => {
                        warn!(route = %ctx.route, error = %one_line(&e), "connection to the broker lost; reconnecting");
                        down = Some(Down::Lost);
                        break;
                    }
                    None => {
                        warn!(route = %ctx.route, "the broker ended the consumer; reconnecting");
                        down = Some(Down::Lost);
                        break;
                    }
                }
            }
            backlog.abort();
            ctx.set_connected(false);
            let _ = connection.close(320, "ferry reconnecting".into()).await;
        }
        // Shutdown: every handle settles (in-flight ones within the grace), then the
        // channel closes, which returns anything still unacked to the queue at once.
        drop(out);
        while settlers.join_next().await.is_some() {}
        if let Some((connection, channel)) = last {
            let _ = channel.close(200, "ferry shutting down".into()).await;
            let _ = connection.close(200, "ferry shutting down".into()).await;
        }
        ctx.set_connected(false);
        Ok(())
    }
}

/// At shutdown: cancels the consumer so the broker sends nothing more, then hands the
/// engine what the broker had already sent (the engine delivers it within the grace). Left
/// in the channel, it would go back to the queue marked redelivered at the close, and come
/// out as a second attempt although no request was ever made.
async fn hand_over_rest(
    channel: &Channel,
    consumer: &mut lapin::Consumer,
    out: &mpsc::Sender<Delivery>,
    wrap: &impl Fn(lapin::message::Delivery) -> Delivery,
) {
    let tag = consumer.tag();
    if channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await
        .is_err()
    {
        return;
    }
    // The consumer ends once the broker has confirmed the cancel; what it sent before
    // arrives first. A quiet second also ends it, in case the confirm never comes.
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(HAND_OVER_QUIET, consumer.next()).await
    {
        if out.send(wrap(delivery)).await.is_err() {
            return;
        }
    }
}

/// How long a cancelled consumer may stay silent before shutdown stops waiting for it.
const HAND_OVER_QUIET: Duration = Duration::from_secs(1);

/// Keeps `ferry_source_backlog` at the queue's ready-message count.
async fn poll_backlog(channel: Channel, queue: String, ctx: SourceContext) {
    loop {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Ok(q) = declared {
            ctx.backlog.set(i64::from(q.message_count()));
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_password_is_redacted() {
        assert_eq!(
            redact("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
        assert!(!format!(
            "{:?}",
            AmqpConfig {
                uri: "amqp://u:p4ss@h/v".into(),
                queue: "q".into(),
                prefetch: 1,
                declare: false,
                ordering_header: None,
                dead_letters: DeadLetters::Drop,
            }
        )
        .contains("p4ss"));
    }
}

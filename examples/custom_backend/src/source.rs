//! A Redis Streams source written against `ferry-core`'s public API only: this file is
//! the whole backend, kept to what every backend needs. (ferry's own `type = "redis"`
//! does more: it takes over a dead consumer's entries, keeps held entries from looking
//! abandoned, counts deliveries; see `backends/redis`.)
//!
//! It reads a stream as one consumer of a consumer group and acknowledges an entry
//! (`XACK`) only when the engine settles it. The three things every backend decides:
//! - **Attempts.** An entry read again from this consumer's pending list was delivered
//!   before, so it is labelled attempt 2 (`X-Ferry-Attempt`); new entries are attempt 1.
//! - **Retries** wait in ferry's engine (`holds_retries` is false): Redis has no delayed
//!   redelivery.
//! - **Release** (shutdown, a dropped handle) leaves the entry pending for this consumer;
//!   the next start reads its own pending entries first, so nothing is lost.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_core::{
    AckHandle, Delivery, Message, Settle, Settlement, Source, SourceContext, SourceError,
};
use redis::aio::ConnectionManager;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Where to read.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// `redis://host:port`.
    pub url: String,
    /// The stream key.
    pub stream: String,
    /// The consumer group (created at the start of the stream if missing).
    pub group: String,
    /// This bridge's consumer name; keep it stable across restarts, so that a restart
    /// picks up the entries the previous run had not settled.
    pub consumer: String,
    /// Stream that receives dead-lettered entries (fields `body`, `reason`).
    pub dead_letter_stream: String,
    /// Entry field that carries the ordering key.
    pub key_field: String,
}

/// The connected source. `ConnectionManager` dials again by itself after a connection
/// is lost; the reader has its own, because a blocking read holds its connection.
pub struct RedisStreamSource {
    config: Arc<StreamConfig>,
    reader: ConnectionManager,
    settler: ConnectionManager,
}

impl RedisStreamSource {
    /// Connects and makes sure the consumer group exists, so that a wrong URL fails at
    /// start with one line instead of as a retry loop.
    pub async fn connect(config: StreamConfig) -> redis::RedisResult<Self> {
        let client = redis::Client::open(config.url.as_str())?;
        let mut reader = ConnectionManager::new(client.clone()).await?;
        let settler = ConnectionManager::new(client).await?;
        let created: redis::RedisResult<()> = reader
            .xgroup_create_mkstream(&config.stream, &config.group, "0")
            .await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
            _ => {}
        }
        Ok(Self {
            config: Arc::new(config),
            reader,
            settler,
        })
    }
}

/// What the engine decided, for the settling task.
enum Op {
    Ack(String),
    DeadLetter {
        id: String,
        body: Vec<u8>,
        reason: String,
    },
}

struct StreamAck {
    id: String,
    body: Vec<u8>,
    ops: mpsc::UnboundedSender<Op>,
}

impl Settle for StreamAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let op = match settlement {
            Settlement::Ack => Op::Ack(self.id),
            Settlement::DeadLetter(why) => Op::DeadLetter {
                id: self.id,
                body: self.body,
                reason: why.to_string(),
            },
            // Stays pending for this consumer; read again at the next start.
            Settlement::Retry { .. } | Settlement::Release => return,
        };
        // Never block here: the settling task talks to Redis.
        let _ = self.ops.send(op);
    }
}

impl Source for RedisStreamSource {
    fn kind(&self) -> &'static str {
        "redis-streams"
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settle(self.settler, self.config.clone(), ops_rx));
        read(self.reader, &self.config, &ops, &out, &ctx).await;
        // Every handle is gone once the engine is done; closing the channel lets the
        // settling task flush what is queued and stop.
        drop(ops);
        drop(out);
        let _ = settler.await;
        Ok(())
    }
}

async fn read(
    mut con: ConnectionManager,
    config: &StreamConfig,
    ops: &mpsc::UnboundedSender<Op>,
    out: &mpsc::Sender<Delivery>,
    ctx: &SourceContext,
) {
    // "0": our own pending entries (a previous run's), then ">": new ones.
    let mut from = "0";
    loop {
        // Backpressure: room for a whole batch before asking Redis for one.
        let room = 64.min(out.max_capacity());
        let permits = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            p = out.reserve_many(room) => match p { Ok(p) => p, Err(_) => return },
        };
        let mut opts = StreamReadOptions::default()
            .group(&config.group, &config.consumer)
            .count(room);
        if from == ">" {
            opts = opts.block(1000);
        }
        let (keys, ids) = ([&config.stream], [from]);
        let reply: redis::RedisResult<StreamReadReply> = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = con.xread_options(&keys, &ids, &opts) => r,
        };
        let entries: Vec<_> = match reply {
            Ok(reply) => reply.keys.into_iter().flat_map(|k| k.ids).collect(),
            Err(e) => {
                warn!(route = %ctx.route, error = %e, "read failed; retrying");
                ctx.set_connected(false);
                // A lost answer left its entries pending for us: read those again.
                from = "0";
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if !ctx.is_connected() {
            info!(route = %ctx.route, stream = %config.stream, "receiving");
            ctx.set_connected(true);
        }
        if entries.is_empty() {
            from = ">";
        }
        let attempt = if from == "0" { 2 } else { 1 };
        for (entry, permit) in entries.into_iter().zip(permits) {
            let body: Vec<u8> = entry.get("body").unwrap_or_default();
            let mut message = Message::new(
                entry.id.clone(),
                body.clone(),
                Arc::from(config.stream.as_str()),
            );
            message.attempt = attempt;
            message.group = entry.get(&config.key_field);
            // An entry id starts with the milliseconds it was added at.
            if let Some(ms) = entry.id.split('-').next().and_then(|ms| ms.parse().ok()) {
                message.timestamp = UNIX_EPOCH + Duration::from_millis(ms);
            } else {
                message.timestamp = SystemTime::now();
            }
            let ack = AckHandle::new(StreamAck {
                id: entry.id,
                body,
                ops: ops.clone(),
            });
            permit.send(Delivery { message, ack });
        }
    }
}

/// Applies settlements: the acks that queued up meanwhile go in one `XACK`, a dead letter
/// is `XADD` and `XACK` in one `MULTI`/`EXEC`. A call that fails is tried again a few
/// times; an entry whose settlement is lost stays pending and is delivered again after a
/// restart (a duplicate, not a loss).
async fn settle(
    mut con: ConnectionManager,
    config: Arc<StreamConfig>,
    mut rx: mpsc::UnboundedReceiver<Op>,
) {
    let (stream, group) = (config.stream.as_str(), config.group.as_str());
    let mut ops = Vec::new();
    while rx.recv_many(&mut ops, 256).await > 0 {
        let mut pipe = redis::pipe();
        let mut acks = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Ack(id) => acks.push(id),
                Op::DeadLetter { id, body, reason } => {
                    let fields = [("body", body), ("reason", reason.into_bytes())];
                    pipe.atomic()
                        .xadd(&config.dead_letter_stream, "*", &fields)
                        .ignore()
                        .xack(stream, group, &[id])
                        .ignore();
                }
            }
        }
        if !acks.is_empty() {
            pipe.xack(stream, group, &acks).ignore();
        }
        for _ in 0..20 {
            match pipe.query_async::<()>(&mut con).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "settling failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

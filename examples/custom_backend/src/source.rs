//! A Redis Streams source written against `ferry-core`'s public API only: this file is
//! the whole backend. It reads a stream as one consumer of a consumer group, so several
//! bridges can share a stream, and it acknowledges an entry (`XACK`) only when the engine
//! settles it.
//!
//! How the three things every backend must decide are decided here:
//! - **Attempts.** Redis counts deliveries of pending entries; an entry read again from
//!   this consumer's pending list carries that count, so the endpoint sees redeliveries
//!   labelled (`X-Ferry-Attempt` > 1).
//! - **Retries** wait in ferry's engine (`holds_retries` is false): Redis has no delayed
//!   redelivery.
//! - **Release** (shutdown, or a handle dropped) leaves the entry pending for this
//!   consumer; the next start reads its own pending entries first, so nothing is lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_core::{
    AckHandle, Delivery, Message, Settle, Settlement, Source, SourceContext, SourceError,
};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamPendingCountReply, StreamReadOptions, StreamReadReply};
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
    /// This bridge's consumer name; keep it stable across restarts so that a restart
    /// picks up the entries the previous run had not settled.
    pub consumer: String,
    /// Stream that receives dead-lettered entries (fields `body`, `reason`, `attempts`).
    pub dead_letter_stream: String,
    /// Entry field that carries the ordering key.
    pub key_field: String,
}

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The URL is not a Redis URL.
    #[error("redis url is invalid: {0}")]
    Url(String),
    /// Redis did not answer or refused a command.
    #[error("redis at {url}: {detail}")]
    Redis {
        /// The server (without credentials).
        url: String,
        /// What failed.
        detail: String,
    },
}

/// The connected source.
pub struct RedisStreamSource {
    config: Arc<StreamConfig>,
    reader: Link,
    settler: Link,
}

impl RedisStreamSource {
    /// Connects and makes sure the consumer group exists, so that a wrong URL fails at
    /// start with one line instead of as a retry loop.
    pub async fn connect(config: StreamConfig) -> Result<Self, StreamError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StreamError::Url(e.to_string()))?;
        let where_ = client.get_connection_info().addr.to_string();
        let err = |e: redis::RedisError| StreamError::Redis {
            url: where_.clone(),
            detail: e.to_string(),
        };
        let mut reader = Link::new(client.clone());
        let settler = Link::new(client);
        let mut con = reader.get().await.map_err(err)?;
        let created: redis::RedisResult<()> = within(
            CALL_TIMEOUT,
            con.xgroup_create_mkstream(&config.stream, &config.group, "0"),
        )
        .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(err(e)),
        }
        Ok(Self {
            config: Arc::new(config),
            reader,
            settler,
        })
    }
}

/// How long one Redis call may take before the connection is treated as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection that is opened again after a failure: a broken or silent connection
/// is dropped and the next call dials anew, so a Redis restart or a network cut heals
/// on its own.
struct Link {
    client: redis::Client,
    con: Option<MultiplexedConnection>,
}

impl Link {
    fn new(client: redis::Client) -> Self {
        Self { client, con: None }
    }

    async fn get(&mut self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(con) = &self.con {
            return Ok(con.clone());
        }
        let con = within(CALL_TIMEOUT, self.client.get_multiplexed_async_connection()).await?;
        self.con = Some(con.clone());
        Ok(con)
    }

    /// Forgets the connection after a failed call.
    fn reset(&mut self) {
        self.con = None;
    }
}

/// `call`, failed as an I/O error if it takes longer than `limit`.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(redis::RedisError::from((
            redis::ErrorKind::IoError,
            "timed out",
        )))
    })
}

/// Ids handed to the engine and not yet settled: a re-read of the pending list after a
/// reconnect must not hand them out a second time.
type Held = Arc<Mutex<HashSet<String>>>;

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashSet<String>> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Op {
    Ack(String),
    DeadLetter {
        id: String,
        body: Vec<u8>,
        reason: String,
        attempts: u32,
    },
}

struct StreamAck {
    id: String,
    body: Vec<u8>,
    held: Held,
    ops: mpsc::UnboundedSender<Op>,
}

impl Settle for StreamAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let op = match settlement {
            Settlement::Ack => Op::Ack(self.id.clone()),
            Settlement::DeadLetter(dl) => Op::DeadLetter {
                id: self.id.clone(),
                body: self.body,
                reason: dl.to_string(),
                attempts: dl.attempts,
            },
            // Stays pending for this consumer; read again at the next start.
            Settlement::Retry { .. } | Settlement::Release => {
                lock(&self.held).remove(&self.id);
                return;
            }
        };
        // The settler removes the id from `held` once Redis has it.
        let _ = self.ops.send(op);
    }
}

impl Source for RedisStreamSource {
    fn kind(&self) -> &'static str {
        "redis-streams"
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let held: Held = Arc::default();
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settle(
            self.settler,
            self.config.clone(),
            held.clone(),
            ops_rx,
        ));
        read(self.reader, &self.config, &held, &ops, &out, &ctx).await;
        // Every handle is dropped by now (the engine has finished); closing the channel
        // lets the settler flush what is queued and stop.
        drop(ops);
        drop(out);
        let _ = settler.await;
        Ok(())
    }
}

async fn read(
    mut link: Link,
    config: &StreamConfig,
    held: &Held,
    ops: &mpsc::UnboundedSender<Op>,
    out: &mpsc::Sender<Delivery>,
    ctx: &SourceContext,
) {
    // Our own pending entries first (a previous run's, or replies lost in a reconnect),
    // read once each by moving a cursor through the pending list; then new entries.
    let mut history: Option<String> = Some("0".to_owned());
    let mut failures = 0u32;
    loop {
        let room = 64.min(out.max_capacity());
        let permits = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            p = out.reserve_many(room) => match p { Ok(p) => p, Err(_) => return },
        };
        let result = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = next_batch(&mut link, config, history.as_deref(), room) => r,
        };
        let entries = match result {
            Ok(entries) => {
                if failures > 0 || !ctx.is_connected() {
                    info!(route = %ctx.route, stream = %config.stream, "receiving");
                }
                failures = 0;
                ctx.set_connected(true);
                entries
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    warn!(route = %ctx.route, stream = %config.stream, error = %e, "read failed; retrying");
                }
                ctx.set_connected(false);
                link.reset();
                // Whatever the lost reply carried is pending for us: read history again.
                history = Some("0".to_owned());
                let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                continue;
            }
        };
        if history.is_some() {
            history = entries.last().map(|(e, _)| e.id.clone());
        }
        let mut permits = permits;
        for (entry, attempt) in entries {
            if !lock(held).insert(entry.id.clone()) {
                continue; // already in the engine
            }
            let body: Vec<u8> = entry.get("body").unwrap_or_default();
            let mut message = Message::new(
                entry.id.clone(),
                body.clone(),
                Arc::from(config.stream.as_str()),
            );
            message.attempt = attempt;
            message.group = entry.get(&config.key_field);
            message.timestamp = timestamp(&entry.id);
            let ack = AckHandle::new(StreamAck {
                id: entry.id.clone(),
                body,
                held: held.clone(),
                ops: ops.clone(),
            });
            if let Some(permit) = permits.next() {
                permit.send(Delivery { message, ack });
            }
        }
    }
}

/// Up to `count` entries with their attempt numbers: this consumer's pending entries
/// after the cursor `history`, else new ones (blocking up to a second for them).
async fn next_batch(
    link: &mut Link,
    config: &StreamConfig,
    history: Option<&str>,
    count: usize,
) -> redis::RedisResult<Vec<(StreamId, u32)>> {
    let mut con = link.get().await?;
    let opts = StreamReadOptions::default()
        .group(&config.group, &config.consumer)
        .count(count);
    let (opts, from) = match history {
        Some(cursor) => (opts, cursor),
        None => (opts.block(1000), ">"),
    };
    let reply: StreamReadReply = within(
        CALL_TIMEOUT,
        con.xread_options(&[&config.stream], &[from], &opts),
    )
    .await?;
    let entries: Vec<StreamId> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
    if history.is_none() || entries.is_empty() {
        return Ok(entries.into_iter().map(|e| (e, 1)).collect());
    }
    // Reading the pending list counted one more delivery of each entry.
    let pending: StreamPendingCountReply = within(
        CALL_TIMEOUT,
        con.xpending_consumer_count(
            &config.stream,
            &config.group,
            "-",
            "+",
            count.max(entries.len()),
            &config.consumer,
        ),
    )
    .await?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let times = pending
                .ids
                .iter()
                .find(|p| p.id == e.id)
                .map_or(2, |p| u32::try_from(p.times_delivered).unwrap_or(u32::MAX));
            (e, times.max(1))
        })
        .collect())
}

/// An entry id starts with its append time in milliseconds.
fn timestamp(id: &str) -> SystemTime {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or_else(SystemTime::now, |ms| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Applies settlements: acks in batches, dead letters as `XADD` then `XACK`. A failed
/// call is retried on a fresh connection for up to 10 s; an entry whose ack is still lost
/// then stays pending and comes back (a duplicate, not a loss).
async fn settle(
    mut link: Link,
    config: Arc<StreamConfig>,
    held: Held,
    mut rx: mpsc::UnboundedReceiver<Op>,
) {
    let mut ops = Vec::new();
    while rx.recv_many(&mut ops, 256).await > 0 {
        let mut acks: Vec<String> = Vec::new();
        for op in ops.drain(..) {
            match op {
                Op::Ack(id) => acks.push(id),
                Op::DeadLetter {
                    id,
                    body,
                    reason,
                    attempts,
                } => {
                    let fields: [(&str, Vec<u8>); 3] = [
                        ("body", body),
                        ("reason", reason.into_bytes()),
                        ("attempts", attempts.to_string().into_bytes()),
                    ];
                    let dlq = config.dead_letter_stream.as_str();
                    let sent = retry(&mut link, |mut con| {
                        let fields = fields.clone();
                        async move {
                            con.xadd::<_, _, _, _, String>(dlq, "*", &fields)
                                .await
                                .map(|_| ())
                        }
                    })
                    .await;
                    if sent {
                        acks.push(id);
                    } else {
                        lock(&held).remove(&id);
                    }
                }
            }
        }
        if acks.is_empty() {
            continue;
        }
        let (stream, group) = (config.stream.as_str(), config.group.as_str());
        let ids = &acks;
        retry(&mut link, |mut con| async move {
            con.xack::<_, _, _, i64>(stream, group, ids)
                .await
                .map(|_| ())
        })
        .await;
        let mut held = lock(&held);
        for id in &acks {
            held.remove(id);
        }
    }
}

/// Runs `call` until it succeeds, on a fresh connection after each failure, for up to
/// 10 s; returns whether it succeeded.
async fn retry<F, Fut>(link: &mut Link, mut call: F) -> bool
where
    F: FnMut(MultiplexedConnection) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<()>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut failures = 0u64;
    loop {
        let result = match link.get().await {
            Ok(con) => within(CALL_TIMEOUT, call(con)).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return true,
            Err(e) => {
                link.reset();
                failures += 1;
                if failures == 1 {
                    warn!(error = %e, "settling failed; retrying");
                }
                if tokio::time::Instant::now() > deadline {
                    warn!(error = %e, "settling gave up; the entries stay pending and will be redelivered");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100 * failures.min(20))).await;
            }
        }
    }
}

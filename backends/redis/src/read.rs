//! The reader: this consumer's own pending entries first, then new ones, and every so
//! often a pass of `XAUTOCLAIM` over the entries other consumers left idle. Room for a
//! whole batch is reserved in the engine's channel before each call asks for one, so
//! ferry never takes more from the group than the route can deliver; a call under way is
//! finished even at shutdown, so what Redis counted as delivered to this consumer is
//! handed to the engine (which delivers or releases it) rather than left pending.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{AckHandle, Delivery, SourceContext};
use redis::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::convert::{self, Entry, Origin};
use crate::link::Link;
use crate::settle::{EntryAck, Op, Senders, State};

/// How long an `XREADGROUP` waits for new entries.
pub(crate) const BLOCK: Duration = Duration::from_secs(1);

/// What the next call reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Next {
    /// This consumer's pending entries after the id.
    Own(String),
    /// The `XAUTOCLAIM` pass, from the cursor.
    Claim(String),
    /// New entries (`>`).
    New,
}

pub(crate) struct Reader<'a> {
    link: Link,
    state: Arc<State>,
    senders: Arc<Senders>,
    ctx: &'a SourceContext,
    stream: Arc<str>,
    /// Whether this consumer's pending list is read through.
    own: Option<String>,
    /// The claim pass under way, if one is.
    claim: Option<String>,
    next_claim: Instant,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(
        link: Link,
        state: Arc<State>,
        senders: Arc<Senders>,
        ctx: &'a SourceContext,
    ) -> Self {
        Self {
            link,
            stream: Arc::from(state.config.stream.as_str()),
            state,
            senders,
            ctx,
            own: Some("0".to_owned()),
            claim: None,
            next_claim: Instant::now(),
        }
    }

    /// How often a claim pass runs: a fraction of `claim_idle`, so an abandoned entry
    /// waits at most about one and a half times `claim_idle`.
    fn claim_every(&self) -> Duration {
        (self.state.config.claim_idle / 2)
            .clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    fn next(&mut self) -> Next {
        if let Some(after) = &self.own {
            return Next::Own(after.clone());
        }
        if self.claim.is_none() && Instant::now() >= self.next_claim {
            self.claim = Some("0-0".to_owned());
        }
        match &self.claim {
            Some(cursor) => Next::Claim(cursor.clone()),
            None => Next::New,
        }
    }

    /// Reads until shutdown or until the engine closes the channel.
    pub(crate) async fn run(mut self, out: &mpsc::Sender<Delivery>) {
        let config = self.state.config.clone();
        info!(route = %self.ctx.route, stream = %config.stream, group = %config.group,
            consumer = %self.state.consumer, "receiving");
        let mut failures = 0u32;
        loop {
            let room = config.batch_size.min(out.max_capacity()).max(1);
            let permits = tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return,
                p = out.reserve_many(room) => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let next = self.next();
            let asked = Instant::now();
            match self.read(&next, room).await {
                Ok(entries) => {
                    if failures > 0 {
                        info!(route = %self.ctx.route, stream = %config.stream, "receiving again");
                        self.ctx.set_error(None);
                    }
                    failures = 0;
                    self.ctx.set_connected(true);
                    let mut permits = permits;
                    for (entry, attempt) in entries {
                        if let Some(delivery) = self.wrap(entry, attempt, asked) {
                            if let Some(permit) = permits.next() {
                                permit.send(delivery);
                            }
                        }
                    }
                }
                Err(e) => {
                    drop(permits);
                    failures += 1;
                    self.failed(&e, failures).await;
                    tokio::select! {
                        _ = self.ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(crate::backoff(failures)) => {}
                    }
                }
            }
        }
    }

    /// A failed read: logged once per outage, counted, and what a lost answer may have
    /// made pending for this consumer is read again from its pending list.
    async fn failed(&mut self, e: &redis::RedisError, failures: u32) {
        let config = &self.state.config;
        let error = crate::setup::one_line(e);
        self.ctx.counts.broker_errors.count("receive", 1);
        if failures == 1 {
            warn!(route = %self.ctx.route, stream = %config.stream, %error, "reading the stream failed; retrying with backoff");
        }
        if crate::link::broken(e) {
            self.ctx.set_connected(false);
        } else {
            self.ctx.set_error(Some(format!("receive: {error}")));
        }
        if e.code() == Some("NOGROUP") && config.declare {
            let create = crate::setup::create_group(config);
            if self.link.query::<()>(&create).await.is_ok() {
                warn!(route = %self.ctx.route, stream = %config.stream, group = %config.group,
                    "the consumer group was gone; created it again (declare = true)");
            }
        }
        self.own = Some("0".to_owned());
        self.claim = None;
    }

    /// Entries of the next call, with the delivery each is (1 for new entries; Redis's
    /// count for pending ones read again or claimed).
    async fn read(&mut self, next: &Next, count: usize) -> redis::RedisResult<Vec<(Entry, u32)>> {
        let config = self.state.config.clone();
        let entries = match next {
            Next::Own(after) => {
                let reply: Value = self
                    .link
                    .query(&self.read_group(count, None, after))
                    .await?;
                let entries = stream_entries(reply);
                self.own = entries.last().map(|e| e.id.to_string());
                entries
            }
            Next::New => {
                let reply: Value = self
                    .link
                    .query(&self.read_group(count, Some(BLOCK), ">"))
                    .await?;
                return Ok(stream_entries(reply).into_iter().map(|e| (e, 1)).collect());
            }
            Next::Claim(cursor) => {
                let reply: Value = self
                    .link
                    .query(
                        redis::cmd("XAUTOCLAIM")
                            .arg(&config.stream)
                            .arg(&config.group)
                            .arg(self.state.consumer.as_ref())
                            .arg(u64::try_from(config.claim_idle.as_millis()).unwrap_or(u64::MAX))
                            .arg(cursor)
                            .arg("COUNT")
                            .arg(count),
                    )
                    .await?;
                let (cursor, entries, deleted) = claimed(reply);
                if deleted > 0 {
                    warn!(route = %self.ctx.route, stream = %config.stream, deleted,
                        "pending entries were deleted from the stream before delivery; Redis dropped them from the group");
                }
                match cursor {
                    Some(c) if c != "0-0" => self.claim = Some(c),
                    _ => {
                        self.claim = None;
                        self.next_claim = Instant::now() + self.claim_every();
                    }
                }
                if !entries.is_empty() {
                    info!(route = %self.ctx.route, stream = %config.stream, count = entries.len(),
                        "claimed entries idle longer than claim_idle from other consumers");
                }
                entries
            }
        };
        let counts = self.delivery_counts(&entries).await?;
        Ok(entries.into_iter().zip(counts).collect())
    }

    fn read_group(&self, count: usize, block: Option<Duration>, from: &str) -> redis::Cmd {
        let config = &self.state.config;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&config.group)
            .arg(self.state.consumer.as_ref())
            .arg("COUNT")
            .arg(count);
        if let Some(block) = block {
            cmd.arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(1000));
        }
        cmd.arg("STREAMS").arg(&config.stream).arg(from);
        cmd
    }

    /// How many times Redis has delivered each entry (this delivery included), from
    /// `XPENDING`, one pipelined call per entry.
    async fn delivery_counts(&mut self, entries: &[Entry]) -> redis::RedisResult<Vec<u32>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let config = &self.state.config;
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("XPENDING")
                .arg(&config.stream)
                .arg(&config.group)
                .arg(e.id.as_ref())
                .arg(e.id.as_ref())
                .arg(1);
        }
        let replies: Vec<Value> = self.link.pipe(&pipe).await?;
        Ok(replies
            .iter()
            .map(|r| match r {
                Value::Array(rows) => rows
                    .first()
                    .and_then(|row| match row {
                        Value::Array(cols) => cols.get(3).and_then(crate::backlog::int),
                        _ => None,
                    })
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(2),
                // Read again, so delivered twice at least.
                _ => 2,
            })
            .collect())
    }

    /// The delivery of one entry, unless ferry holds it already; a pending id whose entry
    /// is gone from the stream is acknowledged (there is nothing to deliver).
    fn wrap(&self, entry: Entry, attempt: u32, asked: Instant) -> Option<Delivery> {
        let Some(fields) = entry.fields else {
            let _ = self.senders.ops.send(Op::Forget(entry.id));
            return None;
        };
        let held = self.state.hold(entry.id.clone(), asked)?;
        let config = &self.state.config;
        let origin = Origin {
            stream: &self.stream,
            body_field: &config.body_field,
            key_field: config.key_field.as_deref(),
        };
        let message = convert::message(&entry.id, &fields, attempt, &origin);
        let keep = self.senders.dead.is_some();
        Some(Delivery {
            message,
            ack: AckHandle::new(EntryAck {
                held,
                state: self.state.clone(),
                senders: self.senders.clone(),
                fields: keep.then(|| Box::new(fields)),
            }),
        })
    }
}

/// The entries of an `XREADGROUP` reply (one stream; `Nil` when the block timed out).
fn stream_entries(reply: Value) -> Vec<Entry> {
    let list = match reply {
        Value::Array(streams) => streams.into_iter().next().and_then(|s| match s {
            Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
            _ => None,
        }),
        Value::Map(streams) => streams.into_iter().next().map(|(_, v)| v),
        _ => None,
    };
    list.map(convert::entries).unwrap_or_default()
}

/// An `XAUTOCLAIM` reply: the next cursor, the entries claimed, how many were deleted.
fn claimed(reply: Value) -> (Option<String>, Vec<Entry>, usize) {
    let Value::Array(parts) = reply else {
        return (None, Vec::new(), 0);
    };
    let mut parts = parts.into_iter();
    let cursor = parts
        .next()
        .and_then(|c| crate::backlog::bytes(&c).map(|b| String::from_utf8_lossy(b).into_owned()));
    let entries = parts.next().map(convert::entries).unwrap_or_default();
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.len(),
        _ => 0,
    };
    (cursor, entries, deleted)
}

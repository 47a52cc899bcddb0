//! Settling entries: the handle the engine settles, and the task that turns settlements
//! into `XACK`s (batched: whatever settled while the last call was out goes in one) and
//! releases.
//!
//! An entry stays held (leased, and known to the reader so that a re-read of the pending
//! list does not hand it out twice) until Redis has its settlement: an `XACK` lost to a
//! connection cut is sent again, and the entry meanwhile cannot look idle to the other
//! replicas.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use ferry_core::lease::Leases;
use ferry_core::{DeadLetter, Settle, Settlement, SourceContext};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::link::{Link, Request};
use crate::{lease, RedisConfig};

/// An entry ferry holds: its id and the key of its lease.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) id: Arc<str>,
    pub(crate) lease: u64,
}

/// What every task of a route shares.
pub(crate) struct State {
    pub(crate) config: Arc<RedisConfig>,
    pub(crate) consumer: Arc<str>,
    /// The ids of the entries ferry holds, kept from looking idle.
    pub(crate) leases: Arc<Leases<Arc<str>>>,
    /// The same ids, for the reader to skip what it holds already.
    held: Mutex<HashSet<Arc<str>>>,
    /// Held entries another consumer has taken over (its `XAUTOCLAIM`).
    taken: Mutex<HashSet<Arc<str>>>,
}

impl State {
    pub(crate) fn new(config: Arc<RedisConfig>, consumer: Arc<str>) -> Self {
        Self {
            leases: Arc::new(Leases::new(config.claim_idle)),
            config,
            consumer,
            held: Mutex::default(),
            taken: Mutex::default(),
        }
    }

    /// Starts holding `id`, read by a call sent at `asked`, unless it is held already.
    pub(crate) fn hold(&self, id: Arc<str>, asked: tokio::time::Instant) -> Option<Held> {
        if !lock(&self.held).insert(id.clone()) {
            return None;
        }
        let lease = self.leases.hold(id.clone(), asked);
        Some(Held { id, lease })
    }

    /// Stops holding an entry whose settlement Redis has.
    pub(crate) fn forget(&self, held: &Held) {
        self.leases.release(held.lease);
        lock(&self.taken).remove(&held.id);
        lock(&self.held).remove(&held.id);
    }

    /// Records that another consumer owns the entry now.
    pub(crate) fn taken(&self, id: &Arc<str>) {
        if lock(&self.held).contains(id) {
            lock(&self.taken).insert(id.clone());
        }
    }

    fn is_current(&self, held: &Held) -> bool {
        self.leases.is_current(held.lease) && !lock(&self.taken).contains(&held.id)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The queues the handles settle into; the settling tasks end once every handle and the
/// reader have dropped theirs.
pub(crate) struct Senders {
    pub(crate) ops: mpsc::UnboundedSender<Op>,
    /// Set when dead letters go to a stream.
    pub(crate) dead: Option<mpsc::UnboundedSender<crate::dead_letter::Op>>,
}

/// A settlement for the settling task.
pub(crate) enum Op {
    /// `XACK`.
    Ack(Held),
    /// `XACK` of a dead letter configured away (`dead_letters = "drop"`).
    Drop(Held),
    /// Back to the group at once: its idle time is set to `claim_idle`, so whichever
    /// consumer looks first (this one's next start, another replica's `XAUTOCLAIM`) takes
    /// it; until then it stays pending for this consumer.
    Release(Held),
    /// `XACK` of a pending entry that was deleted from the stream: there is nothing to
    /// deliver.
    Forget(Arc<str>),
}

/// The fields of an entry, kept for its dead letter.
pub(crate) type Fields = Vec<(Bytes, Bytes)>;

/// The settlement of one entry.
pub(crate) struct EntryAck {
    pub(crate) held: Held,
    pub(crate) state: Arc<State>,
    pub(crate) senders: Arc<Senders>,
    /// Kept only when dead letters go to a stream.
    pub(crate) fields: Option<Box<Fields>>,
}

impl Settle for EntryAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let this = *self;
        let op = match settlement {
            Settlement::Ack => Op::Ack(this.held),
            Settlement::DeadLetter(why) => match (&this.senders.dead, this.fields) {
                (Some(dead), Some(fields)) => {
                    let _ = dead.send(crate::dead_letter::Op {
                        held: this.held,
                        fields,
                        why,
                    });
                    return;
                }
                _ => {
                    dropped(&this.state, &this.held, &why);
                    Op::Drop(this.held)
                }
            },
            // Never sent (retries wait in ferry); if it were, releasing is right.
            Settlement::Retry { .. } | Settlement::Release => Op::Release(this.held),
        };
        let _ = this.senders.ops.send(op);
    }

    fn is_current(&self) -> bool {
        self.state.is_current(&self.held)
    }

    fn counts_dead_letters(&self) -> bool {
        self.senders.dead.is_some()
    }
}

fn dropped(state: &State, held: &Held, why: &DeadLetter) {
    warn!(stream = %state.config.stream, id = %held.id, reason = %why,
        "dead letter dropped (dead_letters = \"drop\")");
}

/// Applies settlements until every handle is gone.
pub(crate) async fn run(
    mut link: Link,
    state: Arc<State>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ctx: SourceContext,
) {
    let mut ops = Vec::new();
    while rx.recv_many(&mut ops, 1024).await > 0 {
        let mut acked: Vec<&str> = Vec::new();
        let mut released: Vec<&str> = Vec::new();
        for op in &ops {
            match op {
                Op::Ack(h) | Op::Drop(h) => acked.push(&h.id),
                Op::Forget(id) => acked.push(id),
                Op::Release(h) => released.push(&h.id),
            }
        }
        if !acked.is_empty() {
            let mut xack = redis::cmd("XACK");
            xack.arg(&state.config.stream)
                .arg(&state.config.group)
                .arg(&acked);
            persist(&ctx, "ack", &mut link, &Request::Cmd(xack)).await;
        }
        if !released.is_empty() {
            let idle = state.config.claim_idle;
            let release = lease::set_idle(&state, &released, idle);
            persist(&ctx, "release", &mut link, &Request::Script(release)).await;
        }
        for op in ops.drain(..) {
            match op {
                Op::Ack(h) | Op::Release(h) => state.forget(&h),
                Op::Drop(h) => {
                    ctx.counts.dropped.inc();
                    state.forget(&h);
                }
                Op::Forget(id) => debug!(stream = %state.config.stream, %id,
                    "pending entry deleted from the stream: acknowledged, nothing to deliver"),
            }
        }
    }
}

/// Sends `request` until it goes through, with backoff, and returns Redis's answer; after
/// shutdown it gives up after a few failures (`None`: the entries stay pending and are
/// read again, duplicates, never losses). Failures are counted as
/// `ferry_broker_errors_total{operation}` and logged once per run of failures.
pub(crate) async fn persist(
    ctx: &SourceContext,
    operation: &'static str,
    link: &mut Link,
    request: &Request<'_>,
) -> Option<redis::Value> {
    let mut failures = 0u32;
    loop {
        match link.send(request).await {
            Ok(answer) => {
                if failures > 0 {
                    ctx.set_error(None);
                    info!(route = %ctx.route, operation, failures, "settling on Redis went through again");
                }
                return Some(answer);
            }
            Err(e) => {
                failures += 1;
                ctx.counts.broker_errors.count(operation, 1);
                let error = crate::setup::one_line(&e);
                if failures == 1 {
                    warn!(route = %ctx.route, operation, %error,
                        "settling on Redis failed; retrying with backoff");
                }
                // Redis answered with an error (a key of the wrong type, a missing
                // permission): an operator must fix it, so `/routes` says so meanwhile.
                if !crate::link::broken(&e) {
                    ctx.set_error(Some(format!("{operation}: {error}")));
                }
                if ctx.shutdown.is_cancelled() && failures >= 3 {
                    warn!(route = %ctx.route, operation,
                        "shutting down: giving up; the entries stay pending and are read again");
                    return None;
                }
                tokio::time::sleep(crate::backoff(failures)).await;
            }
        }
    }
}

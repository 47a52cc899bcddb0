//! Settling messages: the handle the engine settles, and the task that turns settlements
//! into acks on the message's reply subject (`+ACK`, `-NAK` with a delay, `+TERM`), sent
//! together (whatever settled while the last ones were out) as requests the server
//! confirms, so the delivery path never waits for the server and an ack lost with a cut
//! connection is sent again.
//!
//! A message stays leased (its `+WPI` renewals go on) until its settlement is written to
//! the server: a slow dead-letter publish cannot let `ack_wait` run out under it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use ferry_core::lease::Leases;
use ferry_core::{DeadLetter, Settle, Settlement, SourceContext};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::NatsConfig;

/// A message ferry holds: its ack subject and the key of its lease.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) reply: Subject,
    pub(crate) lease: u64,
}

/// What every task of a route shares.
pub(crate) struct State {
    pub(crate) config: Arc<NatsConfig>,
    pub(crate) client: async_nats::Client,
    /// The ack subjects of the messages ferry holds, renewed with `+WPI`.
    pub(crate) leases: Arc<Leases<Subject>>,
    /// Whether the last flush went through, for the connection state.
    failing: Mutex<bool>,
}

impl State {
    pub(crate) fn new(
        config: Arc<NatsConfig>,
        client: async_nats::Client,
        ack_wait: Duration,
    ) -> Self {
        Self {
            config,
            client,
            leases: Arc::new(Leases::new(ack_wait)),
            failing: Mutex::new(false),
        }
    }

    /// Starts holding a message received by a pull sent at `asked`.
    pub(crate) fn hold(&self, reply: Subject, asked: tokio::time::Instant) -> Held {
        let lease = self.leases.hold(reply.clone(), asked);
        Held { reply, lease }
    }

    /// Stops holding a message whose settlement is written.
    pub(crate) fn forget(&self, held: &Held) {
        self.leases.release(held.lease);
    }

    /// Records whether writing to the server works, logging only the changes.
    pub(crate) fn flushed(&self, ctx: &SourceContext, operation: &'static str, ok: bool) {
        let mut failing = lock(&self.failing);
        if *failing == ok {
            *failing = !ok;
            if ok {
                info!(route = %ctx.route, operation, "settling on NATS goes through again");
            } else {
                warn!(route = %ctx.route, operation,
                    "settling on NATS failed; the client reconnects and sends it again");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The queues the handles settle into; the settling tasks end once every handle and the
/// receiver have dropped theirs.
pub(crate) struct Senders {
    pub(crate) ops: mpsc::UnboundedSender<Op>,
    /// Set when dead letters go to a subject.
    pub(crate) dead: Option<mpsc::UnboundedSender<crate::dead_letter::Op>>,
}

/// A settlement for the settling task.
#[derive(Debug)]
pub(crate) enum Op {
    /// `+ACK`.
    Ack(Held),
    /// `-NAK` with the delay (none: at once, a release).
    Nak(Held, Option<Duration>),
    /// `+TERM` of a dead letter (`dead_letters = "term"`).
    Term(Held),
}

impl Op {
    fn held(&self) -> &Held {
        match self {
            Op::Ack(h) | Op::Nak(h, _) | Op::Term(h) => h,
        }
    }

    fn body(&self) -> Bytes {
        match self {
            Op::Ack(_) => Bytes::from_static(b"+ACK"),
            Op::Nak(_, None) => Bytes::from_static(b"-NAK"),
            Op::Nak(_, Some(delay)) => {
                Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
            }
            Op::Term(_) => Bytes::from_static(b"+TERM"),
        }
    }
}

/// The parts of a message its dead letter carries.
pub(crate) struct Original {
    pub(crate) subject: Subject,
    pub(crate) headers: Option<async_nats::HeaderMap>,
    pub(crate) payload: Bytes,
    pub(crate) stream_sequence: u64,
}

/// The settlement of one message.
pub(crate) struct MessageAck {
    pub(crate) held: Held,
    pub(crate) state: Arc<State>,
    pub(crate) senders: Arc<Senders>,
    /// Kept only when dead letters go to a subject.
    pub(crate) original: Option<Box<Original>>,
}

impl Settle for MessageAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let this = *self;
        let op = match settlement {
            Settlement::Ack => Op::Ack(this.held),
            Settlement::Retry { delay } => Op::Nak(this.held, Some(delay)),
            Settlement::Release => Op::Nak(this.held, None),
            Settlement::DeadLetter(why) => match (&this.senders.dead, this.original) {
                (Some(dead), Some(original)) => {
                    let _ = dead.send(crate::dead_letter::Op {
                        held: this.held,
                        original,
                        why,
                    });
                    return;
                }
                _ => {
                    terminated(&this.state, &why);
                    Op::Term(this.held)
                }
            },
        };
        let _ = this.senders.ops.send(op);
    }

    /// Retries wait on the server (a delayed `-NAK`), so they survive a restart.
    fn holds_retries(&self) -> bool {
        true
    }

    fn is_current(&self) -> bool {
        self.state.leases.is_current(self.held.lease)
    }

    fn counts_dead_letters(&self) -> bool {
        self.senders.dead.is_some()
    }
}

fn terminated(state: &State, why: &DeadLetter) {
    warn!(stream = %state.config.stream, reason = %why,
        "dead letter terminated (dead_letters = \"term\"): never redelivered");
}

/// Applies settlements until every handle is gone.
pub(crate) async fn run(
    state: Arc<State>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ctx: SourceContext,
) {
    let mut ops = Vec::new();
    while rx.recv_many(&mut ops, 1024).await > 0 {
        let sends: Vec<(Subject, Bytes)> = ops
            .iter()
            .map(|op| (op.held().reply.clone(), op.body()))
            .collect();
        confirm(&state, &ctx, "ack", sends).await;
        for op in ops.drain(..) {
            if let Op::Term(_) = op {
                ctx.counts.dropped.inc();
            }
            state.forget(op.held());
        }
    }
}

/// How long the server may take to confirm one settlement.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends settlements as requests, all at once, so that the server confirms each (it
/// answers an ack that asks for a reply once it applied it): one lost with a cut
/// connection is sent again, with backoff, until the server has it. Acks are idempotent,
/// so a repeat is harmless. After shutdown it gives up after a few failures (the messages
/// then come back after `ack_wait`: duplicates, never losses). Failures are counted as
/// `ferry_broker_errors_total{operation}` and logged once per run of failures.
pub(crate) async fn confirm(
    state: &State,
    ctx: &SourceContext,
    operation: &'static str,
    mut sends: Vec<(Subject, Bytes)>,
) {
    let mut failures = 0u32;
    while !sends.is_empty() {
        let answers = futures::future::join_all(sends.iter().map(|(reply, body)| {
            tokio::time::timeout(
                CONFIRM_TIMEOUT,
                state.client.request(reply.clone(), body.clone()),
            )
        }))
        .await;
        let before = sends.len();
        let mut answers = answers.into_iter();
        sends.retain(|_| !matches!(answers.next(), Some(Ok(Ok(_)))));
        if sends.is_empty() {
            state.flushed(ctx, operation, true);
            return;
        }
        failures += 1;
        ctx.counts
            .broker_errors
            .count(operation, sends.len() as u64);
        state.flushed(ctx, operation, false);
        if sends.len() < before {
            failures = 1;
        }
        if ctx.shutdown.is_cancelled() && failures >= 3 {
            warn!(route = %ctx.route, operation, count = sends.len(),
                "shutting down: giving up on unconfirmed settlements; those messages come back after ack_wait");
            return;
        }
        tokio::time::sleep(crate::backoff(failures)).await;
    }
}

/// Publishes a settlement. The client queues it while it reconnects and sends it once
/// connected; it fails only when the client is closed, which a running route never does.
pub(crate) async fn publish(state: &State, ctx: &SourceContext, reply: Subject, body: Bytes) {
    if let Err(e) = state.client.publish(reply, body).await {
        ctx.counts.broker_errors.count("ack", 1);
        warn!(route = %ctx.route, error = %crate::setup::one_line(&e), "a settlement could not be queued");
    }
}

/// How long a flush may wait for the connection.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until what was published is written to the server; a failure is counted and
/// logged once per run of failures. The client keeps what it could not write and sends
/// it after reconnecting; a message whose `ack_wait` ran out meanwhile comes back (a
/// duplicate, never a loss).
pub(crate) async fn flush(state: &State, ctx: &SourceContext, operation: &'static str) -> bool {
    let ok = matches!(
        tokio::time::timeout(FLUSH_TIMEOUT, state.client.flush()).await,
        Ok(Ok(()))
    );
    if !ok {
        ctx.counts.broker_errors.count(operation, 1);
    }
    state.flushed(ctx, operation, ok);
    ok
}

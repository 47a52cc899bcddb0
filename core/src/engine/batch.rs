//! Batch delivery: several messages in one request, for endpoints that prefer fewer, larger
//! requests. The endpoint may accept a batch in part by answering 2xx with the ids that
//! failed; only those are retried (like Lambda's partial batch responses).
//!
//! A batch holds one concurrency slot and is one request to the rate limit, the adaptive
//! limit and the circuit breaker; its messages are settled one by one, so an ack never
//! waits for a retry of another message of the same batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{ack, dead_letter, describe, retry_delay, timed, Pass, Shared, Slot};
use crate::ack::{AckHandle, Settlement};
use crate::message::Message;
use crate::policy::Verdict;
use crate::sink::{BatchResponse, Sink};
use crate::source::Delivery;

/// `[routes.x.delivery.batch]`: how a batch is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Messages per request at most.
    pub max_messages: usize,
    /// How long the first message of a batch waits for others.
    pub max_wait: Duration,
}

/// Takes more deliveries after `first` until the batch is full, `max_wait` has passed, the
/// source has nothing more, or shutdown starts.
pub(super) async fn collect(
    first: Delivery,
    rx: &mut mpsc::Receiver<Delivery>,
    batching: Batching,
    shutdown: &CancellationToken,
    received: &prometheus_client::metrics::counter::Counter,
) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + batching.max_wait;
    let mut batch = vec![first];
    while batch.len() < batching.max_messages {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            d = tokio::time::timeout_at(deadline, rx.recv()) => d.ok().flatten(),
        };
        match next {
            Some(d) => {
                received.inc();
                batch.push(d);
            }
            None => break,
        }
    }
    batch
}

/// A message of a batch on its way, with the attempts that do not count toward
/// `max_attempts` (the endpoint was down, or refused the batch as a whole).
struct Entry {
    message: Message,
    ack: AckHandle,
    excused: u32,
}

/// Delivers one batch: attempts until every message is acked, dead-lettered, handed back to
/// the broker for a retry, or taken back.
///
/// A batch refused as a whole with a dead-letter answer (a status of
/// `dead_letter_statuses` such as 413 or 400, or `Ferry-Action: dead-letter`) says nothing
/// about any one of its messages: it is split in halves that go out at once, and only a
/// single message is dead-lettered for such an answer. The split attempts count in
/// `X-Ferry-Attempt` but not toward `max_attempts`, so that splitting down to one message
/// never exhausts a good message.
pub(super) async fn deliver<K: Sink>(shared: Arc<Shared<K>>, batch: Vec<Delivery>, permit: Slot) {
    let began = Instant::now();
    let first: Vec<Entry> = batch
        .into_iter()
        .filter_map(|d| {
            let ack = super::oversize::admit(&shared, &d.message, d.ack)?;
            Some(Entry {
                message: d.message,
                ack,
                excused: 0,
            })
        })
        .collect();
    // Groups to send now, the next on top.
    let mut ready = vec![first];
    let mut permit = Some(permit);
    loop {
        let mut waiting = Vec::new();
        let mut delay = Duration::ZERO;
        while let Some(mut group) = ready.pop() {
            // What the broker took back meanwhile is not sent here.
            group.retain(|entry| {
                let current = entry.ack.is_current();
                if !current {
                    shared.metrics.stale.inc();
                }
                current
            });
            if group.is_empty() {
                continue;
            }
            let mut pass = Pass::Normal;
            if let Some(breaker) = &shared.breaker {
                // A closed circuit passes at once, also during shutdown, which delivers
                // what was received.
                pass = tokio::select! {
                    biased;
                    p = breaker.pass() => p,
                    _ = shared.shutdown.cancelled() => return,
                };
            }
            let messages: Vec<Message> = group.iter().map(|e| e.message.clone()).collect();
            let sent = tokio::time::Instant::now();
            let BatchResponse { response, failed } =
                timed(&shared, Box::pin(shared.sink.deliver_batch(&messages))).await;
            drop(messages);
            let mut excused = false;
            if let Some(breaker) = &shared.breaker {
                breaker.record(&response, pass, sent);
                excused = breaker.excuses(&response, sent);
            }
            let verdict = shared.policy.responses.classify(&response);
            if let (Verdict::DeadLetter { .. }, 2..) = (&verdict, group.len()) {
                debug!(route = %shared.route, messages = group.len(), outcome = %describe(&response), "batch refused whole; splitting it");
                for entry in &mut group {
                    entry.message.attempt += 1;
                    entry.excused += 1;
                    shared.metrics.retried.inc();
                }
                let second = group.split_off(group.len() / 2);
                ready.push(second);
                ready.push(group);
                continue;
            }
            let failed: HashSet<&str> = failed.iter().map(String::as_str).collect();
            // A request that never left (no connection) is no attempt: it raises no
            // attempt number, exhausts nothing and its retry waits here.
            let reached = response.was_sent();
            for entry in group {
                let Entry {
                    mut message,
                    ack: handle,
                    excused: spared,
                } = entry;
                let spared = spared + u32::from(excused);
                let after = match &verdict {
                    Verdict::Ack if !failed.contains(message.id.as_str()) => {
                        ack(&shared, &message, handle, &response, began);
                        continue;
                    }
                    Verdict::Ack => None,
                    Verdict::DeadLetter { reason } => {
                        dead_letter(&shared, &message, handle, &response, reason.clone(), began);
                        continue;
                    }
                    Verdict::Retry { after } => *after,
                };
                if reached && message.attempt.saturating_sub(spared) >= shared.policy.max_attempts {
                    let why = if failed.contains(message.id.as_str()) {
                        "reported failed in the batch answer".to_owned()
                    } else {
                        describe(&response)
                    };
                    let reason = format!("attempts exhausted: {why}");
                    dead_letter(&shared, &message, handle, &response, reason, began);
                    continue;
                }
                shared.metrics.retried.inc();
                let wait = retry_delay(&shared, &message, after);
                if handle.holds_retries() && reached {
                    handle.settle(Settlement::Retry { delay: wait });
                    continue;
                }
                delay = delay.max(wait);
                message.attempt += u32::from(reached);
                waiting.push(Entry {
                    message,
                    ack: handle,
                    excused: spared,
                });
            }
        }
        if waiting.is_empty() {
            return;
        }
        debug!(route = %shared.route, messages = waiting.len(), ?delay, "retrying part of a batch");
        // The slot is not held while waiting, as for a single message.
        drop(permit.take());
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        permit = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return,
            p = shared.limiter.acquire() => match p {
                Ok(p) => Some(p),
                Err(_) => return,
            },
        };
        ready.push(waiting);
    }
}

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

/// Delivers one batch: attempts until every message is acked, dead-lettered, handed back to
/// the broker for a retry, or taken back.
pub(super) async fn deliver<K: Sink>(shared: Arc<Shared<K>>, batch: Vec<Delivery>, permit: Slot) {
    let began = Instant::now();
    let (mut messages, mut acks): (Vec<Message>, Vec<AckHandle>) =
        batch.into_iter().map(|d| (d.message, d.ack)).unzip();
    let mut permit = Some(permit);
    let mut excused = 0u32;
    loop {
        // What the broker took back meanwhile is not sent here.
        let mut i = 0;
        while i < acks.len() {
            if acks[i].is_current() {
                i += 1;
            } else {
                shared.metrics.stale.inc();
                messages.swap_remove(i);
                acks.swap_remove(i);
            }
        }
        if messages.is_empty() {
            return;
        }
        let mut pass = Pass::Normal;
        if let Some(breaker) = &shared.breaker {
            // A closed circuit passes at once, also during shutdown, which delivers what
            // was received.
            pass = tokio::select! {
                biased;
                p = breaker.pass() => p,
                _ = shared.shutdown.cancelled() => return,
            };
        }
        let sent = tokio::time::Instant::now();
        let BatchResponse { response, failed } =
            timed(&shared, Box::pin(shared.sink.deliver_batch(&messages))).await;
        if let Some(breaker) = &shared.breaker {
            breaker.record(&response, pass, sent);
            if breaker.excuses(&response, sent) {
                excused += 1;
            }
        }
        let verdict = shared.policy.responses.classify(&response);
        let failed: HashSet<&str> = failed.iter().map(String::as_str).collect();
        let mut waiting = Vec::new();
        let mut delay = Duration::ZERO;
        for (message, handle) in messages.drain(..).zip(acks.drain(..)) {
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
            if message.attempt.saturating_sub(excused) >= shared.policy.max_attempts {
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
            if handle.holds_retries() {
                handle.settle(Settlement::Retry { delay: wait });
                continue;
            }
            delay = delay.max(wait);
            waiting.push((message, handle));
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
        for (mut message, handle) in waiting {
            message.attempt += 1;
            messages.push(message);
            acks.push(handle);
        }
    }
}

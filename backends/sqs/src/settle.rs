//! Settling messages on SQS, coalesced into batch calls off the delivery path.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{
    BatchResultErrorEntry, ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use ferry_core::{DeadLetter, Settle, Settlement, SourceCounts};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::convert::Original;
use crate::dead_letter;
use crate::lease::Leases;
use crate::SqsConfig;

/// Broker calls in flight at once; while they are busy, settlements pile up and the next
/// call carries up to 10 of them.
const CALLS_IN_FLIGHT: usize = 8;
/// How long a settlement may wait for others to share its call: at a few hundred messages
/// a second, long enough to fill a batch of 10 (every call costs the same whatever it
/// carries); short beside any lease, and beside what a crash may deliver again anyway.
const LINGER: std::time::Duration = std::time::Duration::from_millis(50);
/// SQS's longest visibility timeout (12 h).
const MAX_VISIBILITY: u64 = 43_200;

pub(crate) enum Op {
    Delete(String),
    Visibility(String, i32),
    DeadLetter(String, Box<Original>, DeadLetter),
}

/// The settlement of one SQS message.
pub(crate) struct SqsAck {
    pub(crate) key: u64,
    pub(crate) leases: Arc<Leases>,
    pub(crate) settle: mpsc::UnboundedSender<Op>,
    pub(crate) original: Option<Box<Original>>,
}

impl Settle for SqsAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let lapsed = !self.leases.is_current(self.key);
        let Some(receipt) = self.leases.release(self.key) else {
            return;
        };
        if lapsed && settlement != Settlement::Ack {
            // The visibility ended before a renewal landed: SQS may have handed the message
            // to another consumer, whose hold a visibility change or a dead-letter copy here
            // would spoil. It is delivered again, as a later attempt.
            debug!("lease lapsed; the message is left to the queue");
            return;
        }
        // An ack after a lapse still tries the delete: it removes the message unless SQS
        // handed it out again meanwhile, and does nothing worse than fail otherwise.
        let op = match settlement {
            Settlement::Ack => Op::Delete(receipt),
            Settlement::Retry { delay } => {
                let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
                Op::Visibility(receipt, secs.min(MAX_VISIBILITY) as i32)
            }
            Settlement::Release => Op::Visibility(receipt, 0),
            Settlement::DeadLetter(dl) => match self.original {
                Some(original) => Op::DeadLetter(receipt, original, dl),
                // No dead-letter queue: the message stays invisible until its visibility
                // times out, and the queue's redrive policy moves it after maxReceiveCount.
                None => return,
            },
        };
        // The settler only stops after every sender (every handle) is gone.
        let _ = self.settle.send(op);
    }

    fn holds_retries(&self) -> bool {
        true
    }

    fn is_current(&self) -> bool {
        self.leases.is_current(self.key)
    }

    /// With a dead-letter queue, ferry sends the copy itself and counts it once it landed
    /// and the original is deleted; without one, the queue's redrive policy moves it.
    fn counts_dead_letters(&self) -> bool {
        self.original.is_some()
    }
}

/// Starts the settler; it ends when every sender has been dropped and its calls are done.
pub(crate) fn spawn(
    client: Client,
    config: Arc<SqsConfig>,
    route: Arc<str>,
    counts: SourceCounts,
) -> (JoinHandle<()>, mpsc::UnboundedSender<Op>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(
        Settler {
            client,
            config,
            route,
            counts,
        },
        rx,
    ));
    (task, tx)
}

#[derive(Clone)]
struct Settler {
    client: Client,
    config: Arc<SqsConfig>,
    route: Arc<str>,
    counts: SourceCounts,
}

async fn run(settler: Settler, mut rx: mpsc::UnboundedReceiver<Op>) {
    let permits = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    let mut calls = JoinSet::new();
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = rx.recv().await else {
            break;
        };
        let mut deletes = Vec::new();
        let mut visibility = Vec::new();
        let mut dead = Vec::new();
        // Wait a moment for more settlements so a call carries up to 10: every SQS call
        // costs the same whatever it carries. Only the broker call waits, not a delivery.
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut next = Some(first);
        while let Some(op) = next {
            match op {
                Op::Delete(r) => deletes.push(r),
                Op::Visibility(r, secs) => visibility.push((r, secs)),
                Op::DeadLetter(r, original, dl) => dead.push((r, original, dl)),
            }
            next = if deletes.len() < 10 && visibility.len() < 10 && dead.len() < 10 {
                match rx.try_recv() {
                    Ok(op) => Some(op),
                    Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten(),
                }
            } else {
                None
            };
        }
        let s = settler.clone();
        calls.spawn(async move {
            let _permit = permit;
            s.delete(deletes).await;
            s.change_visibility(visibility).await;
            s.dead_letter(dead).await;
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

impl Settler {
    /// Deletes `receipts` (at most 10); returns how many SQS confirmed.
    async fn delete(&self, receipts: Vec<String>) -> usize {
        if receipts.is_empty() {
            return 0;
        }
        for attempt in 1..=3u32 {
            let entries = receipts.iter().enumerate().filter_map(|(i, r)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .build()
                    .ok()
            });
            let result = self
                .client
                .delete_message_batch()
                .queue_url(&self.config.queue_url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            match result {
                Ok(resp) => {
                    self.refused(
                        "delete",
                        &resp.failed,
                        "delete refused; the message will be delivered again",
                    );
                    return resp.successful.len();
                }
                Err(e) if attempt < 3 => {
                    debug!(route = %self.route, error = %crate::describe(&e), "delete failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => {
                    self.counts
                        .broker_errors
                        .count("delete", receipts.len() as u64);
                    warn!(route = %self.route, count = receipts.len(), error = %crate::describe(&e),
                        "delete failed; these messages will be delivered again");
                }
            }
        }
        0
    }

    async fn change_visibility(&self, entries: Vec<(String, i32)>) {
        if entries.is_empty() {
            return;
        }
        let batch = entries.iter().enumerate().filter_map(|(i, (r, secs))| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .visibility_timeout(*secs)
                .build()
                .ok()
        });
        let result = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.config.queue_url)
            .set_entries(Some(batch.collect()))
            .send()
            .await;
        // A failure only means the message comes back when its current visibility ends.
        match result {
            Ok(resp) => self.refused(
                "visibility",
                &resp.failed,
                "visibility change refused; the message returns when its visibility ends",
            ),
            Err(e) => {
                self.counts
                    .broker_errors
                    .count("visibility", entries.len() as u64);
                warn!(route = %self.route, count = entries.len(), error = %crate::describe(&e),
                    "visibility change failed; messages return when their visibility ends");
            }
        }
    }

    /// Sends each copy to the dead-letter queue, then deletes the originals that landed
    /// there; a dead letter counts once both happened. One that did not land stays on its
    /// queue and comes back when its visibility ends.
    async fn dead_letter(&self, dead: Vec<(String, Box<Original>, DeadLetter)>) {
        let Some(dlq) = &self.config.dead_letter_queue_url else {
            return;
        };
        let mut landed = Vec::with_capacity(dead.len());
        for (receipt, original, dl) in dead {
            let group = original.group.clone();
            let copy = dead_letter::copy(*original, &dl, &self.route);
            if !copy.dropped.is_empty() {
                warn!(route = %self.route, dropped = ?copy.dropped,
                    "dead letter over the SQS size limit; sent without these attributes");
            }
            let mut send = self
                .client
                .send_message()
                .queue_url(dlq)
                .message_body(copy.body);
            for (name, value) in copy.attributes {
                send = send.message_attributes(name, value);
            }
            if dlq.ends_with(".fifo") {
                send = send
                    .message_group_id(group.unwrap_or_else(|| "ferry".to_owned()))
                    .message_deduplication_id(receipt.chars().rev().take(128).collect::<String>());
            }
            match send.send().await {
                Ok(_) => landed.push(receipt),
                Err(e) => {
                    self.counts.broker_errors.count("dead_letter", 1);
                    warn!(route = %self.route, error = %crate::describe(&e),
                        "sending to the dead-letter queue failed; the message stays on its queue");
                }
            }
        }
        let deleted = self.delete(landed).await;
        self.counts.dead_lettered.inc_by(deleted as u64);
    }

    /// Logs and counts the entries of a batch call that SQS refused.
    fn refused(&self, operation: &'static str, failed: &[BatchResultErrorEntry], what: &str) {
        if failed.is_empty() {
            return;
        }
        self.counts
            .broker_errors
            .count(operation, failed.len() as u64);
        for f in failed {
            warn!(route = %self.route, code = %f.code, message = f.message.as_deref().unwrap_or(""), "{what}");
        }
    }
}

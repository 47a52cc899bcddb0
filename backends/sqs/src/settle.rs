//! Settling messages on SQS, coalesced into batch calls off the delivery path.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageAttributeValue,
};
use aws_sdk_sqs::Client;
use ferry_core::{DeadLetter, Settle, Settlement};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::convert::Original;
use crate::lease::Leases;
use crate::SqsConfig;

/// Broker calls in flight at once; while they are busy, settlements pile up and the next
/// call carries up to 10 of them.
const CALLS_IN_FLIGHT: usize = 8;
/// How long a settlement may wait for others to share its call.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);
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
        let Some(receipt) = self.leases.release(self.key) else {
            return;
        };
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
}

/// Starts the settler; it ends when every sender has been dropped and its calls are done.
pub(crate) fn spawn(
    client: Client,
    config: Arc<SqsConfig>,
    route: Arc<str>,
) -> (JoinHandle<()>, mpsc::UnboundedSender<Op>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(
        Settler {
            client,
            config,
            route,
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
            for (receipt, original, dl) in dead {
                s.dead_letter(receipt, *original, dl).await;
            }
        });
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

impl Settler {
    async fn delete(&self, receipts: Vec<String>) {
        if receipts.is_empty() {
            return;
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
                    for failed in resp.failed {
                        warn!(route = %self.route, code = %failed.code, message = failed.message.as_deref().unwrap_or(""),
                            "delete refused; the message will be delivered again");
                    }
                    return;
                }
                Err(e) if attempt < 3 => {
                    debug!(route = %self.route, error = %crate::describe(&e), "delete failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => {
                    warn!(route = %self.route, count = receipts.len(), error = %crate::describe(&e),
                        "delete failed; these messages will be delivered again");
                }
            }
        }
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
        if let Err(e) = result {
            warn!(route = %self.route, count = entries.len(), error = %crate::describe(&e),
                "visibility change failed; messages return when their visibility ends");
        }
    }

    async fn dead_letter(&self, receipt: String, original: Original, dl: DeadLetter) {
        let Some(dlq) = &self.config.dead_letter_queue_url else {
            return;
        };
        let mut reason: String = dl.reason.chars().take(1024).collect();
        if reason.is_empty() {
            reason.push('-');
        }
        let mut send = self
            .client
            .send_message()
            .queue_url(dlq)
            .message_body(original.body)
            .message_attributes("ferry_dead_letter_reason", string_attr(reason))
            .message_attributes("ferry_attempts", number_attr(dl.attempts.to_string()))
            .message_attributes("ferry_route", string_attr(self.route.to_string()));
        if let Some(status) = dl.status {
            send = send.message_attributes("ferry_last_status", number_attr(status.to_string()));
        }
        // SQS allows 10 attributes per message; ferry's own come first.
        for (name, value) in original.attributes.into_iter().take(6) {
            send = send.message_attributes(name, value);
        }
        if dlq.ends_with(".fifo") {
            send = send
                .message_group_id(original.group.unwrap_or_else(|| "ferry".to_owned()))
                .message_deduplication_id(receipt.chars().rev().take(128).collect::<String>());
        }
        match send.send().await {
            Ok(_) => self.delete(vec![receipt]).await,
            Err(e) => {
                // Not deleted: the message returns after its visibility and is tried again.
                warn!(route = %self.route, error = %crate::describe(&e),
                    "sending to the dead-letter queue failed; the message stays on its queue");
            }
        }
    }
}

fn string_attr(value: String) -> MessageAttributeValue {
    attr("String", value)
}

fn number_attr(value: String) -> MessageAttributeValue {
    attr("Number", value)
}

fn attr(kind: &str, value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type(kind)
        .string_value(value)
        .build()
        .expect("data_type is always set")
}

//! The receive loops and the backlog poller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use aws_sdk_sqs::Client;
use ferry_core::{AckHandle, Delivery, SourceContext};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::convert::{convert, Envelope};
use crate::lease::Leases;
use crate::settle::{Op, SqsAck};
use crate::signature::{Judgement, SnsCheck};
use crate::SqsConfig;

/// How long a receive call already under way may finish after shutdown: what it returns is
/// released at once instead of staying invisible for a whole visibility timeout.
const RECEIVE_DRAIN: Duration = Duration::from_secs(2);

pub(crate) struct Receiver {
    pub(crate) client: Client,
    pub(crate) config: Arc<SqsConfig>,
    pub(crate) queue_name: Arc<str>,
    pub(crate) leases: Arc<Leases>,
    pub(crate) settle: mpsc::UnboundedSender<Op>,
    /// Whether receiving fails, shared by the route's receivers: the first to fail and
    /// the first to get through again say so, once for all of them.
    pub(crate) failing: Arc<AtomicBool>,
    pub(crate) sns: Option<Arc<SnsCheck>>,
}

/// How long a message whose signing certificate could not be fetched stays invisible: longer
/// with each receive, at most five minutes.
fn later(receive_count: u32) -> i32 {
    10 * receive_count.clamp(1, 30) as i32
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(10))
}

/// Receives until shutdown or until the engine closes its end.
pub(crate) async fn receive_loop(r: Receiver, out: mpsc::Sender<Delivery>, ctx: SourceContext) {
    let wait = i32::try_from(r.config.wait_time.as_secs()).unwrap_or(20);
    let visibility = i32::try_from(r.config.visibility_timeout.as_secs()).unwrap_or(43_200);
    let keep_original = r.config.dead_letter_queue_url.is_some();
    let batch = usize::try_from(r.config.batch_size)
        .unwrap_or(10)
        .clamp(1, 10);
    let mut failures = 0u32;
    loop {
        // Ask the broker only for what the engine has room for.
        let room = batch.min(out.max_capacity());
        let permits = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            p = out.reserve_many(room) => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let asked = tokio::time::Instant::now();
        let call = r
            .client
            .receive_message()
            .queue_url(&r.config.queue_url)
            .max_number_of_messages(room as i32)
            .wait_time_seconds(wait)
            .visibility_timeout(visibility)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send();
        let result = tokio::select! {
            r = call => r,
            _ = async {
                ctx.shutdown.cancelled().await;
                tokio::time::sleep(RECEIVE_DRAIN).await;
            } => return,
        };
        match result {
            Ok(resp) => {
                if failures > 0 && r.failing.swap(false, Ordering::Relaxed) {
                    info!(route = %ctx.route, queue = %r.queue_name, "receiving again");
                }
                failures = 0;
                ctx.set_connected(true);
                let mut permits = permits;
                for m in resp.messages.unwrap_or_default() {
                    let envelope = match &r.sns {
                        None => Envelope::Trusted,
                        Some(check) => match check.judge(m.body().unwrap_or_default()).await {
                            Judgement::Later(reason) => {
                                // Says nothing about the message: it stays on the queue.
                                ctx.counts.broker_errors.count("sns_certificate", 1);
                                let count = m
                                    .attributes()
                                    .and_then(|a| {
                                        a.get(&MessageSystemAttributeName::ApproximateReceiveCount)
                                    })
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(1);
                                debug!(route = %ctx.route, %reason, "SNS certificate not fetched; the message waits on the queue");
                                if let Some(receipt) = m.receipt_handle {
                                    let _ = r.settle.send(Op::Visibility(receipt, later(count)));
                                }
                                continue;
                            }
                            judged => Envelope::Judged(judged),
                        },
                    };
                    let Some(received) = convert(m, &r.queue_name, keep_original, envelope) else {
                        warn!(route = %ctx.route, "SQS returned a message without id or receipt handle; skipped");
                        continue;
                    };
                    let key = r.leases.hold(received.receipt, asked);
                    let ack = AckHandle::new(SqsAck {
                        key,
                        leases: r.leases.clone(),
                        settle: r.settle.clone(),
                        original: received.original,
                    });
                    let delivery = Delivery {
                        message: received.message,
                        ack,
                    };
                    // We asked for at most `room` messages, so a permit is always there;
                    // if not, dropping the delivery releases it to the queue.
                    if let Some(permit) = permits.next() {
                        permit.send(delivery);
                    }
                }
            }
            Err(e) => {
                failures += 1;
                ctx.set_connected(false);
                if failures == 1 && !r.failing.swap(true, Ordering::Relaxed) {
                    warn!(route = %ctx.route, queue = %r.queue_name, error = %crate::describe(&e), "receive failed; retrying with backoff");
                }
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        }
    }
}

/// Keeps `ferry_source_backlog` at the queue's visible backlog.
pub(crate) async fn poll_backlog(client: Client, queue_url: String, ctx: SourceContext) {
    loop {
        let result = client
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await;
        if let Ok(resp) = result {
            let visible = resp
                .attributes
                .as_ref()
                .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
                .and_then(|v| v.parse::<i64>().ok());
            if let Some(visible) = visible {
                ctx.backlog.set(visible);
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

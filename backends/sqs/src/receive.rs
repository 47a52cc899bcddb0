//! The receive loops and the backlog poller.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// How much longer than its long-poll wait a receive call already under way at shutdown may
/// take to answer. It is awaited rather than dropped: SQS goes on receiving for a call whose
/// client went away, and what it takes then stays invisible for a whole visibility timeout
/// and comes back counted as a second receive. Awaited, what it returns is released at once.
const RECEIVE_DRAIN: Duration = Duration::from_secs(2);

/// How often the backlog is asked for (`GetQueueAttributes`) when it may be more than
/// nothing: about as often as metrics are scraped, and no more.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(15);

/// What the receive loops tell the backlog poller: whether asking SQS for the backlog is
/// worth a call. A long poll that came back with less than it asked for, or that has not
/// come back yet, found no more visible messages than that: the backlog is zero without
/// asking. Only a full batch, or receivers held back by a full (or paused) route while the
/// queue may grow, make the backlog worth a `GetQueueAttributes`.
#[derive(Debug, Default)]
pub(crate) struct BacklogHint {
    /// A receive came back full since the poller last looked.
    full: AtomicBool,
    /// A receiver waited for room since the poller last looked.
    waited: AtomicBool,
    /// Receivers waiting for room right now.
    waiting: AtomicUsize,
}

impl BacklogHint {
    /// Whether the backlog may be more than nothing; forgets what it was told.
    fn worth_asking(&self) -> bool {
        let full = self.full.swap(false, Ordering::Relaxed);
        let waited = self.waited.swap(false, Ordering::Relaxed);
        full || waited || self.waiting.load(Ordering::Relaxed) > 0
    }
}

/// Room for `room` more deliveries, noting in `hint` when the route had none to give.
async fn room_for<'a>(
    out: &'a mpsc::Sender<Delivery>,
    room: usize,
    hint: &BacklogHint,
) -> Result<mpsc::PermitIterator<'a, Delivery>, mpsc::error::SendError<()>> {
    match out.try_reserve_many(room) {
        Ok(permits) => Ok(permits),
        Err(mpsc::error::TrySendError::Closed(())) => Err(mpsc::error::SendError(())),
        Err(mpsc::error::TrySendError::Full(())) => {
            hint.waited.store(true, Ordering::Relaxed);
            hint.waiting.fetch_add(1, Ordering::Relaxed);
            let permits = out.reserve_many(room).await;
            hint.waiting.fetch_sub(1, Ordering::Relaxed);
            permits
        }
    }
}

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
    pub(crate) backlog: Arc<BacklogHint>,
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
            p = room_for(&out, room, &r.backlog) => match p {
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
                tokio::time::sleep(r.config.wait_time + RECEIVE_DRAIN).await;
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
                let messages = resp.messages.unwrap_or_default();
                if messages.len() >= room {
                    r.backlog.full.store(true, Ordering::Relaxed);
                }
                for m in messages {
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

/// Keeps `ferry_source_backlog` at the queue's visible backlog, asking SQS only when the
/// answer may be more than nothing (see [`BacklogHint`]): an idle route makes no call for it.
pub(crate) async fn poll_backlog(
    client: Client,
    queue_url: String,
    hint: Arc<BacklogHint>,
    ctx: SourceContext,
) {
    let mut first = true;
    loop {
        if std::mem::take(&mut first) || hint.worth_asking() {
            let result = client
                .get_queue_attributes()
                .queue_url(&queue_url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .send()
                .await;
            let visible = result.ok().and_then(|resp| {
                resp.attributes
                    .as_ref()
                    .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
                    .and_then(|v| v.parse::<i64>().ok())
            });
            if let Some(visible) = visible {
                ctx.backlog.set(visible);
            }
        } else if ctx.is_connected() {
            ctx.backlog.set(0);
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(BACKLOG_INTERVAL) => {}
        }
    }
}

//! The receiver: pull requests on the durable consumer, each for no more messages than
//! the engine's channel has room for (reserved before the request), so ferry never takes
//! more from the consumer than the route can deliver. A pull under way is read to its end
//! even at shutdown: what the server handed out for it reaches the engine (which delivers
//! or releases it) instead of waiting out `ack_wait`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use ferry_core::{AckHandle, Delivery, SourceContext};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::settle::{MessageAck, Original, Senders, State};

/// How long a pull request waits on the server for messages.
const PULL_WAIT: Duration = Duration::from_secs(1);

pub(crate) struct Receiver<'a> {
    consumer: PullConsumer,
    state: Arc<State>,
    senders: Arc<Senders>,
    ctx: &'a SourceContext,
}

impl<'a> Receiver<'a> {
    pub(crate) fn new(
        consumer: PullConsumer,
        state: Arc<State>,
        senders: Arc<Senders>,
        ctx: &'a SourceContext,
    ) -> Self {
        Self {
            consumer,
            state,
            senders,
            ctx,
        }
    }

    /// Receives until shutdown or until the engine closes the channel.
    pub(crate) async fn run(self, out: &mpsc::Sender<Delivery>) {
        let config = self.state.config.clone();
        info!(route = %self.ctx.route, stream = %config.stream, consumer = %config.consumer, "receiving");
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
            let asked = Instant::now();
            let pull = self
                .consumer
                .batch()
                .max_messages(room)
                .expires(PULL_WAIT)
                .messages()
                .await;
            let mut batch = match pull {
                Ok(batch) => batch,
                Err(e) => {
                    drop(permits);
                    failures += 1;
                    self.failed(&crate::setup::one_line(&e), failures);
                    if self.pause(failures).await {
                        return;
                    }
                    continue;
                }
            };
            let mut permits = permits;
            let mut refused = None;
            while let Some(item) = batch.next().await {
                match item {
                    Ok(msg) => {
                        if failures > 0 {
                            info!(route = %self.ctx.route, stream = %config.stream, "receiving again");
                            self.ctx.set_error(None);
                            failures = 0;
                        }
                        self.ctx.set_connected(self.connected());
                        if let Some(delivery) = self.wrap(msg, asked) {
                            // One permit per message asked for: never short. Dropping
                            // the delivery otherwise would release it, which is safe too.
                            if let Some(permit) = permits.next() {
                                permit.send(delivery);
                            }
                        }
                    }
                    Err(e) => refused = Some(crate::setup::one_line(&*e)),
                }
            }
            drop(permits);
            match refused {
                // 409 "Exceeded ...": the consumer holds `max_ack_pending` messages
                // unacknowledged already (other replicas' too), or has as many pulls
                // waiting as it takes, or the request was too big: ask again soon.
                Some(status) if status.contains("409") && status.contains("Exceeded") => {
                    debug!(route = %self.ctx.route, %status, "pull refused for now");
                    if self.pause(1).await {
                        return;
                    }
                }
                Some(status) => {
                    failures += 1;
                    self.failed(&status, failures);
                    if self.pause(failures).await {
                        return;
                    }
                }
                None => self.ctx.set_connected(self.connected()),
            }
        }
    }

    /// Whether the client is connected now: a pull that ended without a word may have
    /// timed out on the client's side while it reconnects.
    fn connected(&self) -> bool {
        self.state.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A failed pull: logged once per outage, counted, shown by `/routes`.
    fn failed(&self, error: &str, failures: u32) {
        self.ctx.counts.broker_errors.count("receive", 1);
        if failures == 1 {
            warn!(route = %self.ctx.route, stream = %self.state.config.stream, %error,
                "pulling from the consumer failed; retrying with backoff");
        }
        self.ctx.set_error(Some(format!("receive: {error}")));
    }

    /// Waits out the backoff; true when shutdown came first.
    async fn pause(&self, failures: u32) -> bool {
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => true,
            _ = tokio::time::sleep(crate::backoff(failures)) => false,
        }
    }

    fn wrap(&self, msg: async_nats::jetstream::Message, asked: Instant) -> Option<Delivery> {
        let reply = msg.message.reply.clone()?;
        let info = match msg.info() {
            Ok(info) => info,
            Err(e) => {
                warn!(route = %self.ctx.route, error = %e, "a message without JetStream metadata; skipped");
                return None;
            }
        };
        let held = self.state.hold(reply, asked);
        let message = crate::convert::message(&msg.message, &info, &self.state.config);
        let original = self.senders.dead.is_some().then(|| {
            Box::new(Original {
                subject: msg.message.subject.clone(),
                headers: msg.message.headers.clone(),
                payload: msg.message.payload.clone(),
                stream_sequence: info.stream_sequence,
            })
        });
        Some(Delivery {
            message,
            ack: AckHandle::new(MessageAck {
                held,
                state: self.state.clone(),
                senders: self.senders.clone(),
                original,
            }),
        })
    }
}

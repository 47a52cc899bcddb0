//! Settling Kafka records: a delivered record only marks its offset finished (the commit
//! loop does the rest); a dead-lettered one is first produced to the dead-letter topic
//! with the reason in headers, and only finished once the broker has it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_core::{DeadLetter, Settle, Settlement};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::context::Quiet;
use crate::offsets::{Mark, Offsets};

/// What a dead-lettered copy needs of the original record.
#[derive(Debug)]
pub(crate) struct Original {
    pub(crate) key: Option<Bytes>,
    pub(crate) payload: Bytes,
    pub(crate) headers: Vec<(String, Option<Bytes>)>,
}

/// A dead-letter to produce before its offset may be committed.
#[derive(Debug)]
pub(crate) struct DeadOp {
    mark: Mark,
    original: Option<Original>,
    why: DeadLetter,
}

/// The settlement of one record.
pub(crate) struct KafkaAck {
    pub(crate) mark: Mark,
    pub(crate) offsets: Arc<Offsets>,
    /// Also tells the source, by closing, that every handle is gone.
    pub(crate) dead: mpsc::UnboundedSender<DeadOp>,
    pub(crate) original: Option<Original>,
}

impl Settle for KafkaAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        match settlement {
            Settlement::Ack => self.offsets.finish(&self.mark),
            Settlement::DeadLetter(why) => {
                let op = DeadOp {
                    mark: self.mark,
                    original: self.original,
                    why,
                };
                // The receiver lives until every handle is gone, so this cannot fail.
                let _ = self.dead.send(op);
            }
            // Left unfinished: the commit position stays below it, so the record is read
            // again after a restart or rebalance. (Retries wait in the engine, never here.)
            Settlement::Retry { .. } | Settlement::Release => {}
        }
    }

    fn is_current(&self) -> bool {
        self.offsets.is_current(&self.mark)
    }
}

/// Where dead letters go.
pub(crate) struct DeadLetters {
    pub(crate) producer: Option<(FutureProducer<Quiet>, String)>,
    pub(crate) offsets: Arc<Offsets>,
    pub(crate) route: Arc<str>,
    /// Cancelled at shutdown: a dead letter the broker will not take by then stays
    /// uncommitted and is read again on the next start.
    pub(crate) shutdown: CancellationToken,
}

fn headers(op: &DeadOp, source: &str) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = &op.original {
        for (key, value) in &original.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
    }
    let status = op.why.status.map(|s| s.to_string()).unwrap_or_default();
    let attempts = op.why.attempts.to_string();
    let offset = op.mark.offset.to_string();
    let partition = op.mark.tp.1.to_string();
    for (key, value) in [
        ("ferry_reason", op.why.to_string()),
        ("ferry_status", status),
        ("ferry_attempts", attempts),
        ("ferry_source_topic", source.to_owned()),
        ("ferry_source_partition", partition),
        ("ferry_source_offset", offset),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

impl DeadLetters {
    /// Produces each dead letter, then marks it finished; ends when every handle is gone.
    pub(crate) async fn run(self, mut ops: mpsc::UnboundedReceiver<DeadOp>) {
        while let Some(op) = ops.recv().await {
            let Some((producer, topic)) = &self.producer else {
                warn!(route = %self.route, message = %format!("{}-{}-{}", op.mark.tp.0, op.mark.tp.1, op.mark.offset),
                    reason = %op.why, "dead-lettered without a dead_letter_topic: skipped");
                self.offsets.finish(&op.mark);
                continue;
            };
            if self.produce(producer, topic, &op).await {
                self.offsets.finish(&op.mark);
            }
        }
    }

    async fn produce(&self, producer: &FutureProducer<Quiet>, topic: &str, op: &DeadOp) -> bool {
        let empty = Bytes::new();
        let original = op.original.as_ref();
        let payload = original.map_or(&empty, |o| &o.payload);
        let mut failures = 0u32;
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(payload.as_ref())
                .headers(headers(op, &op.mark.tp.0));
            if let Some(key) = original.and_then(|o| o.key.as_ref()) {
                record = record.key(key.as_ref());
            }
            let sent = tokio::select! {
                r = producer.send(record, Duration::from_secs(10)) => r,
                _ = self.shutdown.cancelled(), if failures > 0 => return false,
            };
            match sent {
                Ok(_) => {
                    if failures > 0 {
                        info!(route = %self.route, topic, "dead-letter topic takes messages again");
                    }
                    return true;
                }
                Err((e, _)) => {
                    failures += 1;
                    if failures == 1 {
                        warn!(route = %self.route, topic, error = %e,
                            "cannot produce to the dead-letter topic; the record stays uncommitted and is retried");
                    }
                    let delay = Duration::from_millis(200u64 << failures.min(6));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return false,
                    }
                }
            }
        }
    }
}

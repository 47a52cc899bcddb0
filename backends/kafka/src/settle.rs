//! Settling Kafka records: a delivered record only marks its offset finished (the commit
//! loop does the rest); a dead-lettered one is first produced to the dead-letter topic
//! with the reason in headers, and only finished once the broker has it (or dropped, when
//! the route says `dead_letters = "drop"`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_core::{DeadLetter, Settle, Settlement, SourceContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode as Code;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

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

    /// Dead letters are counted once they landed (or were dropped), so one the broker
    /// refuses is never reported as done.
    fn counts_dead_letters(&self) -> bool {
        true
    }
}

impl DeadOp {
    /// The record's message id, `topic-partition-offset`.
    fn id(&self) -> String {
        format!("{}-{}-{}", self.mark.tp.0, self.mark.tp.1, self.mark.offset)
    }
}

/// The dead-letter producer and its topic.
pub(crate) type Producer = (FutureProducer<Quiet>, String);

/// Where dead letters go.
pub(crate) struct DeadLetters {
    /// The producer and topic; `None` drops them (`dead_letters = "drop"`).
    pub(crate) producer: Option<Producer>,
    pub(crate) offsets: Arc<Offsets>,
    /// The route's counters, shutdown and error state.
    pub(crate) ctx: SourceContext,
    /// Cancelled `shutdown_grace` after shutdown began: a dead letter the broker has not
    /// taken by then stays uncommitted and is read again on the next start.
    pub(crate) give_up: CancellationToken,
}

/// How one dead letter ended.
enum Outcome {
    /// The broker has it.
    Landed,
    /// The broker will never take it.
    Refused(KafkaError),
    /// Shutdown came first.
    Abandoned,
}

/// What a failed produce means.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Larger than the topic (or `message.max.bytes`) allows.
    TooLarge,
    /// Retrying cannot help (no permission, no topic, a record the broker rejects).
    Permanent,
    /// Worth another try (the broker unreachable, a timeout).
    Transient,
}

fn classify(e: &KafkaError) -> Failure {
    match e.rdkafka_error_code() {
        Some(Code::MessageSizeTooLarge | Code::MessageBatchTooLarge) => Failure::TooLarge,
        Some(
            Code::InvalidMessage
            | Code::InvalidMessageSize
            | Code::InvalidRecord
            | Code::InvalidTopic
            | Code::UnknownTopic
            | Code::UnknownPartition
            | Code::TopicAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::PolicyViolation
            | Code::UnsupportedForMessageFormat
            | Code::UnsupportedCompressionType
            | Code::InvalidRequiredAcks
            | Code::InvalidArgument
            | Code::Fatal,
        ) => Failure::Permanent,
        _ => Failure::Transient,
    }
}

/// The reason kept in a dead letter trimmed to fit the topic.
const TRIMMED_REASON: usize = 256;

/// The dead letter's headers: the original ones, then ferry's. `trimmed` leaves out the
/// original headers and cuts the reason, for a record that would not fit otherwise.
fn headers(op: &DeadOp, source: &str, trimmed: bool) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = op.original.as_ref().filter(|_| !trimmed) {
        for (key, value) in &original.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
    }
    let mut reason = op.why.to_string();
    if trimmed && reason.len() > TRIMMED_REASON {
        let mut end = TRIMMED_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    let status = op.why.last_status();
    let attempts = op.why.attempts.to_string();
    let offset = op.mark.offset.to_string();
    let partition = op.mark.tp.1.to_string();
    for (key, value) in [
        ("ferry_reason", reason),
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
    /// Produces each dead letter, then marks it finished; ends when every handle is gone
    /// and hands the producer back, to be closed off the async workers.
    pub(crate) async fn run(
        self,
        mut ops: mpsc::UnboundedReceiver<DeadOp>,
    ) -> Option<FutureProducer<Quiet>> {
        let route = self.ctx.route.clone();
        // Records whose dead letter the broker refused for good: they stay uncommitted
        // while this member holds their partition, and the route says so on `/routes`.
        let mut stuck: Vec<Mark> = Vec::new();
        while let Some(op) = ops.recv().await {
            let Some((producer, topic)) = &self.producer else {
                warn!(route = %route, message = %op.id(), reason = %op.why,
                    "dead letter dropped (dead_letters = \"drop\")");
                self.ctx.counts.dropped.inc();
                self.offsets.finish(&op.mark);
                continue;
            };
            match self.produce(producer, topic, &op).await {
                Outcome::Landed => {
                    self.offsets.finish(&op.mark);
                    self.ctx.counts.dead_lettered.inc();
                }
                Outcome::Refused(e) => {
                    self.ctx.counts.broker_errors.count("dead_letter", 1);
                    let detail = format!(
                        "the dead letter of {} is refused by topic {topic:?} for good ({}); \
                         the record stays uncommitted and is read again after a restart",
                        op.id(),
                        crate::one_line(&e)
                    );
                    if stuck.is_empty() {
                        error!(route = %route, "{detail}");
                    }
                    stuck.push(op.mark.clone());
                    let more = match stuck.len() {
                        1 => String::new(),
                        n => format!(" ({n} records so far)"),
                    };
                    self.ctx.set_error(Some(format!("{detail}{more}")));
                }
                Outcome::Abandoned => {}
            }
            // A partition taken away takes its stuck records with it: the new owner
            // reads them again.
            let before = stuck.len();
            stuck.retain(|m| self.offsets.is_current(m));
            if before > 0 && stuck.is_empty() {
                info!(route = %route, "no record waits on a refused dead letter any more");
                self.ctx.set_error(None);
            }
        }
        self.producer.map(|(producer, _)| producer)
    }

    async fn produce(&self, producer: &FutureProducer<Quiet>, topic: &str, op: &DeadOp) -> Outcome {
        let route = &self.ctx.route;
        let empty = Bytes::new();
        let original = op.original.as_ref();
        let payload = original.map_or(&empty, |o| &o.payload);
        let mut failures = 0u32;
        let mut trimmed = false;
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(payload.as_ref())
                .headers(headers(op, &op.mark.tp.0, trimmed));
            if let Some(key) = original.and_then(|o| o.key.as_ref()) {
                record = record.key(key.as_ref());
            }
            // librdkafka retries by itself for up to `message.timeout.ms` (minutes): the
            // wait ends with the shutdown grace whatever the topic does.
            let sent = tokio::select! {
                r = producer.send(record, Duration::from_secs(10)) => r,
                _ = self.give_up.cancelled() => return Outcome::Abandoned,
            };
            let e = match sent {
                Ok(_) => {
                    if failures > 0 {
                        info!(route = %route, topic, "dead-letter topic takes messages again");
                    }
                    return Outcome::Landed;
                }
                Err((e, _)) => e,
            };
            match classify(&e) {
                Failure::TooLarge if !trimmed => {
                    warn!(route = %route, topic, message = %op.id(),
                        "dead letter too large for the topic; sending it once more without the original headers and with the reason cut");
                    trimmed = true;
                }
                Failure::TooLarge | Failure::Permanent => return Outcome::Refused(e),
                Failure::Transient => {
                    failures += 1;
                    if failures == 1 {
                        warn!(route = %route, topic, error = %crate::one_line(&e),
                            "cannot produce to the dead-letter topic; the record stays uncommitted and is retried");
                    }
                    let delay = Duration::from_millis(200u64 << failures.min(6));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.ctx.shutdown.cancelled() => return Outcome::Abandoned,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_size_refusal_is_worth_trimming_and_outages_are_retried() {
        let failure = |code| classify(&KafkaError::MessageProduction(code));
        assert_eq!(failure(Code::MessageSizeTooLarge), Failure::TooLarge);
        assert_eq!(failure(Code::TopicAuthorizationFailed), Failure::Permanent);
        assert_eq!(failure(Code::MessageTimedOut), Failure::Transient);
        assert_eq!(failure(Code::AllBrokersDown), Failure::Transient);
    }
}

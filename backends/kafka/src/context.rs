//! The consumer's callbacks: commit before partitions are taken away, start afresh on the
//! ones assigned, and turn librdkafka's own errors and logs into one line per change of
//! state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_core::SourceContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use crate::offsets::{Offsets, Tp};

/// Shared by the consumer's callbacks and the receive loop.
pub(crate) struct FerryContext {
    pub(crate) offsets: Arc<Offsets>,
    pub(crate) source: SourceContext,
    /// Whether the broker was last seen unreachable, so each change is logged once.
    pub(crate) down: AtomicBool,
}

impl FerryContext {
    /// The broker answered: log the recovery once.
    pub(crate) fn reached(&self) {
        self.source.set_connected(true);
        if self.down.swap(false, Ordering::Relaxed) {
            info!(route = %self.source.route, "reaches the Kafka brokers again");
        }
    }

    fn unreachable(&self, error: &KafkaError, reason: &str) {
        self.source.set_connected(false);
        if !self.down.swap(true, Ordering::Relaxed) {
            warn!(route = %self.source.route, error = %error, reason,
                "lost the Kafka brokers; librdkafka reconnects with backoff");
        }
    }
}

pub(crate) fn list(positions: &[(Tp, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in positions {
        // Only fails for an offset kind we never pass.
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl FerryContext {
    /// Partitions handed back after their revoke commit failed: commit what was delivered
    /// before fetching starts, unless the group has already moved further (another member
    /// held them meanwhile), so the outage does not turn delivered messages into
    /// duplicates.
    fn save_carried(&self, consumer: &BaseConsumer<Self>, carried: &[(Tp, i64)]) {
        let route = &self.source.route;
        let committed = match consumer.committed_offsets(list(carried), COMMITTED_TIMEOUT) {
            Ok(tpl) => tpl,
            Err(e) => {
                warn!(route = %route, error = %e,
                    "cannot read the group's offsets; re-reading from the last commit");
                return;
            }
        };
        let ahead: Vec<(Tp, i64)> = carried
            .iter()
            .filter(|((topic, partition), position)| {
                match committed
                    .find_partition(topic, *partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(at)) => at < *position,
                    _ => true,
                }
            })
            .cloned()
            .collect();
        if ahead.is_empty() {
            return;
        }
        match consumer.commit(&list(&ahead), CommitMode::Sync) {
            Ok(()) => info!(route = %route, positions = ?ahead,
                "committed what was delivered while the broker was unreachable"),
            Err(e) => warn!(route = %route, error = %e,
                "commit of what was delivered during the outage failed; it is read again"),
        }
    }
}

/// How long an assignment waits for the group's committed offsets.
const COMMITTED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ClientContext for FerryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        // Connection errors arrive through `error` as well; here they would repeat on
        // every reconnect attempt.
        debug!(route = %self.source.route, ?level, fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match error.rdkafka_error_code() {
            Some(Code::AllBrokersDown | Code::BrokerTransportFailure | Code::Resolve) => {
                self.unreachable(&error, reason);
            }
            _ => warn!(route = %self.source.route, error = %error, reason, "Kafka client error"),
        }
    }
}

impl ConsumerContext for FerryContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let tps = partitions(tpl);
                info!(route = %self.source.route, partitions = ?tps, "partitions assigned");
                let carried = self.offsets.assign(tps);
                if !carried.is_empty() {
                    self.save_carried(consumer, &carried);
                }
            }
            Rebalance::Revoke(tpl) => {
                let tps = partitions(tpl);
                let positions = self.offsets.revoke(tps.iter().cloned());
                // Commit what is finished before another consumer takes over; records
                // still in flight are read again by it (a duplicate, never a loss).
                if !positions.is_empty() {
                    if let Err(e) = consumer.commit(&list(&positions), CommitMode::Sync) {
                        warn!(route = %self.source.route, error = %e,
                            "commit on revoke failed; the new owner re-reads from the last commit");
                        self.offsets.unsaved(&positions);
                    }
                }
                info!(route = %self.source.route, partitions = ?tps, "partitions revoked");
            }
            Rebalance::Error(e) => {
                warn!(route = %self.source.route, error = %e, "rebalance failed");
            }
        }
    }
}

/// The context of the start-up check and of the dead-letter producer: the call that waits
/// (the check, or a dead letter's send) reports the outcome, so librdkafka's own reports of
/// the same failure (one per retry) stay at debug level.
pub(crate) struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        debug!(?level, fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        debug!(error = %error, reason, "librdkafka error; the waiting call reports the outcome");
    }
}

impl ConsumerContext for Quiet {}

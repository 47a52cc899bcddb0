//! The audit trail hook: one record per message that reached its end here (delivered or
//! dead-lettered), for teams that must show what was delivered when.
//!
//! The engine hands each record to an [`AuditTrail`] on the delivery's own task, so an
//! implementation must not wait: queue the record and write it elsewhere, and count what it
//! had to drop rather than slow deliveries down.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How a message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// The endpoint answered 2xx (or `Ferry-Action: ack`) and the message was acked.
    Delivered,
    /// The message went to the dead-letter destination.
    DeadLettered,
}

impl AuditOutcome {
    /// `delivered` or `dead_lettered`, as in the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Delivered => "delivered",
            AuditOutcome::DeadLettered => "dead_lettered",
        }
    }
}

/// One finished message.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// The message id the endpoint saw (`Idempotency-Key`).
    pub id: String,
    /// The route's name.
    pub route: Arc<str>,
    /// The queue, topic or exchange it came from.
    pub source: Arc<str>,
    /// The attempt that ended it (1-based, as `X-Ferry-Attempt`).
    pub attempts: u32,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// The endpoint's last HTTP status, if it answered.
    pub status: Option<u16>,
    /// From when this replica started delivering it to its end, retries included.
    pub latency: Duration,
    /// When it ended.
    pub at: SystemTime,
}

/// Where audit records go. `record` is called on the delivery path and must not block.
pub trait AuditTrail: Send + Sync + std::fmt::Debug + 'static {
    /// Takes one record.
    fn record(&self, record: AuditRecord);
}

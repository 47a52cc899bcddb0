//! Settling a message on its broker.
//!
//! Every delivery carries an [`AckHandle`]. The engine settles it exactly once; a handle that
//! is dropped unsettled (a cancelled task, a panic, a shutdown) settles as
//! [`Settlement::Release`], so a message can never be reported delivered by accident.

use std::fmt;
use std::time::Duration;

/// What happened to a message, as far as its broker needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The endpoint answered 2xx: remove the message from the broker.
    Ack,
    /// Deliver again after `delay`; only sent to handles that hold retries in the broker
    /// (see [`Settle::holds_retries`]).
    Retry {
        /// How long the broker should keep the message hidden.
        delay: Duration,
    },
    /// The message is bad or out of attempts: move it aside with the reason.
    DeadLetter(DeadLetter),
    /// Hand the message back at once without counting it as handled (shutdown, cancellation).
    Release,
}

/// Why a message was dead-lettered; backends attach it to the dead-lettered copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Human-readable reason (the endpoint's body cut to 1 KB, or the engine's reason).
    pub reason: String,
    /// The last HTTP status, if the endpoint answered at all.
    pub status: Option<u16>,
    /// The class of the last answer (`4xx`, `5xx`, `timeout`, `error`, ...), which says
    /// what happened when there is no status; see [`DeadLetter::last_status`].
    pub last_class: &'static str,
    /// How many attempts were made.
    pub attempts: u32,
}

impl DeadLetter {
    /// What backends record as `ferry_last_status`: the status, else what the last attempt
    /// came to (`timeout`, `error`).
    pub fn last_status(&self) -> String {
        self.status
            .map_or_else(|| self.last_class.to_owned(), |s| s.to_string())
    }
}

impl fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(
                f,
                "status {status} after {} attempt(s): {}",
                self.attempts, self.reason
            ),
            None => write!(f, "after {} attempt(s): {}", self.attempts, self.reason),
        }
    }
}

/// The broker side of one message's settlement, implemented by each backend.
///
/// `settle` is synchronous on purpose: backends queue the settlement to a background task
/// that coalesces broker calls (SQS `DeleteMessageBatch`, AMQP `multiple` acks), so the
/// delivery path never waits for the broker.
pub trait Settle: Send + 'static {
    /// Records the final word on this message.
    fn settle(self: Box<Self>, settlement: Settlement);

    /// True when the broker can keep a message hidden for a retry delay (SQS visibility),
    /// so retry state survives a restart; false makes the engine wait in memory instead.
    fn holds_retries(&self) -> bool {
        false
    }

    /// False once the broker has taken the message back (its connection was lost, its
    /// partition was revoked): another consumer gets it, so delivering it here would only
    /// make a duplicate whose ack cannot count. The engine checks before every attempt.
    fn is_current(&self) -> bool {
        true
    }

    /// True when the backend counts `ferry_deliveries_total{outcome="dead_lettered"}`
    /// itself (through [`crate::SourceCounts`]) once the dead letter has landed, so that a
    /// dead-letter send that failed is not reported as done; false lets the engine count
    /// it when it decides.
    fn counts_dead_letters(&self) -> bool {
        false
    }
}

/// Owns a message's settlement; settles as [`Settlement::Release`] when dropped unsettled.
pub struct AckHandle(Option<Box<dyn Settle>>);

impl AckHandle {
    /// Wraps a backend's settlement.
    pub fn new(settle: impl Settle) -> Self {
        Self(Some(Box::new(settle)))
    }

    /// Settles the message; consumes the handle so it cannot be settled twice.
    pub fn settle(mut self, settlement: Settlement) {
        if let Some(inner) = self.0.take() {
            inner.settle(settlement);
        }
    }

    /// See [`Settle::holds_retries`].
    pub fn holds_retries(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.holds_retries())
    }

    /// See [`Settle::is_current`].
    pub fn is_current(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_current())
    }

    /// See [`Settle::counts_dead_letters`].
    pub fn counts_dead_letters(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.counts_dead_letters())
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.settle(Settlement::Release);
        }
    }
}

impl fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckHandle")
            .field("settled", &self.0.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Record(Arc<Mutex<Vec<Settlement>>>);
    impl Settle for Record {
        fn settle(self: Box<Self>, s: Settlement) {
            self.0.lock().expect("lock").push(s);
        }
    }

    #[test]
    fn dropped_handle_releases_and_settled_handle_does_not() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        drop(AckHandle::new(Record(seen.clone())));
        AckHandle::new(Record(seen.clone())).settle(Settlement::Ack);
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![Settlement::Release, Settlement::Ack]
        );
    }
}

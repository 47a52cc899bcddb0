//! Visibility leases: a message received but not yet settled stays invisible to other
//! consumers for as long as ferry holds it, however slow the endpoint is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;
use aws_sdk_sqs::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

struct Lease {
    receipt: String,
    expires: Instant,
}

/// The receipt handles of every message ferry holds, with when their visibility ends.
pub(crate) struct Leases {
    visibility: Duration,
    next: AtomicU64,
    held: Mutex<HashMap<u64, Lease>>,
}

impl Leases {
    pub(crate) fn new(visibility: Duration) -> Self {
        Self {
            visibility,
            next: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Starts holding a message received by a call sent at `asked`; returns the key its
    /// handle keeps. The broker starts the visibility clock somewhere between the call and
    /// its answer, so the lease counts from the call: a slow answer then means an early
    /// extension rather than a message that reappears while ferry still holds it.
    pub(crate) fn hold(&self, receipt: String, asked: Instant) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            receipt,
            expires: asked + self.visibility,
        };
        self.lock().insert(key, lease);
        key
    }

    /// Stops holding a message; returns its receipt handle for the settling call.
    pub(crate) fn release(&self, key: u64) -> Option<String> {
        self.lock().remove(&key).map(|l| l.receipt)
    }

    /// Receipts whose visibility ends within half the timeout, marked as renewed.
    fn due(&self, now: Instant) -> Vec<String> {
        let threshold = now + self.visibility / 2;
        let renewed = now + self.visibility;
        let mut held = self.lock();
        held.values_mut()
            .filter(|l| l.expires <= threshold)
            .map(|l| {
                l.expires = renewed;
                l.receipt.clone()
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Renews the visibility of held messages until `stop` is cancelled.
pub(crate) async fn extend(
    client: Client,
    queue_url: String,
    leases: Arc<Leases>,
    stop: CancellationToken,
) {
    let tick = (leases.visibility / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let timeout = i32::try_from(leases.visibility.as_secs()).unwrap_or(i32::MAX);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let due = leases.due(Instant::now());
        for chunk in due.chunks(10) {
            let entries = chunk.iter().enumerate().filter_map(|(i, receipt)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(timeout)
                    .build()
                    .ok()
            });
            let result = client
                .change_message_visibility_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            // A message settled meanwhile has a stale receipt: failing to extend it is fine.
            if let Err(e) = result {
                debug!(error = %crate::describe(&e), "visibility extension failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn due_leases_are_renewed_once_per_half_timeout() {
        let leases = Leases::new(Duration::from_secs(10));
        let a = leases.hold("a".into(), Instant::now());
        let _b = leases.hold("b".into(), Instant::now());
        assert!(leases.due(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(6)).await;
        let mut due = leases.due(Instant::now());
        due.sort();
        assert_eq!(due, vec!["a".to_owned(), "b".to_owned()]);
        assert!(leases.due(Instant::now()).is_empty());
        assert_eq!(leases.release(a).as_deref(), Some("a"));
        assert_eq!(leases.release(a), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(leases.due(Instant::now()), vec!["b".to_owned()]);
    }
}

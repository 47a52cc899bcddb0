//! Leases: a message ferry holds must stay invisible to other consumers for as long as it
//! holds it, however slow the endpoint. Brokers with an ack deadline (SQS visibility, Pub/Sub
//! ack deadlines, NATS `ack_wait`) all need the same bookkeeping: know what is held and
//! when each hold ends, and renew in batches before it does. A backend supplies only the
//! renewing call ([`Renew`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The broker call that extends held messages by the lease length.
pub trait Renew<T>: Send + Sync + 'static {
    /// Extends each of `due` (a backend may batch them) to `length` from now. Failures
    /// are the backend's to log: a message settled meanwhile has a stale token, and
    /// failing to extend it is harmless.
    fn renew(&self, due: Vec<T>, length: Duration) -> impl Future<Output = ()> + Send;
}

struct Lease<T> {
    token: T,
    expires: Instant,
}

/// Every message held, with the broker's token for it (an SQS receipt handle, a delivery
/// tag) and when its lease ends.
pub struct Leases<T> {
    length: Duration,
    next: AtomicU64,
    held: Mutex<HashMap<u64, Lease<T>>>,
}

impl<T: Clone + Send + 'static> Leases<T> {
    /// Leases of `length`: the broker's visibility timeout or ack deadline.
    pub fn new(length: Duration) -> Self {
        Self {
            length,
            next: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The lease length.
    pub fn length(&self) -> Duration {
        self.length
    }

    /// Starts holding a message received by a call sent at `asked`; returns the key to
    /// release it by. The broker starts its clock somewhere between the call and its
    /// answer, so the lease counts from the call: a slow answer then means an early
    /// extension rather than a message that reappears while ferry still holds it.
    pub fn hold(&self, token: T, asked: Instant) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            token,
            expires: asked + self.length,
        };
        self.lock().insert(key, lease);
        key
    }

    /// Stops holding a message; returns its token for the settling call.
    pub fn release(&self, key: u64) -> Option<T> {
        self.lock().remove(&key).map(|l| l.token)
    }

    /// Tokens whose lease ends within half its length, marked as renewed.
    fn due(&self, now: Instant) -> Vec<T> {
        let threshold = now + self.length / 2;
        let renewed = now + self.length;
        let mut held = self.lock();
        held.values_mut()
            .filter(|l| l.expires <= threshold)
            .map(|l| {
                l.expires = renewed;
                l.token.clone()
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Lease<T>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Renews held messages through `renew` until `stop` is cancelled; checks every quarter
/// of the lease (between 100 ms and 5 s), renewing what ends within half of it.
pub async fn keep_renewed<T, R>(leases: Arc<Leases<T>>, renew: R, stop: CancellationToken)
where
    T: Clone + Send + Sync + 'static,
    R: Renew<T>,
{
    let tick = (leases.length / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let due = leases.due(Instant::now());
        if !due.is_empty() {
            renew.renew(due, leases.length).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn due_leases_are_renewed_once_per_half_length() {
        let leases = Leases::new(Duration::from_secs(10));
        let a = leases.hold("a", Instant::now());
        let _b = leases.hold("b", Instant::now());
        assert!(leases.due(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(6)).await;
        let mut due = leases.due(Instant::now());
        due.sort();
        assert_eq!(due, vec!["a", "b"]);
        assert!(leases.due(Instant::now()).is_empty());
        assert_eq!(leases.release(a), Some("a"));
        assert_eq!(leases.release(a), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(leases.due(Instant::now()), vec!["b"]);
    }

    struct Record(Arc<Mutex<Vec<Vec<&'static str>>>>);

    impl Renew<&'static str> for Record {
        async fn renew(&self, due: Vec<&'static str>, length: Duration) {
            assert_eq!(length, Duration::from_secs(4));
            self.0.lock().expect("lock").push(due);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_renews_held_messages_until_stopped() {
        let leases = Arc::new(Leases::new(Duration::from_secs(4)));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_renewed(
            leases.clone(),
            Record(calls.clone()),
            stop.clone(),
        ));
        let key = leases.hold("m", Instant::now());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            calls.lock().expect("lock").len(),
            2,
            "renewed at 2 s and 4 s"
        );
        leases.release(key);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            calls.lock().expect("lock").len(),
            2,
            "released: no more renewals"
        );
        stop.cancel();
        task.await.expect("stops");
    }
}

//! Leases: a message ferry holds must stay invisible to other consumers for as long as it
//! holds it, however slow the endpoint. Brokers with an ack deadline (SQS visibility, Pub/Sub
//! ack deadlines, NATS `ack_wait`) all need the same bookkeeping: know what is held and
//! when each hold ends, and renew in batches before it does. A backend supplies only the
//! renewing call ([`Renew`]).
//!
//! A renewal counts only once the broker confirmed it: a failed one (the whole call, or one
//! entry of a batch) is tried again at the next check, well before the lease ends. A lease
//! that ended all the same is *lapsed*: the broker may already have handed the message to
//! another consumer, so [`Leases::is_current`] says false and it is no longer renewed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The broker call that extends held messages by the lease length.
pub trait Renew<T>: Send + Sync + 'static {
    /// Extends each of `due` (a backend may batch them) to `length` from now, and says, in
    /// the order of `due`, which were extended. The backend logs and counts the failures;
    /// the lease service tries those again soon.
    fn renew(&self, due: Vec<T>, length: Duration) -> impl Future<Output = Vec<bool>> + Send;
}

struct Lease<T> {
    token: T,
    /// When the next renewal is due: half a lease after the last confirmed start.
    renew_at: Instant,
    /// When the broker takes the message back unless a renewal lands first.
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
    /// answer, so renewals count from the call (a slow answer, a long poll, then means an
    /// early extension) and the lease is taken to end a full length after the answer
    /// (now): what the broker hands out is not counted as lapsed before it could be renewed.
    pub fn hold(&self, token: T, asked: Instant) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            token,
            renew_at: asked + self.length / 2,
            expires: Instant::now().max(asked) + self.length,
        };
        self.lock().insert(key, lease);
        key
    }

    /// Stops holding a message; returns its token for the settling call.
    pub fn release(&self, key: u64) -> Option<T> {
        self.lock().remove(&key).map(|l| l.token)
    }

    /// Whether the message is still held and its lease has not lapsed: false once the
    /// broker may have given it to someone else.
    pub fn is_current(&self, key: u64) -> bool {
        let now = Instant::now();
        self.lock().get(&key).is_some_and(|l| l.expires > now)
    }

    /// Keys and tokens whose renewal is due: leases that end within half their length and
    /// have not lapsed.
    fn due(&self, now: Instant) -> Vec<(u64, T)> {
        self.lock()
            .iter()
            .filter(|(_, l)| l.renew_at <= now && l.expires > now)
            .map(|(key, l)| (*key, l.token.clone()))
            .collect()
    }

    /// Records a renewal sent at `sent`: those extended end a length after it, the others
    /// stay due and are tried again at the next check.
    fn renewed(&self, keys: &[u64], extended: &[bool], sent: Instant) {
        let mut held = self.lock();
        for (key, _) in keys.iter().zip(extended).filter(|(_, ok)| **ok) {
            if let Some(lease) = held.get_mut(key) {
                lease.expires = sent + self.length;
                lease.renew_at = sent + self.length / 2;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Lease<T>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often [`keep_renewed`] looks for due leases: an eighth of the lease (between 100 ms
/// and 5 s), so a failed renewal is tried again three times or more before the lease ends.
fn check_interval(length: Duration) -> Duration {
    (length / 8).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Renews held messages through `renew` until `stop` is cancelled; checks every eighth of
/// the lease, renewing what ends within half of it and what failed to renew before.
pub async fn keep_renewed<T, R>(leases: Arc<Leases<T>>, renew: R, stop: CancellationToken)
where
    T: Clone + Send + Sync + 'static,
    R: Renew<T>,
{
    let tick = check_interval(leases.length);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let sent = Instant::now();
        let (keys, tokens): (Vec<u64>, Vec<T>) = leases.due(sent).into_iter().unzip();
        if !tokens.is_empty() {
            let extended = renew.renew(tokens, leases.length).await;
            leases.renewed(&keys, &extended, sent);
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
        let (keys, tokens): (Vec<u64>, Vec<&str>) = due.into_iter().unzip();
        assert_eq!(tokens, vec!["a", "b"]);
        leases.renewed(&keys, &[true, true], Instant::now());
        assert!(leases.due(Instant::now()).is_empty());
        assert_eq!(leases.release(a), Some("a"));
        assert_eq!(leases.release(a), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        let due: Vec<&str> = leases
            .due(Instant::now())
            .into_iter()
            .map(|d| d.1)
            .collect();
        assert_eq!(due, vec!["b"]);
    }

    /// Answers as told: `fail_first` calls report every entry failed, later ones succeed.
    struct Record {
        calls: Calls,
        fail_first: usize,
    }

    impl Renew<&'static str> for Record {
        async fn renew(&self, due: Vec<&'static str>, length: Duration) -> Vec<bool> {
            assert_eq!(length, Duration::from_secs(4));
            let mut calls = self.calls.lock().expect("lock");
            let ok = calls.len() >= self.fail_first;
            let extended = vec![ok; due.len()];
            calls.push(due);
            extended
        }
    }

    type Calls = Arc<Mutex<Vec<Vec<&'static str>>>>;

    /// The lease service running over 4 s leases, its renewals recorded.
    struct Service {
        leases: Arc<Leases<&'static str>>,
        calls: Calls,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(fail_first: usize) -> Service {
        let leases = Arc::new(Leases::new(Duration::from_secs(4)));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_renewed(
            leases.clone(),
            Record {
                calls: calls.clone(),
                fail_first,
            },
            stop.clone(),
        ));
        Service {
            leases,
            calls,
            stop,
            task,
        }
    }

    fn count(calls: &Mutex<Vec<Vec<&'static str>>>) -> usize {
        calls.lock().expect("lock").len()
    }

    #[tokio::test(start_paused = true)]
    async fn the_service_renews_held_messages_until_stopped() {
        let Service {
            leases,
            calls,
            stop,
            task,
        } = start(0);
        let key = leases.hold("m", Instant::now());
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert_eq!(count(&calls), 2, "renewed at 2 s and 4 s");
        assert!(leases.is_current(key));
        leases.release(key);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(count(&calls), 2, "released: no more renewals");
        stop.cancel();
        task.await.expect("stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_is_tried_again_before_the_lease_ends() {
        let Service {
            leases,
            calls,
            stop,
            task,
        } = start(2);
        let key = leases.hold("m", Instant::now());
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_eq!(count(&calls), 3, "failed at 2 s and 2.5 s, renewed at 3 s");
        tokio::time::sleep(Duration::from_millis(1_800)).await;
        assert!(leases.is_current(key), "renewed at 3 s: held until 7 s");
        assert_eq!(count(&calls), 3, "next renewal due at 5 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(&calls), 4, "renewed at 5 s");
        stop.cancel();
        task.await.expect("stops");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_was_never_renewed_lapses() {
        let Service {
            leases,
            calls,
            stop,
            task,
        } = start(usize::MAX);
        let key = leases.hold("m", Instant::now());
        tokio::time::sleep(Duration::from_millis(3_900)).await;
        assert!(leases.is_current(key));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!leases.is_current(key), "not renewed within 4 s: lapsed");
        let tries = count(&calls);
        assert_eq!(tries, 4, "tried at 2, 2.5, 3 and 3.5 s");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(count(&calls), tries, "a lapsed lease is not renewed");
        assert_eq!(
            leases.release(key),
            Some("m"),
            "still released by its handle"
        );
        stop.cancel();
        task.await.expect("stops");
    }
}

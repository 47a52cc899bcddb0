//! The endpoint latency, kept to the time asked for. tokio's timer counts whole
//! milliseconds and rounds each deadline up, and the runtime wakes on that tick, so a
//! 20 ms sleep answers after 20–22 ms: `concurrency ÷ latency` would then be out of reach
//! for any client, ferry's sink included. One thread sleeps to the earliest deadline on
//! the operating system's sub-millisecond timer and wakes the requests that are due.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A request waiting for its answer time.
struct Due {
    at: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Hands out waits that end within tens of microseconds of their deadline.
#[derive(Clone)]
pub struct Delay {
    tx: mpsc::Sender<Due>,
}

impl Delay {
    /// Starts the timer thread; it ends when the last `Delay` is dropped.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Due>();
        std::thread::Builder::new()
            .name("bench-delay".into())
            .spawn(move || run(rx))
            .expect("spawn the delay thread");
        Self { tx }
    }

    /// Waits `latency` from now.
    pub async fn wait(&self, latency: Duration) {
        if latency.is_zero() {
            return;
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (wake, woken) = oneshot::channel();
        let due = Due {
            at: Instant::now() + latency,
            seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            wake,
        };
        if self.tx.send(due).is_ok() {
            let _ = woken.await;
        }
    }
}

fn run(rx: mpsc::Receiver<Due>) {
    let mut waiting: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while waiting.peek().is_some_and(|Reverse(d)| d.at <= now) {
            if let Some(Reverse(due)) = waiting.pop() {
                let _ = due.wake.send(());
            }
        }
        let next = match waiting.peek() {
            Some(Reverse(d)) => rx.recv_timeout(d.at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(due) => waiting.push(Reverse(due)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_end_close_to_their_deadline() {
        let delay = Delay::start();
        let started = Instant::now();
        let waits: Vec<_> = (0..64)
            .map(|_| {
                let delay = delay.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    delay.wait(Duration::from_millis(20)).await;
                    t.elapsed()
                })
            })
            .collect();
        for w in waits {
            let took = w.await.expect("wait task");
            assert!(took >= Duration::from_millis(20), "{took:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}

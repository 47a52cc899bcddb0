//! The route's concurrency limit: fixed, or adaptive (AIMD on latency and overload, in
//! the spirit of TCP congestion control and Vector's adaptive request concurrency).
//!
//! A fixed worker count is always wrong for some endpoint: too low wastes it, too high
//! knocks it over. The adaptive limit doubles per round trip until the endpoint first
//! pushes back (slow start), then grows by one slot per round trip while the route
//! uses every slot and answers stay fast, and shrinks by a tenth when the endpoint pushes
//! back (5xx, 429, timeouts, refused connections) or its latency doubles (it is queueing).
//! Near the level last refused it probes one step per four round trips.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::sink::SinkResponse;

/// How many requests a route keeps in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Exactly this many at most.
    Fixed(usize),
    /// Found from the endpoint's answers, between `min` and `max`.
    Adaptive {
        /// The limit never falls below this.
        min: usize,
        /// Nor rises above this.
        max: usize,
    },
}

impl Concurrency {
    /// The most requests the route may ever have in flight.
    pub fn ceiling(&self) -> usize {
        match *self {
            Self::Fixed(n) => n.max(1),
            Self::Adaptive { min, max } => max.max(min).max(1),
        }
    }
}

/// Multiplicative decrease on push-back (Vector's factor): shallow, because the limit
/// then probes slowly around the level that was refused instead of falling far below it.
const DECREASE: f64 = 0.9;
/// A round trip this many times the usual one means the endpoint is queueing.
const SLOW: f64 = 2.0;
/// Weight of a new window in the usual round trip.
const SMOOTHING: f64 = 0.1;
/// Clean windows before growing past the limit that was last refused.
const PROBE_WINDOWS: u32 = 4;
/// Shortest window, so a very fast endpoint is not judged on a handful of answers.
const MIN_WINDOW: Duration = Duration::from_millis(5);

/// Hands out concurrency slots and, when adaptive, moves their number.
pub(super) struct Limiter {
    permits: Arc<Semaphore>,
    /// Slots to take out of circulation as they come back (a decrease larger than the
    /// free slots at that moment).
    owed: AtomicUsize,
    adaptive: Option<Mutex<Aimd>>,
    /// Requests under way (adaptive only): the limit grows only when they reach it.
    requests: AtomicUsize,
    gauge: Gauge,
}

/// One request under way; finish it with its answer.
pub(super) struct Request<'a> {
    limiter: &'a Limiter,
}

impl Request<'_> {
    /// Feeds the endpoint's answer to the adaptive limit.
    pub(super) fn finish(self, response: &SinkResponse, took: Duration) {
        self.limiter.observe(response, took);
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        if self.limiter.adaptive.is_some() {
            self.limiter.requests.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A concurrency slot; returns to the limiter when dropped.
pub(super) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limiter: Arc<Limiter>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let owed = &self.limiter.owed;
            if owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                permit.forget();
            }
        }
    }
}

struct Aimd {
    min: usize,
    max: usize,
    limit: usize,
    window_start: Instant,
    /// Smoothed round trip of successful requests; `None` until the first window.
    usual: Option<f64>,
    rtt_sum: f64,
    rtt_count: u32,
    /// Answers of any kind during the window.
    answers: usize,
    pushed_back: bool,
    /// Most requests under way at once during the window.
    peak: usize,
    /// The limit at the last push-back: above it the limit probes slowly.
    refused_at: Option<usize>,
    /// Clean windows in a row above `refused_at`.
    clean: u32,
    /// When the limit last went down.
    decreased_at: Instant,
}

impl Limiter {
    pub(super) fn new(concurrency: Concurrency, gauge: Gauge) -> Arc<Self> {
        let (start, adaptive) = match concurrency {
            Concurrency::Fixed(n) => (n.max(1), None),
            Concurrency::Adaptive { min, max } => {
                let min = min.max(1);
                let max = max.max(min);
                let aimd = Aimd::new(min, max);
                (min, Some(Mutex::new(aimd)))
            }
        };
        gauge.set(start as i64);
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(start)),
            owed: AtomicUsize::new(0),
            adaptive,
            requests: AtomicUsize::new(0),
            gauge,
        })
    }

    /// Waits for a free slot; fails only once the limiter is closed.
    pub(super) async fn acquire(self: &Arc<Self>) -> Result<Slot, AcquireError> {
        let permit = self.permits.clone().acquire_owned().await?;
        Ok(Slot {
            permit: Some(permit),
            limiter: self.clone(),
        })
    }

    /// A request is about to be sent.
    pub(super) fn begin(&self) -> Request<'_> {
        if let Some(aimd) = &self.adaptive {
            let now = self.requests.fetch_add(1, Ordering::AcqRel) + 1;
            let mut a = lock(aimd);
            a.peak = a.peak.max(now);
        }
        Request { limiter: self }
    }

    fn observe(&self, response: &SinkResponse, took: Duration) {
        let Some(aimd) = &self.adaptive else { return };
        let mut a = lock(aimd);
        a.answers += 1;
        if pushes_back(response) {
            // A refusal of a request sent before the last decrease speaks of the old
            // limit, which was already lowered for it.
            let sent = Instant::now().checked_sub(took);
            if sent.is_none_or(|sent| sent >= a.decreased_at) {
                a.pushed_back = true;
            }
        } else if response.class() == "2xx" {
            a.rtt_sum += took.as_secs_f64();
            a.rtt_count += 1;
        }
        let window = a
            .usual
            .map_or(MIN_WINDOW, Duration::from_secs_f64)
            .max(MIN_WINDOW);
        // A window is one round trip and at least one answer per slot, so the limit
        // grows only once the endpoint's answers to the current limit are in. A refusal
        // ends it at once: refusals come back fast, and a slot freed by one would
        // otherwise be refused again before the window is over.
        let full = a.window_start.elapsed() >= window && a.answers >= a.limit;
        if !full && !a.pushed_back {
            return;
        }
        let before = a.limit;
        let after = a.close_window();
        drop(a);
        self.resize(before, after);
    }

    fn resize(&self, before: usize, after: usize) {
        if after > before {
            let mut grow = after - before;
            // Slots still owed from a decrease are simply not taken out.
            while grow > 0
                && self
                    .owed
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
            {
                grow -= 1;
            }
            self.permits.add_permits(grow);
        } else if after < before {
            let mut shrink = after.abs_diff(before);
            while shrink > 0 {
                match self.permits.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
                shrink -= 1;
            }
            self.owed.fetch_add(shrink, Ordering::AcqRel);
        }
        self.gauge.set(after as i64);
    }
}

impl Aimd {
    fn new(min: usize, max: usize) -> Self {
        Self {
            min,
            max,
            limit: min,
            window_start: Instant::now(),
            usual: None,
            rtt_sum: 0.0,
            rtt_count: 0,
            answers: 0,
            pushed_back: false,
            peak: 0,
            refused_at: None,
            clean: 0,
            decreased_at: Instant::now(),
        }
    }

    /// Ends the window: returns the new limit.
    fn close_window(&mut self) -> usize {
        let rtt = (self.rtt_count > 0).then(|| self.rtt_sum / f64::from(self.rtt_count));
        let slow = matches!((rtt, self.usual), (Some(r), Some(u)) if r > u * SLOW);
        if self.pushed_back || slow {
            self.refused_at = Some(self.limit);
            self.clean = 0;
            self.decreased_at = Instant::now();
            let decreased = ((self.limit as f64 * DECREASE).ceil() as usize).min(self.limit - 1);
            self.limit = decreased.clamp(self.min, self.max);
        } else {
            if let Some(r) = rtt {
                self.usual = Some(self.usual.map_or(r, |u| u + SMOOTHING * (r - u)));
            }
            // Grow only when the limit is what held the route back; at or beyond the
            // limit that was last refused, one slot per few clean windows, since that
            // is where the endpoint's capacity was found.
            if self.peak >= self.limit && self.limit < self.max && self.refused_at.is_none() {
                // Slow start: until the endpoint first pushes back nothing is known of
                // its capacity, so the limit doubles per round trip instead of creeping up
                // by one (reaching 64 slots takes 6 round trips, not 63).
                self.limit = (self.limit * 2).min(self.max);
            } else if self.peak >= self.limit && self.limit < self.max {
                let cautious = self.refused_at.is_some_and(|r| self.limit + 1 >= r);
                self.clean += 1;
                if !cautious || self.clean >= PROBE_WINDOWS {
                    self.limit += 1;
                    self.clean = 0;
                }
            }
        }
        self.window_start = Instant::now();
        self.rtt_sum = 0.0;
        self.rtt_count = 0;
        self.answers = 0;
        self.pushed_back = false;
        self.peak = 0;
        self.limit
    }
}

/// Answers that say the endpoint has more than it can take.
fn pushes_back(response: &SinkResponse) -> bool {
    match response {
        SinkResponse::Status { status, .. } => *status == 429 || *status >= 500,
        SinkResponse::Timeout | SinkResponse::Error(_) | SinkResponse::Unreachable(_) => true,
    }
}

fn lock(aimd: &Mutex<Aimd>) -> std::sync::MutexGuard<'_, Aimd> {
    aimd.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> SinkResponse {
        SinkResponse::Status {
            status: 200,
            detail: String::new(),
            retry_after: None,
            action: None,
        }
    }

    /// A window in which the route used every slot and answers took `rtt` seconds.
    fn saturated(a: &mut Aimd, rtt: f64) -> usize {
        a.peak = a.limit;
        a.rtt_sum = rtt;
        a.rtt_count = 1;
        a.close_window()
    }

    #[test]
    fn grows_while_saturated_and_backs_off_on_push_back() {
        let mut a = Aimd::new(2, 30);
        for expected in [4, 8, 16] {
            assert_eq!(saturated(&mut a, 0.01), expected, "slow start: doubles");
        }
        a.pushed_back = true;
        assert_eq!(a.close_window(), 15, "a tenth off");
        for _ in 0..8 {
            saturated(&mut a, 0.01);
        }
        assert_eq!(a.limit, 17, "after a push-back: no more doubling");
        a.limit = 20;
        a.pushed_back = true;
        assert_eq!(a.close_window(), 18, "a tenth off");
        a.peak = 5;
        assert_eq!(
            a.close_window(),
            18,
            "no growth when the limit was not reached"
        );
        assert_eq!(
            saturated(&mut a, 0.01),
            19,
            "well below the refused 20: at once"
        );
        for step in [20, 21] {
            for _ in 0..3 {
                assert_eq!(
                    saturated(&mut a, 0.01),
                    step - 1,
                    "probing the refused level"
                );
            }
            assert_eq!(saturated(&mut a, 0.01), step, "after four clean windows");
        }
        assert_eq!(
            saturated(&mut a, 0.05),
            19,
            "five times the usual round trip: a tenth off"
        );
        for _ in 0..100 {
            a.pushed_back = true;
            a.close_window();
        }
        assert_eq!(a.limit, 2, "never below min");
        let mut b = Aimd::new(1, 3);
        for _ in 0..10 {
            saturated(&mut b, 0.01);
        }
        assert_eq!(b.limit, 3, "never above max");
    }

    #[tokio::test]
    async fn shrinking_takes_slots_out_as_they_come_back() {
        let limiter = Limiter::new(Concurrency::Fixed(4), Gauge::default());
        let held: Vec<Slot> = futures_like_collect(&limiter, 4).await;
        limiter.resize(4, 1);
        assert_eq!(limiter.permits.available_permits(), 0);
        drop(held);
        assert_eq!(limiter.permits.available_permits(), 1);
        limiter.resize(1, 3);
        assert_eq!(limiter.permits.available_permits(), 3);
        assert!(pushes_back(&SinkResponse::Timeout) && !pushes_back(&ok()));
    }

    async fn futures_like_collect(limiter: &Arc<Limiter>, n: usize) -> Vec<Slot> {
        let mut slots = Vec::new();
        for _ in 0..n {
            slots.push(limiter.acquire().await.expect("open"));
        }
        slots
    }
}

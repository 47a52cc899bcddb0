//! The circuit breaker: when the endpoint is down, stop receiving instead of burning
//! attempts and filling the dead-letter queue.
//!
//! Consecutive answers that say "the endpoint is not there" (a refused connection, a
//! timeout, 502/503/504) open the circuit. While it is open the route receives nothing
//! (messages stay in the broker, visible in the backlog gauge) and no attempt is made, so
//! none is counted; every `open_for` one request goes through as a probe, and its success
//! closes the circuit for everyone. A 500 does not count: that is the endpoint's verdict
//! on one message, which retries and dead-lettering handle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::sink::SinkResponse;

/// `circuit_breaker = { failures, open_for }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreaker {
    /// Consecutive "endpoint not there" answers that open the circuit.
    pub failures: u32,
    /// Time between probes while open.
    pub open_for: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            failures: 10,
            open_for: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    /// `probe_taken`: a probe is under way. `offered`: the receive loop has let one
    /// message in this turn, so that there is something to probe with even when no
    /// retry is waiting; it does not take the turn (the first attempt to ask does).
    Open {
        until: Instant,
        probe_taken: bool,
        offered: bool,
    },
}

/// Whether an attempt may go, and as what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// The circuit is closed.
    Normal,
    /// The one request that tests a downed endpoint.
    Probe,
}

pub(super) struct Breaker {
    config: CircuitBreaker,
    state: Mutex<State>,
    changed: Notify,
    gauge: Gauge,
    route: std::sync::Arc<str>,
    /// The sink checks its own health: it alone closes the circuit, no message probes.
    health_checked: AtomicBool,
    /// When the latest request that found the endpoint up was sent (nanoseconds since
    /// `born`): a failure of a request sent after it may be the outage's.
    up_sent: AtomicU64,
    born: Instant,
}

impl Breaker {
    pub(super) fn new(config: CircuitBreaker, gauge: Gauge, route: std::sync::Arc<str>) -> Self {
        gauge.set(0);
        Self {
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
            changed: Notify::new(),
            gauge,
            route,
            health_checked: AtomicBool::new(false),
            up_sent: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn since_born(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.born).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a failed attempt sent at `sent` is the outage's rather than the message's:
    /// the endpoint looked down and no request sent after it has found the endpoint up.
    /// Such attempts do not count toward `max_attempts`, so an outage dead-letters
    /// nothing, including while the circuit is still counting towards opening.
    pub(super) fn excuses(&self, response: &SinkResponse, sent: Instant) -> bool {
        endpoint_down(response)
            && self.up_sent.load(AtomicOrdering::Relaxed) <= self.since_born(sent)
    }

    /// How often the sink's own health check runs.
    pub(super) fn check_every(&self) -> Duration {
        self.config.open_for
    }

    /// The sink's health check answered: a failing check opens the circuit (the route
    /// stops receiving though requests may still succeed), a passing one closes it.
    pub(super) fn health(&self, up: bool) {
        self.health_checked.store(true, AtomicOrdering::Relaxed);
        let mut state = self.lock();
        match (*state, up) {
            (State::Closed { .. }, false) => {
                *state = self.open();
                drop(state);
                self.gauge.set(1);
                warn!(route = %self.route, "health check fails: circuit open, the route stops receiving");
            }
            (State::Open { .. }, true) => {
                *state = State::Closed { failures: 0 };
                drop(state);
                self.gauge.set(0);
                self.changed.notify_waiters();
                info!(route = %self.route, "health check passes: circuit closed, receiving");
            }
            _ => {}
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until an attempt may be made: at once while closed; while open, until this
    /// caller may probe or the circuit closes.
    pub(super) async fn pass(&self) -> Pass {
        let health_checked = self.health_checked.load(AtomicOrdering::Relaxed);
        self.wait(|state| match state {
            State::Closed { .. } => Some(Pass::Normal),
            State::Open {
                until, probe_taken, ..
            } if !health_checked && !*probe_taken && Instant::now() >= *until => {
                *probe_taken = true;
                Some(Pass::Probe)
            }
            State::Open { .. } => None,
        })
        .await
    }

    /// Waits until the route may receive: at once while closed; while open, once per
    /// probe turn, for one message to probe with.
    pub(super) async fn receivable(&self) {
        let health_checked = self.health_checked.load(AtomicOrdering::Relaxed);
        self.wait(|state| match state {
            State::Closed { .. } => Some(()),
            State::Open {
                until,
                probe_taken,
                offered,
            } if !health_checked && !*probe_taken && !*offered && Instant::now() >= *until => {
                *offered = true;
                Some(())
            }
            State::Open { .. } => None,
        })
        .await;
    }

    async fn wait<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let until = {
                let mut state = self.lock();
                if let Some(out) = ready(&mut state) {
                    return out;
                }
                match *state {
                    // A probe is under way, or the health check decides: wait for word.
                    State::Open {
                        probe_taken: true, ..
                    } => None,
                    State::Open { .. } if self.health_checked.load(AtomicOrdering::Relaxed) => None,
                    State::Open { until, .. } => Some(until),
                    State::Closed { .. } => None,
                }
            };
            match until {
                Some(until) => tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(until) => {}
                },
                None => notified.await,
            }
        }
    }

    /// Records the answer to an attempt sent at `sent` with `pass`.
    pub(super) fn record(&self, response: &SinkResponse, pass: Pass, sent: Instant) {
        let down = endpoint_down(response);
        if !down {
            self.up_sent
                .fetch_max(self.since_born(sent), AtomicOrdering::Relaxed);
        }
        let mut state = self.lock();
        match (*state, down) {
            (State::Closed { .. }, false) => *state = State::Closed { failures: 0 },
            (State::Closed { failures }, true) => {
                let failures = failures + 1;
                if failures >= self.config.failures {
                    *state = self.open();
                    drop(state);
                    self.gauge.set(1);
                    warn!(route = %self.route, failures, open_for = ?self.config.open_for,
                        "endpoint down: circuit open, the route stops receiving and probes");
                } else {
                    *state = State::Closed { failures };
                }
            }
            // Only a probe's answer closes the circuit (with a health check, only the
            // check): a late answer to a request sent before the outage says nothing.
            (State::Open { .. }, false)
                if pass != Pass::Probe || self.health_checked.load(AtomicOrdering::Relaxed) => {}
            (State::Open { .. }, false) => {
                *state = State::Closed { failures: 0 };
                drop(state);
                self.gauge.set(0);
                self.changed.notify_waiters();
                info!(route = %self.route, "endpoint answers again: circuit closed, receiving");
            }
            (State::Open { .. }, true) if pass == Pass::Probe => {
                *state = self.open();
                drop(state);
                self.changed.notify_waiters();
            }
            // A late answer to a request sent before the circuit opened.
            (State::Open { .. }, true) => {}
        }
    }

    fn open(&self) -> State {
        State::Open {
            until: Instant::now() + self.config.open_for,
            probe_taken: false,
            offered: false,
        }
    }
}

/// Answers that mean nobody is there to take the request.
fn endpoint_down(response: &SinkResponse) -> bool {
    match response {
        SinkResponse::Status { status, .. } => matches!(status, 502..=504),
        SinkResponse::Timeout | SinkResponse::Error(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> SinkResponse {
        SinkResponse::Status {
            status,
            retry_after: None,
            action: None,
            detail: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_consecutive_failures_probes_and_closes() {
        let config = CircuitBreaker {
            failures: 3,
            open_for: Duration::from_secs(2),
        };
        let b = Breaker::new(config, Gauge::default(), "r".into());
        for _ in 0..2 {
            b.record(&status(503), Pass::Normal, Instant::now());
        }
        b.record(&status(500), Pass::Normal, Instant::now());
        b.record(&status(200), Pass::Normal, Instant::now());
        for _ in 0..2 {
            b.record(&SinkResponse::Timeout, Pass::Normal, Instant::now());
        }
        assert_eq!(b.pass().await, Pass::Normal, "500 and 200 reset the count");
        b.record(&status(502), Pass::Normal, Instant::now());
        assert_eq!(b.gauge.get(), 1);

        let started = Instant::now();
        assert_eq!(b.pass().await, Pass::Probe);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // Only one probe at a time; a failed probe waits another `open_for`.
        let second = tokio::time::timeout(Duration::from_secs(1), b.pass()).await;
        assert!(
            second.is_err(),
            "a second probe while the first is under way"
        );
        b.record(
            &SinkResponse::Error("refused".into()),
            Pass::Probe,
            Instant::now(),
        );
        let started = Instant::now();
        assert_eq!(b.pass().await, Pass::Probe);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let late = Instant::now() - Duration::from_secs(30);
        b.record(&status(200), Pass::Normal, late);
        assert_eq!(
            b.gauge.get(),
            1,
            "a late answer to an old request does not close it"
        );
        b.record(&status(200), Pass::Probe, Instant::now());
        assert_eq!(b.gauge.get(), 0);
        assert_eq!(b.pass().await, Pass::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_excused_until_a_later_request_finds_the_endpoint_up() {
        let b = Breaker::new(CircuitBreaker::default(), Gauge::default(), "r".into());
        tokio::time::advance(Duration::from_secs(1)).await;
        let first = Instant::now();
        assert!(b.excuses(&status(503), first), "nothing found it up since");
        assert!(!b.excuses(&status(500), first), "a 500 is the message's");
        tokio::time::advance(Duration::from_millis(10)).await;
        b.record(&status(200), Pass::Normal, Instant::now());
        assert!(
            !b.excuses(&SinkResponse::Timeout, first),
            "a later request got through"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(b.excuses(&SinkResponse::Timeout, Instant::now()));
    }
}

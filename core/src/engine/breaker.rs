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
    /// `probe_taken`: a probe is under way. `offered`: when the receive loop last let one
    /// message in, so that there is something to probe with even when no retry is
    /// waiting; it does not take the turn (the first attempt to ask does). Should that
    /// message never ask (the broker took it back, it waits behind a busy key), another
    /// is let in one `open_for` later, so a probe always comes.
    Open {
        until: Instant,
        probe_taken: bool,
        offered: Option<Instant>,
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

/// What a waiter found: go, or wait for word (and, if given, until that instant).
enum Wait<T> {
    Ready(T),
    Until(Option<Instant>),
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
    /// When the circuit last opened (nanoseconds since `born`, 0: never).
    opened: AtomicU64,
    born: Instant,
}

/// A probe turn; dropped without an answer recorded (its task was cancelled, its message
/// taken back), it hands the turn on so the circuit cannot stay open for want of a probe.
pub(super) struct ProbeTurn<'a> {
    breaker: Option<&'a Breaker>,
}

impl ProbeTurn<'_> {
    /// The probe's answer was recorded: nothing to hand on.
    pub(super) fn done(mut self) {
        self.breaker = None;
    }
}

impl Drop for ProbeTurn<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            let mut state = breaker.lock();
            if let State::Open { probe_taken, .. } = &mut *state {
                *probe_taken = false;
            }
            drop(state);
            breaker.changed.notify_waiters();
        }
    }
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
            opened: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    fn since_born(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.born).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a failed attempt sent at `sent` was the outage's rather than the message's:
    /// it says the endpoint is not there, the circuit is open or has opened since it was
    /// sent, and no request sent after it has found the endpoint up. Asked again each time
    /// the message fails, so failures that came just before the circuit opened are excused
    /// once it does. Such attempts do not count toward `max_attempts`: an outage
    /// dead-letters nothing, while one message that times out on an endpoint that is
    /// otherwise fine (the circuit stays closed) counts every request.
    pub(super) fn excuses(&self, response: &SinkResponse, sent: Instant) -> bool {
        endpoint_down(response) && self.excused(sent)
    }

    /// [`Breaker::excuses`] for a request sent at `sent` whose answer said the endpoint
    /// is not there.
    pub(super) fn excused(&self, sent: Instant) -> bool {
        let sent = self.since_born(sent);
        self.up_sent.load(AtomicOrdering::Relaxed) <= sent
            && (self.is_open() || self.opened.load(AtomicOrdering::Relaxed) >= sent)
    }

    pub(super) fn is_open(&self) -> bool {
        matches!(*self.lock(), State::Open { .. })
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

    /// [`Breaker::pass_turn`] for a caller that records every probe it takes.
    pub(super) async fn pass(&self) -> Pass {
        let (pass, turn) = self.pass_turn().await;
        if let Some(turn) = turn {
            turn.done();
        }
        pass
    }

    /// Waits until an attempt may be made: at once while closed; while open, until this
    /// caller may probe or the circuit closes. A probe comes with its turn, to be marked
    /// done once its answer is recorded.
    pub(super) async fn pass_turn(&self) -> (Pass, Option<ProbeTurn<'_>>) {
        let pass = self
            .wait(|state, health_checked, now| match state {
                State::Closed { .. } => Wait::Ready(Pass::Normal),
                State::Open {
                    probe_taken: true, ..
                } => Wait::Until(None),
                State::Open { .. } if health_checked => Wait::Until(None),
                State::Open { until, .. } if now < *until => Wait::Until(Some(*until)),
                State::Open { probe_taken, .. } => {
                    *probe_taken = true;
                    Wait::Ready(Pass::Probe)
                }
            })
            .await;
        let turn = (pass == Pass::Probe).then_some(ProbeTurn {
            breaker: Some(self),
        });
        (pass, turn)
    }

    /// Waits until the route may receive: at once while closed; while open, once per
    /// probe turn (and again each `open_for` while no probe comes), for one message to
    /// probe with.
    pub(super) async fn receivable(&self) {
        let open_for = self.config.open_for;
        self.wait(|state, health_checked, now| match state {
            State::Closed { .. } => Wait::Ready(()),
            State::Open {
                probe_taken: true, ..
            } => Wait::Until(None),
            State::Open { .. } if health_checked => Wait::Until(None),
            State::Open { until, .. } if now < *until => Wait::Until(Some(*until)),
            State::Open {
                offered: Some(at), ..
            } if now < *at + open_for => Wait::Until(Some(*at + open_for)),
            State::Open { offered, .. } => {
                *offered = Some(now);
                Wait::Ready(())
            }
        })
        .await;
    }

    /// Waits for `ready` to say go; between looks it sleeps until woken by a change of
    /// state or until the instant `ready` named (always one in the future, so an open
    /// circuit costs no CPU).
    async fn wait<T>(&self, mut ready: impl FnMut(&mut State, bool, Instant) -> Wait<T>) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake = {
                let mut state = self.lock();
                let health_checked = self.health_checked.load(AtomicOrdering::Relaxed);
                match ready(&mut state, health_checked, Instant::now()) {
                    Wait::Ready(out) => return out,
                    Wait::Until(at) => at,
                }
            };
            match wake {
                Some(at) => tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(at) => {}
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
        let now = Instant::now();
        self.opened
            .store(self.since_born(now).max(1), AtomicOrdering::Relaxed);
        State::Open {
            until: now + self.config.open_for,
            probe_taken: false,
            offered: None,
        }
    }
}

/// Answers that mean nobody is there to take the request.
pub(super) fn endpoint_down(response: &SinkResponse) -> bool {
    match response {
        SinkResponse::Status { status, .. } => matches!(status, 502..=504),
        SinkResponse::Timeout | SinkResponse::Error(_) | SinkResponse::Unreachable(_) => true,
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
    async fn failures_are_excused_once_the_circuit_opens_until_the_endpoint_is_up() {
        let config = CircuitBreaker {
            failures: 2,
            open_for: Duration::from_secs(2),
        };
        let b = Breaker::new(config, Gauge::default(), "r".into());
        tokio::time::advance(Duration::from_secs(1)).await;
        let first = Instant::now();
        assert!(
            !b.excuses(&status(503), first),
            "one failure alone is the message's as far as anyone knows"
        );
        b.record(&status(503), Pass::Normal, first);
        tokio::time::advance(Duration::from_millis(10)).await;
        b.record(&SinkResponse::Timeout, Pass::Normal, Instant::now());
        assert!(
            b.excuses(&status(503), first),
            "the circuit opened after it"
        );
        assert!(!b.excuses(&status(500), first), "a 500 is the message's");
        tokio::time::advance(Duration::from_secs(2)).await;
        let (pass, turn) = b.pass_turn().await;
        assert_eq!(pass, Pass::Probe);
        b.record(&status(200), Pass::Probe, Instant::now());
        turn.expect("a probe has a turn").done();
        assert!(
            !b.excuses(&SinkResponse::Timeout, first),
            "a later request got through"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            !b.excuses(&SinkResponse::Timeout, Instant::now()),
            "closed, and it has not opened since"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_hands_its_turn_on() {
        let config = CircuitBreaker {
            failures: 1,
            open_for: Duration::from_secs(2),
        };
        let b = Breaker::new(config, Gauge::default(), "r".into());
        b.record(&status(503), Pass::Normal, Instant::now());
        let (pass, turn) = b.pass_turn().await;
        assert_eq!(pass, Pass::Probe);
        drop(turn);
        let again = tokio::time::timeout(Duration::from_millis(1), b.pass_turn()).await;
        let (pass, _turn) = again.expect("the turn was handed on at once");
        assert_eq!(pass, Pass::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_let_in_that_never_probes_lets_in_another() {
        let config = CircuitBreaker {
            failures: 1,
            open_for: Duration::from_secs(2),
        };
        let b = Breaker::new(config, Gauge::default(), "r".into());
        b.record(&status(503), Pass::Normal, Instant::now());
        let started = Instant::now();
        b.receivable().await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // That message never asks for the probe (taken back, behind a busy key).
        b.receivable().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(4),
            "another, one open_for later"
        );
    }
}

//! Engine tests with an in-memory source and a scripted sink, under paused time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ack::Settle;
use crate::error::SourceError;
use crate::metrics::{Metrics, RouteLabels};

type Log = Arc<Mutex<Vec<(String, Settlement)>>>;

struct Recorder {
    id: String,
    log: Log,
    holds: bool,
    revoked: Revoked,
}

/// Ids the "broker" has taken back.
type Revoked = Arc<Mutex<std::collections::HashSet<String>>>;

impl Settle for Recorder {
    fn settle(self: Box<Self>, s: Settlement) {
        self.log.lock().expect("lock").push((self.id, s));
    }
    fn holds_retries(&self) -> bool {
        self.holds
    }
    fn is_current(&self) -> bool {
        !self.revoked.lock().expect("lock").contains(&self.id)
    }
}

struct VecSource {
    count: usize,
    log: Log,
    holds: bool,
    /// Message `i` gets ordering key `k{i % keys}`; 0 = no keys.
    keys: usize,
    revoked: Revoked,
    /// Every message whose index is a multiple of this is handed over refused; 0 = none.
    refuse_every: usize,
}

impl Source for VecSource {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let source: Arc<str> = Arc::from("memory");
        for i in 0..self.count {
            let id = format!("m{i}");
            let mut message = Message::new(id.clone(), format!("payload {i}"), source.clone());
            if self.keys > 0 {
                message.group = Some(format!("k{}", i % self.keys));
            }
            if self.refuse_every > 0 && i % self.refuse_every == 0 {
                message.refuse(format!("not genuine: {id}"));
            }
            let delivery = Delivery {
                message,
                ack: AckHandle::new(Recorder {
                    id,
                    log: self.log.clone(),
                    holds: self.holds,
                    revoked: self.revoked.clone(),
                }),
            };
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                r = out.send(delivery) => if r.is_err() { return Ok(()) },
            }
        }
        ctx.shutdown.cancelled().await;
        Ok(())
    }
}

/// A sink whose answer depends on the message and attempt; counts calls and concurrency.
struct Scripted<F> {
    answer: F,
    latency: Duration,
    calls: Arc<AtomicUsize>,
    current: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl<F: Fn(&Message) -> SinkResponse + Send + Sync + 'static> Sink for Scripted<F> {
    async fn deliver(&self, message: &Message) -> SinkResponse {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.current.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.latency).await;
        self.current.fetch_sub(1, Ordering::SeqCst);
        (self.answer)(message)
    }
}

fn ok() -> SinkResponse {
    status(200)
}

fn status(status: u16) -> SinkResponse {
    SinkResponse::Status {
        status,
        retry_after: None,
        action: None,
        detail: String::new(),
    }
}

struct Harness {
    log: Log,
    calls: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    revoked: Revoked,
    shutdown: CancellationToken,
    ctx: SourceContext,
    metrics: crate::metrics::RouteMetrics,
    task: tokio::task::JoinHandle<Result<(), EngineError>>,
}

fn start<F>(
    count: usize,
    holds: bool,
    policy: DeliveryPolicy,
    latency: Duration,
    answer: F,
) -> Harness
where
    F: Fn(&Message) -> SinkResponse + Send + Sync + 'static,
{
    start_keyed(count, 0, holds, policy, latency, answer)
}

fn start_keyed<F>(
    count: usize,
    keys: usize,
    holds: bool,
    policy: DeliveryPolicy,
    latency: Duration,
    answer: F,
) -> Harness
where
    F: Fn(&Message) -> SinkResponse + Send + Sync + 'static,
{
    start_refusing(count, keys, 0, holds, policy, latency, answer)
}

fn start_refusing<F>(
    count: usize,
    keys: usize,
    refuse_every: usize,
    holds: bool,
    policy: DeliveryPolicy,
    latency: Duration,
    answer: F,
) -> Harness
where
    F: Fn(&Message) -> SinkResponse + Send + Sync + 'static,
{
    let log: Log = Arc::default();
    let revoked = Revoked::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let metrics = Metrics::default().route(&RouteLabels {
        route: "t".into(),
        source: "memory".into(),
        sink: "scripted".into(),
    });
    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(Arc::from("t"), shutdown.clone(), metrics.backlog.clone());
    let route = Route {
        name: Arc::from("t"),
        source: VecSource {
            count,
            log: log.clone(),
            holds,
            keys,
            revoked: revoked.clone(),
            refuse_every,
        },
        sink: Scripted {
            answer,
            latency,
            calls: calls.clone(),
            current: Arc::default(),
            peak: peak.clone(),
        },
        policy,
        metrics: metrics.clone(),
        audit: None,
        tracer: None,
    };
    let task = tokio::spawn(run_route(route, ctx.clone()));
    Harness {
        log,
        calls,
        peak,
        revoked,
        shutdown,
        ctx,
        metrics,
        task,
    }
}

impl Harness {
    async fn settle_all(self, expected: usize) -> HashMap<String, Vec<Settlement>> {
        for _ in 0..100_000 {
            if self.log.lock().expect("lock").len() >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shutdown.cancel();
        self.task.await.expect("join").expect("route");
        by_id(&self.log)
    }
}

/// Each id's settlements, in the order they came.
fn by_id(log: &Log) -> HashMap<String, Vec<Settlement>> {
    let mut by_id: HashMap<String, Vec<Settlement>> = HashMap::new();
    for (id, s) in log.lock().expect("lock").drain(..) {
        by_id.entry(id).or_default().push(s);
    }
    by_id
}

fn policy(concurrency: usize, max_attempts: u32) -> DeliveryPolicy {
    DeliveryPolicy {
        concurrency: Concurrency::Fixed(concurrency),
        rate_limit: None,
        fleet_rate: None,
        circuit_breaker: None,
        max_attempts,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        shutdown_grace: Duration::from_secs(5),
        responses: ResponsePolicy::default(),
        order: MessageOrder::Unordered,
        batch: None,
        max_message_bytes: None,
    }
}

#[tokio::test(start_paused = true)]
async fn the_last_failure_is_kept_with_its_time_and_successes_leave_it() {
    let h = start(
        3,
        false,
        policy(1, 3),
        Duration::from_millis(5),
        |m| match (m.id.as_str(), m.attempt) {
            ("m0", 1) => status(503),
            ("m1", _) => status(422),
            _ => ok(),
        },
    );
    let metrics = h.metrics.clone();
    assert!(metrics.last_failure.get().is_none());
    let settled = h.settle_all(3).await;
    assert_eq!(settled.len(), 3);
    let (what, _at) = metrics.last_failure.get().expect("a failure was recorded");
    // m1's dead letter came after m0's 503; m2's 2xx left it in place.
    assert!(what.contains("422"), "{what}");
}

#[tokio::test(start_paused = true)]
async fn every_message_is_acked_once_and_concurrency_is_capped() {
    let h = start(200, false, policy(8, 3), Duration::from_millis(5), |_| ok());
    let peak = h.peak.clone();
    let settled = h.settle_all(200).await;
    assert_eq!(settled.len(), 200);
    assert!(settled.values().all(|s| s == &[Settlement::Ack]));
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=8).contains(&peak), "peak concurrency {peak}");
}

#[tokio::test(start_paused = true)]
async fn a_paused_route_finishes_in_flight_sends_nothing_more_and_resumes() {
    let h = start(100, false, policy(4, 3), Duration::from_millis(50), |_| {
        ok()
    });
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(h.ctx.set_paused(true));
    assert!(!h.ctx.set_paused(true), "pausing twice changes nothing");
    // What was in flight finishes; then nothing for a long while.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = h.calls.load(Ordering::SeqCst);
    assert!(
        (4..100).contains(&calls),
        "{calls} requests before the pause took hold"
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        h.calls.load(Ordering::SeqCst),
        calls,
        "requests while paused"
    );
    assert_eq!(
        h.log.lock().expect("lock").len(),
        calls,
        "in-flight settled"
    );
    assert!(h.ctx.set_paused(false));
    let settled = h.settle_all(100).await;
    assert_eq!(settled.len(), 100);
    assert!(settled.values().all(|s| s == &[Settlement::Ack]));
}

#[tokio::test(start_paused = true)]
async fn in_memory_retry_then_success() {
    // Every 3rd message fails its first attempt.
    let h = start(60, false, policy(4, 5), Duration::from_millis(1), |m| {
        let n: usize = m.id[1..].parse().expect("id");
        if n % 3 == 0 && m.attempt == 1 {
            status(500)
        } else {
            ok()
        }
    });
    let calls = h.calls.clone();
    let settled = h.settle_all(60).await;
    assert_eq!(settled.len(), 60);
    assert!(settled.values().all(|s| s == &[Settlement::Ack]));
    assert_eq!(calls.load(Ordering::SeqCst), 60 + 20);
}

#[tokio::test(start_paused = true)]
async fn exhausted_attempts_dead_letter_with_reason() {
    let h = start(5, false, policy(2, 3), Duration::ZERO, |_| status(503));
    let calls = h.calls.clone();
    let settled = h.settle_all(5).await;
    assert_eq!(calls.load(Ordering::SeqCst), 15);
    for s in settled.values() {
        match s.as_slice() {
            [Settlement::DeadLetter(dl)] => {
                assert_eq!(dl.attempts, 3);
                assert_eq!(dl.status, Some(503));
                assert!(dl.reason.contains("attempts exhausted"), "{}", dl.reason);
            }
            other => panic!("unexpected settlements {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn bad_message_is_dead_lettered_at_once() {
    let h = start(10, false, policy(2, 5), Duration::ZERO, |m| {
        if m.id == "m4" {
            SinkResponse::Status {
                status: 422,
                retry_after: None,
                action: None,
                detail: "no such order".into(),
            }
        } else {
            ok()
        }
    });
    let settled = h.settle_all(10).await;
    assert_eq!(settled.len(), 10);
    match settled["m4"].as_slice() {
        [Settlement::DeadLetter(dl)] => {
            assert_eq!(dl.reason, "no such order");
            assert_eq!(dl.attempts, 1);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A message its source refused (a forged envelope) is dead-lettered with the source's
/// reason before any request; the others are delivered.
#[tokio::test(start_paused = true)]
async fn refused_messages_are_dead_lettered_unsent() {
    let h = start_refusing(12, 0, 3, true, policy(2, 5), Duration::ZERO, |m| {
        assert!(
            m.refused.is_none(),
            "a refused message reached the sink: {}",
            m.id
        );
        ok()
    });
    let calls = h.calls.clone();
    let settled = h.settle_all(12).await;
    assert_eq!(settled.len(), 12);
    for (id, s) in &settled {
        let i: usize = id[1..].parse().expect("index");
        match s.as_slice() {
            [Settlement::DeadLetter(dl)] if i % 3 == 0 => {
                assert_eq!(dl.reason, format!("not genuine: {id}"));
                assert_eq!(dl.status, None);
            }
            [Settlement::Ack] if i % 3 != 0 => {}
            other => panic!("{id}: unexpected {other:?}"),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 8);
}

#[tokio::test(start_paused = true)]
async fn broker_held_retry_uses_retry_after_capped() {
    let h = start(3, true, policy(2, 5), Duration::ZERO, |_| {
        SinkResponse::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(600)),
            action: None,
            detail: String::new(),
        }
    });
    let settled = h.settle_all(3).await;
    for s in settled.values() {
        assert_eq!(
            s.as_slice(),
            [Settlement::Retry {
                delay: Duration::from_secs(2)
            }]
        );
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_releases_unstarted_and_overdue_in_flight() {
    // Each request takes 60 s; grace is 5 s: the 2 in flight are released after the grace,
    // the buffered ones at once, and nothing is acked.
    let h = start(6, false, policy(2, 5), Duration::from_secs(60), |_| ok());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = h.log.clone();
    let started = tokio::time::Instant::now();
    h.shutdown.cancel();
    h.task.await.expect("join").expect("route");
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(6));
    let log = log.lock().expect("lock");
    let mut ids: Vec<_> = log.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), log.len(), "settled twice: {log:?}");
    assert!(
        log.iter().all(|(_, s)| *s == Settlement::Release),
        "{log:?}"
    );
    // 2 in flight + the 4 others buffered in the channel.
    assert_eq!(log.len(), 6, "{log:?}");
}

/// Shutdown at any moment while slots are free and messages wait in the channel: every
/// message the source made is settled exactly once, every ack follows a request, and
/// none is skipped.
#[tokio::test(start_paused = true)]
async fn shutdown_in_a_busy_loop_settles_every_message_once() {
    for cut_ms in [1, 7, 23] {
        let h = start(
            5_000,
            false,
            policy(64, 3),
            Duration::from_millis(1),
            |_| ok(),
        );
        tokio::time::sleep(Duration::from_millis(cut_ms)).await;
        let (log, calls) = (h.log.clone(), h.calls.clone());
        h.shutdown.cancel();
        h.task.await.expect("join").expect("route");
        let by_id = by_id(&log);
        assert!(by_id.values().all(|s| s.len() == 1), "settled twice");
        for i in 0..by_id.len() {
            assert!(
                by_id.contains_key(format!("m{i}").as_str()),
                "m{i} never settled"
            );
        }
        let acked = by_id.values().filter(|s| s[0] == Settlement::Ack).count();
        assert_eq!(
            acked,
            calls.load(Ordering::SeqCst),
            "an ack without a request"
        );
        assert!(acked > 0, "cut at {cut_ms} ms: nothing delivered");
    }
}

#[tokio::test(start_paused = true)]
async fn in_flight_finishes_within_grace() {
    let h = start(4, false, policy(4, 5), Duration::from_secs(2), |_| ok());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = h.log.clone();
    h.shutdown.cancel();
    h.task.await.expect("join").expect("route");
    let log = log.lock().expect("lock");
    assert_eq!(log.len(), 4);
    assert!(log.iter().all(|(_, s)| *s == Settlement::Ack), "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn same_key_in_order_other_keys_in_parallel_even_with_retries() {
    // 4 keys x 25 messages; every 5th fails twice, and the broker could hold retries:
    // under key order they must wait in ferry instead.
    let calls: Arc<Mutex<Vec<(usize, u32)>>> = Arc::default();
    let seen = calls.clone();
    let mut ordered = policy(8, 5);
    ordered.order = MessageOrder::ByKey;
    let h = start_keyed(100, 4, true, ordered, Duration::from_millis(3), move |m| {
        let n: usize = m.id[1..].parse().expect("id");
        seen.lock().expect("lock").push((n, m.attempt));
        if n % 5 == 0 && m.attempt < 3 {
            status(503)
        } else {
            ok()
        }
    });
    let peak = h.peak.clone();
    let log = h.log.clone();
    let settled = h.settle_all(100).await;
    assert_eq!(settled.len(), 100);
    assert!(
        settled.values().all(|s| s == &[Settlement::Ack]),
        "{settled:?}"
    );
    let calls = calls.lock().expect("lock").clone();
    for key in 0..4 {
        let of_key: Vec<(usize, u32)> = calls
            .iter()
            .copied()
            .filter(|(n, _)| n % 4 == key)
            .collect();
        assert!(
            of_key
                .windows(2)
                .all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)),
            "key k{key} out of order: {of_key:?}"
        );
        assert_eq!(of_key.len(), 25 + 2 * 5, "key k{key}: {of_key:?}");
    }
    assert!(
        log.lock().expect("lock").is_empty(),
        "drained by settle_all"
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "peak concurrency {peak}");
}

#[tokio::test(start_paused = true)]
async fn shutdown_delivers_what_waits_behind_its_key_within_the_grace_then_releases() {
    // One key: one message in flight (2 s each), the rest queued behind it. The grace
    // leaves time for four in all; the other four go back.
    let mut ordered = policy(8, 5);
    ordered.order = MessageOrder::ByKey;
    ordered.shutdown_grace = Duration::from_secs(9);
    let h = start_keyed(8, 1, false, ordered, Duration::from_secs(2), |_| ok());
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.shutdown.cancel();
    h.task.await.expect("join").expect("route");
    let log = h.log.lock().expect("lock").clone();
    let acked: Vec<&String> = log
        .iter()
        .filter(|(_, s)| *s == Settlement::Ack)
        .map(|(id, _)| id)
        .collect();
    let released = log
        .iter()
        .filter(|(_, s)| *s == Settlement::Release)
        .count();
    assert_eq!(acked, ["m0", "m1", "m2", "m3"], "{log:?}");
    assert_eq!(released, 4, "{log:?}");
}

#[tokio::test(start_paused = true)]
async fn messages_the_broker_took_back_are_not_delivered() {
    let h = start(10, false, policy(1, 3), Duration::from_millis(5), |_| ok());
    h.revoked
        .lock()
        .expect("lock")
        .extend((5..10).map(|i| format!("m{i}")));
    let calls = h.calls.clone();
    let settled = h.settle_all(10).await;
    for i in 0..5 {
        assert_eq!(settled[&format!("m{i}")], [Settlement::Ack], "m{i}");
    }
    for i in 5..10 {
        assert_eq!(settled[&format!("m{i}")], [Settlement::Release], "m{i}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

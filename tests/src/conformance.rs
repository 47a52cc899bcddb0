//! One conformance suite for every backend: the same scenarios, counted the same way,
//! against each backend's real broker.
//!
//! A backend takes part by implementing [`Backend`] (make a queue with a dead-letter
//! destination) and [`TestQueue`] (publish, look at the broker, take the broker away for
//! a while, say how to start a bridge on it), then invoking [`conformance_suite!`]
//! in a test file. Every scenario identifies messages by their body, so it works the
//! same whatever ids the broker assigns.
//!
//! [`conformance_suite!`]: crate::conformance_suite

pub mod amqp;
pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod postgres;
pub mod redis;
pub mod sqs;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use crate::endpoint::{Endpoint, Reply, Seen};
use crate::ferry::Ferry;
use crate::wait_until;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The payload (also how the scenarios recognise the message).
    pub body: String,
    /// Ordering key, for the ordered scenario.
    pub key: Option<String>,
}

impl Outgoing {
    /// A message without an ordering key.
    pub fn plain(body: impl Into<String>) -> Self {
        Self {
            body: body.into(),
            key: None,
        }
    }
}

/// A message found in a dead-letter destination.
#[derive(Debug, Clone)]
pub struct DeadLettered {
    /// The original payload.
    pub body: String,
    /// Why, as the broker kept it (ferry's reason, or the broker's own word).
    pub reason: String,
}

/// How to start a bridge on a queue.
#[derive(Debug, Clone)]
pub enum Bridge {
    /// `ferry run` with this `[routes.r.source]` body.
    Ferry {
        /// The source section.
        source: String,
    },
    /// A bridge program of its own (a backend built outside ferry): the kit appends
    /// `--sink-url`, `--concurrency`, `--max-attempts`, `--min-backoff-ms`,
    /// `--max-backoff-ms`, `--shutdown-grace-ms` and, when ordered, `--ordered`.
    Program {
        /// The executable.
        path: PathBuf,
        /// Its own arguments (broker address, queue, ...).
        args: Vec<String>,
        /// A line the program logs once it receives.
        ready_marker: String,
    },
}

/// Delivery settings a scenario runs with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// `ordering = "key"`.
    pub ordered: bool,
    /// Time in-flight deliveries get at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 5,
            ordered: false,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// A broker under test.
pub trait Backend {
    /// Its queues.
    type Queue: TestQueue;
    /// Whether a message handed out again carries attempt > 1 (`X-Ferry-Attempt`), so
    /// that the endpoint can tell a redelivery from a new message.
    const LABELS_REDELIVERIES: bool;
    /// Whether the dead-letter destination keeps ferry's reason (with the status), not
    /// only the broker's own word.
    const KEEPS_REASON: bool;
    /// A fresh queue with a dead-letter destination; ordered (FIFO) when `ordered`.
    fn queue(&self, ordered: bool) -> impl Future<Output = Self::Queue>;
}

/// One queue (with its dead-letter destination) on a backend.
pub trait TestQueue {
    /// How to start a bridge on this queue; its broker connection must go through
    /// whatever [`TestQueue::disrupt`] cuts.
    fn bridge(&self) -> Bridge;
    /// Publishes, in order.
    fn publish(&self, messages: &[Outgoing]) -> impl Future<Output = ()>;
    /// Messages a new consumer could take right now.
    fn ready(&self) -> impl Future<Output = u64>;
    /// Messages the broker still holds for the route (ready or handed out, not acked).
    fn remaining(&self) -> impl Future<Output = u64>;
    /// Takes (and removes) what reached the dead-letter destination.
    fn dead_letters(&self) -> impl Future<Output = Vec<DeadLettered>>;
    /// Cuts the bridge's connections to the broker and keeps them down for `down`.
    fn disrupt(&self, down: Duration) -> impl Future<Output = ()>;
    /// The most messages a bridge with `settings` can hold unacked (in flight, waiting,
    /// or accepted with the ack not yet through): what a crash or a lost connection may
    /// deliver twice.
    fn max_unacked(&self, settings: &Settings) -> usize;
}

/// Starts a bridge on `queue` towards `endpoint` and waits until it receives.
pub async fn start_bridge(queue: &impl TestQueue, endpoint: &Endpoint, s: Settings) -> Ferry {
    start_bridge_to(queue, &endpoint.url(), s).await
}

/// Starts a bridge on `queue` towards `sink_url` (an endpoint behind a proxy, say).
pub async fn start_bridge_to(queue: &impl TestQueue, sink_url: &str, s: Settings) -> Ferry {
    let bridge = match queue.bridge() {
        Bridge::Ferry { source } => {
            let delivery = format!(
                "concurrency = {}\nmax_attempts = {}\nmin_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\
                 shutdown_grace = \"{}ms\"\nordering = \"{}\"",
                s.concurrency,
                s.max_attempts,
                s.shutdown_grace.as_millis(),
                if s.ordered { "key" } else { "none" }
            );
            Ferry::start(&crate::ferry::Route {
                source,
                sink_url,
                sink: "",
                delivery: &delivery,
            })
        }
        Bridge::Program {
            path,
            mut args,
            ready_marker,
        } => {
            args.extend([
                "--sink-url".to_owned(),
                sink_url.to_owned(),
                "--concurrency".to_owned(),
                s.concurrency.to_string(),
                "--max-attempts".to_owned(),
                s.max_attempts.to_string(),
                "--min-backoff-ms".to_owned(),
                "100".to_owned(),
                "--max-backoff-ms".to_owned(),
                "1000".to_owned(),
                "--shutdown-grace-ms".to_owned(),
                s.shutdown_grace.as_millis().to_string(),
            ]);
            if s.ordered {
                args.push("--ordered".to_owned());
            }
            Ferry::start_program(&path, &args, &ready_marker)
        }
    };
    bridge.wait_ready(Duration::from_secs(30)).await;
    bridge
}

pub(crate) fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<Outgoing> {
    range
        .map(|i| Outgoing::plain(format!("{prefix}-{i}")))
        .collect()
}

/// The number at the end of a body such as `m-17` or `k3-17`.
fn number(body: &str) -> Option<usize> {
    body.rsplit('-').next()?.parse().ok()
}

/// Asserts that the accepted bodies `KEY-N` arrived in increasing `N` for every key.
pub fn assert_key_order(endpoint: &Endpoint) {
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for body in bodies(&endpoint.delivered()) {
        let (key, n) = body.split_once('-').expect("k-n body");
        by_key
            .entry(key.to_owned())
            .or_default()
            .push(n.parse().expect("number"));
    }
    for (key, order) in &by_key {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{key} delivered out of order: {order:?}"
        );
    }
}

pub(crate) fn bodies(seen: &[Seen]) -> Vec<String> {
    seen.iter().filter_map(Seen::msg).collect()
}

/// Publishes `messages` in chunks while the bridge drains (keeps queues shallow).
pub(crate) async fn publish_in_chunks(queue: &impl TestQueue, messages: &[Outgoing], chunk: usize) {
    for part in messages.chunks(chunk) {
        queue.publish(part).await;
    }
}

/// Waits until every body in `expected` was accepted (2xx) at least once.
pub(crate) async fn wait_delivered(
    endpoint: &Endpoint,
    expected: &BTreeSet<String>,
    limit: Duration,
    bridge: &Ferry,
) {
    let done = wait_until(limit, || {
        let got: BTreeSet<String> = bodies(&endpoint.delivered()).into_iter().collect();
        expected.is_subset(&got)
    })
    .await;
    if !done {
        let got: BTreeSet<String> = bodies(&endpoint.delivered()).into_iter().collect();
        let missing: Vec<&String> = expected.difference(&got).take(20).collect();
        panic!(
            "{} of {} delivered within {limit:?}; first missing {missing:?}; bridge log:\n{}",
            expected.len() - expected.difference(&got).count(),
            expected.len(),
            bridge.log()
        );
    }
}

/// Stops the bridge with SIGTERM and checks that it exits cleanly.
/// Stops the bridge with SIGTERM, asserts a clean exit and returns its log.
pub(crate) async fn stop(mut bridge: Ferry) -> String {
    bridge.signal("TERM");
    let status = bridge.wait_exit(Duration::from_secs(30)).await;
    let log = bridge.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "bridge did not exit cleanly on SIGTERM ({status:?}); log:\n{log}"
    );
    log
}

/// Waits for the broker to hold nothing more for the route.
pub(crate) async fn assert_drained(queue: &impl TestQueue) {
    if let Err(left) = drained(queue, Duration::from_secs(20)).await {
        panic!("{left} messages still held by the broker after everything was delivered");
    }
}

/// Waits while a bridge still runs until the broker holds nothing more for the route:
/// the endpoint may have accepted every message while the bridge still retries one
/// whose answer it never saw, and stopping then would hand that one back.
pub(crate) async fn wait_settled(queue: &impl TestQueue, bridge: &Ferry) {
    if let Err(left) = drained(queue, Duration::from_secs(60)).await {
        panic!(
            "{left} messages still unsettled with everything delivered; log:\n{}",
            bridge.log()
        );
    }
}

/// Polls [`TestQueue::remaining`] until it is 0 or `limit` passes (then the last count).
async fn drained(queue: &impl TestQueue, limit: Duration) -> Result<(), u64> {
    crate::until_zero(limit, || queue.remaining()).await
}

/// Bodies accepted more than once.
pub(crate) fn duplicates(endpoint: &Endpoint) -> Vec<String> {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for b in bodies(&endpoint.delivered()) {
        *count.entry(b).or_default() += 1;
    }
    count
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(b, _)| b)
        .collect()
}

/// Duplicates the endpoint could not recognise as redeliveries (more than one copy
/// claiming to be a first attempt), when the backend labels them.
fn assert_duplicates_labelled<B: Backend>(endpoint: &Endpoint) {
    if B::LABELS_REDELIVERIES {
        let mut first: BTreeMap<String, usize> = BTreeMap::new();
        for s in endpoint.delivered() {
            if s.attempt <= 1 {
                *first.entry(s.msg().unwrap_or_default()).or_default() += 1;
            }
        }
        let unlabelled: Vec<String> = first
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(b, _)| b)
            .collect();
        assert!(
            unlabelled.is_empty(),
            "duplicates without X-Ferry-Attempt > 1: {unlabelled:?}"
        );
    }
}

/// Every message published while the bridge drains arrives exactly once, and the broker
/// holds nothing afterwards (acks reached it).
pub async fn all_delivered_once<B: Backend>(backend: &B) {
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let bridge = start_bridge(&queue, &endpoint, Settings::default()).await;
    let messages = numbered("m", 0..600);
    publish_in_chunks(&queue, &messages, 100).await;
    let expected = messages.iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(90), &bridge).await;
    stop(bridge).await;
    let dups = duplicates(&endpoint);
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(endpoint.delivered().len(), 600);
    assert_drained(&queue).await;
}

/// A bridge killed with `kill -9` while the endpoint holds requests has acked none of
/// them: after a restart every message arrives, and only messages that were in flight
/// at the kill arrive twice (labelled, where the broker counts deliveries).
pub async fn no_ack_before_2xx<B: Backend>(backend: &B) {
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(100))).await;
    let settings = Settings::default();
    let bridge = start_bridge(&queue, &endpoint, settings).await;
    let messages = numbered("k", 0..300);
    publish_in_chunks(&queue, &messages, 100).await;
    let reached = wait_until(Duration::from_secs(60), || endpoint.delivered().len() >= 60).await;
    assert!(
        reached,
        "the bridge did not start delivering; log:\n{}",
        bridge.log()
    );
    bridge.signal("KILL");
    drop(bridge);
    let at_kill = endpoint.seen().len();

    let bridge = start_bridge(&queue, &endpoint, settings).await;
    let expected = messages.iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(120), &bridge).await;
    stop(bridge).await;
    let dups = duplicates(&endpoint);
    // At most what was in flight or accepted-but-not-yet-acked at the kill.
    let bound = queue.max_unacked(&settings);
    assert!(
        dups.len() <= bound,
        "{} duplicates after a kill with {at_kill} requests seen (bound {bound}): {dups:?}",
        dups.len()
    );
    assert_duplicates_labelled::<B>(&endpoint);
    assert_drained(&queue).await;
}

/// A failed first attempt is retried and then delivered, labelled with its attempt.
pub async fn retry_then_success<B: Backend>(backend: &B) {
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|seen| {
        let n = seen.msg().as_deref().and_then(number).unwrap_or(0);
        if n % 3 == 0 && seen.attempt <= 1 {
            Reply::status(500).body("try later")
        } else {
            Reply::ok()
        }
    })
    .await;
    let bridge = start_bridge(&queue, &endpoint, Settings::default()).await;
    let messages = numbered("r", 0..150);
    publish_in_chunks(&queue, &messages, 50).await;
    let expected = messages.iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(90), &bridge).await;
    stop(bridge).await;
    for s in endpoint.delivered() {
        let n = s.msg().as_deref().and_then(number).unwrap_or(0);
        if n % 3 == 0 {
            assert!(s.attempt >= 2, "r-{n} accepted at attempt {}", s.attempt);
        }
    }
    let refused = endpoint.seen().iter().filter(|s| s.status == 500).count();
    assert!(refused >= 45, "only {refused} first attempts were refused");
    assert_duplicates_labelled::<B>(&endpoint);
    assert_drained(&queue).await;
}

/// Messages the endpoint refuses as bad reach the dead-letter destination with a
/// reason; the others are delivered.
pub async fn dead_letter_with_reason<B: Backend>(backend: &B) {
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|seen| match seen.msg() {
        Some(m) if m.starts_with("poison") => Reply::status(422).body("cannot parse"),
        _ => Reply::ok(),
    })
    .await;
    let bridge = start_bridge(&queue, &endpoint, Settings::default()).await;
    let mut messages = numbered("fine", 0..20);
    messages.extend(numbered("poison", 0..5));
    queue.publish(&messages).await;
    let expected = messages[..20].iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(60), &bridge).await;
    let mut dead: Vec<DeadLettered> = Vec::new();
    let all_there = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            dead.extend(queue.dead_letters().await);
            if dead.len() >= 5 || tokio::time::Instant::now() > deadline {
                break dead.len() >= 5;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(all_there, "dead-lettered: {dead:?}; log:\n{}", bridge.log());
    stop(bridge).await;
    let names: BTreeSet<&str> = dead.iter().map(|d| d.body.as_str()).collect();
    let poison: BTreeSet<&str> = messages[20..].iter().map(|m| m.body.as_str()).collect();
    assert_eq!(names, poison);
    for d in &dead {
        assert!(!d.reason.is_empty(), "{d:?} has no reason");
        if B::KEEPS_REASON {
            assert!(d.reason.contains("422"), "{d:?}: reason lacks the status");
        }
    }
    // Refused at once, not retried.
    let poison_requests = endpoint.seen().iter().filter(|s| s.status == 422).count();
    assert_eq!(poison_requests, 5);
    assert_drained(&queue).await;
}

/// SIGTERM lets in-flight requests finish and gives everything not started back to the
/// broker at once: nothing is cut off, nothing waits out a lease, nothing arrives twice.
pub async fn shutdown_releases_unstarted<B: Backend>(backend: &B) {
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(300))).await;
    let settings = Settings {
        concurrency: 4,
        ..Settings::default()
    };
    let bridge = start_bridge(&queue, &endpoint, settings).await;
    let messages = numbered("s", 0..100);
    queue.publish(&messages).await;
    let started = wait_until(Duration::from_secs(60), || endpoint.delivered().len() >= 8).await;
    assert!(started, "no deliveries; log:\n{}", bridge.log());
    stop(bridge).await;
    // Every request the endpoint got was answered before the bridge went away.
    let seen = endpoint.seen();
    assert!(seen.iter().all(|s| s.status == 200));
    let delivered = endpoint.delivered().len() as u64;
    // What was handed to the bridge but not started is ready again at once.
    let back = wait_until_async(Duration::from_secs(3), || async {
        queue.ready().await == 100 - delivered
    })
    .await;
    assert!(
        back,
        "after shutdown {} ready, expected {} (100 published, {delivered} delivered)",
        queue.ready().await,
        100 - delivered
    );
    let bridge = start_bridge(&queue, &endpoint, Settings::default()).await;
    let expected = messages.iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(60), &bridge).await;
    stop(bridge).await;
    let dups = duplicates(&endpoint);
    let copies: Vec<(String, u32)> = endpoint
        .delivered()
        .iter()
        .filter_map(|s| Some((s.msg()?, s.attempt)))
        .filter(|(b, _)| dups.contains(b))
        .collect();
    assert!(
        dups.is_empty(),
        "delivered twice across a clean restart (body, attempt): {copies:?}; {delivered} delivered before the restart"
    );
    assert_drained(&queue).await;
}

/// An endpoint that answers each attempt after 0 to 20 ms, one in ten with a 500, as
/// the hash of its body and attempt decides (the same every run).
pub async fn random_latency_endpoint() -> Endpoint {
    Endpoint::start(|seen| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (seen.msg(), seen.attempt).hash(&mut h);
        let roll = h.finish();
        let reply = if roll % 10 == 0 {
            Reply::status(500)
        } else {
            Reply::ok()
        };
        reply.after(Duration::from_millis((roll >> 8) % 21))
    })
    .await
}

/// `per_key` messages `k<K>-<N>` for each of `keys` keys `key-<K>`, the keys interleaved.
pub fn keyed(keys: usize, per_key: usize) -> Vec<Outgoing> {
    (0..per_key)
        .flat_map(|i| {
            (0..keys).map(move |k| Outgoing {
                body: format!("k{k}-{i}"),
                key: Some(format!("key-{k}")),
            })
        })
        .collect()
}

/// Messages that share a key arrive in order even with random latency and failures;
/// different keys proceed in parallel.
pub async fn key_order_under_random_latency<B: Backend>(backend: &B) {
    let queue = backend.queue(true).await;
    let endpoint = random_latency_endpoint().await;
    let settings = Settings {
        ordered: true,
        max_attempts: 10,
        ..Settings::default()
    };
    let bridge = start_bridge(&queue, &endpoint, settings).await;
    let messages = keyed(8, 25);
    queue.publish(&messages).await;
    let expected = messages.iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(90), &bridge).await;
    stop(bridge).await;
    assert_key_order(&endpoint);
    let peak = endpoint.peak_in_flight();
    assert!(
        peak >= 2,
        "keys were not delivered in parallel (peak {peak} in flight)"
    );
    assert_drained(&queue).await;
}

/// The broker goes away mid-stream and comes back: the bridge reconnects by itself and
/// nothing is lost.
pub async fn connection_loss_and_recovery<B: Backend>(backend: &B) {
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    let bridge = start_bridge(&queue, &endpoint, Settings::default()).await;
    let messages = numbered("c", 0..400);
    publish_in_chunks(&queue, &messages[..200], 100).await;
    let reached = wait_until(Duration::from_secs(60), || {
        endpoint.delivered().len() >= 100
    })
    .await;
    assert!(reached, "no deliveries; log:\n{}", bridge.log());
    queue.disrupt(Duration::from_secs(3)).await;
    publish_in_chunks(&queue, &messages[200..], 100).await;
    let expected = messages.iter().map(|m| m.body.clone()).collect();
    wait_delivered(&endpoint, &expected, Duration::from_secs(120), &bridge).await;
    let log = stop(bridge).await;
    let dups = duplicates(&endpoint);
    let bound = queue.max_unacked(&Settings::default());
    assert!(
        dups.len() <= bound,
        "{} duplicates (bound {bound}): {dups:?}; log:\n{log}",
        dups.len()
    );
    assert_duplicates_labelled::<B>(&endpoint);
    assert_drained(&queue).await;
}

async fn wait_until_async<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Declares the whole suite as `#[tokio::test]`s for one backend. `$backend` is an
/// expression (it may `.await`) that yields the backend.
#[macro_export]
macro_rules! conformance_suite {
    ($backend:expr) => {
        $crate::conformance_suite!(@tests $backend;
            all_delivered_once,
            no_ack_before_2xx,
            retry_then_success,
            dead_letter_with_reason,
            shutdown_releases_unstarted,
            key_order_under_random_latency,
            connection_loss_and_recovery,
        );
    };
    (@tests $backend:expr; $($name:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = $backend;
                $crate::conformance::$name(&backend).await;
            }
        )*
    };
}

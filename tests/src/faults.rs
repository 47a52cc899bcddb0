//! The fault-injection suite: each scenario publishes messages with unique bodies, injects
//! one fault, waits for the route to drain and counts what came out — sent, delivered
//! (accepted at least once), duplicates, lost, dead-lettered — into a [`Report`].
//!
//! Lost must be 0 in every row, and duplicates at most what the fault can explain (what
//! was in flight or unacked when it struck). The CI runs every scenario with a small
//! `FERRY_FAULTS_N`; `RELIABILITY.md` has the table of a full run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::amqp::{Rabbit, RabbitQueue};
use crate::conformance::{
    assert_drained, bodies, numbered, publish_in_chunks, start_bridge, start_bridge_to, stop,
    wait_delivered, wait_settled, Backend, Outgoing, Settings, TestQueue,
};
use crate::endpoint::{Endpoint, Reply};
use crate::ferry::{amqp_source, Route};
use crate::proxy::Proxy;
use crate::{wait_until, Ferry};

/// Messages per scenario: `FERRY_FAULTS_N`, 300 unless set.
pub fn size() -> usize {
    std::env::var("FERRY_FAULTS_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300)
}

/// Messages per scenario on the SQS emulator, which slows down with queue depth and moves
/// a few hundred messages a second: [`size`], at most 600.
pub fn sqs_size() -> usize {
    size().min(600)
}

/// How long the endpoint stays down: `FERRY_FAULTS_DOWN_SECS`, 5 unless set (30 in the
/// full run).
pub fn down_for() -> Duration {
    Duration::from_secs(
        std::env::var("FERRY_FAULTS_DOWN_SECS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(5),
    )
}

/// What one scenario counted.
#[derive(Debug, Clone)]
pub struct Report {
    /// The fault.
    pub scenario: &'static str,
    /// The broker.
    pub backend: &'static str,
    /// Messages published.
    pub sent: usize,
    /// Published messages the endpoint accepted (2xx) at least once.
    pub delivered: usize,
    /// Accepted copies beyond the first.
    pub duplicates: usize,
    /// Published messages neither delivered nor dead-lettered.
    pub lost: usize,
    /// Published messages found in the dead-letter destination.
    pub dead_lettered: usize,
    /// The most duplicates the fault explains.
    pub bound: usize,
    /// Wall time of the scenario.
    pub seconds: f64,
}

impl Report {
    /// Counts `endpoint`'s accepted requests against what was `sent`.
    pub fn tally(
        scenario: &'static str,
        backend: &'static str,
        sent: &BTreeSet<String>,
        endpoint: &Endpoint,
        dead: &BTreeSet<String>,
        bound: usize,
        started: Instant,
    ) -> Self {
        let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
        for body in bodies(&endpoint.delivered()) {
            *accepted.entry(body).or_default() += 1;
        }
        let delivered = sent.iter().filter(|b| accepted.contains_key(*b)).count();
        let duplicates = accepted.values().map(|n| n - 1).sum();
        let dead_lettered = sent.iter().filter(|b| dead.contains(*b)).count();
        let lost = sent
            .iter()
            .filter(|b| !accepted.contains_key(*b) && !dead.contains(*b))
            .count();
        Self {
            scenario,
            backend,
            sent: sent.len(),
            delivered,
            duplicates,
            lost,
            dead_lettered,
            bound,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// The Markdown table header for [`Report::row`].
    pub fn header() -> &'static str {
        "| scenario | broker | sent | delivered | duplicates (bound) | lost | dead-lettered | seconds |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    }

    /// One Markdown table row.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {:.1} |",
            self.scenario,
            self.backend,
            self.sent,
            self.delivered,
            self.duplicates,
            self.bound,
            self.lost,
            self.dead_lettered,
            self.seconds
        )
    }

    /// Prints the row (for the table of a full run) and asserts that nothing was lost and
    /// every duplicate is explained.
    pub fn assert_sound(&self) {
        println!("{}", self.row());
        assert_eq!(self.lost, 0, "lost messages: {}", self.row());
        assert!(
            self.duplicates <= self.bound,
            "more duplicates than the fault explains: {}",
            self.row()
        );
    }
}

pub(crate) fn body_set(messages: &[Outgoing]) -> BTreeSet<String> {
    messages.iter().map(|m| m.body.clone()).collect()
}

async fn dead_set(queue: &impl TestQueue) -> BTreeSet<String> {
    queue
        .dead_letters()
        .await
        .into_iter()
        .map(|d| d.body)
        .collect()
}

/// Runs `n` messages `PREFIX-i` through `bridge`: publishes half, waits until `after` are
/// accepted, injects `fault` (which hands back the bridge to go on with, maybe a new one),
/// publishes the rest, waits until everything was accepted and the broker holds nothing
/// more, then stops the bridge cleanly and checks that the broker still holds nothing. Returns what was sent and what was
/// dead-lettered.
async fn drive<Q: TestQueue>(
    queue: &Q,
    endpoint: &Endpoint,
    bridge: Ferry,
    (prefix, n, after): (&str, usize, usize),
    fault: impl AsyncFnOnce(Ferry) -> Ferry,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let messages = numbered(prefix, 0..n);
    let sent = body_set(&messages);
    let (first, rest) = messages.split_at(n / 2);
    publish_in_chunks(queue, first, 100).await;
    crate::fleet::wait_accepted(endpoint, after, std::slice::from_ref(&bridge)).await;
    let bridge = fault(bridge).await;
    publish_in_chunks(queue, rest, 100).await;
    wait_delivered(endpoint, &sent, Duration::from_secs(300), &bridge).await;
    wait_settled(queue, &bridge).await;
    stop(bridge).await;
    assert_drained(queue).await;
    (sent, dead_set(queue).await)
}

/// `kill -9` of the bridge mid-stream, then a restart.
pub async fn kill_and_restart<B: Backend>(backend: &B, name: &'static str, n: usize) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    // The latency the backends' `max_unacked` bounds are stated for.
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(100))).await;
    let settings = Settings::default();
    let bridge = start_bridge(&queue, &endpoint, settings).await;
    let (sent, dead) = drive(
        &queue,
        &endpoint,
        bridge,
        ("kill", n, n / 6),
        async |bridge| {
            bridge.signal("KILL");
            drop(bridge);
            start_bridge(&queue, &endpoint, settings).await
        },
    )
    .await;
    let bound = queue.max_unacked(&settings);
    Report::tally(
        "kill -9 mid-stream, restart",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

/// The broker connection is cut for 5 s mid-stream (the bridge reconnects by itself).
pub async fn broker_outage<B: Backend>(backend: &B, name: &'static str, n: usize) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    let settings = Settings::default();
    let bridge = start_bridge(&queue, &endpoint, settings).await;
    let (sent, dead) = drive(
        &queue,
        &endpoint,
        bridge,
        ("outage", n, n / 6),
        async |bridge| {
            queue.disrupt(Duration::from_secs(5)).await;
            bridge
        },
    )
    .await;
    let bound = queue.max_unacked(&settings);
    Report::tally(
        "broker connection cut 5 s",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

/// The endpoint is unreachable (connections refused) for [`down_for`] mid-stream.
pub async fn endpoint_down<B: Backend>(backend: &B, name: &'static str, n: usize) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    let proxy = Proxy::start(&endpoint.addr().to_string()).await;
    let url = format!("http://{}/deliver", proxy.addr());
    let settings = Settings {
        max_attempts: 3,
        ..Settings::default()
    };
    let bridge = start_bridge_to(&queue, &url, settings).await;
    let (sent, dead) = drive(
        &queue,
        &endpoint,
        bridge,
        ("down", n, n / 6),
        async |bridge| {
            proxy.cut(down_for()).await;
            bridge
        },
    )
    .await;
    // Requests cut off after the endpoint accepted them come again.
    let bound = settings.concurrency;
    let scenario = if down_for() >= Duration::from_secs(30) {
        "endpoint down 30 s"
    } else {
        "endpoint down 5 s"
    };
    Report::tally(scenario, name, &sent, &endpoint, &dead, bound, started)
}

/// The endpoint answers 500 to 30% of requests at random.
pub async fn endpoint_errors<B: Backend>(backend: &B, name: &'static str, n: usize) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| {
        if rand_percent() < 30 {
            Reply::status(500).body("random failure")
        } else {
            Reply::ok()
        }
    })
    .await;
    let settings = Settings {
        max_attempts: 30,
        ..Settings::default()
    };
    let bridge = start_bridge(&queue, &endpoint, settings).await;
    // The fault is the endpoint's own, all along.
    let (sent, dead) = drive(&queue, &endpoint, bridge, ("err", n, 1), async |b| b).await;
    Report::tally(
        "endpoint 500 on 30% at random",
        name,
        &sent,
        &endpoint,
        &dead,
        0,
        started,
    )
}

/// Every third connection to the endpoint breaks in the middle of a response.
pub async fn endpoint_cuts_connections<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().body(&"x".repeat(300))).await;
    let proxy = Proxy::start_flaky(&endpoint.addr().to_string(), 3).await;
    let url = format!("http://{}/deliver", proxy.addr());
    let settings = Settings {
        max_attempts: 30,
        ..Settings::default()
    };
    let bridge = start_bridge_to(&queue, &url, settings).await;
    // The fault is the proxy's, all along.
    let (sent, dead) = drive(&queue, &endpoint, bridge, ("cut", n, 1), async |b| b).await;
    // A cut response was accepted by the endpoint but not seen by ferry: it comes again.
    let bound = proxy.cuts() as usize;
    assert!(bound > 0, "the proxy cut nothing");
    Report::tally(
        "endpoint closes connections mid-response",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

/// A fresh RabbitMQ queue (with its dead-letter queue) and a ferry on it, for the
/// scenarios that need RabbitMQ itself.
async fn rabbit_route(
    prefix: &str,
    endpoint: &Endpoint,
    source_extra: &str,
    delivery: &str,
) -> (Rabbit, RabbitQueue, Ferry) {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue(prefix).await;
    let bridge = Ferry::start(&Route {
        source: amqp_source(&queue.name, source_extra),
        sink_url: &endpoint.url(),
        sink: "",
        delivery,
    });
    bridge.wait_ready(Duration::from_secs(30)).await;
    (rabbit, queue, bridge)
}

/// Waits until `expected` were all accepted, then stops the bridge and checks that the
/// queue is empty.
async fn rabbit_finish(
    rabbit: &Rabbit,
    queue: &RabbitQueue,
    endpoint: &Endpoint,
    bridge: Ferry,
    expected: &BTreeSet<String>,
) {
    wait_delivered(endpoint, expected, Duration::from_secs(300), &bridge).await;
    stop(bridge).await;
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");
}

fn rabbit_dead(rabbit_dead: Vec<(String, lapin::types::FieldTable)>) -> BTreeSet<String> {
    rabbit_dead.into_iter().map(|(body, _)| body).collect()
}

/// SIGTERM while `in_flight` requests are open at a slow endpoint (RabbitMQ, prefetch as
/// large): they all finish within the grace, nothing new starts, and after a restart the
/// rest arrives; nothing is lost and nothing comes twice.
pub async fn sigterm_with_in_flight(in_flight: usize) -> Report {
    let started = Instant::now();
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_secs(3))).await;
    let delivery = format!("concurrency = {in_flight}\nshutdown_grace = \"30s\"");
    let source = format!("prefetch = {in_flight}");
    let (rabbit, queue, bridge) = rabbit_route("term", &endpoint, &source, &delivery).await;
    let messages = numbered("term", 0..in_flight * 2);
    let sent = body_set(&messages);
    for chunk in messages.chunks(1000) {
        rabbit.publish(&queue.name, chunk).await;
    }
    let open = wait_until(Duration::from_secs(60), || endpoint.open() >= in_flight).await;
    assert!(
        open,
        "{} of {in_flight} requests open; log:\n{}",
        endpoint.open(),
        bridge.log()
    );
    stop(bridge).await;
    // A request cut off at SIGTERM would not be acked and would come again after the
    // restart: the report's bound of 0 duplicates checks that none was.
    assert!(
        endpoint.seen().len() < in_flight * 2,
        "the bridge did not stop"
    );
    let bridge = Ferry::start(&Route {
        source: amqp_source(&queue.name, &source),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: &delivery,
    });
    bridge.wait_ready(Duration::from_secs(30)).await;
    rabbit_finish(&rabbit, &queue, &endpoint, bridge, &sent).await;
    let dead = rabbit_dead(rabbit.drain(&queue.dead_letter).await);
    let scenario = if in_flight >= 1000 {
        "SIGTERM with 1,000 in flight"
    } else {
        "SIGTERM with requests in flight"
    };
    Report::tally(scenario, "RabbitMQ", &sent, &endpoint, &dead, 0, started)
}

/// SIGTERM while the endpoint is down and the circuit is open (deliveries waiting for a
/// probe turn): ferry exits cleanly, nothing is dead-lettered, and once the endpoint is
/// back a new ferry delivers everything exactly once.
pub async fn sigterm_while_circuit_open() -> Report {
    let started = Instant::now();
    let up = Arc::new(AtomicBool::new(false));
    let endpoint = {
        let up = up.clone();
        Endpoint::start(move |_| {
            if up.load(Ordering::SeqCst) {
                Reply::ok()
            } else {
                Reply::status(503)
            }
        })
        .await
    };
    let delivery = "concurrency = 8\nmax_attempts = 3\nmin_backoff = \"50ms\"\n\
                    circuit_breaker = { failures = 5, open_for = \"1s\" }";
    let (rabbit, queue, bridge) = rabbit_route("open", &endpoint, "prefetch = 64", delivery).await;
    let messages = numbered("open", 0..size());
    let sent = body_set(&messages);
    rabbit.publish(&queue.name, &messages).await;
    let metric = r#"ferry_circuit_open{route="r",source="amqp",sink="http"}"#;
    let mut open = false;
    for _ in 0..200 {
        if bridge.metric(metric).await == Some(1.0) {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(open, "the circuit did not open; log:\n{}", bridge.log());
    stop(bridge).await;
    up.store(true, Ordering::SeqCst);
    let bridge = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 64"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery,
    });
    bridge.wait_ready(Duration::from_secs(30)).await;
    rabbit_finish(&rabbit, &queue, &endpoint, bridge, &sent).await;
    let dead = rabbit_dead(rabbit.drain(&queue.dead_letter).await);
    assert!(
        dead.is_empty(),
        "an outage dead-lettered {} messages",
        dead.len()
    );
    Report::tally(
        "SIGTERM while the circuit is open",
        "RabbitMQ",
        &sent,
        &endpoint,
        &dead,
        0,
        started,
    )
}

/// RabbitMQ itself restarted mid-stream (`rabbitmqctl stop_app`, 5 s, `start_app`).
pub async fn rabbitmq_restart() -> Report {
    let started = Instant::now();
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    let (rabbit, queue, bridge) =
        rabbit_route("restart", &endpoint, "prefetch = 64", "concurrency = 16").await;
    let messages = numbered("restart", 0..size());
    let sent = body_set(&messages);
    let (first, rest) = messages.split_at(messages.len() / 2);
    rabbit.publish(&queue.name, first).await;
    let reached = wait_until(Duration::from_secs(60), || endpoint.delivered().len() >= 10).await;
    assert!(reached, "no deliveries; log:\n{}", bridge.log());
    drop(rabbit);
    {
        let _restart = RabbitRestart::stop();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // The test's own connection went with the broker: a new one.
    let rabbit = Rabbit::connect().await;
    rabbit.publish(&queue.name, rest).await;
    rabbit_finish(&rabbit, &queue, &endpoint, bridge, &sent).await;
    let dead = rabbit_dead(rabbit.drain(&queue.dead_letter).await);
    // Whatever the bridge held unacked when the broker stopped comes again.
    Report::tally(
        "RabbitMQ stop_app / start_app",
        "RabbitMQ",
        &sent,
        &endpoint,
        &dead,
        64,
        started,
    )
}

/// Stops the RabbitMQ application; starts it again when dropped, even if the test fails.
struct RabbitRestart;

impl RabbitRestart {
    fn stop() -> Self {
        let status = std::process::Command::new("rabbitmqctl")
            .arg("stop_app")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run rabbitmqctl");
        assert!(status.success(), "rabbitmqctl stop_app failed");
        Self
    }
}

impl Drop for RabbitRestart {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(std::process::Stdio::null())
            .status();
        // Back when it accepts connections again.
        for _ in 0..100 {
            if std::net::TcpStream::connect("127.0.0.1:5672").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Poison input among good messages: a broken SNS envelope, a payload that is not UTF-8,
/// and a 300 KB message the endpoint refuses with 413. The first two are delivered (as
/// they are, and as `msg_base64`), the last is dead-lettered at once.
pub async fn poison_input() -> Report {
    let started = Instant::now();
    let endpoint = Endpoint::start(|seen| {
        if seen.body.len() > 256 * 1024 {
            Reply::status(413).body("too large")
        } else {
            Reply::ok()
        }
    })
    .await;
    let (rabbit, queue, bridge) = rabbit_route("poison", &endpoint, "", "max_attempts = 5").await;
    let mut messages = numbered("good", 0..size());
    let broken_sns = r#"{"Type":"Notification","MessageId":"x","Message":"#.to_owned();
    let large = format!("large-{}", "x".repeat(300 * 1024));
    messages.push(Outgoing::plain(broken_sns.clone()));
    messages.push(Outgoing::plain(large.clone()));
    rabbit.publish(&queue.name, &messages).await;
    let binary = b"\xff\xfe not utf-8 \x80".to_vec();
    rabbit.publish_bytes(&queue.name, &binary).await;
    let mut expected = body_set(&messages);
    expected.remove(&large);
    wait_delivered(&endpoint, &expected, Duration::from_secs(120), &bridge).await;
    let binary_arrived = wait_until(Duration::from_secs(30), || {
        endpoint.delivered().iter().any(|s| {
            serde_json::from_slice::<serde_json::Value>(&s.body)
                .ok()
                .and_then(|v| {
                    v.get("msg_base64")
                        .and_then(|b| b.as_str())
                        .map(str::to_owned)
                })
                .is_some()
        })
    })
    .await;
    assert!(
        binary_arrived,
        "the non-UTF-8 payload did not arrive as msg_base64"
    );
    let mut dead = BTreeSet::new();
    let dead_arrived = wait_until_async_dead(&rabbit, &queue, &mut dead).await;
    assert!(
        dead_arrived,
        "the 413 message was not dead-lettered; log:\n{}",
        bridge.log()
    );
    stop(bridge).await;
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");
    let mut sent = body_set(&messages);
    // The binary payload is counted by hand: the endpoint saw it as base64.
    sent.insert("<binary>".to_owned());
    let mut report = Report::tally(
        "poison: broken SNS, non-UTF-8, 300 KB (413)",
        "RabbitMQ",
        &sent,
        &endpoint,
        &dead,
        0,
        started,
    );
    report.delivered += 1;
    report.lost -= 1;
    report
}

async fn wait_until_async_dead(
    rabbit: &Rabbit,
    queue: &RabbitQueue,
    dead: &mut BTreeSet<String>,
) -> bool {
    for _ in 0..100 {
        dead.extend(rabbit_dead(rabbit.drain(&queue.dead_letter).await));
        if !dead.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An endpoint slower (5 s) than the SQS visibility timeout (2 s): the leases keep every
/// message invisible while its request is open, so none is handed out twice.
pub async fn slow_endpoint_sqs() -> Report {
    let started = Instant::now();
    let n = sqs_size().min(200);
    let client = crate::sqs::client().await;
    let queue = crate::sqs::create_queue(&client, "slow").await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_secs(5))).await;
    let bridge = Ferry::start(&Route {
        source: crate::ferry::sqs_source(
            &queue,
            None,
            "receivers = 1\nvisibility_timeout = \"2s\"",
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 100",
    });
    bridge.wait_ready(Duration::from_secs(30)).await;
    let bodies: Vec<String> = (0..n).map(|i| format!("slow-{i}")).collect();
    crate::sqs::send(&client, &queue, &bodies).await;
    let sent: BTreeSet<String> = bodies.into_iter().collect();
    wait_delivered(&endpoint, &sent, Duration::from_secs(300), &bridge).await;
    stop(bridge).await;
    assert_eq!(
        crate::sqs::depth(&client, &queue).await,
        (0, 0),
        "left in the queue"
    );
    let bound = 0;
    Report::tally(
        "endpoint slower than the visibility timeout",
        "SQS",
        &sent,
        &endpoint,
        &BTreeSet::new(),
        bound,
        started,
    )
}

/// A number in 0..100, different for every call.
fn rand_percent() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish() % 100
}

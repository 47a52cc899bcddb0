//! Flow control against the local RabbitMQ and a real endpoint: the adaptive limit finds
//! an endpoint's capacity, and `rate_limit` paces requests.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

/// An endpoint that refuses (503) whatever exceeds 12 requests at once and otherwise takes
/// 5 ms: the adaptive limit must settle near 12 (between 8 and 16) within 10 s while more
/// than 95% of requests succeed, and every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_finds_the_endpoints_capacity() {
    // Enough for more than 10 s at the capacity (~2,400 msg/s), so that the settled
    // window below is seconds long and holds enough samples even on a busy machine.
    const N: usize = 30_000;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("adaptive").await;
    let endpoint = Endpoint::start(|seen| {
        if seen.open > 12 {
            Reply::status(503)
        } else {
            Reply::ok().after(Duration::from_millis(5))
        }
    })
    .await;
    let expected = rabbit.publish_numbered(&queue.name, "a", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 300"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = \"adaptive\"\nmax_concurrency = 128\nmax_attempts = 50",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let metric = r#"ferry_concurrency_limit{route="r",source="amqp",sink="http"}"#;
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(14) && endpoint.delivered_set().len() < N {
        if let Some(limit) = ferry.metric(metric).await {
            samples.push((started.elapsed(), limit));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: from 10 s on (or the last second, if the queue drained sooner) the limit
    // stays near the capacity. AIMD probes above the level last refused by design, and on a
    // busy machine the endpoint may count fewer open requests than ferry has begun, so a
    // short excursion (at most a tenth of the samples, never past 8..=20) is allowed;
    // staying high is not.
    let cut = started
        .elapsed()
        .min(Duration::from_secs(10))
        .saturating_sub(Duration::from_secs(1));
    let settled: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= cut)
        .map(|(_, l)| *l)
        .collect();
    let outside = settled
        .iter()
        .filter(|l| !(8.0..=16.0).contains(*l))
        .count();
    let wild = settled
        .iter()
        .filter(|l| !(8.0..=20.0).contains(*l))
        .count();
    assert!(
        settled.len() >= 5 && outside * 10 <= settled.len() && wild == 0,
        "limit did not settle between 8 and 16 from {cut:?} on: {outside} outside, {wild} past 20, of {} samples: {samples:?}",
        settled.len()
    );
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    let seen = endpoint.seen();
    let ok = seen.iter().filter(|s| s.status == 200).count();
    let share = ok as f64 / seen.len() as f64;
    assert!(
        share > 0.95,
        "only {ok} of {} requests succeeded ({share:.3}); limit samples: {samples:?}",
        seen.len()
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// `rate_limit = { per_second = 200, burst = 20 }` with 16 slots and an instant endpoint:
/// no one-second window holds more than 200 + 20 requests, yet the pace is kept (the limit is
/// the only brake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_paces_requests() {
    const N: usize = 2_400;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("paced").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let expected = rabbit.publish_numbered(&queue.name, "p", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16\nrate_limit = { per_second = 200, burst = 20 }",
    });
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    let mut at: Vec<Instant> = endpoint.seen().iter().map(|s| s.at).collect();
    at.sort();
    // Every window of one second that starts at a request, once the connections are
    // open: ferry paces when it sends and the endpoint counts arrivals, and the first
    // requests of the run open their connections on the way, so the start-up burst
    // reaches the endpoint spread over its first milliseconds. Sent at the pace, no
    // window holds more than 200 + 20; 1% is allowed for arrival jitter.
    let warm = at[0] + Duration::from_millis(250);
    let (busiest, from) = (0..at.len())
        .filter(|i| at[*i] >= warm)
        .map(|i| {
            let n = at[i..]
                .iter()
                .take_while(|t| t.duration_since(at[i]) < Duration::from_secs(1))
                .count();
            (n, at[i].duration_since(at[0]))
        })
        .max()
        .unwrap_or_default();
    assert!(
        busiest <= 220 + 2,
        "{busiest} requests within one second from {from:?} after the first"
    );
    let span = at[at.len() - 1].duration_since(at[0]).as_secs_f64();
    let rate = (at.len() - 1) as f64 / span;
    assert!(
        (185.0..=210.0).contains(&rate),
        "{rate:.1} requests/s over {span:.1} s; the limit is 200/s"
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// The endpoint answers 503 for 20 s in the middle of 5,000 messages: the circuit opens,
/// the route stops receiving (the queue keeps its backlog), only probes reach the endpoint,
/// nothing is dead-lettered, delivery resumes within 5 s of recovery and every message
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downed_endpoint_stops_receiving_and_nothing_is_dead_lettered() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const N: usize = 5_000;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("down").await;
    let down = Arc::new(AtomicBool::new(false));
    let flag = down.clone();
    let endpoint = Endpoint::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::ok().after(Duration::from_millis(20))
        }
    })
    .await;
    let expected = rabbit.publish_numbered(&queue.name, "d", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 20"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 8\nmax_attempts = 3\nmin_backoff = \"50ms\"\n\
                   circuit_breaker = { failures = 10, open_for = \"2s\" }",
    });
    let flowing = wait_until(Duration::from_secs(60), || {
        endpoint.delivered().len() >= 1_000
    })
    .await;
    assert!(flowing, "no deliveries; log:\n{}", ferry.log());

    down.store(true, Ordering::SeqCst);
    let metric = r#"ferry_circuit_open{route="r",source="amqp",sink="http"}"#;
    let opened = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if ferry.metric(metric).await == Some(1.0) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(opened, "circuit did not open; log:\n{}", ferry.log());
    let seen_at_open = endpoint.seen().len();
    let depth_at_open = rabbit.depth(&queue.name).await;
    tokio::time::sleep(Duration::from_secs(18)).await;
    let probes = endpoint.seen().len() - seen_at_open;
    let depth_after = rabbit.depth(&queue.name).await;
    // One probe per 2 s, plus answers to requests already on their way.
    assert!(
        probes <= 20,
        "{probes} requests reached the downed endpoint in 18 s"
    );
    assert!(
        depth_after + 30 >= depth_at_open && depth_after > 1_000,
        "the route kept receiving while open: {depth_at_open} → {depth_after} in the queue"
    );

    down.store(false, Ordering::SeqCst);
    let recovered = Instant::now();
    let delivered_at_recovery = endpoint.delivered().len();
    let resumed = wait_until(Duration::from_secs(5), || {
        endpoint.delivered().len() > delivered_at_recovery + 50
    })
    .await;
    assert!(
        resumed,
        "delivery did not resume within 5 s of recovery; log:\n{}",
        ferry.log()
    );
    let all = wait_until(Duration::from_secs(90), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    assert_eq!(
        rabbit.depth(&queue.dead_letter).await,
        0,
        "dead-lettered while the endpoint was down; log:\n{}",
        ferry.log()
    );
    assert!(recovered.elapsed() < Duration::from_secs(90));
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// An endpoint that always answers 500 (its verdict on the message, not an outage): each
/// message gets exactly `max_attempts` requests spaced by the backoff, then goes to the
/// dead-letter queue; the circuit stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_500_retries_with_backoff_then_dead_letters() {
    const N: usize = 20;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("five-hundred").await;
    let endpoint = Endpoint::start(|_| Reply::status(500).body("broken")).await;
    rabbit.publish_numbered(&queue.name, "f", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery:
            "concurrency = 4\nmax_attempts = 4\nmin_backoff = \"200ms\"\nmax_backoff = \"2s\"",
    });
    let started = Instant::now();
    let dead = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let depth = rabbit.depth(&queue.dead_letter).await;
            if depth as usize >= N || Instant::now() > deadline {
                break depth;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(dead as usize, N, "log:\n{}", ferry.log());
    let seen = endpoint.seen();
    assert_eq!(
        seen.len(),
        N * 4,
        "exactly max_attempts requests per message"
    );
    // Full-jitter backoff: a message waits U(0, 200) + U(0, 400) + U(0, 800) ms over its
    // three retries (700 ms on average); the slowest of 20 stays under 500 ms with odds
    // below 1 in 10^12. A retry loop that spun would be done in a few milliseconds.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "{} requests in {took:?}: retries did not wait",
        seen.len()
    );
    let metric = r#"ferry_circuit_open{route="r",source="amqp",sink="http"}"#;
    assert_eq!(
        ferry.metric(metric).await,
        Some(0.0),
        "a 500 is not an outage"
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// 20 keys × 100 messages with 0–20 ms of random endpoint latency and 10% random 500s:
/// every key's messages arrive in order, and the keys run in parallel (the wall time is
/// a fraction of the endpoint's total time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stay_in_order_and_run_in_parallel() {
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const KEYS: usize = 20;
    const PER_KEY: usize = 100;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("keys").await;
    let busy_ms = Arc::new(AtomicU64::new(0));
    let busy = busy_ms.clone();
    let endpoint = Endpoint::start(move |seen| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (seen.msg(), seen.attempt).hash(&mut h);
        let roll = h.finish();
        let delay = (roll >> 8) % 21;
        busy.fetch_add(delay, Ordering::SeqCst);
        let reply = if roll % 10 == 0 {
            Reply::status(500)
        } else {
            Reply::ok()
        };
        reply.after(Duration::from_millis(delay))
    })
    .await;
    let mut messages = Vec::new();
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            messages.push(Outgoing {
                body: format!("k{k}-{i}"),
                key: Some(format!("key-{k}")),
            });
        }
    }
    rabbit.publish(&queue.name, &messages).await;
    let expected: BTreeSet<String> = messages.iter().map(|m| m.body.clone()).collect();
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 200\nordering_header = \"key\""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 32\nordering = \"key\"\nmax_attempts = 20\nmin_backoff = \"10ms\"",
    });
    let started = Instant::now();
    let all = wait_until(Duration::from_secs(120), || {
        endpoint.delivered_set() == expected
    })
    .await;
    let wall = started.elapsed();
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    ferry_e2e::conformance::assert_key_order(&endpoint);
    let serial = Duration::from_millis(busy_ms.load(Ordering::SeqCst));
    assert!(
        wall * 4 < serial,
        "{wall:?} for {serial:?} of endpoint time: keys did not run in parallel"
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// With `health_url`, the sink's health check decides: while it fails the route stops
/// receiving even though deliveries would still succeed, and it resumes when the check
/// passes again; nothing is lost or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_stops_receiving_until_it_passes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const N: usize = 3_000;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("health").await;
    let up = Arc::new(AtomicBool::new(true));
    let flag = up.clone();
    let health = axum::Router::new().fallback(move || {
        let up = flag.load(Ordering::SeqCst);
        async move {
            if up {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let health_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, health).await });
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(20))).await;
    let expected = rabbit.publish_numbered(&queue.name, "h", N).await;
    let sink = format!("health_url = \"http://{health_addr}/health\"");
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 20"),
        sink_url: &endpoint.url(),
        sink: &sink,
        delivery: "concurrency = 8\ncircuit_breaker = { failures = 10, open_for = \"1s\" }",
    });
    let flowing = wait_until(Duration::from_secs(60), || {
        endpoint.delivered().len() >= 300
    })
    .await;
    assert!(flowing, "no deliveries; log:\n{}", ferry.log());

    up.store(false, Ordering::SeqCst);
    let metric = r#"ferry_circuit_open{route="r",source="amqp",sink="http"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while ferry.metric(metric).await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "a failing health check did not open the circuit; log:\n{}",
            ferry.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was in flight when it opened finishes; then nothing more is sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped_at = endpoint.seen().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        endpoint.seen().len(),
        stopped_at,
        "requests went out while the health check failed"
    );
    assert!(rabbit.depth(&queue.name).await > 0, "the queue was drained");

    up.store(true, Ordering::SeqCst);
    let resumed = wait_until(Duration::from_secs(3), || {
        endpoint.seen().len() > stopped_at + 20
    })
    .await;
    assert!(
        resumed,
        "no resume after the check passed; log:\n{}",
        ferry.log()
    );
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    assert_eq!(rabbit.depth(&queue.dead_letter).await, 0);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

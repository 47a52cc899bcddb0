//! `ordering = "key"` under a failing key and a downed endpoint: a key that retries holds
//! back only its own messages, and an open circuit costs no CPU and always probes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, kafka_source, Route};
use ferry_e2e::kafka::Cluster;
use ferry_e2e::{free_port, unique, wait_until, Endpoint, Ferry, Reply};

/// One key answered 500 for 12 s (5 of its messages, the first ones published), while
/// 400 messages over 50 other keys arrive: with `concurrency = 4` the others must all be
/// delivered well before the failing key recovers, and the failing key's messages then
/// arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_key_holds_back_only_its_own_messages() {
    const FAILING_FOR: Duration = Duration::from_secs(12);
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("keyed").await;
    let run = unique("k");
    let mut outgoing: Vec<Outgoing> = (0..5)
        .map(|i| Outgoing {
            body: format!("{run}-bad-{i}"),
            key: Some("bad".into()),
        })
        .collect();
    outgoing.extend((0..400).map(|i| Outgoing {
        body: format!("{run}-good-{i}"),
        key: Some(format!("good-{}", i % 50)),
    }));
    let failing = Arc::new(AtomicBool::new(true));
    let flag = failing.clone();
    let endpoint = Endpoint::start(move |seen| {
        let bad = seen.msg().is_some_and(|m| m.contains("-bad-"));
        if bad && flag.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::ok().after(Duration::from_millis(10))
        }
    })
    .await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 100\nordering_header = \"key\""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nordering = \"key\"\nmax_attempts = 1000\n\
                   min_backoff = \"100ms\"\nmax_backoff = \"1s\"",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    rabbit.publish(&queue.name, &outgoing).await;
    let started = Instant::now();
    let good = |e: &Endpoint| {
        e.delivered_msgs()
            .iter()
            .filter(|m| m.contains("-good-"))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let flowed = wait_until(FAILING_FOR - Duration::from_secs(4), || {
        good(&endpoint) == 400
    })
    .await;
    assert!(
        flowed,
        "{} of 400 other messages delivered in {:?} while one key failed; log:\n{}",
        good(&endpoint),
        started.elapsed(),
        ferry.log()
    );
    tokio::time::sleep(FAILING_FOR.saturating_sub(started.elapsed())).await;
    failing.store(false, Ordering::SeqCst);
    let bad_delivered = || {
        endpoint
            .delivered_msgs()
            .into_iter()
            .filter(|m| m.contains("-bad-"))
            .collect::<Vec<_>>()
    };
    let recovered = wait_until(Duration::from_secs(15), || bad_delivered().len() == 5).await;
    assert!(
        recovered,
        "the failing key did not recover; log:\n{}",
        ferry.log()
    );
    let expected: Vec<String> = (0..5).map(|i| format!("{run}-bad-{i}")).collect();
    assert_eq!(
        bad_delivered(),
        expected,
        "the failing key's messages out of order"
    );
    assert_eq!(rabbit.depth(&queue.dead_letter).await, 0, "dead-lettered");
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// A Kafka route ordered by key while its endpoint refuses connections for 30 s: the open
/// circuit costs under 2% of a core, and delivery resumes within `open_for` + 2 s of the
/// endpoint's return, every record delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_costs_no_cpu_and_probes_within_open_for() {
    const N: usize = 200;
    let cluster = Cluster::start();
    let topic = unique("keyed-down");
    let dead = format!("{topic}-dlq");
    cluster.create_topic(&topic, 4);
    cluster.create_topic(&dead, 1);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/deliver");
    let ferry = Ferry::start(&Route {
        source: kafka_source(cluster.bootstrap(), &format!("{topic}-g"), &topic, &dead),
        sink_url: &url,
        sink: "connect_timeout = \"1s\"",
        // Backoffs far longer than `open_for`: resuming must not wait for them.
        delivery: "concurrency = 8\nordering = \"key\"\nmax_attempts = 3\n\
                   min_backoff = \"1s\"\nmax_backoff = \"60s\"\n\
                   circuit_breaker = { failures = 5, open_for = \"2s\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let records: Vec<(Option<String>, String)> = (0..N)
        .map(|i| (Some(format!("key-{}", i % 20)), format!("{topic}-{i}")))
        .collect();
    cluster.produce(&topic, &records).await;
    let opened = wait_until(Duration::from_secs(20), || {
        ferry.log().contains("circuit open")
    })
    .await;
    assert!(opened, "the circuit never opened; log:\n{}", ferry.log());
    // Let retries already under way settle into the open circuit, then measure.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cpu_before = ferry.cpu_seconds();
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let share = (ferry.cpu_seconds() - cpu_before) / window.elapsed().as_secs_f64();
    assert!(
        share < 0.02,
        "ferry used {:.1}% of a core while the circuit was open; log:\n{}",
        share * 100.0,
        ferry.log()
    );
    let endpoint = Endpoint::start_on(port, |_| Reply::ok()).await;
    let back = Instant::now();
    let resumed = wait_until(Duration::from_secs(4), || !endpoint.delivered().is_empty()).await;
    assert!(
        resumed,
        "nothing delivered within open_for + 2 s of the endpoint's return; log:\n{}",
        ferry.log()
    );
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set().len() == N
    })
    .await;
    assert!(
        all,
        "{} of {N} delivered {:?} after the endpoint returned; log:\n{}",
        endpoint.delivered_set().len(),
        back.elapsed(),
        ferry.log()
    );
}

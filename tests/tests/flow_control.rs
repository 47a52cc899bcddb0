//! Flow control against the local RabbitMQ and a real endpoint: the adaptive limit finds
//! an endpoint's capacity, and `rate_limit` paces requests.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

async fn publish(rabbit: &Rabbit, queue: &str, prefix: &str, n: usize) -> BTreeSet<String> {
    let messages: Vec<Outgoing> = (0..n)
        .map(|i| Outgoing::plain(format!("{prefix}-{i}")))
        .collect();
    for chunk in messages.chunks(1000) {
        rabbit.publish(queue, chunk).await;
    }
    messages.into_iter().map(|m| m.body).collect()
}

fn delivered_bodies(endpoint: &Endpoint) -> BTreeSet<String> {
    endpoint
        .delivered()
        .iter()
        .filter_map(|s| s.msg())
        .collect()
}

/// An endpoint that refuses (503) whatever exceeds 12 requests at once and otherwise takes
/// 5 ms: the adaptive limit must settle near 12 (between 8 and 16) within 10 s while more
/// than 95% of requests succeed, and every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_finds_the_endpoints_capacity() {
    const N: usize = 15_000;
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
    let expected = publish(&rabbit, &queue.name, "a", N).await;
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
    while started.elapsed() < Duration::from_secs(14) && delivered_bodies(&endpoint).len() < N {
        if let Some(limit) = ferry.metric(metric).await {
            samples.push((started.elapsed(), limit));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: from 10 s on (or the last second, if the queue drained sooner) every
    // sample is near the capacity.
    let cut = started
        .elapsed()
        .min(Duration::from_secs(10))
        .saturating_sub(Duration::from_secs(1));
    let settled: Vec<f64> = samples
        .iter()
        .filter(|(t, _)| *t >= cut)
        .map(|(_, l)| *l)
        .collect();
    let outside: Vec<&(Duration, f64)> = samples
        .iter()
        .filter(|(t, l)| *t >= cut && !(8.0..=16.0).contains(l))
        .collect();
    assert!(
        settled.len() >= 5 && outside.is_empty(),
        "limit did not settle between 8 and 16 from {cut:?} on: {outside:?} of {} samples",
        settled.len()
    );
    let all = wait_until(Duration::from_secs(60), || {
        delivered_bodies(&endpoint) == expected
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
    let expected = publish(&rabbit, &queue.name, "p", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16\nrate_limit = { per_second = 200, burst = 20 }",
    });
    let all = wait_until(Duration::from_secs(60), || {
        delivered_bodies(&endpoint) == expected
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    let mut at: Vec<Instant> = endpoint.seen().iter().map(|s| s.at).collect();
    at.sort();
    // Every window of one second that starts at a request.
    let (busiest, from) = (0..at.len())
        .map(|i| {
            let n = at[i..]
                .iter()
                .take_while(|t| t.duration_since(at[i]) < Duration::from_secs(1))
                .count();
            (n, at[i].duration_since(at[0]))
        })
        .max()
        .unwrap_or_default();
    // ferry paces when it sends; the endpoint counts arrivals, and the first requests of
    // the run also open their connections, so a couple sent just before a window's start
    // may land inside it: 1% of the bound.
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

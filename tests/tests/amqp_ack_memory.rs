//! One RabbitMQ message that keeps failing while thousands of others flow: ferry's
//! bookkeeping of the acks above it stays bounded, so its memory stays flat.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

/// How long the one message fails (`FERRY_TEST_STUCK_SECS`, default 60).
fn stuck_for() -> Duration {
    Duration::from_secs(
        std::env::var("FERRY_TEST_STUCK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_while_one_message_retries_for_a_minute() {
    const WARM_UP: Duration = Duration::from_secs(15);
    const BATCH: usize = 200;
    let stuck = stuck_for();
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("rss").await;
    let started = Instant::now();
    let endpoint = Endpoint::start(move |seen| {
        if seen.msg().as_deref() == Some("stuck") && started.elapsed() < stuck {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let url = endpoint.url();
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 200"),
        sink_url: &url,
        sink: "",
        delivery: "concurrency = 32\nmax_attempts = 1000\nmin_backoff = \"100ms\"\n\
                   max_backoff = \"200ms\"\ncircuit_breaker = { failures = 0, open_for = \"1s\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    rabbit
        .publish(&queue.name, &[Outgoing::plain("stuck")])
        .await;

    // The others: a batch every 100 ms (up to 2,000 a second) while the one fails.
    let name = queue.name.clone();
    let publisher = tokio::spawn(async move {
        let rabbit = Rabbit::connect().await;
        let mut sent = BTreeSet::new();
        let mut n = 0usize;
        while started.elapsed() < stuck {
            let batch: Vec<Outgoing> = (n..n + BATCH)
                .map(|i| Outgoing::plain(format!("m-{i}")))
                .collect();
            n += BATCH;
            rabbit.publish(&name, &batch).await;
            sent.extend(batch.into_iter().map(|m| m.body));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    });

    let mut samples = Vec::new();
    while started.elapsed() < stuck {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if started.elapsed() >= WARM_UP {
            samples.push((started.elapsed().as_secs(), ferry.rss_kib()));
        }
    }
    let mut sent = publisher.await.expect("publisher");
    sent.insert("stuck".into());
    let retried = endpoint
        .seen()
        .iter()
        .filter(|s| s.msg().as_deref() == Some("stuck"))
        .count();
    eprintln!(
        "{} messages while one failed {retried} times over {stuck:?}; RSS (s, KiB): {samples:?}",
        sent.len() - 1
    );
    assert!(
        wait_until(Duration::from_secs(60), || endpoint.delivered_set() == sent).await,
        "{} of {} delivered; log:\n{}",
        endpoint.delivered_set().len(),
        sent.len(),
        ferry.log()
    );
    assert_eq!(
        until_zero(Duration::from_secs(10), || rabbit.held(&queue.name)).await,
        Ok(())
    );
    assert!(retried >= 10, "the message did not keep failing: {retried}");
    let first = samples.first().expect("samples after the warm-up").1;
    let top = samples.iter().map(|s| s.1).max().unwrap_or(first);
    assert!(
        top as f64 <= first as f64 * 1.10,
        "RSS grew from {first} KiB to {top} KiB: {samples:?}"
    );
    drop(ferry);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// Many teams run one ferry with dozens of routes, most of them idle: an idle RabbitMQ
/// route must cost well under a MiB. (lapin's I/O buffers, grown after the handshake,
/// made each connection 8.5 MiB resident.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_route_costs_less_than_a_mib() {
    const ROUTES: usize = 20;
    let rabbit = Rabbit::connect().await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let url = endpoint.url();
    let mut queues = Vec::new();
    for _ in 0..ROUTES {
        queues.push(rabbit.queue("idle").await);
    }
    let config = |n: usize| {
        let queues = &queues;
        let url = &url;
        move |admin_port: u16| {
            let mut text = format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n");
            for (i, queue) in queues.iter().take(n).enumerate() {
                let route = Route {
                    source: amqp_source(&queue.name, ""),
                    sink_url: url,
                    sink: "",
                    delivery: "",
                };
                text.push_str(&route.section(&format!("idle{i}")));
            }
            text
        }
    };
    let one = Ferry::start_config(config(1));
    one.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_one = one.rss_kib();
    drop(one);
    let many = Ferry::start_config(config(ROUTES));
    many.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_many = many.rss_kib();
    let per_route = rss_many.saturating_sub(rss_one) / (ROUTES as u64 - 1);
    assert!(
        per_route < 1024,
        "an idle route costs {per_route} KiB ({rss_one} KiB with one route, {rss_many} KiB with {ROUTES})"
    );
}

//! What only a JetStream consumer does: `+WPI` keeps a request slower than `ack_wait`
//! from being handed out again; replicas share one durable consumer without losing or
//! doubling a message; a retry's delay is held on the server (`-NAK` with a delay), so it
//! survives `kill -9` of the bridge and nothing is lost.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::conformance::nats::{unacked, NatsStream};
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

async fn bridge(s: &NatsStream, endpoint: &Endpoint, sink: &str, delivery: &str) -> Ferry {
    let ferry = Ferry::start(&Route {
        source: s.source(),
        sink_url: &endpoint.url(),
        sink,
        delivery,
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    ferry
}

async fn stop(mut ferry: Ferry) {
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit; log:\n{}",
        ferry.log()
    );
}

fn numbered(prefix: &str, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing::plain(format!("{prefix}-{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_ack_wait_is_not_handed_out_again() {
    let mut s = NatsStream::on_local("slow").await;
    s.extra = String::new();
    // The consumer's ack_wait is 2 s; each request takes 5 s.
    let source = s
        .source()
        .replace("ack_wait = \"10s\"", "ack_wait = \"2s\"");
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_secs(5))).await;
    let ferry = Ferry::start(&Route {
        source,
        sink_url: &endpoint.url(),
        sink: "timeout = \"10s\"",
        delivery: "concurrency = 8",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    s.publish(&numbered("slow", 5)).await;
    let done = wait_until(Duration::from_secs(30), || endpoint.delivered().len() >= 5).await;
    assert!(done, "log:\n{}", ferry.log());
    assert!(
        until_zero(Duration::from_secs(10), || unacked(&s.js, &s.stream))
            .await
            .is_ok(),
        "not acknowledged"
    );
    // Twice ack_wait more: a message whose lease lapsed would have come back by now.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let seen = endpoint.seen();
    assert_eq!(
        seen.len(),
        5,
        "asked more than once: {:?}",
        seen.iter()
            .map(|s| (s.msg(), s.attempt))
            .collect::<Vec<_>>()
    );
    assert!(seen.iter().all(|s| s.attempt == 1));
    stop(ferry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_durable_consumer_without_loss() {
    let s = NatsStream::on_local("replicas").await;
    let endpoint = Endpoint::start(|seen| {
        let n: u64 = seen
            .msg()
            .and_then(|m| m.rsplit('-').next().and_then(|n| n.parse().ok()))
            .unwrap_or(0);
        Reply::ok().after(Duration::from_millis(n % 4))
    })
    .await;
    let a = bridge(&s, &endpoint, "", "concurrency = 16").await;
    let b = bridge(&s, &endpoint, "", "concurrency = 16").await;
    let total = 3000;
    let messages = numbered("m", total);
    for chunk in messages.chunks(200) {
        s.publish(chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all = wait_until(Duration::from_secs(120), || {
        endpoint.delivered_set().len() == total
    })
    .await;
    assert!(
        all,
        "{} of {total} delivered; logs:\n{}\n---\n{}",
        endpoint.delivered_set().len(),
        a.log(),
        b.log()
    );
    assert!(
        until_zero(Duration::from_secs(30), || unacked(&s.js, &s.stream))
            .await
            .is_ok(),
        "left unacknowledged"
    );
    const DELIVERED: &str =
        r#"ferry_deliveries_total{route="r",source="nats",sink="http",outcome="delivered"}"#;
    let by_a = a.metric(DELIVERED).await.unwrap_or(0.0);
    let by_b = b.metric(DELIVERED).await.unwrap_or(0.0);
    stop(a).await;
    stop(b).await;
    let ids_in: BTreeSet<String> = messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(
        endpoint.delivered_set(),
        ids_in,
        "every id out that went in"
    );
    assert_eq!(endpoint.delivered().len(), total, "none twice");
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "one replica did all: {by_a} / {by_b}"
    );
    assert_eq!((by_a + by_b) as usize, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_held_on_the_server_survives_kill_9() {
    let s = NatsStream::on_local("kill").await;
    // Every first attempt is told to come back in 6 s.
    let endpoint = Endpoint::start(|seen| {
        if seen.attempt <= 1 {
            let mut reply = Reply::status(429);
            reply.headers.push(("Retry-After", "6".to_owned()));
            reply
        } else {
            Reply::ok()
        }
    })
    .await;
    let delivery = "concurrency = 8\nmax_backoff = \"1m\"";
    let ferry = bridge(&s, &endpoint, "", delivery).await;
    let messages = numbered("r", 30);
    s.publish(&messages).await;
    let refused = wait_until(Duration::from_secs(20), || endpoint.seen().len() >= 30).await;
    assert!(refused, "log:\n{}", ferry.log());
    // Every one was handed back with its delay: none is held by the bridge.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ferry.signal("KILL");
    drop(ferry);
    let asked = endpoint.seen().len();
    assert_eq!(asked, 30, "a retry before its delay");

    let ferry = bridge(&s, &endpoint, "", delivery).await;
    let all = wait_until(Duration::from_secs(40), || endpoint.delivered().len() >= 30).await;
    assert!(
        all,
        "{} delivered; log:\n{}",
        endpoint.delivered().len(),
        ferry.log()
    );
    stop(ferry).await;
    let seen = endpoint.seen();
    let first = seen.iter().map(|s| s.at).min().expect("seen");
    for s in seen.iter().filter(|s| s.status == 200) {
        assert!(s.attempt >= 2, "accepted at attempt {}", s.attempt);
        assert!(
            s.at.duration_since(first) >= Duration::from_secs(5),
            "delivered before its delay ({:?})",
            s.at.duration_since(first)
        );
    }
    let delivered: BTreeSet<String> = endpoint.delivered_set();
    assert_eq!(delivered.len(), 30, "lost across kill -9");
    assert!(
        until_zero(Duration::from_secs(20), || unacked(&s.js, &s.stream))
            .await
            .is_ok(),
        "left unacknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauge_is_the_consumers_pending_count() {
    let s = NatsStream::on_local("backlog").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = bridge(&s, &endpoint, "", "concurrency = 4").await;
    let (status, _) = ferry.admin(reqwest::Method::PUT, "/routes/r/pause").await;
    assert_eq!(status, 200);
    // Paused, the route takes no more than its buffer: the rest stays pending.
    s.publish(&numbered("b", 1000)).await;
    let metric = r#"ferry_source_backlog{route="r",source="nats",sink="http"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (matched, last) = loop {
        let pending = ferry_e2e::conformance::nats::consumer_counts(&s.js, &s.stream)
            .await
            .map(|(p, _)| p as f64);
        let gauge = ferry.metric(metric).await;
        if gauge.is_some() && gauge == pending && gauge > Some(500.0) {
            break (true, (gauge, pending));
        }
        if tokio::time::Instant::now() > deadline {
            break (false, (gauge, pending));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(matched, "gauge and num_pending (gauge, server): {last:?}");
    let (status, _) = ferry.admin(reqwest::Method::PUT, "/routes/r/resume").await;
    assert_eq!(status, 200);
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set().len() == 1000
    })
    .await;
    assert!(all, "log:\n{}", ferry.log());
    let drained = wait_until_gauge_zero(&ferry, metric).await;
    assert!(drained, "the gauge did not come back to 0");
    stop(ferry).await;
}

async fn wait_until_gauge_zero(ferry: &Ferry, metric: &str) -> bool {
    for _ in 0..60 {
        if ferry.metric(metric).await == Some(0.0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

//! Kafka beyond the conformance suite: consumer-group rebalances and the lag gauge, on
//! librdkafka's mock cluster with real `ferry` processes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_e2e::ferry::Route;
use ferry_e2e::kafka::Topic;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

const PARTITIONS: i32 = 4;

/// A second member joins mid-stream (partitions move to it), then the first is killed
/// with requests in flight on the partitions it kept. If a revoke or the commit loop had
/// committed anything not yet delivered, the survivor would never read it: every record
/// must still arrive, and the group's lag must end at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_and_a_killed_member_lose_nothing() {
    const N: usize = 1200;
    let topic = Topic::new("flow", PARTITIONS);
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(40))).await;
    let delivery = "concurrency = 16\nordering = \"none\"";
    let first = topic.start(&endpoint.url(), delivery);
    first.wait_ready(Duration::from_secs(30)).await;
    topic.publish(0..400).await;
    let flowing = wait_until(Duration::from_secs(60), || {
        endpoint.delivered().len() >= 100
    })
    .await;
    assert!(
        flowing,
        "first member did not deliver; log:\n{}",
        first.log()
    );

    let second = topic.start(&endpoint.url(), delivery);
    second.wait_ready(Duration::from_secs(30)).await;
    topic.publish(400..800).await;
    // Both members take part once the second has partitions and delivered from them.
    let shared = wait_until(Duration::from_secs(60), || {
        second.log().contains("partitions assigned") && endpoint.delivered().len() >= 500
    })
    .await;
    assert!(
        shared,
        "second member got no partitions; logs:\n{}\n---\n{}",
        first.log(),
        second.log()
    );
    assert!(
        first.log().contains("partitions revoked"),
        "the first member saw no rebalance; log:\n{}",
        first.log()
    );
    first.signal("KILL");
    let first_log = first.log();
    drop(first);
    topic.publish(800..N).await;

    let expected: BTreeSet<String> = (0..N).map(|i| format!("m-{i}")).collect();
    let all = wait_until(Duration::from_secs(120), || {
        endpoint.delivered_set() == expected
    })
    .await;
    let got = endpoint.delivered_counts();
    let missing: Vec<&String> = expected
        .iter()
        .filter(|b| !got.contains_key(*b))
        .take(20)
        .collect();
    assert!(all, "missing {missing:?}; survivor log:\n{}", second.log());
    let lag_zero = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let lag = topic.lag().await;
            if lag == 0 || tokio::time::Instant::now() > deadline {
                break lag;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    assert_eq!(lag_zero, 0, "records left uncommitted after all arrived");
    // Records read again come only from the two changes of owner (the rebalance and the
    // kill). Each repeats at most what the losing member had received past its last
    // successful commit: in flight (16) + buffered (16) + what it delivered during one
    // commit interval and the heartbeat that told it of the rebalance (~0.2 s at 16 per
    // 40 ms = 80). Commits are refused while the group rebalances, so the last one can be
    // that old.
    const PER_CHANGE: usize = 16 + 16 + 80;
    let twice: Vec<usize> = got
        .iter()
        .filter(|(_, n)| **n > 1)
        .filter_map(|(b, _)| b.strip_prefix("m-")?.parse().ok())
        .collect();
    let rebalances: Vec<String> = second
        .log()
        .lines()
        .filter(|l| l.contains("partitions"))
        .map(str::to_owned)
        .collect();
    assert!(
        twice.len() <= 2 * PER_CHANGE,
        "{} records delivered more than once: {twice:?}; survivor: {rebalances:?}; first: {first_log}",
        twice.len()
    );
    let mut second = second;
    second.signal("TERM");
    let status = second.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", second.log());
}

/// The lag gauge shows what the group has not finished, and falls to zero once drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_gauge_is_the_consumer_lag() {
    let topic = Topic::new("flow", PARTITIONS);
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(100))).await;
    let ferry = topic.start(&endpoint.url(), "concurrency = 2\nordering = \"partition\"");
    ferry.wait_ready(Duration::from_secs(30)).await;
    topic.publish(0..300).await;
    let metric = r#"ferry_source_backlog{route="r",source="kafka",sink="http"}"#;
    let mut seen_high = 0.0f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline && seen_high < 150.0 {
        seen_high = seen_high.max(ferry.metric(metric).await.unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        seen_high >= 150.0,
        "backlog gauge peaked at {seen_high} with ~300 records waiting behind 2 slow slots"
    );
    let drained = wait_until(Duration::from_secs(60), || {
        endpoint.delivered().len() >= 300
    })
    .await;
    assert!(drained, "log:\n{}", ferry.log());
    let mut low = f64::MAX;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline && low > 0.0 {
        low = ferry.metric(metric).await.unwrap_or(f64::MAX);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        low, 0.0,
        "backlog gauge did not fall to zero after draining"
    );
    // ordering = "partition": each partition's records arrived in offset order.
    let seen = endpoint.delivered();
    let mut by_partition: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for s in &seen {
        let id = s.id.clone();
        let (tp, offset) = id.rsplit_once('-').expect("topic-partition-offset id");
        by_partition
            .entry(tp.to_owned())
            .or_default()
            .push(offset.parse().expect("offset"));
    }
    for (tp, offsets) in &by_partition {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{tp} out of order: {offsets:?}"
        );
    }
}

/// The broker is unreachable for longer than the group's session timeout while the bridge
/// keeps delivering what it had already fetched; the group drops the member, so commits of
/// that work fail until it rejoins. The delivered positions must be committed when the same
/// partitions come back: nothing lost, and only what was in flight at the drop is repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_session_repeats_only_what_was_in_flight() {
    const N: usize = 800;
    let topic = Topic::new("flow", PARTITIONS);
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(20))).await;
    // The member rejoins under a new id; the group's rebalance waits for the members it
    // knows for up to `max.poll.interval.ms` (5 minutes by default), so it is bounded here.
    let source = topic.source_with("\"max.poll.interval.ms\" = 20000");
    assert!(source.contains("max.poll.interval.ms"), "{source}");
    let ferry = Ferry::start(&Route {
        source,
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16\nordering = \"none\"",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    topic.publish(0..600).await;
    let flowing = wait_until(Duration::from_secs(60), || endpoint.delivered().len() >= 50).await;
    assert!(flowing, "no deliveries; log:\n{}", ferry.log());
    // Longer than `session.timeout.ms` (6 s): the group forgets the member.
    topic.cluster.set_down(true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = endpoint.delivered().len();
    topic.cluster.set_down(false);
    topic.publish(600..N).await;

    let expected: BTreeSet<String> = (0..N).map(|i| format!("m-{i}")).collect();
    // Rejoining takes the mock's rebalance delay (~4 s). The reports of broker trouble that
    // librdkafka queued during the outage must not hold up the rebalance behind them: when
    // each one was followed by a backoff, they kept the member out for 25 s to minutes.
    let all = wait_until(Duration::from_secs(20), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(
        all,
        "not every record arrived within 20 s of the broker's return; log:\n{}",
        ferry.log()
    );
    let mut ferry = ferry;
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(30)).await;
    let log = ferry.log();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    let twice: Vec<String> = endpoint
        .delivered_counts()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(b, _)| b)
        .collect();
    // In flight (16) and buffered (16) when the group dropped the member.
    assert!(
        twice.len() <= 32,
        "{} records delivered again after the outage ({during} delivered by its end): \
         {twice:?}; log:\n{log}",
        twice.len()
    );
    assert!(
        log.contains("committed what was delivered while the broker was unreachable"),
        "the outage did not cost the member its partitions ({during} delivered by its end); \
         log:\n{log}"
    );
    assert_eq!(topic.lag().await, 0, "records left uncommitted");
}

//! A Kafka route keeps its place in the consumer group whatever the route does: paused for
//! longer than `max.poll.interval.ms`, and while a rebalance waits on the broker no other
//! route of the process stands still.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_e2e::ferry::Route;
use ferry_e2e::kafka::Topic;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

/// Waits until every `m-<i>` of `range` was delivered; returns whether they were.
async fn all_delivered(
    endpoint: &Endpoint,
    range: std::ops::Range<usize>,
    limit: Duration,
) -> bool {
    let expected: BTreeSet<String> = range.map(|i| format!("m-{i}")).collect();
    wait_until(limit, || endpoint.delivered_set().is_superset(&expected)).await
}

fn delivered_twice(endpoint: &Endpoint) -> Vec<String> {
    endpoint
        .delivered_counts()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(m, _)| m)
        .collect()
}

/// Paused through the admin API for 25 s with `max.poll.interval.ms` at 10 s: the member
/// never leaves its group (no revoke, one assignment), nothing is read twice, and every
/// record arrives after the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_longer_than_max_poll_interval_keeps_the_member_and_reads_nothing_twice() {
    const N: usize = 300;
    let topic = Topic::new("pause", 4);
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: topic.source_with("\"max.poll.interval.ms\" = 10000"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nordering = \"none\"",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    topic.publish(0..100).await;
    assert!(
        all_delivered(&endpoint, 0..100, Duration::from_secs(30)).await,
        "log:\n{}",
        ferry.log()
    );

    let (status, _) = ferry.admin(reqwest::Method::PUT, "/routes/r/pause").await;
    assert_eq!(status, 200);
    topic.publish(100..200).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let during = endpoint.delivered().len();
    let (status, _) = ferry.admin(reqwest::Method::PUT, "/routes/r/resume").await;
    assert_eq!(status, 200);
    topic.publish(200..N).await;

    let all = all_delivered(&endpoint, 0..N, Duration::from_secs(30)).await;
    let log = ferry.log();
    assert!(
        all,
        "not every record arrived after the resume; log:\n{log}"
    );
    assert!(
        during <= 100 + 4,
        "{during} delivered while paused (only in-flight ones may finish)"
    );
    assert_eq!(
        log.matches("partitions assigned").count(),
        1,
        "the member rejoined; log:\n{log}"
    );
    assert!(
        !log.contains("partitions revoked"),
        "the member lost its partitions; log:\n{log}"
    );
    let twice = delivered_twice(&endpoint);
    assert!(twice.is_empty(), "read twice: {twice:?}; log:\n{log}");
    let mut ferry = ferry;
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "{}", ferry.log());
}

/// One process runs two routes on one runtime thread (the default): `r` on a cluster
/// whose every answer takes 1.5 s, `r2` on another. A second member joins `r`'s group,
/// and the rebalance's commits wait on the slow broker; `r2` must keep flowing meanwhile
/// (no gap between its deliveries as long as that wait). The mock answers a fetch that
/// finds nothing after `fetch.wait.max.ms` (500 ms) even when records arrive meanwhile, so
/// gaps of that length are the cluster's, not ferry's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_waiting_on_the_broker_does_not_stall_the_other_routes() {
    let slow = Topic::new("slowgroup", 4);
    let other = Topic::new("other", 1);
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(20))).await;
    let other_endpoint = Endpoint::start(|_| Reply::ok()).await;
    let second_route = format!(
        "\n[routes.r2.source]\n{}\n[routes.r2.sink]\ntype = \"http\"\nurl = \"{}\"\n",
        other.source(),
        other_endpoint.url()
    );
    let delivery = "concurrency = 4\nordering = \"none\"";
    let first = Ferry::start_with(
        &Route {
            source: slow.source(),
            sink_url: &endpoint.url(),
            sink: "",
            delivery,
        },
        &second_route,
    );
    first.wait_ready(Duration::from_secs(30)).await;
    slow.publish(0..400).await;
    let flowing = wait_until(Duration::from_secs(30), || endpoint.delivered().len() >= 50).await;
    assert!(flowing, "log:\n{}", first.log());

    slow.cluster.set_round_trip(Duration::from_millis(1500));
    let second = slow.start(&endpoint.url(), delivery);
    let joined_at = Instant::now();
    // `r2` gets a record every 50 ms until the first member has been through the
    // rebalance (revoked, then assigned again) and a few seconds more.
    let mut i = 0;
    let mut rebalanced_at = None;
    while rebalanced_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(3)) {
        assert!(
            joined_at.elapsed() < Duration::from_secs(90),
            "no rebalance within 90 s; logs:\n{}\n---\n{}",
            first.log(),
            second.log()
        );
        other.publish(i..i + 1).await;
        i += 1;
        let log = first.log();
        if rebalanced_at.is_none()
            && log.contains("partitions revoked")
            && log.matches("partitions assigned").count() >= 2
        {
            rebalanced_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen: Vec<Instant> = other_endpoint
        .delivered()
        .iter()
        .map(|s| s.at)
        .filter(|at| *at >= joined_at)
        .collect();
    let longest = seen
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or(Duration::MAX);
    println!(
        "r2: {} deliveries during the rebalance, longest gap {longest:?}",
        seen.len()
    );
    assert!(
        longest < Duration::from_millis(1000),
        "r2 stood still for {longest:?} while r rebalanced; log:\n{}",
        first.log()
    );
    assert!(
        all_delivered(&other_endpoint, 0..i, Duration::from_secs(10)).await,
        "r2 lost records"
    );
    slow.cluster.set_round_trip(Duration::ZERO);
    drop(second);
    drop(first);
}

//! The persistent session keeps everything across restarts: of ferry (`kill -9`, with
//! messages published while it is down) and of the broker (a private Mosquitto with
//! persistence, restarted mid-stream).

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::conformance::mqtt::{self, PrivateBroker, ADDR, WINDOW};
use ferry_e2e::ferry::Route;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

fn start(addr: &str, base: &str, client_id: &str, endpoint: &Endpoint) -> Ferry {
    Ferry::start(&Route {
        source: mqtt::source(addr, base, client_id, &format!("dead/{base}"), ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16",
    })
}

fn items(base: &str, range: std::ops::Range<usize>) -> Vec<mqtt::Item> {
    range
        .map(|i| (format!("{base}/t{}", i % 5), format!("m-{i}"), Vec::new()))
        .collect()
}

async fn wait_all(endpoint: &Endpoint, total: usize, ferry: &Ferry) {
    let all = wait_until(Duration::from_secs(120), || {
        endpoint.delivered_set().len() == total
    })
    .await;
    assert!(
        all,
        "{} of {total} delivered; log:\n{}",
        endpoint.delivered_set().len(),
        ferry.log()
    );
}

/// Bodies accepted more than once, and any of their copies that claimed to be a first
/// attempt beyond the first.
fn duplicates(endpoint: &Endpoint) -> (usize, Vec<String>) {
    let mut firsts: BTreeMap<String, usize> = BTreeMap::new();
    let counts = endpoint.delivered_counts();
    for s in endpoint.delivered() {
        if s.attempt <= 1 {
            *firsts.entry(s.msg().unwrap_or_default()).or_default() += 1;
        }
    }
    let dups = counts.values().filter(|n| **n > 1).count();
    let unlabelled = firsts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(b, _)| b)
        .collect();
    (dups, unlabelled)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_ferry_loses_nothing_published_before_or_while_it_was_down() {
    mqtt::require_broker(ADDR).await;
    let base = ferry_e2e::unique("kill");
    let client_id = format!("{base}-bridge");
    let _dead = mqtt::DeadLetterTopic::subscribe(ADDR, &format!("dead/{base}")).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(50))).await;
    let ferry = start(ADDR, &base, &client_id, &endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    mqtt::publish(ADDR, &items(&base, 0..300)).await;
    let started = wait_until(Duration::from_secs(60), || endpoint.delivered().len() >= 50).await;
    assert!(started, "no deliveries; log:\n{}", ferry.log());
    ferry.signal("KILL");
    drop(ferry);
    // Published while no ferry runs: the session keeps them.
    mqtt::publish(ADDR, &items(&base, 300..500)).await;
    let ferry = start(ADDR, &base, &client_id, &endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    wait_all(&endpoint, 500, &ferry).await;
    stop(ferry).await;
    let (dups, unlabelled) = duplicates(&endpoint);
    assert!(
        dups <= WINDOW,
        "{dups} duplicates, more than the window of {WINDOW}"
    );
    assert!(
        unlabelled.is_empty(),
        "redeliveries not labelled attempt > 1: {unlabelled:?}"
    );
    assert_eq!(mqtt::held(ADDR, &client_id).await, 0);
    mqtt::end_session(ADDR, &client_id).await;
}

/// A plain subscription: Mosquitto (2.0) does not keep shared subscriptions across its
/// restart (messages published before ferry is back find no subscriber), see the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing() {
    let mut broker = PrivateBroker::start().await;
    let addr = broker.addr.clone();
    let base = ferry_e2e::unique("bounce");
    let client_id = format!("{base}-bridge");
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(20))).await;
    let ferry = Ferry::start(&Route {
        source: mqtt::source(&addr, &base, &client_id, &format!("dead/{base}"), "")
            .replace("shared_group = \"ferry\"\n", ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    mqtt::publish(&addr, &items(&base, 0..300)).await;
    let started = wait_until(Duration::from_secs(60), || endpoint.delivered().len() >= 50).await;
    assert!(started, "no deliveries; log:\n{}", ferry.log());
    broker.restart(Duration::from_secs(2)).await;
    mqtt::publish(&addr, &items(&base, 300..500)).await;
    wait_all(&endpoint, 500, &ferry).await;
    let log = ferry.log();
    assert!(log.contains("connected to the broker again"), "log:\n{log}");
    stop(ferry).await;
    let (dups, unlabelled) = duplicates(&endpoint);
    assert!(
        dups <= WINDOW,
        "{dups} duplicates, more than the window of {WINDOW}"
    );
    assert!(
        unlabelled.is_empty(),
        "redeliveries not labelled attempt > 1: {unlabelled:?}"
    );
    assert_eq!(mqtt::held(&addr, &client_id).await, 0);
}

/// Mosquitto numbers the messages it queues for an absent session as it queues them, so
/// past 65,535 of them it sends a message under an identifier ferry still holds
/// unacknowledged on the same connection. Both must be delivered, each taking one
/// `PUBACK` (the broker removes one message per `PUBACK`): nothing lost, nothing stuck,
/// no reconnect storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_the_packet_identifiers_loses_nothing() {
    const TOTAL: usize = 70_000;
    let broker = PrivateBroker::start().await;
    let addr = broker.addr.clone();
    let base = ferry_e2e::unique("deep");
    let client_id = format!("{base}-bridge");
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let route = |endpoint: &Endpoint| {
        Ferry::start(&Route {
            source: mqtt::source(&addr, &base, &client_id, &format!("dead/{base}"), "")
                .replace("shared_group = \"ferry\"\n", ""),
            sink_url: &endpoint.url(),
            sink: "",
            delivery: "concurrency = 64",
        })
    };
    // The first start makes the session; the backlog is queued while ferry is away.
    let ferry = route(&endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    stop(ferry).await;
    mqtt::publish(&addr, &items(&base, 0..TOTAL)).await;
    let ferry = route(&endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    wait_all(&endpoint, TOTAL, &ferry).await;
    stop(ferry).await;
    let (_, unlabelled) = duplicates(&endpoint);
    assert!(
        unlabelled.is_empty(),
        "redeliveries not labelled attempt > 1: {unlabelled:?}"
    );
    assert_eq!(mqtt::held(&addr, &client_id).await, 0, "left on the broker");
}

/// The start check resumes the session before the real connection does: what it was sent
/// comes back flagged DUP and is labelled a second attempt. At most one message may be
/// mislabelled so, not a receive window of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_labels_no_window_of_first_deliveries_as_redeliveries() {
    mqtt::require_broker(ADDR).await;
    let base = ferry_e2e::unique("relabel");
    let client_id = format!("{base}-bridge");
    let _dead = mqtt::DeadLetterTopic::subscribe(ADDR, &format!("dead/{base}")).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = start(ADDR, &base, &client_id, &endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    stop(ferry).await;
    // Queued for the session while no ferry runs: none of them was ever delivered.
    mqtt::publish(ADDR, &items(&base, 0..300)).await;
    let ferry = start(ADDR, &base, &client_id, &endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    wait_all(&endpoint, 300, &ferry).await;
    stop(ferry).await;
    let relabelled = endpoint
        .delivered()
        .iter()
        .filter(|s| s.attempt > 1)
        .count();
    assert!(
        relabelled <= 1,
        "{relabelled} first deliveries labelled as redeliveries"
    );
    mqtt::end_session(ADDR, &client_id).await;
}

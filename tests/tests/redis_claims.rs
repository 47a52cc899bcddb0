//! Entries of a consumer that died are taken over by another after `claim_idle`; entries
//! a live consumer holds (however slow its endpoint) are not.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_e2e::conformance::redis::{group_counts, publish, source, unacked, Redis, GROUP};
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply, Seen};
use redis::aio::MultiplexedConnection;

fn bridge(
    stream: &str,
    consumer: &str,
    endpoint: &Endpoint,
    extra: &str,
    concurrency: usize,
) -> Ferry {
    Ferry::start(&Route {
        source: source(
            "redis://127.0.0.1:6379/",
            stream,
            &format!(
                "consumer = \"{consumer}\"\nclaim_idle = \"2s\"\ndead_letters = \"drop\"\n{extra}"
            ),
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: &format!(
            "concurrency = {concurrency}\nmax_attempts = 10\nshutdown_grace = \"5s\""
        ),
    })
}

/// The ids pending for `consumer`.
async fn pending_of(con: &MultiplexedConnection, stream: &str, consumer: &str) -> BTreeSet<String> {
    let mut con = con.clone();
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query_async(&mut con)
        .await
        .expect("XPENDING");
    rows.into_iter().map(|r| r.0).collect()
}

fn bodies(seen: &[Seen]) -> BTreeMap<String, Vec<u32>> {
    let mut by_body: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for s in seen {
        if let Some(b) = s.msg() {
            by_body.entry(b).or_default().push(s.attempt);
        }
    }
    by_body
}

/// Consumer `a` is killed with `kill -9` while its endpoint holds requests and never comes
/// back. Consumer `b` (another name) takes `a`'s pending entries over once they have been
/// idle for `claim_idle` and delivers them labelled as redeliveries: every id arrives, the
/// only ones that arrive twice were `a`'s in flight at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumer_s_entries_are_claimed_by_another_and_nothing_is_lost() {
    let redis = Redis::connect().await;
    let con = redis.con();
    let stream = ferry_e2e::unique("claim");
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(300))).await;
    let a = bridge(&stream, "a", &endpoint, "", 8);
    a.wait_ready(Duration::from_secs(30)).await;
    let messages: Vec<Outgoing> = (0..300)
        .map(|i| Outgoing::plain(format!("c-{i}")))
        .collect();
    publish(&con, &stream, &messages).await;
    let started = wait_until(Duration::from_secs(30), || endpoint.delivered().len() >= 16).await;
    assert!(started, "a delivered nothing; log:\n{}", a.log());
    a.signal("KILL");
    drop(a);
    // What `a` had read and not acknowledged: in flight at the kill, or waiting in its buffer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let orphaned = pending_of(&con, &stream, "a").await;
    assert!(!orphaned.is_empty(), "a held nothing pending at the kill");
    let at_kill: BTreeSet<String> = bodies(&endpoint.seen()).into_keys().collect();

    let b = bridge(&stream, "b", &endpoint, "", 8);
    b.wait_ready(Duration::from_secs(30)).await;
    let expected: BTreeSet<String> = messages.iter().map(|m| m.body.clone()).collect();
    let all = wait_until(Duration::from_secs(90), || {
        let got: BTreeSet<String> = bodies(&endpoint.delivered()).into_keys().collect();
        expected.is_subset(&got)
    })
    .await;
    let got = bodies(&endpoint.delivered());
    let missing: Vec<&String> = expected
        .iter()
        .filter(|b| !got.contains_key(*b))
        .take(10)
        .collect();
    assert!(all, "missing {missing:?}; b's log:\n{}", b.log());
    assert!(
        wait_until_zero(&con, &stream).await,
        "entries still unacknowledged; b's log:\n{}",
        b.log()
    );
    assert!(
        pending_of(&con, &stream, "a").await.is_empty(),
        "a still owns entries"
    );
    // Every body exactly once, except those a had sent the endpoint before it died.
    for (body, attempts) in &got {
        if attempts.len() > 1 {
            assert!(
                at_kill.contains(body),
                "{body} delivered {attempts:?} but was not in flight at the kill"
            );
            assert!(
                attempts.iter().filter(|a| **a <= 1).count() <= 1,
                "{body}: two copies claim attempt 1: {attempts:?}"
            );
        }
    }
    assert_eq!(got.len(), 300);
    // The orphans came from b, as redeliveries.
    let log = b.log();
    assert!(
        log.contains("claimed entries idle longer than claim_idle"),
        "b claimed nothing; log:\n{log}"
    );
    let redelivered = endpoint
        .delivered()
        .iter()
        .filter(|s| s.attempt >= 2)
        .count();
    assert!(
        redelivered >= orphaned.len(),
        "{redelivered} deliveries with attempt >= 2 for {} orphans",
        orphaned.len()
    );
}

async fn wait_until_zero(con: &MultiplexedConnection, stream: &str) -> bool {
    ferry_e2e::until_zero(Duration::from_secs(20), || unacked(con, stream))
        .await
        .is_ok()
}

/// Two live consumers and an endpoint that takes longer than `claim_idle` (5 s against
/// 2 s): the entries each holds are kept from looking idle, so neither claims the other's
/// and every entry is requested exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_held_longer_than_claim_idle_are_not_claimed_away() {
    let redis = Redis::connect().await;
    let con = redis.con();
    let stream = ferry_e2e::unique("slow");
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_secs(5))).await;
    let x = bridge(&stream, "x", &endpoint, "batch_size = 10", 8);
    x.wait_ready(Duration::from_secs(30)).await;
    let y = bridge(&stream, "y", &endpoint, "batch_size = 10", 8);
    y.wait_ready(Duration::from_secs(30)).await;
    let messages: Vec<Outgoing> = (0..48).map(|i| Outgoing::plain(format!("s-{i}"))).collect();
    publish(&con, &stream, &messages).await;
    let all = wait_until(Duration::from_secs(90), || endpoint.delivered().len() >= 48).await;
    assert!(
        all,
        "{} of 48 delivered; x:\n{}\ny:\n{}",
        endpoint.delivered().len(),
        x.log(),
        y.log()
    );
    assert!(
        wait_until_zero(&con, &stream).await,
        "entries still unacknowledged"
    );
    // Give a claim pass the chance to run after the last answer, then count requests.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = bodies(&endpoint.seen());
    let twice: Vec<(&String, &Vec<u32>)> = seen.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(twice.is_empty(), "requested more than once: {twice:?}");
    assert_eq!(seen.len(), 48);
    assert!(seen.values().all(|a| a == &[1]), "attempts: {seen:?}");
    for (name, log) in [("x", x.log()), ("y", y.log())] {
        assert!(
            !log.contains("claimed entries"),
            "{name} claimed entries a live consumer held:\n{log}"
        );
    }
    let (pending, lag) = group_counts(&con, &stream).await.expect("group");
    assert_eq!((pending, lag), (0, 0));
}

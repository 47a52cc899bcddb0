//! Replicas share one table: every row is claimed by one of them at a time, so every id
//! arrives exactly once, and under `ordering = "key"` a key's rows arrive in order
//! although two processes claim them.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use ferry_e2e::conformance::postgres::PgTable;
use ferry_e2e::conformance::{assert_key_order, keyed, random_latency_endpoint, Outgoing};
use ferry_e2e::ferry::Route;
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

fn roll(seen: &ferry_e2e::Seen) -> u64 {
    let mut h = DefaultHasher::new();
    (seen.msg(), seen.attempt).hash(&mut h);
    h.finish()
}

async fn replica(table: &PgTable, endpoint: &Endpoint, delivery: &str) -> Ferry {
    let ferry = Ferry::start(&Route {
        source: table.source(),
        sink_url: &endpoint.url(),
        sink: "",
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

/// Waits until every one of `total` bodies was accepted, or fails with both logs.
async fn wait_all(endpoint: &Endpoint, total: usize, a: &Ferry, b: &Ferry) {
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
}

const DELIVERED: &str =
    r#"ferry_deliveries_total{route="r",source="postgres",sink="http",outcome="delivered"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_every_id_exactly_once() {
    let table = PgTable::create("replicas", false).await;
    let endpoint =
        Endpoint::start(|seen| Reply::ok().after(Duration::from_millis(roll(seen) % 4))).await;
    let delivery = "concurrency = 16";
    let a = replica(&table, &endpoint, delivery).await;
    let b = replica(&table, &endpoint, delivery).await;
    let total = 4000;
    let messages: Vec<Outgoing> = (0..total)
        .map(|i| Outgoing::plain(format!("m-{i}")))
        .collect();
    for chunk in messages.chunks(200) {
        table.insert(chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_all(&endpoint, total, &a, &b).await;
    assert_eq!(
        until_zero(Duration::from_secs(30), || table
            .count("SELECT count(*) FROM {t}"))
        .await,
        Ok(()),
        "rows left in the table"
    );
    let (by_a, by_b) = (
        a.metric(DELIVERED).await.unwrap_or(0.0),
        b.metric(DELIVERED).await.unwrap_or(0.0),
    );
    stop(a).await;
    stop(b).await;
    let twice: Vec<(String, usize)> = endpoint
        .delivered_counts()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(endpoint.delivered().len(), total);
    assert_eq!(by_a + by_b, total as f64, "a {by_a}, b {by_b}");
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "one replica did all the work: a {by_a}, b {by_b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_keep_key_order() {
    let mut table = PgTable::create("replicas_keyed", true).await;
    // One claim takes the first row of 8 keys at most, so neither replica can hold every
    // key's head: both claim, and a key's rows pass from one replica to the other.
    table.batch_size = 8;
    let endpoint = random_latency_endpoint().await;
    let delivery = "concurrency = 8\nordering = \"key\"\nmax_attempts = 20\nmin_backoff = \"50ms\"\nmax_backoff = \"500ms\"";
    let a = replica(&table, &endpoint, delivery).await;
    let b = replica(&table, &endpoint, delivery).await;
    let messages = keyed(64, 5);
    for chunk in messages.chunks(40) {
        table.insert(chunk).await;
    }
    let total = messages.len();
    wait_all(&endpoint, total, &a, &b).await;
    let (by_a, by_b) = (
        a.metric(DELIVERED).await.unwrap_or(0.0),
        b.metric(DELIVERED).await.unwrap_or(0.0),
    );
    stop(a).await;
    stop(b).await;
    assert_key_order(&endpoint);
    assert!(
        by_a > 0.0 && by_b > 0.0,
        "one replica did all the work: a {by_a}, b {by_b}"
    );
    assert_eq!(table.count("SELECT count(*) FROM {t}").await, 0);
}

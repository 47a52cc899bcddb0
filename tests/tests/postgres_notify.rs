//! Only committed rows are delivered, and an idle bridge hears of a new row by `NOTIFY`
//! at once instead of at its next poll; without the trigger the poll still finds it.

use std::time::{Duration, Instant};

use ferry_e2e::conformance::postgres::PgTable;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

fn bridge(table: &PgTable, endpoint: &Endpoint) -> Ferry {
    Ferry::start(&Route {
        source: table.source(),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    })
}

/// The bound on insert → request for an idle bridge. NOTIFY takes a millisecond or two
/// here; the bound is generous because the machine is shared.
const NOTIFIED_WITHIN: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_row_is_never_delivered_and_a_new_row_wakes_an_idle_bridge() {
    let mut table = PgTable::create("notify", false).await;
    // The poll alone would take an hour: only the notification can be this quick.
    table.extra = "poll_interval = \"1h\"".into();
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = bridge(&table, &endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    table
        .client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO \"{}\" (payload) VALUES ('rolled-back'); ROLLBACK;",
            table.name
        ))
        .await
        .expect("insert and roll back");
    let mut took = Vec::new();
    for i in 0..5 {
        // Idle: the bridge sleeps on its notification.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = format!("idle-{i}");
        let inserted = Instant::now();
        table.insert(&[Outgoing::plain(body.clone())]).await;
        let arrived = wait_until(Duration::from_secs(10), || {
            endpoint.delivered_msgs().contains(&body)
        })
        .await;
        assert!(arrived, "{body} not delivered; log:\n{}", ferry.log());
        let at = endpoint
            .delivered()
            .iter()
            .find(|s| s.msg().as_deref() == Some(body.as_str()))
            .map(|s| s.at)
            .expect("seen");
        took.push(at.duration_since(inserted));
    }
    println!("insert → request while idle: {took:?}");
    let slowest = took.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < NOTIFIED_WITHIN,
        "an idle bridge took {slowest:?} to deliver a new row: {took:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = endpoint.delivered_msgs();
    assert!(
        !delivered.iter().any(|m| m == "rolled-back"),
        "{delivered:?}"
    );
    assert_eq!(delivered.len(), 5, "{delivered:?}");
    assert_eq!(table.count("SELECT count(*) FROM {t}").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_trigger_the_poll_finds_new_rows() {
    let mut table = PgTable::create("nonotify", false).await;
    table
        .client
        .batch_execute(&format!(
            "DROP TRIGGER \"{0}_ferry_notify\" ON \"{0}\"",
            table.name
        ))
        .await
        .expect("drop the trigger");
    table.extra = "poll_interval = \"300ms\"".into();
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = bridge(&table, &endpoint);
    ferry.wait_ready(Duration::from_secs(30)).await;
    assert!(
        ferry.log().contains("the table has no trigger"),
        "no warning; log:\n{}",
        ferry.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages: Vec<Outgoing> = (0..10).map(|i| Outgoing::plain(format!("p-{i}"))).collect();
    table.insert(&messages).await;
    let all = wait_until(Duration::from_secs(5), || endpoint.delivered().len() == 10).await;
    assert!(all, "not found by the poll; log:\n{}", ferry.log());
}

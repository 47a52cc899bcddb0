//! Two replicas on one shared subscription split the messages between them, and together
//! deliver every id, none twice.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::conformance::mqtt::{self, ADDR};
use ferry_e2e::ferry::Route;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

async fn replica(base: &str, client_id: &str, endpoint: &Endpoint) -> Ferry {
    let ferry = Ferry::start(&Route {
        source: mqtt::source(ADDR, base, client_id, &format!("dead/{base}"), ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 8",
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

const DELIVERED: &str =
    r#"ferry_deliveries_total{route="r",source="mqtt",sink="http",outcome="delivered"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_shared_subscription_split_the_load_without_loss() {
    mqtt::require_broker(ADDR).await;
    let base = ferry_e2e::unique("share");
    let _dead = mqtt::DeadLetterTopic::subscribe(ADDR, &format!("dead/{base}")).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(2))).await;
    let (id_a, id_b) = (format!("{base}-a"), format!("{base}-b"));
    let a = replica(&base, &id_a, &endpoint).await;
    let b = replica(&base, &id_b, &endpoint).await;
    let total = 1000;
    let items: Vec<_> = (0..total)
        .map(|i| {
            (
                format!("{base}/t{}", i % 7),
                format!("m-{i}"),
                vec![("message-id".to_owned(), format!("id-{i}"))],
            )
        })
        .collect();
    for chunk in items.chunks(200) {
        mqtt::publish(ADDR, chunk).await;
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
    let (from_a, from_b) = (
        a.metric(DELIVERED).await.unwrap_or(0.0),
        b.metric(DELIVERED).await.unwrap_or(0.0),
    );
    stop(a).await;
    stop(b).await;
    // Ids in and out: each one exactly once.
    let ids: Vec<String> = endpoint.delivered().iter().map(|s| s.id.clone()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(
        ids.len(),
        total,
        "duplicates: {} requests accepted",
        ids.len()
    );
    let expected: BTreeSet<String> = (0..total).map(|i| format!("id-{i}")).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );
    // Both took a real share.
    assert_eq!(from_a + from_b, total as f64);
    assert!(
        from_a >= total as f64 * 0.2 && from_b >= total as f64 * 0.2,
        "the load was not split: {from_a} and {from_b}"
    );
    for id in [&id_a, &id_b] {
        assert_eq!(
            mqtt::held(ADDR, id).await,
            0,
            "session {id} still holds messages"
        );
        mqtt::end_session(ADDR, id).await;
    }
}

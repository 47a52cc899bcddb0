//! Dead letters of a Redis route: the original fields plus ferry's, `XADD`ed and
//! acknowledged together. While the dead-letter key cannot take them (it holds a list)
//! nothing is acknowledged; once it can, each lands exactly once and is counted once.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::conformance::redis::{source, take_all, unacked, Redis};
use ferry_e2e::ferry::Route;
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};
use redis::AsyncCommands;

const BROKER_ERRORS: &str =
    r#"ferry_broker_errors_total{route="r",source="redis",sink="http",operation="dead_letter"}"#;
const DEAD_LETTERED: &str =
    r#"ferry_deliveries_total{route="r",source="redis",sink="http",outcome="dead_lettered"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_land_with_their_fields_once_and_never_without_their_ack() {
    let redis = Redis::connect().await;
    let mut con = redis.con();
    let reader = redis.con();
    let stream = ferry_e2e::unique("dl");
    let dead = format!("{stream}.dead-letter");
    let endpoint = Endpoint::start(|seen| match seen.msg() {
        Some(m) if m.starts_with("poison") => Reply::status(422).body("cannot parse"),
        _ => Reply::ok(),
    })
    .await;
    let ferry = Ferry::start(&Route {
        source: source(
            "redis://127.0.0.1:6379/",
            &stream,
            "consumer = \"dl\"\nclaim_idle = \"5s\"",
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nmax_attempts = 3",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;

    // The dead-letter key holds a list: a dead letter cannot be added.
    let _: i64 = con.rpush(&dead, "not a stream").await.expect("RPUSH");
    let mut sent = BTreeSet::new();
    for i in 0..20 {
        let body = if i % 4 == 0 {
            format!("poison-{i}")
        } else {
            format!("fine-{i}")
        };
        let _: String = con
            .xadd(&stream, "*", &[("body", body.as_str()), ("origin", "test")])
            .await
            .expect("XADD");
        sent.insert(body);
    }
    // An entry without the body field is refused: a dead letter too, not a silent drop.
    let _: String = con
        .xadd(&stream, "*", &[("payload", "misnamed")])
        .await
        .expect("XADD");
    let fine: BTreeSet<String> = sent
        .iter()
        .filter(|b| b.starts_with("fine"))
        .cloned()
        .collect();
    let delivered = wait_until(Duration::from_secs(30), || {
        let got: BTreeSet<String> = endpoint
            .delivered()
            .iter()
            .filter_map(|s| s.msg())
            .collect();
        fine.is_subset(&got)
    })
    .await;
    assert!(
        delivered,
        "fine entries not delivered; log:\n{}",
        ferry.log()
    );
    // The dead letters were refused: counted as broker errors, their entries still pending.
    // Polled as "refusals still to see" until none.
    let refused = until_zero(Duration::from_secs(20), || async {
        u64::from(ferry.metric(BROKER_ERRORS).await.unwrap_or(0.0) < 1.0)
    })
    .await
    .is_ok();
    assert!(
        refused,
        "no failed dead letter counted; log:\n{}",
        ferry.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        unacked(&reader, &stream).await,
        6,
        "5 poison + 1 misnamed stay pending while the dead letters fail"
    );
    assert_eq!(ferry.metric(DEAD_LETTERED).await.unwrap_or(0.0), 0.0);
    let (_, routes) = ferry.admin(reqwest::Method::GET, "/routes").await;
    assert!(
        routes.to_string().contains("dead_letter"),
        "/routes does not show the refusal: {routes}"
    );

    // The key is fixed: every dead letter lands, once, and is acknowledged with it.
    let _: i64 = con.del(&dead).await.expect("DEL");
    let drained = until_zero(Duration::from_secs(30), || unacked(&reader, &stream)).await;
    assert!(
        drained.is_ok(),
        "still pending after the fix: {drained:?}; log:\n{}",
        ferry.log()
    );
    // Dead letters not yet counted, until none.
    let counted = until_zero(Duration::from_secs(10), || async {
        6 - ferry.metric(DEAD_LETTERED).await.unwrap_or(0.0).min(6.0) as u64
    })
    .await
    .is_ok();
    assert!(
        counted,
        "dead letters not counted 6 times; metrics:\n{}",
        ferry.metrics().await
    );
    let landed = take_all(&reader, &dead).await;
    assert_eq!(landed.len(), 6, "{landed:?}");
    let poison: BTreeSet<String> = sent
        .iter()
        .filter(|b| b.starts_with("poison"))
        .cloned()
        .collect();
    let bodies: BTreeSet<String> = landed
        .iter()
        .filter_map(|f| f.get("body").cloned())
        .collect();
    assert_eq!(bodies, poison);
    for f in &landed {
        if f.contains_key("body") {
            assert_eq!(f.get("origin").map(String::as_str), Some("test"), "{f:?}");
            assert_eq!(
                f.get("ferry_status").map(String::as_str),
                Some("422"),
                "{f:?}"
            );
            assert_eq!(
                f.get("ferry_attempts").map(String::as_str),
                Some("1"),
                "{f:?}"
            );
            assert!(
                f.get("ferry_reason")
                    .is_some_and(|r| r.contains("cannot parse")),
                "{f:?}"
            );
        } else {
            assert_eq!(
                f.get("payload").map(String::as_str),
                Some("misnamed"),
                "{f:?}"
            );
            assert!(
                f.get("ferry_reason").is_some_and(|r| r.contains("body")),
                "{f:?}"
            );
        }
        assert_eq!(f.get("ferry_route").map(String::as_str), Some("r"), "{f:?}");
    }
    // Refused at once, never retried; the misnamed entry never reached the endpoint.
    assert_eq!(
        endpoint.seen().iter().filter(|s| s.status == 422).count(),
        5
    );
    assert_eq!(endpoint.seen().len(), 20);
}

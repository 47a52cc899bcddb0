//! Visibility renewals that fail, end to end: a proxy between ferry and the SQS emulator
//! fails `ChangeMessageVisibilityBatch` for the first 3 s of a 4 s visibility while the
//! endpoint takes 10 s; ferry must try again before the visibility ends, so the queue
//! never hands the held message out a second time, and count every refused renewal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_e2e::ferry::{sqs_source, Route};
use ferry_e2e::sqs::{self, SqsProxy, Verdict};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_stays_held_when_renewals_fail_for_a_while() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "renew-fails").await;
    // Renewals fail (every entry refused) until this moment.
    let failing_until: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    // When ferry's receive long-poll now open began.
    let polling_since: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let (until, since) = (failing_until.clone(), polling_since.clone());
    let proxy = SqsProxy::start(move |call| {
        if call.action == "ReceiveMessage" {
            *since.lock().expect("lock") = Some(Instant::now());
        }
        let failing = until
            .lock()
            .expect("lock")
            .is_some_and(|t| Instant::now() < t);
        if failing && call.action == "ChangeMessageVisibilityBatch" {
            Verdict::FailEntries
        } else {
            Verdict::Forward
        }
    })
    .await;
    // Much slower than the visibility timeout.
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_secs(10))).await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(
            &queue,
            None,
            "receivers = 1\nvisibility_timeout = \"4s\"\nwait_time = \"5s\"",
        )
        .replace(&ferry_e2e::sqs_endpoint(), &proxy.endpoint()),
        sink_url: &endpoint.url(),
        sink: "timeout = \"30s\"",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;

    // Send while a long-poll has been open for 2.5 s: the receive call then dates from
    // well before the message, so its first renewal is due at once (and fails).
    let in_poll = wait_until(Duration::from_secs(20), || {
        polling_since
            .lock()
            .expect("lock")
            .is_some_and(|t| (2_500..3_000).contains(&t.elapsed().as_millis()))
    })
    .await;
    assert!(in_poll, "ferry does not long-poll");
    *failing_until.lock().expect("lock") = Some(Instant::now() + Duration::from_secs(3));
    sqs::send(&client, &queue, &["held".to_owned()]).await;
    let answered = wait_until(Duration::from_secs(20), || !endpoint.delivered().is_empty()).await;
    assert!(answered, "never delivered; log:\n{}", ferry.log());
    // A second copy handed out while the first was held would still be open.
    let peak = endpoint.peak_in_flight();
    wait_until(Duration::from_secs(15), || endpoint.open() == 0).await;
    // The ack is a delete; the queue is empty once it landed.
    let mut depth = sqs::depth(&client, &queue).await;
    for _ in 0..50 {
        if depth == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        depth = sqs::depth(&client, &queue).await;
    }
    let seen = endpoint.seen();
    assert!(
        proxy.failed("ChangeMessageVisibilityBatch") >= 1,
        "no renewal was failed; log:\n{}",
        ferry.log()
    );
    assert_eq!(
        (peak, seen.len()),
        (1, 1),
        "(most requests open at once, requests): the message was handed out again while \
         held: attempts {:?}; log:\n{}",
        seen.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        ferry.log()
    );
    assert_eq!(seen[0].status, 200);
    assert_eq!(depth, (0, 0), "not acked");
    let refused = ferry
        .metric(
            r#"ferry_broker_errors_total{route="r",source="sqs",sink="http",operation="renew"}"#,
        )
        .await
        .unwrap_or(0.0);
    assert!(
        refused >= 1.0 && refused as usize == proxy.failed("ChangeMessageVisibilityBatch"),
        "renew errors counted {refused}, failed by the proxy {}",
        proxy.failed("ChangeMessageVisibilityBatch")
    );
    println!(
        "renewals failing 3 s: sent 1, delivered 1, duplicates 0, lost 0, renewals failed {}",
        proxy.failed("ChangeMessageVisibilityBatch")
    );
}

//! SNS → SQS → ferry → HTTP, end to end: the real `ferry` binary, the real AWS SDK against
//! the local SQS/SNS emulator, and a real HTTP endpoint. Every test counts ids in and out.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::ferry::{sqs_source, Route};
use ferry_e2e::sns::Topic;
use ferry_e2e::{sqs, wait_until, Endpoint, Ferry, Reply, Seen};

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{{\"{prefix}\": {i}}}")).collect()
}

fn number(seen: &Seen) -> usize {
    seen.msg()
        .and_then(|m| {
            let digits: String = m.chars().filter(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or(usize::MAX)
}

async fn wait_empty(client: &aws_sdk_sqs::Client, url: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let depth = sqs::depth(client, url).await;
        if depth == (0, 0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue not empty: (visible, in flight) = {depth:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sns_messages_arrive_once_each() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "sns-1000").await;
    let topic = Topic::create("orders-topic").await;
    topic
        .subscribe_queue(&sqs::queue_arn(&client, &queue).await, false)
        .await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    // One receiver: the emulator hands out rare duplicates only to concurrent receivers.
    let ferry = Ferry::start(&Route {
        source: sqs_source(&queue, None, "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 32",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;

    // Publish while ferry drains, so the queue stays shallow.
    let published = numbered("order", 1000);
    topic.publish(&published).await;

    let done = wait_until(Duration::from_secs(120), || {
        endpoint.delivered_unique() >= 1000
    })
    .await;
    let delivered = endpoint.delivered();
    assert!(
        done,
        "only {} of 1000 arrived; log:\n{}",
        endpoint.delivered_unique(),
        ferry.log()
    );
    assert_eq!(delivered.len(), 1000, "duplicates delivered");
    let msgs: BTreeSet<String> = delivered.iter().filter_map(Seen::msg).collect();
    assert_eq!(msgs, published.iter().cloned().collect::<BTreeSet<_>>());
    for seen in &delivered {
        assert_eq!(seen.attempt, 1);
        assert_eq!(seen.headers["idempotency-key"], seen.id.as_str());
        assert_eq!(seen.headers["x-ferry-attr-tenant"], "acme");
        assert_eq!(seen.headers["x-ferry-route"], "r");
        assert_eq!(seen.headers["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&seen.body).expect("envelope");
        assert_eq!(v["id"], seen.id.as_str());
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
    wait_empty(&client, &queue).await;
    let delivered_metric = ferry
        .metric(r#"ferry_deliveries_total{route="r",source="sqs",sink="http",outcome="delivered"}"#)
        .await;
    assert_eq!(delivered_metric, Some(1000.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_first_attempts_are_retried_with_counting_attempts() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "retry").await;
    let topic = Topic::create("retry-topic").await;
    topic
        .subscribe_queue(&sqs::queue_arn(&client, &queue).await, false)
        .await;
    // Every 3rd message fails its first attempt.
    let endpoint = Endpoint::start(|seen| {
        if number(seen) % 3 == 0 && seen.attempt == 1 {
            Reply::status(500).body("try later")
        } else {
            Reply::ok()
        }
    })
    .await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(&queue, None, "receivers = 2"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16\nmin_backoff = \"100ms\"\nmax_backoff = \"1s\"",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    topic.publish(&numbered("n", 150)).await;

    let done = wait_until(Duration::from_secs(90), || {
        endpoint.delivered_unique() >= 150
    })
    .await;
    let seen = endpoint.seen();
    let delivered: BTreeSet<usize> = endpoint.delivered().iter().map(number).collect();
    let missing: Vec<usize> = (0..150).filter(|n| !delivered.contains(n)).collect();
    let requests_of = |n: usize| -> Vec<(u32, u16)> {
        seen.iter()
            .filter(|s| number(s) == n)
            .map(|s| (s.attempt, s.status))
            .collect()
    };
    assert!(
        done,
        "missing {missing:?} (requests (attempt, status): {:?}); queue (visible, in flight) = {:?}; log:\n{}",
        missing.first().map(|n| requests_of(*n)),
        sqs::depth(&client, &queue).await,
        ferry.log()
    );
    // Every third message's first attempt was refused (a copy first handed out twice
    // by the emulator may arrive already labelled as attempt 2).
    for n in (0..150).filter(|n| n % 3 == 0) {
        let requests = requests_of(n);
        assert!(
            requests.first().is_some_and(|r| r.1 == 500 || r.0 > 1),
            "message {n}: requests (attempt, status) {requests:?}"
        );
    }
    let failed: Vec<&Seen> = seen.iter().filter(|s| s.status == 500).collect();
    assert!(failed.iter().all(|s| s.attempt == 1));
    for s in endpoint.delivered() {
        if number(&s) % 3 == 0 {
            assert!(
                s.attempt >= 2,
                "message {} delivered at attempt {}",
                number(&s),
                s.attempt
            );
        }
    }
    // Every duplicate is a labelled redelivery.
    let unlabelled = endpoint.unlabelled_duplicates();
    assert!(
        unlabelled.is_empty(),
        "unlabelled duplicates: {unlabelled:?}"
    );
    wait_empty(&client, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_are_dead_lettered_and_odd_bodies_pass_unchanged() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "dlq-src").await;
    let dlq = sqs::create_queue(&client, "dlq").await;
    let endpoint = Endpoint::start(|seen| match seen.msg().as_deref() {
        Some("poison-400") => Reply::status(400).body("bad: 400"),
        Some("poison-413") => Reply::status(413).body("bad: 413"),
        Some("poison-422") => Reply::status(422).body("bad: 422"),
        _ => Reply::ok(),
    })
    .await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(&queue, Some(&dlq), "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let mut bodies = numbered("ok", 20);
    let odd = [
        "plain text".to_owned(),
        "{broken json".to_owned(),
        r#"{"order": 1, "no": "Type"}"#.to_owned(),
        r#"{"Type": "Notification", "Message": 5}"#.to_owned(),
    ];
    bodies.extend(odd.iter().cloned());
    bodies.extend(["poison-400", "poison-413", "poison-422"].map(String::from));
    sqs::send(&client, &queue, &bodies).await;

    let done = wait_until(Duration::from_secs(60), || {
        endpoint.seen().len() >= bodies.len()
    })
    .await;
    assert!(
        done,
        "saw {} of {}; log:\n{}",
        endpoint.seen().len(),
        bodies.len(),
        ferry.log()
    );
    let delivered: BTreeSet<String> = endpoint.delivered().iter().filter_map(Seen::msg).collect();
    assert_eq!(delivered.len(), 24);
    for body in &odd {
        assert!(delivered.contains(body), "{body} not delivered as it is");
    }
    wait_empty(&client, &queue).await;
    let mut dead = sqs::drain(&client, &dlq).await;
    dead.sort_by(|a, b| a.body.cmp(&b.body));
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (stored, status) in dead.iter().zip(["400", "413", "422"]) {
        assert_eq!(stored.body, format!("poison-{status}"));
        assert_eq!(
            stored.attributes["ferry_dead_letter_reason"],
            format!("bad: {status}")
        );
        assert_eq!(stored.attributes["ferry_last_status"], status);
        assert_eq!(stored.attributes["ferry_attempts"], "1");
    }
    // Each poison message was tried exactly once: no retry loop.
    assert_eq!(endpoint.seen().len(), bodies.len());
    let dead_metric = ferry
        .metric(
            r#"ferry_deliveries_total{route="r",source="sqs",sink="http",outcome="dead_lettered"}"#,
        )
        .await;
    assert_eq!(dead_metric, Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_slower_than_the_visibility_timeout_gets_the_message_once() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "slow").await;
    let endpoint = Endpoint::start(|seen| {
        if seen.msg().as_deref() == Some("slow") {
            Reply::ok().after(Duration::from_secs(9))
        } else {
            Reply::ok()
        }
    })
    .await;
    // Two receivers polling all the time: without the lease, the slow message would be
    // handed out again after 3 s.
    let ferry = Ferry::start(&Route {
        source: sqs_source(&queue, None, "receivers = 2\nvisibility_timeout = \"3s\""),
        sink_url: &endpoint.url(),
        sink: "timeout = \"20s\"",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let mut bodies = vec!["slow".to_owned()];
    bodies.extend(numbered("fast", 9));
    sqs::send(&client, &queue, &bodies).await;
    let done = wait_until(Duration::from_secs(30), || {
        endpoint.delivered_unique() >= 10
    })
    .await;
    assert!(done, "log:\n{}", ferry.log());
    // Give a wrongful redelivery time to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let slow: Vec<Seen> = endpoint
        .seen()
        .into_iter()
        .filter(|s| s.msg().as_deref() == Some("slow"))
        .collect();
    assert_eq!(slow.len(), 1, "slow message requested {} times", slow.len());
    // With two receivers the emulator may hand a fast message out twice, as SQS may; such a
    // copy must come labelled as a redelivery.
    assert_eq!(endpoint.unlabelled_duplicates(), Vec::<String>::new());
    wait_empty(&client, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_loses_nothing_and_duplicates_nothing() {
    const N: usize = 2000;
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "sigterm").await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(20))).await;
    let route = Route {
        source: sqs_source(&queue, None, "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 20\nshutdown_grace = \"5s\"",
    };
    let mut first = Ferry::start(&route);
    first.wait_ready(Duration::from_secs(20)).await;
    let publisher = {
        let client = client.clone();
        let queue = queue.clone();
        tokio::spawn(async move { sqs::send(&client, &queue, &numbered("m", N)).await })
    };
    let started = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_unique() >= 300
    })
    .await;
    assert!(started, "log:\n{}", first.log());
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(5 + 3)).await;
    let status =
        status.unwrap_or_else(|| panic!("no exit within the grace; log:\n{}", first.log()));
    assert!(status.success(), "exit {status:?}; log:\n{}", first.log());
    let at_stop = endpoint.delivered().len();
    assert!(at_stop < N, "everything was delivered before the signal");

    let second = Ferry::start(&route);
    publisher.await.expect("publisher");
    let done = wait_until(Duration::from_secs(150), || {
        endpoint.delivered_unique() >= N
    })
    .await;
    assert!(
        done,
        "only {} of {N} arrived; log:\n{}",
        endpoint.delivered_unique(),
        second.log()
    );
    wait_empty(&client, &queue).await;
    let delivered = endpoint.delivered();
    let mut ids: Vec<&str> = delivered.iter().map(|s| s.id.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(
        before,
        ids.len(),
        "{} duplicate deliveries",
        before - ids.len()
    );
    assert_eq!(ids.len(), N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sns_delivery_passes_the_message_as_published() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "raw").await;
    let topic = Topic::create("raw-topic").await;
    topic
        .subscribe_queue(&sqs::queue_arn(&client, &queue).await, true)
        .await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(&queue, None, "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "mode = \"raw\"",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let published = numbered("raw", 20);
    topic.publish(&published).await;
    let done = wait_until(Duration::from_secs(30), || {
        endpoint.delivered_unique() >= 20
    })
    .await;
    assert!(done, "log:\n{}", ferry.log());
    let bodies: BTreeSet<String> = endpoint
        .delivered()
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect();
    assert_eq!(bodies, published.into_iter().collect::<BTreeSet<_>>());
    assert!(endpoint
        .delivered()
        .iter()
        .all(|s| s.headers["content-type"] == "application/octet-stream"));
}

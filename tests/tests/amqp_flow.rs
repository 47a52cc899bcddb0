//! RabbitMQ specifics: deliveries received on a channel that has since been lost are not
//! sent (the broker hands them out again on the new channel), so a lost connection costs
//! at most the requests that were in flight, not everything prefetched.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::proxy::Proxy;
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_a_lost_channel_are_taken_back_not_sent() {
    const N: usize = 300;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("stale").await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    // Two requests at a time, 100 ms each: most of the 200 prefetched wait in ferry.
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(100))).await;
    let messages: Vec<Outgoing> = (0..N).map(|i| Outgoing::plain(format!("s-{i}"))).collect();
    rabbit.publish(&queue.name, &messages).await;
    let ferry = Ferry::start(&Route {
        source: format!(
            "type = \"amqp\"\nuri = \"amqp://guest:guest@{}/%2f\"\nqueue = \"{}\"\nprefetch = 200\ndead_letters = \"queue\"\n",
            proxy.addr(),
            queue.name
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 2",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    assert!(wait_until(Duration::from_secs(30), || endpoint.seen().len() >= 10).await);
    proxy.cut(Duration::from_secs(2)).await;

    let expected: BTreeSet<String> = messages.into_iter().map(|m| m.body).collect();
    let done = wait_until(Duration::from_secs(120), || {
        let got: BTreeSet<String> = endpoint
            .delivered()
            .iter()
            .filter_map(|s| s.msg())
            .collect();
        got == expected
    })
    .await;
    assert!(done, "not everything arrived; log:\n{}", ferry.log());
    let taken_back = ferry
        .metric(
            r#"ferry_deliveries_total{route="r",source="amqp",sink="http",outcome="taken_back"}"#,
        )
        .await
        .unwrap_or(0.0);
    let requests = endpoint.seen().len();
    // What was in flight at the cut (two requests) comes again, and each of the two slots
    // may start one or two more in the moment before the client library marks the
    // channel lost (longer on a loaded machine); the rest of the ~190 deliveries the old
    // channel held were skipped, not sent.
    assert!(
        requests <= N + 10,
        "{requests} requests for {N} messages: stale deliveries were sent"
    );
    assert!(
        taken_back >= 50.0,
        "only {taken_back} deliveries taken back; log:\n{}",
        ferry.log()
    );
    let unlabelled = endpoint.unlabelled_duplicates();
    assert!(
        unlabelled.is_empty(),
        "duplicates without X-Ferry-Attempt > 1: {unlabelled:?}"
    );
}

/// A redirect is not a delivery: an endpoint that answers 302 pointing at a URL that would
/// answer 200 to anything gets every message POSTed to it and nothing else (no GET to the
/// new location, which would "ack" a message that was never delivered); each message is
/// retried, then dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    const N: usize = 10;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("redirect").await;
    let location = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let endpoint = {
        let location = location.clone();
        Endpoint::start(move |seen| {
            if seen.body.is_empty() {
                // Only a followed redirect (a GET) comes without a body.
                Reply::ok()
            } else {
                let mut reply = Reply::status(302);
                reply
                    .headers
                    .push(("location", location.get().cloned().unwrap_or_default()));
                reply
            }
        })
        .await
    };
    location
        .set(format!("http://{}/elsewhere", endpoint.addr()))
        .expect("set once");
    let messages: Vec<Outgoing> = (0..N).map(|i| Outgoing::plain(format!("r-{i}"))).collect();
    rabbit.publish(&queue.name, &messages).await;
    let ferry = Ferry::start(&Route {
        source: ferry_e2e::ferry::amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery:
            "concurrency = 4\nmax_attempts = 2\nmin_backoff = \"10ms\"\nmax_backoff = \"20ms\"",
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut dead = false;
    while !dead && tokio::time::Instant::now() < deadline {
        dead = rabbit.depth(&queue.dead_letter).await == N as u32;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = endpoint.seen();
    assert!(
        dead,
        "not every message was dead-lettered; {} requests; log:\n{}",
        seen.len(),
        ferry.log()
    );
    assert_eq!(seen.len(), 2 * N, "two attempts per message, nothing else");
    assert!(
        seen.iter().all(|s| !s.body.is_empty() && s.status == 302),
        "a redirect was followed"
    );
    assert_eq!(rabbit.depth(&queue.name).await, 0);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// Every 40th message of `acks_held_behind_slow_deliveries_all_reach_the_broker`.
fn slow(msg: &str) -> bool {
    msg.strip_prefix("h-")
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n % 40 == 39)
}

/// A slow delivery holds the acks above it (a `multiple` ack may not pass it); after a
/// moment they go out one by one, all at once. Every message arrives once, the broker
/// ends up holding nothing (no ack lost, none sent twice, which would close the channel
/// and bring messages back), and the channel never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_held_behind_slow_deliveries_all_reach_the_broker() {
    const N: usize = 600;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("held").await;
    // 300 ms: far beyond how long acks wait for the deliveries below them.
    let endpoint = Endpoint::start(|seen| match seen.msg() {
        Some(m) if slow(&m) => Reply::ok().after(Duration::from_millis(300)),
        _ => Reply::ok(),
    })
    .await;
    let messages: Vec<Outgoing> = (0..N).map(|i| Outgoing::plain(format!("h-{i}"))).collect();
    rabbit.publish(&queue.name, &messages).await;
    let ferry = Ferry::start(&Route {
        source: format!(
            "type = \"amqp\"\nuri = \"{}\"\nqueue = \"{}\"\nprefetch = 200\ndead_letters = \"queue\"\n",
            ferry_e2e::amqp::amqp_uri(),
            queue.name
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 32",
    });
    let expected: BTreeSet<String> = messages.into_iter().map(|m| m.body).collect();
    let done = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(done, "not everything arrived; log:\n{}", ferry.log());
    let settled = until_zero(Duration::from_secs(30), || rabbit.held(&queue.name)).await;
    assert_eq!(
        settled,
        Ok(()),
        "messages still held by the broker; log:\n{}",
        ferry.log()
    );
    assert_eq!(
        endpoint.seen().len(),
        N,
        "requests for {N} messages; log:\n{}",
        ferry.log()
    );
    assert!(
        !ferry.log().contains("closed channel"),
        "the channel failed; log:\n{}",
        ferry.log()
    );
    drop(ferry);
    rabbit.delete(&queue.name).await;
}

//! Batch delivery against the local RabbitMQ and a real endpoint: one POST carries a JSON
//! array of envelopes, a 2xx answer may name the ids that failed, and only those come
//! again; a refused batch comes again whole. Every message is counted in and out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{Endpoint, Ferry, Reply, Seen};
use serde_json::Value;

/// The envelopes of one batch request: (msg, id, attempt).
fn envelopes(seen: &Seen) -> Vec<(String, String, u64)> {
    let batch: Vec<Value> = serde_json::from_slice(&seen.body).unwrap_or_default();
    batch
        .iter()
        .map(|e| {
            (
                e["msg"].as_str().unwrap_or_default().to_owned(),
                e["id"].as_str().unwrap_or_default().to_owned(),
                e["attempt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_batch_failures_retry_only_the_failed_messages() {
    const N: usize = 500;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("batch").await;
    let requests = Arc::new(AtomicUsize::new(0));
    let endpoint = {
        let requests = requests.clone();
        Endpoint::start(move |seen| {
            // The very first batch is refused whole; later, every message whose body ends
            // in 3 fails at its first attempt.
            if requests.fetch_add(1, Ordering::SeqCst) == 0 {
                return Reply::status(503);
            }
            let failed: Vec<String> = envelopes(seen)
                .into_iter()
                .filter(|(msg, _, attempt)| msg.ends_with('3') && *attempt == 1)
                .map(|(_, id, _)| id)
                .collect();
            Reply::ok().body(&serde_json::json!({ "failed": failed }).to_string())
        })
        .await
    };
    let messages: Vec<Outgoing> = (0..N).map(|i| Outgoing::plain(format!("b-{i}"))).collect();
    rabbit.publish(&queue.name, &messages).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 100"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nmin_backoff = \"10ms\"\nmax_backoff = \"100ms\"\n\
                   batch = { max_messages = 20, max_wait = \"20ms\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let delivered =
        r#"ferry_deliveries_total{route="r",source="amqp",sink="http",outcome="delivered"}"#;
    let mut done = false;
    for _ in 0..300 {
        if ferry.metric(delivered).await == Some(N as f64) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done, "delivered: {:?}", ferry.metric(delivered).await);
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");

    let seen = endpoint.seen();
    let first: BTreeSet<String> = envelopes(&seen[0]).into_iter().map(|(m, _, _)| m).collect();
    assert_eq!(seen[0].status, 503);
    assert!(!first.is_empty());
    // Each message's attempts, in the order the endpoint saw them.
    let mut attempts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for request in &seen {
        assert!(request.headers.contains_key("x-ferry-batch-size"));
        for (msg, _, attempt) in envelopes(request) {
            attempts.entry(msg).or_default().push(attempt);
        }
    }
    assert_eq!(attempts.len(), N, "every message reached the endpoint");
    for (msg, tries) in &attempts {
        let expected: Vec<u64> = if first.contains(msg) || msg.ends_with('3') {
            vec![1, 2]
        } else {
            vec![1]
        };
        // A message of the refused first batch that ends in 3 used its failing first
        // attempt on the 503, so it too comes exactly twice.
        assert_eq!(tries, &expected, "{msg}");
    }
    let retried = 50 + first.iter().filter(|m| !m.ends_with('3')).count();
    assert_eq!(
        ferry
            .metric(
                r#"ferry_deliveries_total{route="r",source="amqp",sink="http",outcome="retried"}"#
            )
            .await,
        Some(retried as f64)
    );
    let average = (N + retried) as f64 / seen.len() as f64;
    assert!(average >= 5.0, "{} requests for {N} messages", seen.len());
}

const POISON: &str = "split-17";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_whole_is_split_and_only_the_poison_message_dead_letters() {
    // Too large for the endpoint beyond two messages; one message it refuses on its own.
    split_down_to_the_poison_message(|batch| {
        if batch.len() > 2 {
            Reply::status(413).body("request entity too large")
        } else if batch.iter().any(|(msg, _, _)| msg == POISON) {
            Reply::status(400).body("poison")
        } else {
            Reply::ok()
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_action_dead_letter_on_a_batch_splits_it_down_to_the_poison_message() {
    // `Ferry-Action: dead-letter` to any request holding the poison, whatever its size,
    // on a 409 (which alone would mean a retry, and which the endpoint does not count as
    // an acceptance).
    split_down_to_the_poison_message(|batch| {
        if batch.iter().any(|(msg, _, _)| msg == POISON) {
            let mut reply = Reply::status(409).body("poison");
            reply.headers.push(("ferry-action", "dead-letter".into()));
            reply
        } else {
            Reply::ok()
        }
    })
    .await;
}

/// Batches of ten that the endpoint refuses whole as `refuse` says: every good message is
/// accepted exactly once, and only the poison one is dead-lettered.
async fn split_down_to_the_poison_message(
    refuse: impl Fn(&[(String, String, u64)]) -> Reply + Send + Sync + 'static,
) {
    const N: usize = 40;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("batch-split").await;
    let endpoint = Endpoint::start(move |seen| refuse(&envelopes(seen))).await;
    let sent = rabbit.publish_numbered(&queue.name, "split", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 50"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 2\nmax_attempts = 2\nmin_backoff = \"10ms\"\n\
                   max_backoff = \"50ms\"\nbatch = { max_messages = 10, max_wait = \"50ms\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let delivered =
        r#"ferry_deliveries_total{route="r",source="amqp",sink="http",outcome="delivered"}"#;
    let settled = ferry_e2e::wait_until(Duration::from_secs(30), || {
        accepted_msgs(&endpoint).len() >= N - 1
    })
    .await;
    assert!(
        settled,
        "accepted: {}, dead-lettered: {}",
        accepted_msgs(&endpoint).len(),
        rabbit.depth(&queue.dead_letter).await
    );
    for _ in 0..100 {
        if rabbit.depth(&queue.dead_letter).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let anything wrongly still in flight land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ferry.metric(delivered).await, Some((N - 1) as f64));
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");
    let dead: Vec<String> = rabbit
        .drain(&queue.dead_letter)
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect();
    assert_eq!(dead, vec![POISON.to_owned()], "dead-lettered");

    let mut accepted: BTreeMap<String, usize> = BTreeMap::new();
    for request in endpoint.delivered() {
        for (msg, _, _) in envelopes(&request) {
            *accepted.entry(msg).or_default() += 1;
        }
    }
    let good: BTreeSet<String> = sent.into_iter().filter(|m| m != POISON).collect();
    assert_eq!(
        accepted.keys().cloned().collect::<BTreeSet<_>>(),
        good,
        "every good message accepted"
    );
    let twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "accepted more than once: {twice:?}");
    assert!(
        endpoint.seen().iter().all(|s| envelopes(s).len() <= 10),
        "no batch beyond max_messages"
    );
}

/// The distinct messages the endpoint has accepted.
fn accepted_msgs(endpoint: &Endpoint) -> BTreeSet<String> {
    endpoint
        .delivered()
        .iter()
        .flat_map(envelopes)
        .map(|(msg, _, _)| msg)
        .collect()
}

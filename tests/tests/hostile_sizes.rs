//! Messages sized to hurt, against the local RabbitMQ and a real endpoint: a message past
//! the route's `max_message_bytes` is dead-lettered before any request (singly and in
//! batches), and a message with hundreds of attributes or tens of KiB of them is still
//! delivered once, its attribute headers capped, instead of drawing a 431 forever.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply, Seen};
use serde_json::Value;

/// Every envelope `msg` of a request, whether it carried one message or a batch.
fn msgs(seen: &Seen) -> Vec<String> {
    match serde_json::from_slice::<Value>(&seen.body) {
        Ok(Value::Array(batch)) => batch
            .iter()
            .filter_map(|e| e["msg"].as_str().map(str::to_owned))
            .collect(),
        Ok(envelope) => envelope["msg"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn oversized_messages_are_dead_lettered_unsent(batch: &str) {
    const LIMIT: usize = 1024;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("oversize").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let mut messages: Vec<Outgoing> = (0..20)
        .map(|i| Outgoing::plain(format!("fits-{i}")))
        .collect();
    let big: Vec<String> = (0..3)
        .map(|i| format!("big-{i}-{}", "x".repeat(LIMIT)))
        .collect();
    for (i, body) in big.iter().enumerate() {
        messages.insert(i * 7, Outgoing::plain(body.clone()));
    }
    rabbit.publish(&queue.name, &messages).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 50"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: &format!("concurrency = 4\nmax_message_bytes = {LIMIT}\n{batch}"),
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let accepted = || {
        endpoint.delivered().iter().flat_map(msgs).fold(
            BTreeMap::<String, usize>::new(),
            |mut n, m| {
                *n.entry(m).or_default() += 1;
                n
            },
        )
    };
    assert!(
        wait_until(Duration::from_secs(20), || accepted().len() >= 20).await,
        "accepted: {:?}; log:\n{}",
        accepted(),
        ferry.log()
    );
    // Drain until every big message is there, then a few rounds more for any extra.
    let (mut dead, mut after) = (Vec::new(), 0);
    for _ in 0..100 {
        let drained = rabbit.drain(&queue.dead_letter).await;
        dead.extend(drained.into_iter().map(|(body, _)| body));
        if dead.len() >= big.len() {
            after += 1;
            if after > 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dead.sort();
    assert_eq!(dead, big, "dead-lettered");
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");
    let accepted = accepted();
    assert_eq!(accepted.len(), 20);
    assert!(accepted.values().all(|n| *n == 1), "accepted: {accepted:?}");
    assert!(
        endpoint
            .seen()
            .iter()
            .flat_map(msgs)
            .all(|m| m.starts_with("fits-")),
        "a message past max_message_bytes reached the endpoint"
    );
    let log = ferry.log();
    assert_eq!(
        log.matches("larger than max_message_bytes (1024)").count(),
        big.len(),
        "one reason per dead letter; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_past_max_message_bytes_is_dead_lettered_before_any_request() {
    oversized_messages_are_dead_lettered_unsent("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_message_past_max_message_bytes_is_dead_lettered_before_any_request() {
    oversized_messages_are_dead_lettered_unsent(
        "batch = { max_messages = 10, max_wait = \"50ms\" }",
    )
    .await;
}

/// Node's default limit on a request's headers, which the endpoint enforces on top of
/// hyper's own (at most 100 headers).
const HEADER_BYTES: usize = 16 * 1024;

async fn delivered_once_despite_attributes(attributes: Vec<(String, String)>) {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("attrs").await;
    let endpoint = Endpoint::start(|seen| {
        let bytes: usize = seen
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if bytes > HEADER_BYTES {
            Reply::status(431)
        } else {
            Reply::ok()
        }
    })
    .await;
    let headers: Vec<(&str, &str)> = attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    rabbit
        .publish_with_headers(&queue.name, b"heavy", &headers)
        .await;
    rabbit.publish_numbered(&queue.name, "light", 5).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 10"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "max_attempts = 3\nmin_backoff = \"10ms\"\nmax_backoff = \"50ms\"",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let done = wait_until(Duration::from_secs(20), || endpoint.delivered().len() >= 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heavy: Vec<Seen> = endpoint
        .seen()
        .into_iter()
        .filter(|s| s.msg().as_deref() == Some("heavy"))
        .collect();
    assert!(
        done && heavy.len() == 1 && heavy[0].status == 200,
        "requests with the heavy message: {:?}; accepted in all: {}; dead-lettered: {}",
        heavy.iter().map(|s| s.status).collect::<Vec<_>>(),
        endpoint.delivered().len(),
        rabbit.depth(&queue.dead_letter).await
    );
    let request = &heavy[0];
    assert_eq!(request.attempt, 1);
    let sent = request
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-ferry-attr-"))
        .count();
    let omitted: usize = request.headers["x-ferry-attributes-omitted"]
        .to_str()
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert_eq!(sent + omitted, attributes.len(), "headers sent and omitted");
    // The body still carries every attribute.
    let envelope: Value = serde_json::from_slice(&request.body).expect("envelope");
    for (name, value) in &attributes {
        assert_eq!(
            envelope["attributes"][name].as_str(),
            Some(value.as_str()),
            "{name}"
        );
    }
    assert_eq!(endpoint.delivered().len(), 6, "each message accepted once");
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");
    assert_eq!(rabbit.depth(&queue.dead_letter).await, 0, "dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_500_attributes_is_delivered_once() {
    let attributes = (0..500)
        .map(|i| (format!("attr{i:03}"), format!("value-{i}")))
        .collect();
    delivered_once_despite_attributes(attributes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_64_kib_of_attributes_is_delivered_once() {
    let attributes = (0..16)
        .map(|i| (format!("blob{i:02}"), "v".repeat(4096)))
        .collect();
    delivered_once_despite_attributes(attributes).await;
}

//! Ids ferry makes up for RabbitMQ messages without a usable `message_id` never repeat:
//! not between two replicas that are both PID 1 (as in containers), not after a restart.
//! An endpoint that deduplicates on `Idempotency-Key` would otherwise drop real messages.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

/// Each ferry is PID 1 of a PID namespace of its own, as in a container.
const OWN_PID_NAMESPACE: [&str; 4] = ["unshare", "--pid", "--fork", "--kill-child"];

/// `n` bodies `PREFIX-i`; every fifth carries a `message_id` that is no header value,
/// every seventh an empty one, the rest none at all.
fn batch(prefix: &str, n: usize) -> Vec<(Option<&'static str>, String)> {
    (0..n)
        .map(|i| {
            let id = match i {
                i if i % 5 == 0 => Some("bad\r\nid"),
                i if i % 7 == 0 => Some(""),
                _ => None,
            };
            (id, format!("{prefix}-{i}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_ids_differ_across_replicas_and_restarts() {
    const N: usize = 30;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("ids").await;
    // Slow enough that both replicas take their share of the queue.
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(30))).await;
    let url = endpoint.url();
    let route = Route {
        source: amqp_source(&queue.name, "prefetch = 2"),
        sink_url: &url,
        sink: "",
        delivery: "concurrency = 2",
    };
    let start = || Ferry::start_in(&route, "", &OWN_PID_NAMESPACE);
    let expect_bodies = |n: usize| {
        let endpoint = &endpoint;
        async move {
            wait_until(Duration::from_secs(60), || {
                endpoint.delivered_set().len() >= n
            })
            .await
        }
    };

    let first = batch("a", N);
    rabbit.publish_with_ids(&queue.name, &first).await;
    let (a, b) = (start(), start());
    a.wait_ready(Duration::from_secs(30)).await;
    b.wait_ready(Duration::from_secs(30)).await;
    assert!(
        expect_bodies(N).await,
        "first batch not delivered; log:\n{}",
        a.log()
    );
    // The restart of one replica: a new process, PID 1 again.
    drop(a);
    let second = batch("b", N);
    rabbit.publish_with_ids(&queue.name, &second).await;
    let a = start();
    a.wait_ready(Duration::from_secs(30)).await;
    assert!(
        expect_bodies(2 * N).await,
        "second batch not delivered; log:\n{}",
        a.log()
    );
    drop((a, b));

    let mut bodies_by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut without_key = Vec::new();
    for seen in endpoint.delivered() {
        let body = seen.msg().unwrap_or_default();
        let key = seen
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if key.trim().is_empty() || key != seen.id {
            without_key.push(body);
            continue;
        }
        bodies_by_key.entry(key).or_default().insert(body);
    }
    let shared: Vec<_> = bodies_by_key
        .iter()
        .filter(|(_, bodies)| bodies.len() > 1)
        .collect();
    assert!(
        shared.is_empty() && without_key.is_empty(),
        "{} ids were given to different messages: {shared:?}; {} requests had no \
         Idempotency-Key equal to the message id: {without_key:?}",
        shared.len(),
        without_key.len()
    );
    let expected: BTreeSet<String> = first.into_iter().chain(second).map(|(_, b)| b).collect();
    assert_eq!(endpoint.delivered_set(), expected);
    eprintln!(
        "| two replicas as PID 1 and a restart, no message_id | RabbitMQ | {} | {} | {} | 0 | 0 |",
        expected.len(),
        endpoint.delivered_set().len(),
        endpoint.delivered().len() - endpoint.delivered_set().len()
    );
}

//! An endpoint outage and clean restarts burn no attempts, on SQS (which counts receives)
//! and RabbitMQ (which marks a message handed back as redelivered): nothing is
//! dead-lettered, and every request's `X-Ferry-Attempt` is the number of requests the
//! endpoint has actually seen for that message.

use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, sqs_source, Route};
use ferry_e2e::{free_port, sqs, unique, wait_until, Endpoint, Ferry, Reply};

/// How long the endpoint refuses connections.
const OUTAGE: Duration = Duration::from_secs(45);

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    let run = unique(prefix);
    (0..n).map(|i| format!("{run}-{i}")).collect()
}

/// Waits out the outage with nothing listening on `port`, then starts the endpoint there.
async fn outage_then_endpoint(port: u16, ferry: &Ferry) -> Endpoint {
    tokio::time::sleep(OUTAGE).await;
    assert!(
        ferry.log().contains("circuit open"),
        "the outage never opened the circuit; log:\n{}",
        ferry.log()
    );
    Endpoint::start_on(port, |_| Reply::ok()).await
}

/// Clean shutdowns make no duplicates: exactly one request per message.
fn assert_no_duplicates(endpoint: &Endpoint, n: usize) {
    assert_eq!(
        endpoint.seen().len(),
        n,
        "clean shutdowns caused duplicates"
    );
}

fn assert_truthful(endpoint: &Endpoint, ferry: &Ferry) {
    let untruthful = endpoint.untruthful_attempts();
    assert!(
        untruthful.is_empty(),
        "X-Ferry-Attempt claims requests the endpoint never saw: {untruthful:?}; log:\n{}",
        ferry.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_refusing_connections_for_45s_dead_letters_nothing_on_sqs() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "outage").await;
    let dlq = sqs::create_queue(&client, "outage-dlq").await;
    let sent = bodies("outage-sqs", 5);
    sqs::send(&client, &queue, &sent).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/deliver");
    let ferry = Ferry::start(&Route {
        source: sqs_source(
            &queue,
            Some(&dlq),
            "visibility_timeout = \"10s\"\nwait_time = \"1s\"",
        ),
        sink_url: &url,
        sink: "timeout = \"2s\"\nconnect_timeout = \"1s\"",
        delivery: "max_attempts = 3\nmin_backoff = \"100ms\"\nmax_backoff = \"2s\"\n\
                   circuit_breaker = { failures = 3, open_for = \"2s\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let endpoint = outage_then_endpoint(port, &ferry).await;
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set().len() == 5
    })
    .await;
    let delivered: Vec<String> = endpoint.delivered_set().into_iter().collect();
    let dead = sqs::drain(&client, &dlq).await;
    assert!(
        dead.is_empty(),
        "the outage dead-lettered {} message(s): {:?}; log:\n{}",
        dead.len(),
        dead.iter().map(|d| &d.body).collect::<Vec<_>>(),
        ferry.log()
    );
    assert!(
        all,
        "delivered {delivered:?} of {sent:?}; log:\n{}",
        ferry.log()
    );
    assert_truthful(&endpoint, &ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_refusing_connections_for_45s_dead_letters_nothing_on_rabbitmq() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("outage").await;
    let sent = rabbit.publish_numbered(&queue.name, "outage-amqp", 5).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/deliver");
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 10"),
        sink_url: &url,
        sink: "timeout = \"2s\"\nconnect_timeout = \"1s\"",
        delivery: "max_attempts = 3\nmin_backoff = \"100ms\"\nmax_backoff = \"2s\"\n\
                   circuit_breaker = { failures = 3, open_for = \"2s\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let endpoint = outage_then_endpoint(port, &ferry).await;
    let all = wait_until(Duration::from_secs(60), || endpoint.delivered_set() == sent).await;
    let dead = rabbit.depth(&queue.dead_letter).await;
    assert_eq!(
        dead,
        0,
        "the outage dead-lettered messages; log:\n{}",
        ferry.log()
    );
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    assert_truthful(&endpoint, &ferry);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// Five times: SIGTERM with requests in flight and a batch in hand, then a new process.
/// A clean shutdown delivers what it holds within the grace; nothing comes back from the
/// broker marked as a later attempt than the endpoint saw.
async fn rolling_restarts(route: &Route<'_>, endpoint: &Endpoint, expected: usize) -> Ferry {
    let mut ferry = Ferry::start(route);
    ferry.wait_ready(Duration::from_secs(30)).await;
    for round in 0..5 {
        let target = (round + 1) * expected / 7;
        let reached = wait_until(Duration::from_secs(60), || endpoint.seen().len() >= target).await;
        assert!(
            reached,
            "round {round}: stuck at {}; log:\n{}",
            endpoint.seen().len(),
            ferry.log()
        );
        ferry.signal("TERM");
        let exited = ferry.wait_exit(Duration::from_secs(30)).await;
        assert!(
            exited.is_some_and(|s| s.success()),
            "round {round}: no clean exit; log:\n{}",
            ferry.log()
        );
        ferry = Ferry::start(route);
        ferry.wait_ready(Duration::from_secs(30)).await;
    }
    ferry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_burn_no_attempts_on_sqs() {
    const N: usize = 70;
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "rolling").await;
    let dlq = sqs::create_queue(&client, "rolling-dlq").await;
    let sent = bodies("rolling-sqs", N);
    sqs::send(&client, &queue, &sent).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(150))).await;
    let route = Route {
        source: sqs_source(
            &queue,
            Some(&dlq),
            "receivers = 1\nbatch_size = 10\nwait_time = \"1s\"",
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nmax_attempts = 2",
    };
    let ferry = rolling_restarts(&route, &endpoint, N).await;
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set().len() == N
    })
    .await;
    assert!(
        all,
        "{} of {N} delivered; log:\n{}",
        endpoint.delivered_set().len(),
        ferry.log()
    );
    assert!(
        sqs::drain(&client, &dlq).await.is_empty(),
        "dead-lettered; log:\n{}",
        ferry.log()
    );
    assert_truthful(&endpoint, &ferry);
    assert_no_duplicates(&endpoint, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_burn_no_attempts_on_rabbitmq() {
    const N: usize = 300;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("rolling").await;
    let sent = rabbit
        .publish_numbered(&queue.name, "rolling-amqp", N)
        .await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(30))).await;
    let route = Route {
        source: amqp_source(&queue.name, "prefetch = 40"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 8\nmax_attempts = 2",
    };
    let ferry = rolling_restarts(&route, &endpoint, N).await;
    let all = wait_until(Duration::from_secs(60), || endpoint.delivered_set() == sent).await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    assert_eq!(
        rabbit.depth(&queue.dead_letter).await,
        0,
        "dead-lettered; log:\n{}",
        ferry.log()
    );
    assert_truthful(&endpoint, &ferry);
    assert_no_duplicates(&endpoint, N);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

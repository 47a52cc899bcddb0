//! `max_attempts` is the number of requests made, timeouts included: one message that
//! always times out on an endpoint that is otherwise there (the circuit stays closed) gets
//! exactly `max_attempts` requests, numbered 1 to `max_attempts`, and is then dead-lettered.

use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, sqs_source, Route};
use ferry_e2e::{sqs, unique, wait_until, Endpoint, Ferry, Reply};

const MAX_ATTEMPTS: u32 = 5;

fn slow() -> impl Fn(&ferry_e2e::Seen) -> Reply + Send + Sync + 'static {
    |_| Reply::ok().after(Duration::from_secs(3))
}

const SINK: &str = "timeout = \"1s\"";

fn delivery() -> String {
    format!("max_attempts = {MAX_ATTEMPTS}\nmin_backoff = \"100ms\"\nmax_backoff = \"1s\"")
}

fn assert_counted(endpoint: &Endpoint, ferry: &Ferry) {
    let numbers: Vec<u32> = endpoint.arrivals().iter().map(|(_, a)| *a).collect();
    assert_eq!(
        numbers,
        (1..=MAX_ATTEMPTS).collect::<Vec<_>>(),
        "requests made (by X-Ferry-Attempt) for max_attempts = {MAX_ATTEMPTS}; log:\n{}",
        ferry.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_count_toward_max_attempts_exactly_on_sqs() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "timeouts").await;
    let dlq = sqs::create_queue(&client, "timeouts-dlq").await;
    let body = unique("timeout");
    sqs::send(&client, &queue, std::slice::from_ref(&body)).await;
    let endpoint = Endpoint::start(slow()).await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(
            &queue,
            Some(&dlq),
            "visibility_timeout = \"30s\"\nwait_time = \"1s\"",
        ),
        sink_url: &endpoint.url(),
        sink: SINK,
        delivery: &delivery(),
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let mut dead = Vec::new();
    let landed = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            dead.extend(sqs::drain(&client, &dlq).await);
            if !dead.is_empty() || tokio::time::Instant::now() > deadline {
                break !dead.is_empty();
            }
        }
    };
    assert!(landed, "never dead-lettered; log:\n{}", ferry.log());
    assert_eq!(dead[0].body, body);
    // Nothing more comes once it is dead-lettered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_counted(&endpoint, &ferry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_count_toward_max_attempts_exactly_on_rabbitmq() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("timeouts").await;
    rabbit.publish_numbered(&queue.name, "timeout", 1).await;
    let endpoint = Endpoint::start(slow()).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: SINK,
        delivery: &delivery(),
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let landed = wait_until(Duration::from_secs(60), || {
        ferry.log().contains("dead-lettering message")
    })
    .await;
    assert!(landed, "never dead-lettered; log:\n{}", ferry.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rabbit.depth(&queue.dead_letter).await, 1, "the dead letter");
    assert_counted(&endpoint, &ferry);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

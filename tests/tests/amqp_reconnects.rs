//! A queue ferry cannot consume (held by an exclusive consumer, a quorum queue without a
//! leader) is retried with backoff and one warning, not in a tight reconnect loop, and
//! consumed as soon as it can be.

use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_held_exclusively_is_retried_with_backoff_then_consumed() {
    const N: usize = 30;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("exclusive").await;
    let holder = Rabbit::hold_exclusively(&queue.name).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let url = endpoint.url();
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &url,
        sink: "",
        delivery: "",
    });
    let sent = rabbit.publish_numbered(&queue.name, "x", N).await;
    tokio::time::sleep(Duration::from_secs(10)).await;

    let log = ferry.log();
    let warnings = log.matches("cannot consume").count();
    eprintln!("10 s held: {warnings} warning line(s)");
    assert_eq!(
        warnings,
        1,
        "one warning per change of state; log (cut):\n{}",
        &log[..log.len().min(3000)]
    );
    let attempts = ferry
        .metric(
            r#"ferry_broker_errors_total{route="r",source="amqp",sink="http",operation="consume"}"#,
        )
        .await
        .unwrap_or(0.0);
    eprintln!("10 s held: {attempts} consume attempts");
    // 200 ms doubling: about 6 attempts in 10 s, never hundreds.
    assert!(
        (3.0..=10.0).contains(&attempts),
        "{attempts} consume attempts in 10 s; log:\n{log}"
    );
    assert!(
        endpoint.seen().is_empty(),
        "delivered while the queue was held"
    );

    holder.release().await;
    assert!(
        wait_until(Duration::from_secs(30), || endpoint.delivered_set() == sent).await,
        "not everything delivered after the release; log:\n{}",
        ferry.log()
    );
    assert_eq!(
        until_zero(Duration::from_secs(10), || rabbit.held(&queue.name)).await,
        Ok(())
    );
    assert!(
        ferry.log().contains("consuming again"),
        "log:\n{}",
        ferry.log()
    );
    drop(ferry);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

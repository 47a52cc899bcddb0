//! Kafka dead letters the broker will not take: too large for the dead-letter topic, a
//! dead-letter topic that never answers at shutdown, and a route that drops them by choice.

use std::time::{Duration, Instant};

use ferry_e2e::ferry::Route;
use ferry_e2e::kafka::{Record, Topic};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};
use rdkafka::types::RDKafkaRespErr;

const GRACE: &str = "shutdown_grace = \"3s\"";

/// Every request is dead-lettered by the endpoint, with `reason` as the reason.
async fn refusing_endpoint(reason: String, delay: Duration) -> Endpoint {
    Endpoint::start(move |_| {
        let mut reply = Reply::status(400).body(&reason).after(delay);
        reply
            .headers
            .push(("Ferry-Action", "dead-letter".to_owned()));
        reply
    })
    .await
}

fn header<'a>(record: &'a Record, key: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Stops the bridge with SIGTERM and returns how long it took to exit.
async fn stop(ferry: &mut Ferry) -> Duration {
    let asked = Instant::now();
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(60)).await;
    let took = asked.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit within 60 s; log:\n{}",
        ferry.log()
    );
    took
}

/// The dead-letter producer takes at most 2000 bytes a record (`message.max.bytes`, as a
/// topic's limit would). A record that fits only without its original headers and with a
/// shorter reason lands trimmed; one that can never fit is counted, shown on `/routes`,
/// logged once and left uncommitted, while the dead letters after it still land; shutdown
/// stays within the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_lands_trimmed_and_one_that_never_fits_is_held_in_view() {
    let topic = Topic::new("dlsize", 1);
    let endpoint = refusing_endpoint("r".repeat(900), Duration::ZERO).await;
    let mut ferry = Ferry::start(&Route {
        source: topic.source_with("\"message.max.bytes\" = 2000"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: &format!("concurrency = 1\n{GRACE}"),
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let body = |name: &str, size: usize| format!("{name}-{}", "x".repeat(size));
    let records = [
        (None, body("fits", 100)),
        (None, body("trim", 1300)),
        (None, body("never", 1950)),
        (None, body("after", 100)),
    ];
    topic.cluster.produce(&topic.name, &records).await;

    let reader = topic.cluster.reader(&topic.dead, 1);
    let mut landed: Vec<Record> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while landed.len() < 3 && Instant::now() < deadline {
        landed.extend(reader.take(Duration::from_secs(1)).await);
    }
    landed.extend(reader.take(Duration::from_secs(2)).await);
    let names: Vec<&str> = landed
        .iter()
        .map(|r| r.body.split('-').next().unwrap_or_default())
        .collect();
    assert_eq!(
        names,
        ["fits", "trim", "after"],
        "dead letters that landed; log:\n{}",
        ferry.log()
    );
    let (fits, trim) = (&landed[0], &landed[1]);
    assert!(header(fits, "traceparent").is_some(), "{:?}", fits.headers);
    assert!(
        header(fits, "ferry_reason").is_some_and(|r| r.len() > 900),
        "{:?}",
        fits.headers
    );
    assert!(
        header(trim, "traceparent").is_none(),
        "trimmed keeps the original headers: {:?}",
        trim.headers
    );
    assert!(
        header(trim, "ferry_reason").is_some_and(|r| r.len() <= 256 && r.starts_with("status 400")),
        "{:?}",
        trim.headers
    );
    assert_eq!(header(trim, "ferry_source_offset"), Some("1"));
    assert_eq!(trim.body, records[1].1, "the payload is never cut");

    let refused = r#"ferry_broker_errors_total{route="r",source="kafka",sink="http",operation="dead_letter"}"#;
    assert_eq!(
        ferry.metric(refused).await,
        Some(1.0),
        "{}",
        ferry.metrics().await
    );
    let dead_lettered =
        r#"ferry_deliveries_total{route="r",source="kafka",sink="http",outcome="dead_lettered"}"#;
    assert_eq!(ferry.metric(dead_lettered).await, Some(3.0));
    let (status, route) = ferry.admin(reqwest::Method::GET, "/routes/r").await;
    assert_eq!(status, 200);
    assert_eq!(route["state"], "source_error", "{route}");
    let never_id = format!("{}-0-2", topic.name);
    let error = route["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&never_id) && error.contains("refused"),
        "{route}"
    );
    let log = ferry.log();
    assert_eq!(
        log.matches("refused by topic").count(),
        1,
        "one line for the change of state; log:\n{log}"
    );
    // The refused record and the one after it stay uncommitted: read again after a restart.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lag = topic.lag().await;
    while lag != 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        lag = topic.lag().await;
    }
    assert_eq!(lag, 2, "log:\n{log}");

    let took = stop(&mut ferry).await;
    println!("shutdown took {took:?} with a refused dead letter held");
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

/// The dead-letter topic stops answering (every produce request fails with a retriable
/// error, which librdkafka retries by itself for `message.timeout.ms`, five minutes) while
/// a dead letter is on its way: shutdown still ends within `shutdown_grace`, and the
/// record stays uncommitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_the_grace_while_the_dead_letter_topic_does_not_answer() {
    let topic = Topic::new("dlhang", 1);
    let endpoint = refusing_endpoint("bad".to_owned(), Duration::from_millis(300)).await;
    let mut ferry = Ferry::start(&Route {
        source: topic.source(),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: &format!("concurrency = 1\n{GRACE}"),
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    topic.publish(0..1).await;
    topic
        .cluster
        .fail_produce(RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS, 1000);
    let refused = wait_until(Duration::from_secs(30), || !endpoint.seen().is_empty()).await;
    assert!(refused, "no delivery; log:\n{}", ferry.log());
    // The dead letter is with librdkafka, which keeps retrying it.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let took = stop(&mut ferry).await;
    println!("shutdown took {took:?} with a dead letter the topic does not take");
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with shutdown_grace = 3s; log:\n{}",
        ferry.log()
    );
    assert_eq!(topic.lag().await, 1, "the record must stay uncommitted");
}

/// `dead_letters = "drop"`: each dead letter is logged with its id and reason, counted,
/// and committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_dead_letters_are_logged_counted_and_committed() {
    const N: usize = 5;
    let topic = Topic::new("dldrop", 1);
    let endpoint = refusing_endpoint("unwanted".to_owned(), Duration::ZERO).await;
    let line = format!("dead_letter_topic = \"{}\"\n", topic.dead);
    let source = topic.source().replace(&line, "dead_letters = \"drop\"\n");
    assert!(
        source.contains("drop") && !source.contains("dead_letter_topic"),
        "{source}"
    );
    let mut ferry = Ferry::start(&Route {
        source,
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    topic.publish(0..N).await;
    let dropped =
        r#"ferry_deliveries_total{route="r",source="kafka",sink="http",outcome="dropped"}"#;
    let mut count = 0.0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while count < N as f64 && Instant::now() < deadline {
        count = ferry.metric(dropped).await.unwrap_or(0.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(count, N as f64, "log:\n{}", ferry.log());
    let log = ferry.log();
    for offset in 0..N {
        let id = format!("{}-0-{offset}", topic.name);
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("dead letter dropped")
                && l.contains(&id)
                && l.contains("unwanted")),
            "no warning for {id}; log:\n{log}"
        );
    }
    let committed = ferry_e2e::until_zero(Duration::from_secs(10), || topic.lag()).await;
    assert_eq!(committed, Ok(()), "dropped dead letters are committed");
    stop(&mut ferry).await;
}

//! RabbitMQ dead letters are never discarded by accident: ferry publishes them to the
//! configured dead-letter exchange with confirms and acks the original only then; while
//! the exchange is missing the original stays on its queue; and a route that does not say
//! where dead letters go is refused at start.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::amqp::{header_text, Rabbit};
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, run_cli, scratch, Route};
use ferry_e2e::{unique, until_zero, wait_until, Endpoint, Ferry, Reply};
use lapin::types::FieldTable;

const N: usize = 40;

/// Every fourth message is bad: the endpoint answers 400 to it.
fn is_bad(body: &str) -> bool {
    body.rsplit('-')
        .next()
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i % 4 == 0)
}

async fn judging_endpoint() -> Endpoint {
    Endpoint::start(|seen| match seen.msg() {
        Some(body) if is_bad(&body) => Reply::status(400).body("bad order"),
        _ => Reply::ok(),
    })
    .await
}

fn messages(prefix: &str) -> Vec<Outgoing> {
    (0..N)
        .map(|i| Outgoing::plain(format!("{prefix}-{i}")))
        .collect()
}

/// Waits until `queue` holds `n` ready messages, then takes them: bodies and headers.
async fn take(rabbit: &Rabbit, queue: &str, n: usize) -> BTreeMap<String, Vec<FieldTable>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (rabbit.depth(queue).await as usize) < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A moment for any extra copy to land too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut by_body: BTreeMap<String, Vec<FieldTable>> = BTreeMap::new();
    for (body, headers) in rabbit.drain(queue).await {
        by_body.entry(body).or_default().push(headers);
    }
    by_body
}

/// Each bad message exactly once, with ferry's headers.
fn assert_dead_letters(found: &BTreeMap<String, Vec<FieldTable>>, sent: &[Outgoing]) {
    let bad: Vec<&str> = sent
        .iter()
        .map(|m| m.body.as_str())
        .filter(|b| is_bad(b))
        .collect();
    let bodies: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(
        bodies,
        sorted(&bad),
        "dead-letter queue holds the wrong messages"
    );
    for (body, copies) in found {
        assert_eq!(
            copies.len(),
            1,
            "{body} dead-lettered {} times",
            copies.len()
        );
        let headers = &copies[0];
        assert_eq!(
            header_text(headers, "ferry_reason").as_deref(),
            Some("bad order")
        );
        assert_eq!(header_text(headers, "ferry_status").as_deref(), Some("400"));
        assert_eq!(header_text(headers, "ferry_attempts").as_deref(), Some("1"));
        assert_eq!(header_text(headers, "ferry_route").as_deref(), Some("r"));
    }
}

fn sorted<'a>(items: &[&'a str]) -> Vec<&'a str> {
    let mut v = items.to_vec();
    v.sort_unstable();
    v
}

/// The RELIABILITY.md row of a scenario: sent, delivered unique, duplicates, lost,
/// dead-lettered.
fn print_row(
    scenario: &str,
    sent: &[Outgoing],
    endpoint: &Endpoint,
    dead: &BTreeMap<String, Vec<FieldTable>>,
) {
    let delivered = endpoint.delivered_set();
    let duplicates = endpoint.delivered().len() - delivered.len();
    let lost = sent
        .iter()
        .filter(|m| !delivered.contains(&m.body) && !dead.contains_key(&m.body))
        .count();
    let dead_lettered: usize = dead.values().map(Vec::len).sum();
    eprintln!(
        "| {scenario} | RabbitMQ | {} | {} | {duplicates} | {lost} | {dead_lettered} |",
        sent.len(),
        delivered.len()
    );
}

async fn dead_letter_failures(ferry: &Ferry) -> f64 {
    ferry
        .metric(r#"ferry_broker_errors_total{route="r",source="amqp",sink="http",operation="dead_letter"}"#)
        .await
        .unwrap_or(0.0)
}

async fn dead_lettered(ferry: &Ferry) -> f64 {
    ferry
        .metric(
            r#"ferry_deliveries_total{route="r",source="amqp",sink="http",outcome="dead_lettered"}"#,
        )
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_dead_letter_exchange_gets_each_dead_letter_once_with_its_reasons() {
    let rabbit = Rabbit::connect().await;
    let queue = unique("dlx-declared");
    let exchange = format!("{queue}.dlx");
    let endpoint = judging_endpoint().await;
    let url = endpoint.url();
    let ferry = Ferry::start(&Route {
        source: amqp_source(
            &queue,
            &format!("declare = true\ndead_letter_exchange = \"{exchange}\""),
        ),
        sink_url: &url,
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let sent = messages("d");
    rabbit.publish(&queue, &sent).await;

    let bad = sent.iter().filter(|m| is_bad(&m.body)).count();
    let good: Vec<&str> = sent
        .iter()
        .map(|m| m.body.as_str())
        .filter(|b| !is_bad(b))
        .collect();
    let found = take(&rabbit, &format!("{queue}.dead-letter"), bad).await;
    assert_dead_letters(&found, &sent);
    assert!(
        wait_until(Duration::from_secs(30), || endpoint.delivered_set().len()
            == good.len())
        .await,
        "accepted messages missing; log:\n{}",
        ferry.log()
    );
    let left = until_zero(Duration::from_secs(10), || rabbit.held(&queue)).await;
    assert_eq!(left, Ok(()), "messages left on the queue");
    assert_eq!(dead_lettered(&ferry).await, bad as f64);
    print_row(
        "endpoint 400 on a quarter, declare = true",
        &sent,
        &endpoint,
        &found,
    );
    drop(ferry);
    rabbit.delete(&queue).await;
    rabbit.delete(&format!("{queue}.dead-letter")).await;
    rabbit.delete_exchange(&exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unbound_dead_letter_exchange_keeps_the_original_until_it_is_back() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("dlx-missing").await;
    let exchange = format!("{}.dlx", queue.name);
    let dead_letter_queue = format!("{}.dead", queue.name);
    rabbit
        .bound_exchange(&exchange, &dead_letter_queue, "dead")
        .await;
    let endpoint = judging_endpoint().await;
    let url = endpoint.url();
    let ferry = Ferry::start(&Route {
        source: amqp_source(
            &queue.name,
            &format!("dead_letter_exchange = \"{exchange}\"\ndead_letter_routing_key = \"dead\""),
        ),
        sink_url: &url,
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    // Gone while ferry runs: its publishes fail until the exchange is back.
    rabbit.delete_exchange(&exchange).await;
    let sent = messages("m");
    rabbit.publish(&queue.name, &sent).await;
    let bad = sent.iter().filter(|m| is_bad(&m.body)).count();
    let good = N - bad;
    assert!(
        wait_until(Duration::from_secs(30), || endpoint.delivered_set().len()
            == good)
        .await,
        "accepted messages missing; log:\n{}",
        ferry.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Not acked, not lost, not rejected to the queue's own dead-letter queue either.
    assert_eq!(
        rabbit.held(&queue.name).await,
        bad as u64,
        "log:\n{}",
        ferry.log()
    );
    assert_eq!(rabbit.depth(&queue.dead_letter).await, 0);
    assert_eq!(dead_lettered(&ferry).await, 0.0);
    let failures = dead_letter_failures(&ferry).await;
    assert!(failures >= 1.0, "no dead_letter broker errors counted");
    let warnings = ferry.log().matches("cannot publish a dead letter").count();
    assert_eq!(
        warnings,
        1,
        "one warning per change of state; log:\n{}",
        ferry.log()
    );

    // Back but bound to nothing: the broker would drop what it cannot route, so ferry
    // publishes `mandatory` and keeps the originals while they come back unroutable.
    rabbit.exchange(&exchange).await;
    let before = dead_letter_failures(&ferry).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dead_letter_failures(&ferry).await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no publish to the unbound exchange was tried; log:\n{}",
            ferry.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rabbit.held(&queue.name).await,
        bad as u64,
        "log:\n{}",
        ferry.log()
    );
    assert_eq!(dead_lettered(&ferry).await, 0.0);

    rabbit
        .bound_exchange(&exchange, &dead_letter_queue, "dead")
        .await;
    let found = take(&rabbit, &dead_letter_queue, bad).await;
    assert_dead_letters(&found, &sent);
    let left = until_zero(Duration::from_secs(10), || rabbit.held(&queue.name)).await;
    assert_eq!(
        left,
        Ok(()),
        "originals not acked once their dead letters landed"
    );
    assert_eq!(dead_lettered(&ferry).await, bad as f64);
    assert!(ferry
        .log()
        .contains("dead letters land on the dead-letter exchange again"));
    print_row(
        "dead-letter exchange deleted mid-run, then unbound, then bound again",
        &sent,
        &endpoint,
        &found,
    );
    drop(ferry);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
    rabbit.delete(&dead_letter_queue).await;
    rabbit.delete_exchange(&exchange).await;
}

#[test]
fn a_route_that_does_not_say_where_dead_letters_go_is_refused() {
    let route = Route {
        source: "type = \"amqp\"\nuri = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nqueue = \"q\"\n"
            .into(),
        sink_url: "http://127.0.0.1:9/x",
        sink: "",
        delivery: "",
    };
    let file = scratch("dead-letters").join("ferry.toml");
    std::fs::write(&file, route.config(0)).expect("write config");
    let out = run_cli(&["validate", "--config", &file.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = ferry_e2e::ferry::fatal_lines(&out);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    assert!(lines[0].contains("routes.r.source:"), "{}", lines[0]);
    for needle in [
        "dead_letter_exchange",
        "dead_letters = \"queue\"",
        "\"drop\"",
    ] {
        assert!(lines[0].contains(needle), "{needle} not in {}", lines[0]);
    }
}

//! `ferry redrive` against the local RabbitMQ and the SQS emulator: dead letters made by a
//! real ferry go back to the route's queue, `--dry-run` counts, `--max` limits, and the
//! dead-letter marks do not travel back. Every message is counted in and out.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, run_cli, scratch, sqs_source, Route};
use ferry_e2e::{sqs, Endpoint, Ferry, Reply};

const N: usize = 30;

fn bodies(prefix: &str) -> Vec<String> {
    (0..N).map(|i| format!("{prefix}-{i}")).collect()
}

/// Dead-letters every message by answering 400, and waits until all are.
async fn dead_letter_all(route: &Route<'_>) {
    let mut ferry = Ferry::start(route);
    ferry.wait_ready(Duration::from_secs(30)).await;
    let metric = r#"ferry_deliveries_total{route="r","#;
    for _ in 0..300 {
        let text = ferry.metrics().await;
        let dead = text
            .lines()
            .filter(|l| l.starts_with(metric) && l.contains("dead_lettered"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        if dead >= N as f64 {
            // A clean stop finishes sending the dead letters it has settled.
            ferry.signal("TERM");
            let exit = ferry.wait_exit(Duration::from_secs(30)).await;
            assert!(
                exit.is_some_and(|s| s.success()),
                "{exit:?}; log:\n{}",
                ferry.log()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not all dead-lettered; log:\n{}", ferry.log());
}

/// Runs `ferry redrive` with the route's configuration; returns exit code and stdout.
fn redrive(route: &Route<'_>, args: &[&str]) -> (i32, String, String) {
    let config = scratch("redrive").join("ferry.toml");
    std::fs::write(&config, route.config(ferry_e2e::free_port())).expect("config");
    let config = config.display().to_string();
    let mut all = vec!["redrive", "--config", &config, "--route", "r"];
    all.extend_from_slice(args);
    let out = run_cli(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dead_letters_go_back_to_the_queue() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("redrive").await;
    let endpoint = Endpoint::start(|_| Reply::status(400)).await;
    let sent = bodies("amqp");
    let outgoing: Vec<_> = sent
        .iter()
        .map(|b| ferry_e2e::conformance::Outgoing::plain(b.clone()))
        .collect();
    rabbit.publish(&queue.name, &outgoing).await;
    let route = Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    };
    dead_letter_all(&route).await;
    assert_eq!(rabbit.depth(&queue.dead_letter).await, N as u32);

    let (code, _, err) = redrive(&route, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--from"), "{err}");
    let (code, out, err) = redrive(&route, &["--from", &queue.dead_letter, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("dry run: {N} message(s)")),
        "{out}"
    );
    assert_eq!(
        rabbit.depth(&queue.dead_letter).await,
        N as u32,
        "a dry run moves nothing"
    );
    let (code, out, err) = redrive(&route, &["--from", &queue.dead_letter, "--max", "12"]);
    assert_eq!(
        (code, out.trim()),
        (
            0,
            format!(
                "moved 12 message(s) from {} to {}",
                queue.dead_letter, queue.name
            )
            .as_str()
        ),
        "{err}"
    );
    let (code, out, err) = redrive(&route, &["--from", &queue.dead_letter]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("moved 18 message(s)"), "{out}");

    assert_eq!(rabbit.depth(&queue.dead_letter).await, 0);
    let back = rabbit.drain(&queue.name).await;
    let got: BTreeSet<String> = back.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(back.len(), N, "no duplicates");
    assert_eq!(got, sent.into_iter().collect());
    for (body, headers) in &back {
        assert!(
            !headers
                .inner()
                .keys()
                .any(|k| k.as_str().starts_with("x-death")),
            "{body} still carries x-death"
        );
    }
}

/// Dead letters ferry published to the exchange it declared go back from
/// `<queue>.dead-letter` without `--from`, and without ferry's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_dead_letters_from_the_declared_exchange_go_back_without_ferry_headers() {
    let rabbit = Rabbit::connect().await;
    let queue = ferry_e2e::unique("redrive-dlx");
    let exchange = format!("{queue}.dlx");
    let dead_letter_queue = format!("{queue}.dead-letter");
    let endpoint = Endpoint::start(|_| Reply::status(400)).await;
    let route = Route {
        source: amqp_source(
            &queue,
            &format!("declare = true\ndead_letter_exchange = \"{exchange}\""),
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    };
    // A first run declares the queues; the messages go in before the one that dead-letters.
    let (code, _, err) = redrive(&route, &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    let sent = bodies("dlx");
    let outgoing: Vec<_> = sent
        .iter()
        .map(|b| ferry_e2e::conformance::Outgoing::plain(b.clone()))
        .collect();
    rabbit.publish(&queue, &outgoing).await;
    dead_letter_all(&route).await;
    assert_eq!(rabbit.depth(&dead_letter_queue).await, N as u32);

    let (code, out, err) = redrive(&route, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("moved {N} message(s)")), "{out}");
    let back = rabbit.drain(&queue).await;
    let got: BTreeSet<String> = back.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(back.len(), N, "no duplicates");
    assert_eq!(got, sent.into_iter().collect());
    for (body, headers) in &back {
        let marks: Vec<&str> = headers
            .inner()
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("ferry_") || k.starts_with("x-death"))
            .collect();
        assert!(marks.is_empty(), "{body} still carries {marks:?}");
    }
    rabbit.delete(&queue).await;
    rabbit.delete(&dead_letter_queue).await;
    rabbit.delete_exchange(&exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_dead_letters_go_back_without_their_marks() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "redrive").await;
    let dlq = sqs::create_queue(&client, "redrive-dlq").await;
    let endpoint = Endpoint::start(|_| Reply::status(400)).await;
    let sent = bodies("sqs");
    sqs::send(&client, &queue, &sent).await;
    let route = Route {
        source: sqs_source(&queue, Some(&dlq), "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    };
    dead_letter_all(&route).await;

    let (code, out, err) = redrive(&route, &["--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("dry run: {N} message(s) in {dlq}")),
        "{out}"
    );
    let (code, out, err) = redrive(&route, &["--max", "12"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("moved 12 message(s) from {dlq} to {queue}")
    );
    let (code, out, err) = redrive(&route, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("moved 18 message(s)"), "{out}");

    assert_eq!(sqs::depth(&client, &dlq).await, (0, 0));
    let back = sqs::drain(&client, &queue).await;
    let got: BTreeSet<String> = back.iter().map(|m| m.body.clone()).collect();
    assert_eq!(back.len(), N, "no duplicates");
    assert_eq!(got, sent.into_iter().collect());
    for m in &back {
        assert!(
            !m.attributes.keys().any(|k| k.starts_with("ferry_")),
            "{} still carries {:?}",
            m.body,
            m.attributes
        );
    }
}

#[test]
fn an_unknown_route_is_a_configuration_error() {
    let route = Route {
        source: amqp_source("q", ""),
        sink_url: "http://127.0.0.1:9/x",
        sink: "",
        delivery: "",
    };
    let config = scratch("redrive").join("ferry.toml");
    std::fs::write(&config, route.config(ferry_e2e::free_port())).expect("config");
    let out = run_cli(&[
        "redrive",
        "--config",
        &config.display().to_string(),
        "--route",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        ferry_e2e::ferry::fatal_lines(&out),
        ["ferry: --route: no route named \"nope\" (routes: r)"]
    );
}

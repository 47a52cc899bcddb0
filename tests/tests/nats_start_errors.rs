//! A NATS route that cannot start says why in one line: an unreachable server exits 1; a
//! missing stream or consumer (without `declare`), or a dead-letter subject no stream
//! captures, exits 2.

use async_nats::jetstream::consumer::{pull, AckPolicy};
use ferry_e2e::conformance::nats::{self, NatsStream, CONSUMER};
use ferry_e2e::ferry::{fatal_lines, run_cli, scratch, Route};

/// Runs `ferry run` on a route with this source and returns the exit code and the lines
/// that are not log lines.
fn run(source: &str) -> (Option<i32>, Vec<String>) {
    let route = Route {
        source: source.to_owned(),
        sink_url: "http://127.0.0.1:9/x",
        sink: "",
        delivery: "",
    };
    let file = scratch("nats-start").join("ferry.toml");
    std::fs::write(&file, route.config(ferry_e2e::free_port())).expect("write config");
    let out = run_cli(&["run", "--config", &file.display().to_string()]);
    (out.status.code(), fatal_lines(&out))
}

fn source(url: &str, stream: &str, extra: &str) -> String {
    format!(
        "type = \"nats\"\nurl = \"{url}\"\nstream = \"{stream}\"\nconsumer = \"{CONSUMER}\"\n{extra}\n"
    )
}

fn one_line(lines: &[String], code: Option<i32>, expected: i32) -> &str {
    assert_eq!(code, Some(expected), "exit code; stderr lines: {lines:?}");
    assert_eq!(lines.len(), 1, "one line, not {lines:?}");
    &lines[0]
}

#[test]
fn an_unreachable_server_exits_1_in_one_line_without_the_password() {
    let port = ferry_e2e::free_port();
    let url = format!("nats://ferry:s3cret@127.0.0.1:{port}");
    let (code, lines) = run(&source(
        &url,
        "ORDERS",
        "declare = true\ndead_letters = \"term\"",
    ));
    let line = one_line(&lines, code, 1);
    assert!(line.contains("routes.r.source.url"), "{line}");
    assert!(line.contains(&port.to_string()), "{line}");
    assert!(!line.contains("s3cret"), "the password is shown: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_or_consumer_without_declare_exits_2() {
    let url = format!("nats://{}", nats::ADDR);
    let missing = ferry_e2e::unique("nostream");
    let (code, lines) = run(&source(&url, &missing, "dead_letters = \"term\""));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.stream")
            && line.contains(&missing)
            && line.contains("declare = true"),
        "{line}"
    );

    // The stream exists, the consumer does not.
    let s = NatsStream::on_local("noconsumer").await;
    let (code, lines) = run(&source(&url, &s.stream, "dead_letters = \"term\""));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.consumer") && line.contains(CONSUMER),
        "{line}"
    );

    // No stream captures the dead-letter subject (the consumer exists: without
    // `declare`, nothing is created).
    s.js.get_stream(&s.stream)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("create the consumer");
    let nowhere = ferry_e2e::unique("nowhere");
    let (code, lines) = run(&source(
        &url,
        &s.stream,
        &format!("dead_letter_subject = \"{nowhere}\""),
    ));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.dead_letter_subject") && line.contains(&nowhere),
        "{line}"
    );

    // The dead-letter subject is the route's own stream's.
    let own = format!("{}.dead", s.stream);
    let (code, lines) = run(&source(
        &url,
        &s.stream,
        &format!("declare = true\ndead_letter_subject = \"{own}\""),
    ));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.dead_letter_subject") && line.contains("delivered again"),
        "{line}"
    );
}

//! A Redis route that cannot start says why in one line: unreachable Redis exits 1, a
//! missing group (without `declare`) or a key that is not a stream exits 2.

use ferry_e2e::conformance::redis::{Redis, GROUP};
use ferry_e2e::ferry::{fatal_lines, run_cli, scratch, Route};
use redis::AsyncCommands;

/// Runs `ferry run` on a route with this source and returns the exit code and the lines
/// that are not log lines.
fn run(source: &str) -> (Option<i32>, Vec<String>) {
    let route = Route {
        source: source.to_owned(),
        sink_url: "http://127.0.0.1:9/x",
        sink: "",
        delivery: "",
    };
    let file = scratch("redis-start").join("ferry.toml");
    std::fs::write(&file, route.config(ferry_e2e::free_port())).expect("write config");
    let out = run_cli(&["run", "--config", &file.display().to_string()]);
    (out.status.code(), fatal_lines(&out))
}

fn source(url: &str, stream: &str, extra: &str) -> String {
    format!(
        "type = \"redis\"\nurl = \"{url}\"\nstream = \"{stream}\"\ngroup = \"{GROUP}\"\n\
         dead_letters = \"drop\"\n{extra}\n"
    )
}

fn one_line(lines: &[String], code: Option<i32>, expected: i32) -> &str {
    assert_eq!(code, Some(expected), "exit code; stderr lines: {lines:?}");
    assert_eq!(lines.len(), 1, "one line, not {lines:?}");
    &lines[0]
}

#[test]
fn unreachable_redis_exits_1_in_one_line_without_the_password() {
    let port = ferry_e2e::free_port();
    let url = format!("redis://:s3cret@127.0.0.1:{port}/");
    let (code, lines) = run(&source(&url, "orders", "declare = true"));
    let line = one_line(&lines, code, 1);
    assert!(line.contains("routes.r.source.url"), "{line}");
    assert!(line.contains(&port.to_string()), "{line}");
    assert!(!line.contains("s3cret"), "the password is shown: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_group_or_stream_without_declare_exits_2() {
    let redis = Redis::connect().await;
    let mut con = redis.con();
    let stream = ferry_e2e::unique("nogroup");
    let (code, lines) = run(&source("redis://127.0.0.1:6379/", &stream, ""));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.stream") && line.contains("declare = true"),
        "{line}"
    );

    // The stream exists, the group does not.
    let _: String = con
        .xadd(&stream, "*", &[("body", "x")])
        .await
        .expect("XADD");
    let (code, lines) = run(&source("redis://127.0.0.1:6379/", &stream, ""));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.group") && line.contains(GROUP),
        "{line}"
    );
    let _: i64 = con.del(&stream).await.expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_a_stream_exits_2() {
    let redis = Redis::connect().await;
    let mut con = redis.con();
    let list = ferry_e2e::unique("list");
    let _: i64 = con.rpush(&list, "x").await.expect("RPUSH");
    let (code, lines) = run(&source("redis://127.0.0.1:6379/", &list, "declare = true"));
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.stream") && line.contains("list"),
        "{line}"
    );

    // The dead-letter key too.
    let stream = ferry_e2e::unique("dlwrong");
    let with_dead = format!(
        "type = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\nstream = \"{stream}\"\ngroup = \"{GROUP}\"\n\
         declare = true\ndead_letter_stream = \"{list}\"\n"
    );
    let (code, lines) = run(&with_dead);
    let line = one_line(&lines, code, 2);
    assert!(
        line.contains("routes.r.source.dead_letter_stream") && line.contains("list"),
        "{line}"
    );
    let _: i64 = con.del(&[&list, &stream]).await.expect("DEL");
}

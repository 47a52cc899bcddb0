//! What an operator reads when something is wrong: `FERRY_LOG`, which files were loaded,
//! every configuration mistake at once, broker and credential errors on one line, JSON
//! fatal errors, `--help` and `--version`.

use std::process::Output;

use ferry_e2e::ferry::{fatal_lines, run_cli, run_cli_env, scratch};

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn route(sink_extra: &str, delivery: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[routes.orders.source]
type = "sqs"
queue_url = "http://127.0.0.1:4566/000000000000/orders"
endpoint_url = "{endpoint}"
region = "us-east-1"
[routes.orders.sink]
type = "http"
url = "http://127.0.0.1:9/x"
{sink_extra}
[routes.orders.delivery]
{delivery}
"#,
        endpoint = ferry_e2e::sqs_endpoint()
    )
}

#[test]
fn ferry_log_blank_means_info_and_an_unknown_level_is_refused() {
    let dir = scratch("diag-log");
    let file = write(&dir, "ok.toml", &route("", ""));
    // Blank: the default level, so the info line about the loaded file is there.
    let out = run_cli_env(&["validate", "--config", &file], &[("FERRY_LOG", Some(""))]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("configuration loaded"),
        "{}",
        stderr(&out)
    );
    // `warning` is taken for `warn`: warnings still show.
    let warned = route("", "");
    let warned = warned.replace("127.0.0.1:0", "0.0.0.0:0");
    let file_warned = write(&dir, "warned.toml", &warned);
    let out = run_cli_env(
        &["validate", "--config", &file_warned],
        &[("FERRY_LOG", Some("warning"))],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("WARN"),
        "a warning is hidden: {}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("INFO"), "{}", stderr(&out));
    for bad in ["verbose", "info,aws=loud"] {
        let out = run_cli_env(
            &["validate", "--config", &file],
            &[("FERRY_LOG", Some(bad))],
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "FERRY_LOG={bad}: {}",
            stderr(&out)
        );
        let lines = fatal_lines(&out);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("ferry: FERRY_LOG: "), "{lines:?}");
    }
}

#[test]
fn every_mistake_is_listed_with_its_key_and_its_file() {
    let dir = scratch("diag-errors");
    write(
        &dir,
        "config/config.toml",
        &route(
            "timeout = \"-5s\"",
            "concurrency = -1\ndead_letter_statuses = [200]",
        ),
    );
    write(
        &dir,
        "config/uat/config.toml",
        "[routes.orders.delivery]\nmax_attempts = \"x\"\n",
    );
    let tree = dir.join("config").display().to_string();
    let out = run_cli_env(
        &["validate", "--config-dir", &tree],
        &[("ENV", Some("uat")), ("SCOPE", Some("uatt"))],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let lines = fatal_lines(&out);
    let expect = [
        (
            "routes.orders.delivery.concurrency",
            "a positive integer or \"adaptive\"",
        ),
        ("routes.orders.delivery.max_attempts", "uat/config.toml)"),
        ("routes.orders.sink.timeout", "cannot be negative"),
        (
            "routes.orders.delivery.dead_letter_statuses",
            "success status",
        ),
    ];
    for (at, what) in expect {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("ferry: {at}: ")) && l.contains(what)),
            "no {at} ... {what} in {lines:?}"
        );
    }
    assert_eq!(lines.len(), expect.len(), "{lines:?}");
    // The typo'd scope is named, with the file ferry looked for.
    let text = stderr(&out);
    assert!(
        text.lines().any(|l| l.contains("WARN")
            && l.contains("SCOPE=uatt")
            && l.contains("uatt.config.toml")),
        "{text}"
    );
}

#[test]
fn json_logs_make_fatal_errors_json_and_lists_arrays() {
    let dir = scratch("diag-json");
    let file = write(
        &dir,
        "bad.toml",
        &route("", "concurrency = -1\nmax_attempts = \"x\""),
    );
    let out = run_cli(&["--log-format", "json", "validate", "--config", &file]);
    assert_eq!(out.status.code(), Some(2));
    let lines: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let errors: Vec<_> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 2, "{lines:?}");
    assert_eq!(
        errors[0]["fields"]["at"],
        "routes.orders.delivery.concurrency"
    );
    let loaded = lines
        .iter()
        .find(|l| l["fields"]["message"] == "configuration loaded")
        .expect("the loaded line");
    assert_eq!(loaded["fields"]["files"], serde_json::json!([file]));
}

#[test]
fn help_and_version_are_for_users() {
    let help = String::from_utf8_lossy(&run_cli(&["--help"]).stdout).into_owned();
    for needle in [
        "POSTs each one",
        "FERRY_LOG",
        "ENV",
        "SCOPE",
        ".yml",
        "--config-dir",
    ] {
        assert!(help.contains(needle), "{needle:?} not in --help:\n{help}");
    }
    let version = String::from_utf8_lossy(&run_cli(&["--version"]).stdout).into_owned();
    assert!(version.contains("features: sqs, amqp, kafka"), "{version}");
}

#[tokio::test]
async fn missing_aws_credentials_say_where_ferry_looked() {
    let dir = scratch("diag-creds");
    let file = write(&dir, "c.toml", &route("", ""));
    let home = dir.display().to_string();
    let out = run_cli_env(
        &["run", "--config", &file],
        &[
            ("AWS_ACCESS_KEY_ID", None),
            ("AWS_SECRET_ACCESS_KEY", None),
            ("AWS_PROFILE", None),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", None),
            ("HOME", Some(&home)),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let lines = fatal_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("credentials: none found"), "{lines:?}");
    assert!(lines[0].contains("AWS_ACCESS_KEY_ID"), "{lines:?}");
    assert!(
        !lines[0].contains("queue_url"),
        "blames the queue: {lines:?}"
    );
    assert!(lines[0].len() < 700, "{} characters", lines[0].len());
    assert!(
        !stderr(&out).contains("Extensions"),
        "a debug dump: {}",
        stderr(&out)
    );
}

#[test]
fn an_unreachable_sqs_endpoint_is_one_readable_line() {
    let dir = scratch("diag-unreachable");
    let port = ferry_e2e::free_port();
    let text = route("", "").replace(
        &format!("endpoint_url = \"{}\"", ferry_e2e::sqs_endpoint()),
        &format!("endpoint_url = \"http://127.0.0.1:{port}\""),
    );
    let file = write(&dir, "u.toml", &text);
    let out = run_cli(&["run", "--config", &file]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = fatal_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(&format!(
            "cannot reach endpoint_url http://127.0.0.1:{port}"
        )) && lines[0].contains("Connection refused"),
        "{lines:?}"
    );
    assert!(
        lines[0].len() < 400,
        "{} characters: {lines:?}",
        lines[0].len()
    );
}

/// `ferry check` before a deploy: a route whose queue and endpoint are there passes; a
/// route whose queue does not exist and whose endpoint does not answer fails on both
/// lines, with the reason, and nothing is received or delivered.
// Two threads: the endpoint answers while the test waits for the `ferry check` process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_is_there_and_what_is_not() {
    let sqs = ferry_e2e::sqs::client().await;
    let queue = ferry_e2e::sqs::create_queue(&sqs, "check").await;
    ferry_e2e::sqs::send(&sqs, &queue, &["stays".to_owned()]).await;
    let endpoint = ferry_e2e::endpoint::Endpoint::start(|_| ferry_e2e::endpoint::Reply::ok()).await;
    let closed = ferry_e2e::free_port();
    let dir = scratch("diag-check");
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[routes.good.source]
type = "sqs"
queue_url = "{queue}"
endpoint_url = "{sqs_endpoint}"
region = "us-east-1"
[routes.good.sink]
type = "http"
url = "{url}"
[routes.bad.source]
type = "amqp"
uri = "{amqp}"
queue = "ferry-check-no-such-queue"
dead_letters = "drop"
[routes.bad.sink]
type = "http"
url = "http://127.0.0.1:{closed}/x"
"#,
        sqs_endpoint = ferry_e2e::sqs_endpoint(),
        url = endpoint.url(),
        amqp = ferry_e2e::amqp::amqp_uri(),
    );
    let file = write(&dir, "check.toml", &text);
    let out = run_cli(&["check", "--config", &file]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", stderr(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let line = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {stdout}"))
            .to_string()
    };
    assert!(line("routes.good.source").starts_with("✓"), "{stdout}");
    assert!(line("routes.good.sink").starts_with("✓"), "{stdout}");
    let bad_source = line("routes.bad.source");
    assert!(
        bad_source.starts_with("✗") && bad_source.contains("ferry-check-no-such-queue"),
        "{stdout}"
    );
    let bad_sink = line("routes.bad.sink");
    assert!(
        bad_sink.starts_with("✗") && bad_sink.contains(&closed.to_string()),
        "{stdout}"
    );
    assert!(
        stderr(&out).contains("2 of 4 checks failed"),
        "{}",
        stderr(&out)
    );
    // The endpoint was asked once and given no message; the message is still on its queue.
    let seen = endpoint.seen();
    assert_eq!(seen.len(), 1, "one probe");
    assert!(
        seen[0].id.is_empty() && seen[0].body.is_empty(),
        "a message was delivered"
    );
    let (visible, invisible) = ferry_e2e::sqs::depth(&sqs, &queue).await;
    assert_eq!((visible, invisible), (1, 0));
}

/// A reader of stderr that stops reading (a stalled log shipper, a parent that never
/// reads) fills the pipe, and a write to a full pipe blocks. ferry must go on delivering,
/// stop on SIGTERM, and count the lines it could not write, not hang in a log write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_stops_no_delivery_and_no_shutdown() {
    use ferry_e2e::amqp::Rabbit;
    use ferry_e2e::ferry::{amqp_source, Route};
    use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};
    use std::time::Duration;

    const N: usize = 3000;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("unread-log").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let url = endpoint.url();
    let route = Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &url,
        sink: "",
        delivery: "concurrency = 16",
    };
    // Every message writes a few debug lines: far more than a pipe holds (64 KiB).
    let mut ferry = Ferry::start_unread(&route, "debug");
    ferry.wait_ready(Duration::from_secs(30)).await;
    let sent = rabbit.publish_numbered(&queue.name, "log", N).await;
    let all = wait_until(Duration::from_secs(60), || {
        endpoint.delivered_set().len() >= N
    })
    .await;
    assert!(
        all,
        "{} of {N} delivered with nobody reading stderr",
        endpoint.delivered_set().len()
    );
    assert_eq!(endpoint.delivered_set(), sent);
    let dropped = ferry
        .metric("ferry_log_lines_dropped_total")
        .await
        .expect("ferry_log_lines_dropped_total");
    assert!(
        dropped > 0.0,
        "no log line dropped: did the pipe ever fill?"
    );
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit on SIGTERM: {status:?}"
    );
}

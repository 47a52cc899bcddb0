//! Bad input at the command line: one clear line naming what and where, exit code 2 for
//! configuration errors, never a panic; and `validate` showing the resolved configuration.

use std::process::Output;

use ferry_e2e::ferry::{fatal_lines, run_cli, scratch};
use ferry_e2e::sqs;

fn write(name: &str, text: &str) -> String {
    let path = scratch("cli").join(name);
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// Exit 2 and exactly one stderr line that contains every `needle`.
fn assert_config_error(out: &Output, needles: &[&str]) {
    let lines = fatal_lines(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(lines.len(), 1, "expected one line, got {lines:?}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{needle:?} not in {:?}",
            lines[0]
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn config(queue_url: &str, sink_url: &str, extra_sink: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[routes.orders.source]
type = "sqs"
queue_url = "{queue_url}"
endpoint_url = "{endpoint}"
region = "us-east-1"
[routes.orders.sink]
type = "http"
url = "{sink_url}"
{extra_sink}
"#,
        endpoint = ferry_e2e::sqs_endpoint()
    )
}

#[test]
fn unknown_key_is_named_with_its_path() {
    let file = write(
        "unknown.toml",
        &config(
            "http://127.0.0.1:4566/000000000000/q",
            "http://127.0.0.1:9/x",
            "urll = \"x\"",
        ),
    );
    for cmd in ["validate", "run"] {
        let out = run_cli(&[cmd, "--config", &file]);
        assert_config_error(&out, &["routes.orders.sink", "unknown field `urll`"]);
    }
}

#[test]
fn missing_file_is_named() {
    let out = run_cli(&["run", "--config", "/nonexistent/ferry.toml"]);
    assert_config_error(&out, &["/nonexistent/ferry.toml", "No such file"]);
}

#[test]
fn malformed_url_is_named_with_its_path() {
    let file = write(
        "badurl.toml",
        &config("http://127.0.0.1:4566/000000000000/q", "not a url", ""),
    );
    let out = run_cli(&["run", "--config", &file]);
    assert_config_error(
        &out,
        &["routes.orders.sink.url: relative URL without a base"],
    );
}

#[test]
fn broken_toml_names_file_and_line() {
    let file = write("broken.toml", "[routes.orders\ntype = 1\n");
    let out = run_cli(&["validate", "--config", &file]);
    assert_config_error(&out, &["broken.toml", "line 1"]);
}

#[test]
fn missing_secret_variable_is_an_error_not_an_empty_header() {
    let file = write(
        "secret.toml",
        &config(
            "http://127.0.0.1:4566/000000000000/q",
            "http://127.0.0.1:9/x",
            "headers = { Authorization = \"Bearer ${FERRY_TEST_UNSET_TOKEN}\" }",
        ),
    );
    let out = run_cli(&["validate", "--config", &file]);
    assert_config_error(
        &out,
        &[
            "routes.orders.sink.headers.Authorization",
            "FERRY_TEST_UNSET_TOKEN is not set",
        ],
    );
}

#[tokio::test]
async fn wrong_queue_url_is_named_at_start() {
    // Needs the emulator: the queue check is a real call.
    let _client = sqs::client().await;
    let file = write(
        "noqueue.toml",
        &config(
            "http://127.0.0.1:4566/000000000000/no-such-queue-for-ferry",
            "http://127.0.0.1:9/x",
            "",
        ),
    );
    let out = run_cli(&["run", "--config", &file]);
    assert_config_error(
        &out,
        &["routes.orders.source.queue_url", "no-such-queue-for-ferry"],
    );
}

#[test]
fn validate_prints_layers_merged_with_secrets_redacted() {
    let dir = scratch("layers");
    std::fs::create_dir_all(dir.join("prod")).expect("mkdir");
    std::fs::write(
        dir.join("config.toml"),
        config(
            "http://127.0.0.1:4566/000000000000/base",
            "http://127.0.0.1:9/base",
            "headers = { Authorization = \"Bearer ${FERRY_TEST_TOKEN}\" }",
        ),
    )
    .expect("write");
    std::fs::write(
        dir.join("prod/config.yaml"),
        "routes:\n  orders:\n    sink:\n      url: http://127.0.0.1:9/prod\n      pool_size: 7\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("prod/eu.config.toml"),
        "[routes.orders.delivery]\nconcurrency = 3\n",
    )
    .expect("write");
    let out = std::process::Command::new(ferry_e2e::ferry::binary())
        .args(["validate", "--config-dir"])
        .arg(&dir)
        .env("ENV", "prod")
        .env("SCOPE", "eu")
        .env("FERRY_TEST_TOKEN", "s3cret-value")
        .env("FERRY__ROUTES__ORDERS__DELIVERY__MAX_ATTEMPTS", "4")
        .output()
        .expect("run validate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("url = \"http://127.0.0.1:9/prod\""), "{text}");
    assert!(text.contains("pool_size = 7"), "{text}");
    assert!(text.contains("concurrency = 3"), "{text}");
    assert!(text.contains("max_attempts = 4"), "{text}");
    assert!(
        text.contains("queue_url = \"http://127.0.0.1:4566/000000000000/base\""),
        "{text}"
    );
    assert!(!text.contains("s3cret-value"), "secret printed: {text}");
    assert!(text.contains("<redacted>"), "{text}");
}

fn amqp_config(uri: &str, queue: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[routes.events.source]
type = "amqp"
uri = "{uri}"
queue = "{queue}"
dead_letters = "queue"
[routes.events.sink]
type = "http"
url = "http://127.0.0.1:9/x"
"#
    )
}

#[tokio::test]
async fn missing_rabbitmq_queue_is_named_at_start() {
    // Needs the broker: the queue check is a real passive declare.
    let _rabbit = ferry_e2e::amqp::Rabbit::connect().await;
    let file = write(
        "noamqpqueue.toml",
        &amqp_config(&ferry_e2e::amqp_uri(), "no-such-queue-for-ferry"),
    );
    let out = run_cli(&["run", "--config", &file]);
    assert_config_error(&out, &["routes.events.source", "no-such-queue-for-ferry"]);
}

#[tokio::test]
async fn refused_rabbitmq_login_is_one_line_without_the_password() {
    let _rabbit = ferry_e2e::amqp::Rabbit::connect().await;
    let file = write(
        "badlogin.toml",
        &amqp_config("amqp://guest:not-the-password@127.0.0.1:5672/%2f", "q"),
    );
    let out = run_cli(&["run", "--config", &file]);
    assert_config_error(&out, &["routes.events.source"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("not-the-password"),
        "password leaked: {text}"
    );
}

fn kafka_config(brokers: &str, topic: &str, extra: &str) -> String {
    kafka_config_with(brokers, topic, "dead_letters = \"drop\"", extra)
}

/// `dead_letters` holds the route's dead-letter keys, `extra` what follows them.
fn kafka_config_with(brokers: &str, topic: &str, dead_letters: &str, extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[routes.clicks.source]
type = "kafka"
brokers = "{brokers}"
group_id = "ferry-cli"
topics = ["{topic}"]
{dead_letters}
{extra}
[routes.clicks.sink]
type = "http"
url = "http://127.0.0.1:9/x"
"#
    )
}

#[test]
fn missing_kafka_topic_is_named_at_start() {
    let cluster = ferry_e2e::kafka::Cluster::start();
    cluster.create_topic("present", 1);
    let file = write(
        "nokafkatopic.toml",
        &kafka_config(cluster.bootstrap(), "no-such-topic-for-ferry", ""),
    );
    let out = run_cli(&["run", "--config", &file]);
    assert_config_error(
        &out,
        &["routes.clicks.source.topics", "no-such-topic-for-ferry"],
    );
}

#[test]
fn kafka_settings_ferry_owns_are_refused_and_values_stay_secret() {
    let file = write(
        "kafkaowned.toml",
        &kafka_config(
            "127.0.0.1:9092",
            "t",
            "[routes.clicks.source.librdkafka]\nenable.auto.commit = true\n\"sasl.password\" = \"hunter2\"",
        ),
    );
    let out = run_cli(&["validate", "--config", &file]);
    assert_config_error(
        &out,
        &["routes.clicks.source.librdkafka.enable.auto.commit"],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("hunter2"), "secret leaked: {text}");
}

/// Without a dead-letter topic the route must say that dead letters are dropped; saying
/// both is a contradiction. Each is one line naming the key.
#[test]
fn kafka_without_a_dead_letter_destination_is_refused() {
    let file = write(
        "kafkanodlq.toml",
        &kafka_config_with("127.0.0.1:9092", "t", "", ""),
    );
    let out = run_cli(&["validate", "--config", &file]);
    assert_config_error(
        &out,
        &["routes.clicks.source: no dead-letter destination: set dead_letter_topic, or dead_letters = \"drop\" to drop dead letters"],
    );
    let file = write(
        "kafkaboth.toml",
        &kafka_config_with(
            "127.0.0.1:9092",
            "t",
            "dead_letter_topic = \"t-dlq\"\ndead_letters = \"drop\"",
            "",
        ),
    );
    let out = run_cli(&["validate", "--config", &file]);
    assert_config_error(&out, &["routes.clicks.source.dead_letters"]);
    let file = write("kafkadrop.toml", &kafka_config("127.0.0.1:9092", "t", ""));
    let out = run_cli(&["validate", "--config", &file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unreachable_kafka_is_one_line_naming_the_brokers() {
    let port = ferry_e2e::free_port();
    let brokers = format!("127.0.0.1:{port}");
    let file = write("nokafka.toml", &kafka_config(&brokers, "t", ""));
    let out = run_cli(&["run", "--config", &file]);
    let lines = fatal_lines(&out);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(lines.len(), 1, "expected one line, got {lines:?}");
    assert!(
        lines[0].contains("routes.clicks.source.brokers"),
        "{lines:?}"
    );
    assert!(lines[0].contains(&brokers), "{lines:?}");
}

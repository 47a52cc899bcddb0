//! No secret leaves ferry: a configuration with a distinct secret in every place that can
//! hold one (URL passwords and query values, headers, the signing key, the admin token,
//! the Redis password, the OTLP headers), run with `FERRY_LOG=debug` and JSON logs through
//! deliveries, a retry and an exporter that cannot reach its collector, shows none of them
//! in the log, `ferry validate`, `/metrics`, `/routes`, `/status` or the audit file.

use std::time::Duration;

use ferry_e2e::endpoint::{Endpoint, Reply};
use ferry_e2e::ferry::{run_cli, scratch, Ferry};
use ferry_e2e::sqs;

const SECRETS: [&str; 9] = [
    "SinkPassw0rdXYZ",
    "SinkQueryK3yXYZ",
    "HealthT0kenXYZ",
    "HeaderBear3rXYZ",
    "SigningS3cretXYZSigningS3cretXYZSigningS3cre",
    "AdminT0ken-0123456789XYZ",
    "RedisPassw0rdXYZ",
    "OtlpHead3rXYZ",
    "OtlpQueryK3yXYZ",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_anywhere() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "secrets").await;
    // The first request of each message fails once, so that retries are logged too.
    let endpoint = Endpoint::start(|seen| {
        // The health check (no message) passes.
        if !seen.id.is_empty() && seen.attempt <= 1 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    })
    .await;
    let dir = scratch("secrets");
    let audit = dir.join("audit.jsonl");
    let collector = ferry_e2e::free_port();
    let [sink_pw, sink_query, health, header, signing, token, redis_pw, otlp_header, otlp_query] =
        SECRETS;
    let port = endpoint.addr().port();
    let (queue_url, audit_path) = (queue.clone(), audit.clone());
    let config = move |admin_port: u16| {
        format!(
            r#"
[admin]
listen = "127.0.0.1:{admin_port}"
token = "{token}"
[admin.state]
redis_url = "redis://:{redis_pw}@127.0.0.1:6379"
key_prefix = "ferry-secrets-{admin_port}"
[audit]
path = "{audit}"
[otlp]
endpoint = "http://127.0.0.1:{collector}/?key={otlp_query}"
headers = {{ authorization = "{otlp_header}" }}
timeout = "1s"
[routes.orders.source]
type = "sqs"
queue_url = "{queue_url}"
endpoint_url = "{sqs_endpoint}"
region = "us-east-1"
wait_time = "1s"
[routes.orders.sink]
type = "http"
url = "http://user:{sink_pw}@127.0.0.1:{port}/orders?api_key={sink_query}"
health_url = "http://127.0.0.1:{port}/health?token={health}"
headers = {{ Authorization = "Bearer {header}" }}
signing = {{ secret = "{signing}" }}
[routes.orders.delivery]
min_backoff = "50ms"
max_backoff = "100ms"
"#,
            audit = audit_path.display(),
            sqs_endpoint = ferry_e2e::sqs_endpoint(),
        )
    };
    let file = dir.join("validate.toml");
    std::fs::write(&file, config(1)).expect("write");
    let validate = run_cli(&["validate", "--config", &file.display().to_string()]);
    assert_eq!(
        validate.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );

    let ferry = Ferry::start_config_logged(config, &["--log-format", "json"], "debug");
    ferry.wait_ready(Duration::from_secs(30)).await;
    let bodies: Vec<String> = (0..5).map(|i| format!("order-{i}")).collect();
    sqs::send(&client, &queue, &bodies).await;
    // Messages only: the health checks carry no id.
    let delivered = || {
        endpoint
            .delivered_set()
            .into_iter()
            .filter(|id| !id.is_empty())
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while delivered() < bodies.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(delivered(), bodies.len(), "log:\n{}", ferry.log());
    let metrics = ferry.metrics().await;
    let routes = reqwest::get(format!("http://127.0.0.1:{}/routes", ferry.admin_port))
        .await
        .expect("GET /routes")
        .text()
        .await
        .expect("routes");
    let status = reqwest::get(format!("http://127.0.0.1:{}/status", ferry.admin_port))
        .await
        .expect("GET /status")
        .text()
        .await
        .expect("status");
    // The exporter has tried (and failed) to reach its collector by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ferry.signal("TERM");
    let mut ferry = ferry;
    ferry.wait_exit(Duration::from_secs(30)).await;
    let log = ferry.log();
    let audit_text = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(
        log.lines().count() > 10,
        "too little logged to mean anything:\n{log}"
    );
    assert!(
        log.contains("\"attempt\""),
        "no per-message debug lines:\n{log}"
    );
    assert!(!audit_text.is_empty(), "no audit records");
    for (what, text) in [
        ("the log", log.as_str()),
        ("ferry validate", &String::from_utf8_lossy(&validate.stdout)),
        ("/metrics", metrics.as_str()),
        ("/routes", routes.as_str()),
        ("/status (the status page's data)", status.as_str()),
        ("the audit file", audit_text.as_str()),
    ] {
        for secret in SECRETS {
            assert!(
                !text.contains(secret),
                "{secret} appears in {what}:\n{text}"
            );
        }
    }
    // The endpoint did get what it is owed: the secrets are in the requests, not lost.
    let seen = endpoint.delivered();
    let message = seen.iter().find(|s| !s.id.is_empty()).expect("a message");
    assert!(message.headers.get("authorization").is_some());
}

//! Operating ferry: pause and resume through the admin API, shared by two replicas through
//! the local Redis, with the admin token, the original service's `/consumer/*` calls, and
//! a replica that loses Redis keeping its last state.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::proxy::Proxy;
use ferry_e2e::{unique, wait_until, Endpoint, Ferry, Reply};
use serde_json::Value;

const TOKEN: &str = "test-admin-token";

/// `[admin]` lines: the token and the shared state under a key of the test's own.
fn shared_admin(redis: &str, prefix: &str) -> String {
    format!(
        "token = \"{TOKEN}\"\n[admin.state]\nredis_url = \"redis://{redis}\"\nkey_prefix = \"{prefix}\"\npoll_interval = \"200ms\"\n"
    )
}

async fn call(
    method: reqwest::Method,
    ferry: &Ferry,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(
        method,
        format!("http://127.0.0.1:{}{path}", ferry.admin_port),
    );
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("admin call");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("admin answer body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body)
}

async fn put(ferry: &Ferry, path: &str, token: Option<&str>) -> (u16, Value) {
    call(reqwest::Method::PUT, ferry, path, token).await
}

async fn route_state(ferry: &Ferry) -> String {
    let (status, body) = call(reqwest::Method::GET, ferry, "/routes/r", None).await;
    assert_eq!(status, 200, "{body}");
    body["state"].as_str().expect("state").to_owned()
}

async fn wait_state(ferry: &Ferry, state: &str, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if route_state(ferry).await == state {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Two replicas on one queue share pause/resume through Redis: pausing one stops both
/// within two seconds, nothing reaches the endpoint while paused, and after a resume on
/// the other replica every message arrives exactly once. A wrong token changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_on_one_replica_pauses_every_replica() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("pause").await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(2))).await;
    let prefix = unique("ferry-test");
    let route = Route {
        source: amqp_source(&queue.name, "prefetch = 20"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4",
    };
    let admin = shared_admin("127.0.0.1:6379", &prefix);
    let a = Ferry::start_with(&route, &admin);
    let b = Ferry::start_with(&route, &admin);
    a.wait_ready(Duration::from_secs(30)).await;
    b.wait_ready(Duration::from_secs(30)).await;

    let mut expected = rabbit.publish_numbered(&queue.name, "before", 100).await;
    assert!(
        wait_until(Duration::from_secs(30), || endpoint.delivered_msgs().len()
            >= 100)
        .await,
        "first 100 not delivered"
    );

    // Wrong or missing token: 401 and nothing changes.
    assert_eq!(put(&a, "/routes/r/pause", None).await.0, 401);
    assert_eq!(put(&a, "/routes/r/pause", Some("wrong")).await.0, 401);
    assert_eq!(route_state(&a).await, "running");
    // Unknown route: 404.
    let (status, body) = put(&a, "/routes/nope/pause", Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("nope")),
        "{body}"
    );

    let (status, body) = put(&a, "/routes/r/pause", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "paused");
    assert!(
        wait_state(&b, "paused", Duration::from_secs(2)).await,
        "the other replica did not follow within 2 s"
    );
    for ferry in [&a, &b] {
        assert_eq!(
            ferry.metric(r#"ferry_route_paused{route="r""#).await,
            Some(1.0)
        );
    }

    let before_pause = endpoint.seen().len();
    expected.extend(rabbit.publish_numbered(&queue.name, "during", 300).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        endpoint.seen().len(),
        before_pause,
        "requests reached the endpoint while paused"
    );

    let (status, body) = put(&b, "/routes/r/resume", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(wait_state(&a, "running", Duration::from_secs(2)).await);
    assert!(
        wait_until(Duration::from_secs(60), || endpoint.delivered_msgs().len()
            >= 400)
        .await,
        "after resume: {} of 400",
        endpoint.delivered_msgs().len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bodies = endpoint.delivered_msgs();
    let unique_bodies: BTreeSet<String> = bodies.iter().cloned().collect();
    assert_eq!(unique_bodies, expected, "delivered set");
    assert_eq!(bodies.len(), 400, "duplicates: {}", bodies.len() - 400);
    assert_eq!(rabbit.depth(&queue.name).await, 0);
    for ferry in [&a, &b] {
        let log = ferry.log();
        assert!(!log.contains(TOKEN), "the token appears in a log");
        assert_eq!(log.matches("route paused").count(), 1, "{log}");
    }
}

/// The original consumer service's calls on a single-route configuration, without a token
/// configured: status, stop, start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_start_stop_status_for_a_single_route() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("consumer").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let status = |s: &str| serde_json::json!({ "route": "r", "status": s });
    let (code, body) = call(reqwest::Method::GET, &ferry, "/consumer/status", None).await;
    assert_eq!((code, body), (200, status("started")));
    let (code, body) = put(&ferry, "/consumer/stop", None).await;
    assert_eq!((code, body), (200, status("stopped")));
    assert_eq!(route_state(&ferry).await, "paused");

    rabbit.publish_numbered(&queue.name, "held", 20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(endpoint.seen().is_empty(), "delivered while stopped");

    let (code, body) = put(&ferry, "/consumer/start", None).await;
    assert_eq!((code, body), (200, status("started")));
    assert!(
        wait_until(Duration::from_secs(20), || endpoint.delivered_msgs().len()
            == 20)
        .await
    );
}

/// A replica that loses Redis keeps its last state (and says so once), a pause asked of it
/// meanwhile is refused with 503 rather than applied to it alone, and it follows the
/// shared state again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_redis_keeps_its_last_state() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("lostredis").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let prefix = unique("ferry-test");
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let route = Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    };
    let direct = Ferry::start_with(&route, &shared_admin("127.0.0.1:6379", &prefix));
    let cut_off = Ferry::start_with(&route, &shared_admin(&proxy.addr().to_string(), &prefix));
    direct.wait_ready(Duration::from_secs(30)).await;
    cut_off.wait_ready(Duration::from_secs(30)).await;

    assert_eq!(put(&direct, "/routes/r/pause", Some(TOKEN)).await.0, 200);
    assert!(wait_state(&cut_off, "paused", Duration::from_secs(2)).await);

    let outage = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Redis is unreachable from `cut_off` now: a resume asked of it changes nothing.
        let (status, body) = put(&cut_off, "/routes/r/resume", Some(TOKEN)).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("shared state")),
            "{body}"
        );
        // The other replica resumes everyone; `cut_off` cannot see it and stays paused.
        assert_eq!(put(&direct, "/routes/r/resume", Some(TOKEN)).await.0, 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(route_state(&cut_off).await, "paused");
        assert_eq!(route_state(&direct).await, "running");
    };
    tokio::join!(proxy.cut(Duration::from_secs(5)), outage);
    assert!(
        wait_state(&cut_off, "running", Duration::from_secs(4)).await,
        "did not follow the shared state after Redis came back"
    );
    let log = cut_off.log();
    assert_eq!(log.matches("shared state unreachable").count(), 1, "{log}");
    assert_eq!(
        log.matches("shared state reachable again").count(),
        1,
        "{log}"
    );

    // Both replicas deliver again.
    let expected = rabbit.publish_numbered(&queue.name, "after", 50).await;
    assert!(
        wait_until(Duration::from_secs(30), || endpoint.delivered_msgs().len()
            >= 50)
        .await
    );
    let got: BTreeSet<String> = endpoint.delivered_msgs().into_iter().collect();
    assert_eq!(got, expected);
}

/// The audit trail has one line per message that ended, with its outcome and the
/// endpoint's status, and the file is complete once ferry has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_every_finished_message() {
    const N: usize = 50;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("audit").await;
    let endpoint = Endpoint::start(|seen| match seen.msg() {
        Some(m) if m.ends_with('7') => Reply::status(400),
        _ => Reply::ok(),
    })
    .await;
    let dir = ferry_e2e::ferry::scratch("audit");
    let path = dir.join("trail").join("ferry.jsonl");
    rabbit.publish_numbered(&queue.name, "a", N).await;
    let mut ferry = Ferry::start_with(
        &Route {
            source: amqp_source(&queue.name, ""),
            sink_url: &endpoint.url(),
            sink: "",
            delivery: "",
        },
        &format!(
            "\n[audit]\npath = \"{}\"\nmax_file_mb = 1\n",
            path.display()
        ),
    );
    ferry.wait_ready(Duration::from_secs(30)).await;
    let mut written = 0.0;
    for _ in 0..300 {
        written = ferry
            .metric("ferry_audit_records_total")
            .await
            .unwrap_or(0.0);
        if written >= N as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(written, N as f64, "audit records written");
    assert_eq!(ferry.metric("ferry_audit_dropped_total").await, Some(0.0));
    ferry.signal("TERM");
    assert!(ferry
        .wait_exit(Duration::from_secs(30))
        .await
        .is_some_and(|s| s.success()));

    let text = std::fs::read_to_string(&path).expect("audit file");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), N);
    let ids: BTreeSet<&str> = lines.iter().filter_map(|l| l["id"].as_str()).collect();
    let seen: BTreeSet<String> = endpoint.seen().iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids.len(), N, "unique ids");
    assert_eq!(ids, seen.iter().map(String::as_str).collect());
    let count = |outcome: &str, status: u64| {
        lines
            .iter()
            .filter(|l| l["outcome"] == outcome && l["status"] == status)
            .count()
    };
    assert_eq!(count("delivered", 200), N - 5);
    assert_eq!(count("dead_lettered", 400), 5);
    for line in &lines {
        assert_eq!(line["route"], "r");
        assert_eq!(line["source"], queue.name.as_str());
        assert_eq!(line["attempts"], 1);
        assert!(line["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
        assert!(line["delivered_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
}

/// `[runtime] worker_threads` is the number of threads that run the routes: one unless
/// asked, and a route delivers either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_worker_threads_sets_the_threads_that_run_routes() {
    let rabbit = Rabbit::connect().await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    for (runtime, threads) in [("", 1), ("[runtime]\nworker_threads = 3\n", 3)] {
        let queue = rabbit.queue("threads").await;
        let ferry = Ferry::start_with(
            &Route {
                source: amqp_source(&queue.name, ""),
                sink_url: &endpoint.url(),
                sink: "",
                delivery: "",
            },
            runtime,
        );
        ferry.wait_ready(Duration::from_secs(30)).await;
        let started = format!("worker_threads={threads}");
        assert!(
            ferry
                .log()
                .lines()
                .any(|l| l.contains("ferry started") && l.contains(&started)),
            "no {started} with {runtime:?}; log:\n{}",
            ferry.log()
        );
        let body = unique("threads");
        rabbit
            .publish(
                &queue.name,
                &[ferry_e2e::conformance::Outgoing::plain(body.clone())],
            )
            .await;
        assert!(
            wait_until(Duration::from_secs(20), || endpoint
                .delivered_set()
                .contains(&body))
            .await,
            "nothing delivered with {runtime:?}; log:\n{}",
            ferry.log()
        );
        drop(ferry);
        rabbit.delete(&queue.name).await;
    }
}

//! SIGHUP reads the configuration again: changed routes are drained and restarted, new ones
//! start, removed ones drain and stop, unchanged ones run on untouched; a configuration
//! that does not validate is refused and the old one keeps running.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};
use serde_json::Value;

/// A route on `queue` with these `[delivery]` lines.
fn route<'a>(queue: &str, endpoint: &'a str, delivery: &'a str) -> Route<'a> {
    Route {
        source: amqp_source(queue, "prefetch = 50"),
        sink_url: endpoint,
        sink: "",
        delivery,
    }
}

/// The whole file: `[admin]` on `admin_port` and each `(name, route)`.
fn config(admin_port: u16, routes: &[(&str, &Route<'_>)]) -> String {
    let mut text = format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n");
    for (name, route) in routes {
        text.push_str(&route.section(name));
    }
    text
}

/// The distinct `msg`s delivered (2xx) that start with `prefix`.
fn delivered_with(endpoint: &Endpoint, prefix: &str) -> BTreeSet<String> {
    endpoint
        .delivered_set()
        .into_iter()
        .filter(|m| m.starts_with(prefix))
        .collect()
}

/// How often ferry logged that route `name` stopped.
fn stops(ferry: &Ferry, name: &str) -> usize {
    ferry
        .log()
        .lines()
        .filter(|l| l.contains("route stopped") && l.contains(&format!("route={name}")))
        .count()
}

async fn reloads(ferry: &Ferry, result: &str) -> f64 {
    ferry
        .metric(&format!(
            "ferry_config_reloads_total{{result=\"{result}\"}}"
        ))
        .await
        .unwrap_or(0.0)
}

/// Reloads and waits until ferry has counted it under `result`.
async fn reload(ferry: &Ferry, text: &str, result: &str) {
    let before = reloads(ferry, result).await;
    ferry.rewrite_config(text);
    ferry.reload();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while reloads(ferry, result).await < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reload not counted as {result} within 30 s; log:\n{}",
            ferry.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until at least `n` messages of route `a` were delivered.
async fn until_delivered(ferry: &Ferry, endpoint: &Endpoint, n: usize) {
    let reached = wait_until(Duration::from_secs(40), || {
        delivered_with(endpoint, "a-").len() >= n
    })
    .await;
    assert!(
        reached,
        "only {} of {n} delivered; log:\n{}",
        delivered_with(endpoint, "a-").len(),
        ferry.log()
    );
}

/// Five reloads during a 20,000-message RabbitMQ run, each changing route `a`, one adding
/// route `b`, one leaving `b` alone, one removing it and one adding it back; two broken files
/// in between are refused while deliveries go on. Every message arrives, and none is
/// answered 2xx twice: draining a route delivers what it holds once and hands the rest back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_during_a_run_lose_nothing_and_repeat_nothing() {
    const A: usize = 20_000;
    const B: usize = 2_000;
    let rabbit = Rabbit::connect().await;
    let qa = rabbit.queue("reload-a").await;
    let qb = rabbit.queue("reload-b").await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(2))).await;
    let url = endpoint.url();
    let expected_a = rabbit.publish_numbered(&qa.name, "a", A).await;
    let expected_b = rabbit.publish_numbered(&qb.name, "b", B).await;

    let a4 = route(&qa.name, &url, "concurrency = 4");
    let a8 = route(&qa.name, &url, "concurrency = 8");
    let a3 = route(&qa.name, &url, "concurrency = 3\nshutdown_grace = \"10s\"");
    let a6 = route(&qa.name, &url, "concurrency = 6");
    let a_adaptive = route(
        &qa.name,
        &url,
        "concurrency = \"adaptive\"\nmax_concurrency = 12",
    );
    let a_zero = route(&qa.name, &url, "concurrency = 0");
    let b2 = route(&qb.name, &url, "concurrency = 2");
    let b5 = route(&qb.name, &url, "concurrency = 5");

    let ferry = Ferry::start_config(|port| config(port, &[("a", &a4)]));
    ferry.wait_ready(Duration::from_secs(30)).await;
    let port = ferry.admin_port;
    assert_eq!(
        reloads(&ferry, "applied").await,
        0.0,
        "{}",
        ferry.metrics().await
    );

    until_delivered(&ferry, &endpoint, 2_000).await;
    reload(&ferry, &config(port, &[("a", &a8)]), "applied").await;

    until_delivered(&ferry, &endpoint, 4_000).await;
    reload(&ferry, &config(port, &[("a", &a6), ("b", &b2)]), "applied").await;
    let (_, routes) = ferry.admin(reqwest::Method::GET, "/routes").await;
    let names: Vec<&str> = routes["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "{routes}");
    assert!(
        wait_until(Duration::from_secs(20), || !delivered_with(&endpoint, "b-")
            .is_empty())
        .await,
        "route b added by the reload delivers nothing; log:\n{}",
        ferry.log()
    );

    // Broken files change nothing: a value out of range, then a file that is not TOML.
    reload(
        &ferry,
        &config(port, &[("a", &a_zero), ("b", &b2)]),
        "refused",
    )
    .await;
    reload(&ferry, "[admin\nlisten = ", "refused").await;
    assert!(
        ferry.log().contains("routes.a.delivery.concurrency"),
        "the refused reload does not say why; log:\n{}",
        ferry.log()
    );
    let before = delivered_with(&endpoint, "a-").len();
    until_delivered(&ferry, &endpoint, before + 1_000).await;
    let (status, _) = ferry.admin(reqwest::Method::GET, "/routes/b").await;
    assert_eq!(status, 200, "route b is gone after a refused reload");

    // b is unchanged: it runs on without a restart.
    until_delivered(&ferry, &endpoint, 8_000).await;
    reload(&ferry, &config(port, &[("a", &a3), ("b", &b2)]), "applied").await;
    assert_eq!(
        stops(&ferry, "b"),
        0,
        "unchanged route b was restarted; log:\n{}",
        ferry.log()
    );

    until_delivered(&ferry, &endpoint, 11_000).await;
    reload(&ferry, &config(port, &[("a", &a6)]), "applied").await;
    assert_eq!(
        stops(&ferry, "b"),
        1,
        "removed route b did not stop; log:\n{}",
        ferry.log()
    );
    let (status, _) = ferry.admin(reqwest::Method::GET, "/routes/b").await;
    assert_eq!(status, 404, "removed route b still listed");

    until_delivered(&ferry, &endpoint, 14_000).await;
    reload(
        &ferry,
        &config(port, &[("a", &a_adaptive), ("b", &b5)]),
        "applied",
    )
    .await;

    let all = wait_until(Duration::from_secs(40), || {
        delivered_with(&endpoint, "a-") == expected_a
            && delivered_with(&endpoint, "b-") == expected_b
    })
    .await;
    assert!(
        all,
        "lost: {} of a, {} of b; log:\n{}",
        A - delivered_with(&endpoint, "a-").len(),
        B - delivered_with(&endpoint, "b-").len(),
        ferry.log()
    );
    let repeated: Vec<(String, usize)> = endpoint
        .delivered_counts()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        repeated.is_empty(),
        "{} messages answered 2xx more than once, e.g. {:?}",
        repeated.len(),
        repeated.iter().take(5).collect::<Vec<_>>()
    );
    assert!(endpoint.unlabelled_duplicates().is_empty());
    assert_eq!(reloads(&ferry, "applied").await, 5.0);
    assert_eq!(reloads(&ferry, "refused").await, 2.0);
    assert_eq!(rabbit.depth(&qa.name).await, 0);
    assert_eq!(rabbit.depth(&qb.name).await, 0);
    assert_eq!(rabbit.depth(&qa.dead_letter).await, 0);
}

async fn route_json(ferry: &Ferry, name: &str) -> Value {
    let (status, body) = ferry
        .admin(reqwest::Method::GET, &format!("/routes/{name}"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// A route paused before a reload restarts it stays paused (and delivers nothing) until
/// resumed; a setting that needs a restart is kept and named in a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_route_stays_paused_across_a_reload() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("reload-pause").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let url = endpoint.url();
    let c2 = route(&queue.name, &url, "concurrency = 2");
    let c7 = route(&queue.name, &url, "concurrency = 7");
    let ferry = Ferry::start_config(|port| config(port, &[("p", &c2)]));
    ferry.wait_ready(Duration::from_secs(30)).await;

    let (status, body) = ferry.admin(reqwest::Method::PUT, "/routes/p/pause").await;
    assert_eq!(status, 200, "{body}");
    // The new file moves the admin server too, which needs a restart, and sets a token,
    // which applies at once.
    let moved = config(ferry_e2e::free_port(), &[("p", &c7)]).replacen(
        "[admin]\n",
        "[admin]\ntoken = \"reloaded-token-0123\"\n",
        1,
    );
    reload(&ferry, &moved, "applied").await;
    assert_eq!(stops(&ferry, "p"), 1, "the changed route was not restarted");
    assert!(
        ferry.log().contains("admin.listen") && ferry.log().contains("needs a restart"),
        "no warning about admin.listen; log:\n{}",
        ferry.log()
    );
    let p = route_json(&ferry, "p").await;
    assert_eq!(p["paused"], true, "{p}");
    assert_eq!(p["concurrency_limit"], 7, "{p}");

    let sent = rabbit.publish_numbered(&queue.name, "p", 50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        endpoint.seen().is_empty(),
        "a paused route delivered after a reload"
    );

    let (status, body) = ferry.admin(reqwest::Method::PUT, "/routes/p/resume").await;
    assert_eq!(
        status, 401,
        "the reloaded admin token is not required: {body}"
    );
    let status = reqwest::Client::new()
        .put(format!(
            "http://127.0.0.1:{}/routes/p/resume",
            ferry.admin_port
        ))
        .bearer_auth("reloaded-token-0123")
        .send()
        .await
        .expect("resume")
        .status();
    assert_eq!(status, 200);
    assert!(
        wait_until(Duration::from_secs(20), || endpoint.delivered_set() == sent).await,
        "not delivered after resume; log:\n{}",
        ferry.log()
    );
}

/// SIGTERM right behind a SIGHUP, while the reload connects its new route or drains the
/// changed one: ferry still drains every route and exits 0; nothing is lost or delivered
/// twice (what was not delivered is back in its queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reload_still_drains_everything() {
    let rabbit = Rabbit::connect().await;
    for gap in [Duration::from_millis(5), Duration::from_millis(150)] {
        let qa = rabbit.queue("reload-term-a").await;
        let qb = rabbit.queue("reload-term-b").await;
        let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(200))).await;
        let url = endpoint.url();
        let sent_a = rabbit.publish_numbered(&qa.name, "a", 100).await;
        let sent_b = rabbit.publish_numbered(&qb.name, "b", 100).await;
        let a4 = route(&qa.name, &url, "concurrency = 4");
        let a6 = route(&qa.name, &url, "concurrency = 6");
        let b3 = route(&qb.name, &url, "concurrency = 3");
        let mut ferry = Ferry::start_config(|port| config(port, &[("a", &a4)]));
        ferry.wait_ready(Duration::from_secs(30)).await;
        assert!(wait_until(Duration::from_secs(20), || endpoint.delivered().len() >= 8).await);
        ferry.rewrite_config(&config(ferry.admin_port, &[("a", &a6), ("b", &b3)]));
        ferry.reload();
        tokio::time::sleep(gap).await;
        ferry.signal("TERM");
        let status = ferry.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "ferry did not stop cleanly ({status:?}) with SIGTERM {gap:?} after SIGHUP; log:\n{}",
            ferry.log()
        );
        assert!(ferry.log().contains("ferry stopped"), "{}", ferry.log());
        for (prefix, queue, sent) in [("a-", &qa, &sent_a), ("b-", &qb, &sent_b)] {
            let delivered = delivered_with(&endpoint, prefix);
            let left = rabbit.depth(&queue.name).await as usize;
            assert_eq!(
                delivered.len() + left,
                sent.len(),
                "{prefix}: {} delivered + {left} left of {} (gap {gap:?}); log:\n{}",
                delivered.len(),
                sent.len(),
                ferry.log()
            );
        }
        let repeated = endpoint
            .delivered_counts()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .count();
        assert_eq!(repeated, 0, "messages answered 2xx twice (gap {gap:?})");
    }
}

//! The status page at `/`, in a real headless Chromium against the real `ferry` binary:
//! it loads without console errors, shows every route, its chart moves while messages
//! flow, its numbers are those of `/metrics`, pause and resume work with the right token
//! and change nothing without it, it fits a phone's window, shows no secret, and follows
//! ferry through a restart ("reconnecting", then live again).
//!
//! Needs the local RabbitMQ, and Chromium with chromedriver (Debian `chromium` and
//! `chromium-driver`, installed by scripts/test.sh); fails loudly without them.
//! Screenshots are left in `target/status-page/` as test artifacts. With
//! `FERRY_UPDATE_README_SCREENSHOT=1` the test also writes docs/status-page.png.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::browser::{artifact_dir, Browser, LogEntry};
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{Endpoint, Ferry, Reply};
use serde_json::{json, Value};

const TOKEN: &str = "status-page-token-0123";
/// The sink's basic-auth password: a secret the page must never show.
const SINK_PASSWORD: &str = "sink-pa55word-never-shown";
const WAIT: Duration = Duration::from_secs(20);

/// The page's view of one route, read from its card.
const CARD: &str = r#"
const card = document.querySelector(`[data-route="${arguments[0]}"]`);
if (!card) return null;
const text = (f) => card.querySelector(`[data-field="${f}"]`).textContent;
const line = card.querySelector("polyline.delivered").getAttribute("points");
return {
  state: card.querySelector(".state").dataset.state,
  received: text("received"), delivered: text("delivered"), retried: text("retried"),
  dead_lettered: text("dead_lettered"), in_flight: text("in_flight"), backlog: text("backlog"),
  request: text("request"), lag: text("lag"),
  error: card.querySelector(".error").hidden ? "" : card.querySelector(".error").textContent,
  error_time: !!card.querySelector(".error time"),
  outcome: card.querySelector(".outcome").textContent,
  outcome_ok: card.querySelector(".outcome").dataset.ok || "",
  delivered_points: line,
  // Whether the delivered line rises above the chart's floor somewhere.
  delivered_moving: line.split(" ").some((p) => p && parseFloat(p.split(",")[1]) < 99),
};
"#;

fn section(name: &str, queue: &str, sink_url: &str) -> String {
    Route {
        source: amqp_source(queue, ""),
        sink_url,
        sink: "",
        delivery: "concurrency = 10\nmax_attempts = 3\n",
    }
    .section(name)
}

/// The sample of `family` for `route` (and `outcome`, when given) in the `/metrics` text.
fn sample(metrics: &str, family: &str, route: &str, outcome: Option<&str>) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| l.contains(&format!("route=\"{route}\"")))
        .find(|l| outcome.is_none_or(|o| l.contains(&format!("outcome=\"{o}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or_else(
            || panic!("no {family} sample for {route} {outcome:?} in:\n{metrics}"),
            |v| v as u64,
        )
}

/// The cumulative buckets of a histogram family for `route` in the `/metrics` text.
fn buckets(metrics: &str, family: &str, route: &str) -> Vec<(f64, u64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}_bucket{{")))
        .filter(|l| l.contains(&format!("route=\"{route}\"")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, l.rsplit(' ').next()?.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// `histogram_quantile` as Prometheus computes it, written out independently of ferry's.
fn prometheus_quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1 as f64;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let i = buckets.iter().position(|(_, c)| *c as f64 >= rank)?;
    if buckets[i].0.is_infinite() {
        return Some(buckets[i - 1].0);
    }
    let (start, below) = if i == 0 {
        (0.0, 0.0)
    } else {
        (buckets[i - 1].0, buckets[i - 1].1 as f64)
    };
    let inside = buckets[i].1 as f64 - below;
    Some(start + (buckets[i].0 - start) * (rank - below) / inside)
}

/// Console entries that are errors: every severe one, except the browser's note of a
/// refused call (`network`: the 401 of a wrong token, a refused connection while ferry
/// restarts) when `refusals_expected`.
fn errors(entries: &[LogEntry], refusals_expected: bool) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.level == "SEVERE" || e.source == "javascript")
        .filter(|e| !(refusals_expected && e.source == "network"))
        .map(|e| format!("{} {}: {}", e.level, e.source, e.message))
        .collect()
}

async fn status_json(admin_port: u16) -> (String, Value) {
    let text = reqwest::get(format!("http://127.0.0.1:{admin_port}/status"))
        .await
        .expect("GET /status")
        .text()
        .await
        .expect("/status body");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("/status: {e}: {text}"));
    (text, value)
}

async fn paused(ferry: &Ferry, route: &str) -> bool {
    let (status, body) = ferry
        .admin(reqwest::Method::GET, &format!("/routes/{route}"))
        .await;
    assert_eq!(status, 200, "GET /routes/{route}: {body}");
    body["paused"].as_bool().expect("paused")
}

async fn card(browser: &Browser, route: &str) -> Value {
    browser.eval(CARD, json!([route])).await
}

async fn wait_card(browser: &Browser, route: &str, what: &str, check: &str) -> Value {
    let script =
        format!("const c = (function() {{ {CARD} }}).apply(null, arguments); return c && ({check}) ? c : null;");
    browser.wait_for(WAIT, what, &script, json!([route])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_browser() {
    let rabbit = Rabbit::connect().await;
    let orders = rabbit.queue("status-orders").await;
    let payments = rabbit.queue("status-payments").await;
    // Some first attempts fail (retried), "poison" messages are refused (dead-lettered).
    let endpoint = Endpoint::start(|seen| {
        let msg = seen.msg().unwrap_or_default();
        if msg.contains("poison") {
            Reply::status(422)
        } else if seen.attempt == 1 && msg.ends_with('7') {
            Reply::status(500)
        } else {
            Reply::ok().after(Duration::from_millis(10))
        }
    })
    .await;
    let sink = endpoint
        .url()
        .replacen("http://", &format!("http://ops:{SINK_PASSWORD}@"), 1);
    let config = {
        let (orders, payments, sink) = (orders.name.clone(), payments.name.clone(), sink.clone());
        move |port: u16| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n\n{}\n{}",
                section("orders", &orders, &sink),
                section("payments", &payments, &sink)
            )
        }
    };
    let ferry = Ferry::start_config(config.clone());
    ferry.wait_ready(WAIT).await;
    let port = ferry.admin_port;
    let page = format!("http://127.0.0.1:{port}/");

    let browser = Browser::start(1280, 1000).await;
    browser.goto(&page).await;
    let names = browser
        .wait_for(
            WAIT,
            "both routes, live",
            r#"const cards = [...document.querySelectorAll("[data-route]")];
               return document.getElementById("connection").dataset.state === "live"
                   && cards.length === 2 && cards.map((c) => c.dataset.route).sort();"#,
            json!([]),
        )
        .await;
    assert_eq!(names, json!(["orders", "payments"]));
    for route in ["orders", "payments"] {
        wait_card(&browser, route, "running", "c.state === 'running'").await;
    }
    let loaded = browser.console().await;
    assert_eq!(
        errors(&loaded, false),
        Vec::<String>::new(),
        "console errors while loading"
    );

    // Messages flow for a while: the chart moves.
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (flowing, orders, payments) =
            (flowing.clone(), orders.name.clone(), payments.name.clone());
        tokio::spawn(async move {
            let rabbit = Rabbit::connect().await;
            let mut sent = 0usize;
            while flowing.load(Ordering::Relaxed) {
                let batch: Vec<String> = (sent..sent + 20)
                    .map(|i| {
                        if i % 50 == 49 {
                            format!("poison-{i}")
                        } else {
                            format!("m-{i}")
                        }
                    })
                    .collect();
                for queue in [&orders, &payments] {
                    let messages: Vec<_> = batch
                        .iter()
                        .map(|b| ferry_e2e::conformance::Outgoing::plain(b.clone()))
                        .collect();
                    rabbit.publish(queue, &messages).await;
                }
                sent += 20;
                // A rate that rises and falls, so that the chart has a shape.
                let pause = 150 + 40 * ((sent / 20) % 10) as u64;
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            sent
        })
    };
    let first = wait_card(&browser, "orders", "the chart moving", "c.delivered_moving").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = card(&browser, "orders").await;
    assert!(
        later["delivered_moving"] == json!(true)
            && later["delivered_points"] != first["delivered_points"],
        "the chart did not move: {first} then {later}"
    );
    let readme = std::env::var("FERRY_UPDATE_README_SCREENSHOT").is_ok_and(|v| v == "1");
    if readme {
        // The README's picture: a minute of traffic on the chart.
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    flowing.store(false, Ordering::Relaxed);
    let sent = publisher.await.expect("publisher");
    let poison = sent / 50;
    let expected = 2 * (sent - poison);
    let settled = ferry_e2e::wait_until(WAIT, || endpoint.delivered_unique() >= expected).await;
    assert!(
        settled,
        "{} of {expected} delivered; log:\n{}",
        endpoint.delivered_unique(),
        ferry.log()
    );

    // Quiet now: the page's numbers are those of /metrics.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = ferry.metrics().await;
    for route in ["orders", "payments"] {
        let want = json!({
            "received": sample(&metrics, "ferry_messages_received_total", route, None).to_string(),
            "delivered": sample(&metrics, "ferry_deliveries_total", route, Some("delivered")).to_string(),
            "retried": sample(&metrics, "ferry_deliveries_total", route, Some("retried")).to_string(),
            "dead_lettered": sample(&metrics, "ferry_deliveries_total", route, Some("dead_lettered")).to_string(),
            "in_flight": format!("{} / {}", sample(&metrics, "ferry_in_flight", route, None),
                sample(&metrics, "ferry_concurrency_limit", route, None)),
            "backlog": sample(&metrics, "ferry_source_backlog", route, None).to_string(),
        });
        let check = want
            .as_object()
            .expect("object")
            .iter()
            .map(|(k, v)| format!("c.{k} === {v}"))
            .collect::<Vec<_>>()
            .join(" && ");
        let shown = wait_card(&browser, route, &format!("{route}: {want}"), &check).await;
        assert_ne!(want["retried"], json!("0"), "no retries to show");
        assert_ne!(want["dead_lettered"], json!("0"), "no dead letters to show");
        assert!(
            shown["error"]
                .as_str()
                .is_some_and(|e| e.contains("last error"))
                && shown["error_time"] == json!(true),
            "{route}: no last error with its time: {shown}"
        );
        assert!(
            !shown["request"].as_str().unwrap_or("–").starts_with('–')
                && !shown["lag"].as_str().unwrap_or("–").starts_with('–'),
            "{route}: no latency or lag: {shown}"
        );
    }
    // The quantiles of /status are those of /metrics' histograms (everything happened
    // within the five minutes the page looks at).
    let (_, status) = status_json(port).await;
    let metrics = ferry.metrics().await;
    for route in status["routes"].as_array().expect("routes") {
        let name = route["name"].as_str().expect("name");
        for (key, family) in [
            ("request_seconds", "ferry_http_request_duration_seconds"),
            ("end_to_end_seconds", "ferry_end_to_end_seconds"),
        ] {
            let buckets = buckets(&metrics, family, name);
            for (q, p) in [(0.5, "p50"), (0.99, "p99")] {
                let want = prometheus_quantile(q, &buckets).expect("observations");
                let got = route[key][p].as_f64().unwrap_or(f64::NAN);
                assert!(
                    (want - got).abs() < 1e-9,
                    "{name} {key} {p}: /status {got}, /metrics {want}"
                );
            }
        }
    }

    // Pause without the token, then with a wrong one: refused, nothing changes.
    let orders_pause = "[data-route=\"orders\"] [data-action=\"pause\"]";
    let orders_resume = "[data-route=\"orders\"] [data-action=\"resume\"]";
    browser.click(orders_pause).await;
    wait_card(
        &browser,
        "orders",
        "the token asked for",
        "c.outcome.includes('needs the admin token') && c.outcome_ok === 'false'",
    )
    .await;
    assert!(!paused(&ferry, "orders").await, "paused without a token");
    browser.type_into("#token", "wrong-token-0123456").await;
    browser.click(orders_pause).await;
    wait_card(
        &browser,
        "orders",
        "the wrong token refused",
        "c.outcome.includes('401') && c.outcome_ok === 'false'",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!paused(&ferry, "orders").await, "paused with a wrong token");
    let after = card(&browser, "orders").await;
    assert_eq!(after["state"], json!("running"), "{after}");

    // With the right token: paused, shown, then resumed.
    browser.type_into("#token", TOKEN).await;
    browser.click(orders_pause).await;
    wait_card(
        &browser,
        "orders",
        "paused",
        "c.state === 'paused' && c.outcome.startsWith('paused') && c.outcome_ok === 'true'",
    )
    .await;
    assert!(paused(&ferry, "orders").await, "not paused");
    assert!(!paused(&ferry, "payments").await, "the other route paused");
    let screenshots = artifact_dir();
    let shot = screenshots.join("status-page.png");
    browser.screenshot(&shot).await;
    if readme {
        let docs = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/status-page.png");
        std::fs::copy(&shot, docs).expect("copy the screenshot to docs/");
    }
    browser.click(orders_resume).await;
    wait_card(
        &browser,
        "orders",
        "resumed",
        "c.state === 'running' && c.outcome.startsWith('resumed')",
    )
    .await;
    assert!(!paused(&ferry, "orders").await, "not resumed");

    // No secret anywhere: not in the page, not in what it polls, not kept by the browser.
    let html = browser.html().await;
    let (status_text, _) = status_json(port).await;
    for secret in [TOKEN, SINK_PASSWORD] {
        assert!(!html.contains(secret), "the page shows a secret:\n{html}");
        assert!(
            !status_text.contains(secret),
            "/status shows a secret: {status_text}"
        );
    }
    let kept = browser
        .eval(
            "return [localStorage.length, sessionStorage.length, document.cookie, location.href];",
            json!([]),
        )
        .await;
    assert_eq!(kept, json!([0, 0, "", page]), "the browser kept something");
    let used = browser.console().await;
    // The log is read for real: the browser noted the refused call.
    assert!(
        used.iter()
            .any(|e| e.source == "network" && e.message.contains("401")),
        "the wrong token's 401 is not in the console log: {used:?}"
    );
    assert_eq!(
        errors(&used, true),
        Vec::<String>::new(),
        "console errors while in use"
    );

    // A phone's window: one column, nothing wider than the screen.
    browser.set_window(390, 844).await;
    let overflow = browser
        .wait_for(
            WAIT,
            "a layout that fits a phone",
            r#"const w = document.documentElement.clientWidth;
               const cards = [...document.querySelectorAll("[data-route]")];
               const fits = document.documentElement.scrollWidth <= w
                   && cards.every((c) => c.getBoundingClientRect().right <= w);
               return fits && w <= 400 ? w : null;"#,
            json!([]),
        )
        .await;
    assert!(overflow.as_u64().is_some_and(|w| w <= 400), "{overflow}");
    browser
        .screenshot(&screenshots.join("status-page-phone.png"))
        .await;
    browser.set_window(1280, 1000).await;

    // ferry restarts: the page says so, then follows the new process.
    drop(ferry);
    browser
        .wait_for(
            WAIT,
            "reconnecting",
            r#"return document.getElementById("connection").dataset.state === "reconnecting";"#,
            json!([]),
        )
        .await;
    let ferry = Ferry::start_config_at(port, config);
    ferry.wait_ready(WAIT).await;
    browser
        .wait_for(
            WAIT,
            "live again",
            r#"return document.getElementById("connection").dataset.state === "live"
                   && document.querySelectorAll("[data-route]").length === 2;"#,
            json!([]),
        )
        .await;
    for route in ["orders", "payments"] {
        wait_card(
            &browser,
            route,
            "running after the restart",
            "c.state === 'running'",
        )
        .await;
    }
    let restarted = browser.console().await;
    assert_eq!(
        errors(&restarted, true),
        Vec::<String>::new(),
        "console errors across the restart"
    );
    browser
        .screenshot(&screenshots.join("status-page-after-restart.png"))
        .await;
    drop(browser);
    drop(ferry);
    for queue in [&orders, &payments] {
        rabbit.delete(&queue.name).await;
        rabbit.delete(&queue.dead_letter).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_without_a_token() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("status-open").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start_config(|port| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n\n{}",
            section("open", &queue.name, &endpoint.url())
        )
    });
    ferry.wait_ready(WAIT).await;
    let browser = Browser::start(1024, 800).await;
    browser
        .goto(&format!("http://127.0.0.1:{}/", ferry.admin_port))
        .await;
    wait_card(&browser, "open", "the route", "c.state === 'running'").await;
    let hidden = browser
        .eval(
            "return document.getElementById('token-field').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(hidden, json!(true), "a token field without a token");

    browser
        .click("[data-route=\"open\"] [data-action=\"pause\"]")
        .await;
    wait_card(
        &browser,
        "open",
        "paused",
        "c.state === 'paused' && c.outcome.startsWith('paused')",
    )
    .await;
    assert!(paused(&ferry, "open").await, "not paused");
    browser
        .click("[data-route=\"open\"] [data-action=\"resume\"]")
        .await;
    wait_card(
        &browser,
        "open",
        "resumed",
        "c.state === 'running' && c.outcome.startsWith('resumed')",
    )
    .await;
    assert!(!paused(&ferry, "open").await, "not resumed");
    let console = browser.console().await;
    assert_eq!(
        errors(&console, false),
        Vec::<String>::new(),
        "console errors"
    );
    drop(browser);
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

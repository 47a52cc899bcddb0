//! The Grafana dashboard (`dashboards/ferry.json`) against a running ferry: every metric
//! and every label its queries name must be in `/metrics`. A renamed metric or label
//! otherwise shows up only as an empty panel in the middle of an incident.
//!
//! Needs the local RabbitMQ; fails loudly without it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};
use serde_json::Value;

/// Metric name → every label name seen on its samples.
type Exposition = BTreeMap<String, BTreeSet<String>>;

/// The metric families the dashboard must chart (the operations contract).
const CHARTED: [&str; 10] = [
    "ferry_messages_received_total",
    "ferry_deliveries_total",
    "ferry_http_responses_total",
    "ferry_http_request_duration_seconds_bucket",
    "ferry_end_to_end_seconds_bucket",
    "ferry_in_flight",
    "ferry_concurrency_limit",
    "ferry_source_backlog",
    "ferry_circuit_open",
    "ferry_route_paused",
];

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/ferry.json");
    let text = std::fs::read_to_string(path).expect("read dashboards/ferry.json");
    serde_json::from_str(&text).expect("dashboards/ferry.json is JSON")
}

/// Every PromQL expression of the dashboard: the panels' (and rows') `expr`s.
fn exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Parses the text exposition (Prometheus or OpenMetrics) into names and their labels.
fn exposition(text: &str) -> Exposition {
    let mut out = Exposition::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            // Label names are what precedes `=` outside the quoted values.
            let (mut quoted, mut escaped, mut name) = (false, false, String::new());
            for c in line[end + 1..].chars() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    _ if quoted => {}
                    '}' => break,
                    '=' => {
                        labels.insert(std::mem::take(&mut name));
                    }
                    ',' | ' ' => name.clear(),
                    c => name.push(c),
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Punct(char),
}

/// Just enough of PromQL's lexer to tell identifiers from label values and punctuation.
fn tokens(expr: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut ident = c.to_string();
            while let Some(&n) = chars.peek() {
                if !(n.is_ascii_alphanumeric() || n == '_' || n == ':') {
                    break;
                }
                ident.push(n);
                chars.next();
            }
            out.push(Token::Ident(ident));
        } else if c == '"' || c == '\'' || c == '`' {
            let mut escaped = false;
            for n in chars.by_ref() {
                match n {
                    _ if escaped => escaped = false,
                    '\\' if c != '`' => escaped = true,
                    n if n == c => break,
                    _ => {}
                }
            }
            out.push(Token::Str);
        } else if c.is_ascii_digit() {
            // Numbers and durations (`0.99`, `5m`): nothing to check.
            while chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '.')
            {
                chars.next();
            }
        } else if !c.is_whitespace() {
            out.push(Token::Punct(c));
        }
    }
    out
}

/// The index of the bracket that closes (or, going back, opens) the one at `at`.
fn matching(tokens: &[Token], at: usize, forward: bool) -> Option<usize> {
    let (open, close) = if forward { ('(', ')') } else { (')', '(') };
    let mut depth = 0usize;
    let mut i = at;
    loop {
        match tokens.get(i)? {
            Token::Punct(c) if *c == open => depth += 1,
            Token::Punct(c) if *c == close => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i = if forward { i + 1 } else { i.checked_sub(1)? };
    }
}

fn is_ferry_metric(t: &Token) -> Option<&str> {
    match t {
        Token::Ident(s) if s.starts_with("ferry_") => Some(s),
        _ => None,
    }
}

/// Everything wrong with one expression against the exposition: metrics that are not
/// exported, matcher labels the metric does not carry, and `by`/`without` labels that a
/// metric under the aggregation does not carry (`on`/`ignoring`/`group_*` labels must be
/// on every metric of the expression).
fn problems(expr: &str, metrics: &Exposition) -> Vec<String> {
    let toks = tokens(expr);
    let mut out = Vec::new();
    let labels_of = |name: &str| metrics.get(name);
    let all: Vec<&str> = toks.iter().filter_map(is_ferry_metric).collect();
    if all.is_empty() {
        out.push("uses no ferry metric".to_owned());
    }
    for (i, t) in toks.iter().enumerate() {
        if let Some(name) = is_ferry_metric(t) {
            let Some(known) = labels_of(name) else {
                out.push(format!("metric {name} is not in /metrics"));
                continue;
            };
            if toks.get(i + 1) == Some(&Token::Punct('{')) {
                for m in toks[i + 2..]
                    .iter()
                    .take_while(|t| **t != Token::Punct('}'))
                {
                    if let Token::Ident(label) = m {
                        if !known.contains(label) {
                            out.push(format!("{name} has no label {label:?} (has {known:?})"));
                        }
                    }
                }
            }
        }
        let Token::Ident(keyword) = t else { continue };
        let grouping = matches!(keyword.as_str(), "by" | "without");
        let matching_clause = matches!(
            keyword.as_str(),
            "on" | "ignoring" | "group_left" | "group_right"
        );
        if !(grouping || matching_clause) || toks.get(i + 1) != Some(&Token::Punct('(')) {
            continue;
        }
        let Some(close) = matching(&toks, i + 1, true) else {
            out.push(format!("unbalanced {keyword}(...)"));
            continue;
        };
        let clause: Vec<&str> = toks[i + 2..close]
            .iter()
            .filter_map(|t| match t {
                Token::Ident(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        // The aggregation's argument: `sum by (l) (ARG)` or `sum (ARG) by (l)`.
        let scope: Vec<&str> = if !grouping {
            all.clone()
        } else if toks.get(close + 1) == Some(&Token::Punct('(')) {
            let end = matching(&toks, close + 1, true).unwrap_or(toks.len() - 1);
            toks[close + 1..=end]
                .iter()
                .filter_map(is_ferry_metric)
                .collect()
        } else if i > 0 && toks[i - 1] == Token::Punct(')') {
            let start = matching(&toks, i - 1, false).unwrap_or(0);
            toks[start..i].iter().filter_map(is_ferry_metric).collect()
        } else {
            out.push(format!("cannot tell what {keyword}(...) aggregates"));
            continue;
        };
        for name in scope {
            let Some(known) = labels_of(name) else {
                continue;
            };
            for label in &clause {
                if !known.contains(*label) {
                    out.push(format!(
                        "{keyword} ({label}) over {name}, which has no such label (has {known:?})"
                    ));
                }
            }
        }
    }
    out
}

/// Every problem of the whole dashboard: its expressions and its variables.
fn dashboard_problems(dashboard: &Value, metrics: &Exposition) -> Vec<String> {
    let mut all = Vec::new();
    exprs(dashboard, &mut all);
    let mut out: Vec<String> = all
        .iter()
        .flat_map(|e| {
            problems(e, metrics)
                .into_iter()
                .map(move |p| format!("{e}: {p}"))
        })
        .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .or_else(|| var["definition"].as_str())
            .unwrap_or_default();
        let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        else {
            continue;
        };
        let (metric, label) = args.rsplit_once(',').unwrap_or(("", args));
        // `metric{source=~"$source"}`: the metric is what precedes the selector.
        let metric = metric.split('{').next().unwrap_or_default();
        let (metric, label) = (metric.trim(), label.trim());
        match metrics.get(metric) {
            Some(labels) if labels.contains(label) => {}
            Some(labels) => out.push(format!(
                "{query}: {metric} has no label {label} ({labels:?})"
            )),
            None => out.push(format!("{query}: {metric} is not in /metrics")),
        }
    }
    out
}

/// The checker itself must catch a renamed metric, a wrong matcher label and a wrong
/// grouping label; otherwise the end-to-end test below could pass vacuously.
#[test]
fn the_checker_catches_renames() {
    let metrics = exposition(
        "# TYPE ferry_http_responses counter\n\
         ferry_http_responses_total{route=\"r\",source=\"amqp\",sink=\"http\",class=\"2xx\"} 3\n\
         ferry_in_flight{route=\"a,b=\\\"c\\\"\",source=\"amqp\",sink=\"http\"} 0\n\
         ferry_x_bucket{route=\"r\",le=\"+Inf\"} 1\n\
         # EOF\n",
    );
    assert_eq!(
        metrics["ferry_in_flight"],
        ["route", "sink", "source"].map(String::from).into()
    );
    let ok = [
        r#"sum by (class) (rate(ferry_http_responses_total{route=~"$route", class!="2xx"}[$__rate_interval]))"#,
        r#"histogram_quantile(0.99, sum by (le, route) (rate(ferry_x_bucket{route=~"ferry_nope"}[5m])))"#,
        r#"sum(rate(ferry_http_responses_total[5m])) by (route) / sum(ferry_in_flight) by (sink)"#,
    ];
    for expr in ok {
        assert_eq!(problems(expr, &metrics), Vec::<String>::new(), "{expr}");
    }
    let bad = [
        "rate(ferry_http_response_total[5m])",
        r#"ferry_in_flight{class="2xx"}"#,
        "sum by (klass) (rate(ferry_http_responses_total[5m]))",
        "sum without (le) (ferry_in_flight)",
        "sum(ferry_in_flight) by (outcome)",
        "ferry_in_flight / on (class) ferry_http_responses_total",
        "sum(up)",
    ];
    for expr in bad {
        assert!(!problems(expr, &metrics).is_empty(), "{expr} passed");
    }
}

/// Starts ferry on a RabbitMQ queue, delivers a few messages so that every family has
/// samples, and checks every query of the dashboard against the real `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_uses_exported_metrics_and_labels() {
    const N: usize = 5;
    let dashboard = dashboard();
    let ds_inputs: Vec<&str> = dashboard["__inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(
        ds_inputs,
        ["DS_PROMETHEUS"],
        "the datasource is an import input"
    );

    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("dashboard").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let messages: Vec<Outgoing> = (0..N)
        .map(|i| Outgoing::plain(format!("dashboard-{i}")))
        .collect();
    rabbit.publish(&queue.name, &messages).await;
    assert!(
        wait_until(Duration::from_secs(15), || endpoint.delivered_unique() == N).await,
        "{} of {N} delivered; log:\n{}",
        endpoint.delivered_unique(),
        ferry.log()
    );
    // The ack (and with it the end-to-end observation) follows the endpoint's answer.
    let e2e = r#"ferry_end_to_end_seconds_count{route="r",source="amqp",sink="http"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ferry.metric(e2e).await.unwrap_or(0.0) < N as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{e2e} never reached {N}:\n{}",
            ferry.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let text = ferry.metrics().await;
    let metrics = exposition(&text);
    for histogram in [
        "ferry_http_request_duration_seconds",
        "ferry_end_to_end_seconds",
    ] {
        for suffix in ["_bucket", "_sum", "_count"] {
            assert!(
                metrics.contains_key(&format!("{histogram}{suffix}")),
                "{histogram}{suffix} missing from /metrics:\n{text}"
            );
        }
    }

    let problems = dashboard_problems(&dashboard, &metrics);
    assert!(
        problems.is_empty(),
        "the dashboard does not match /metrics:\n  {}\n\n/metrics:\n{text}",
        problems.join("\n  ")
    );

    let mut all = Vec::new();
    exprs(&dashboard, &mut all);
    let used: BTreeSet<&str> = all
        .iter()
        .flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("ferry_"))
        .collect();
    let missing: Vec<&str> = CHARTED.into_iter().filter(|m| !used.contains(m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard charts none of {missing:?}"
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

//! `docs/openapi.yaml` against the real admin server: every documented path and method
//! answers with a documented status, content type and body shape, and every call of the
//! admin API is documented. Clients generated from the document, and operators reading
//! it, would otherwise find out about a drift only when a call fails.
//!
//! Runs ferry with one RabbitMQ route (so `/consumer/*` answers) and `[admin] token`
//! set (so the state-changing calls can be tried with and without it). Needs the local
//! RabbitMQ; fails loudly without it.

use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{Endpoint, Ferry, Reply};
use serde_json::Value;

const TOKEN: &str = "secret-token-0123";
const ROUTE: &str = "r";
const UNKNOWN_ROUTE: &str = "no_such_route";

/// The admin API as it is meant to be: every call must be in the document.
const CALLS: [(&str, &str); 15] = [
    ("get", "/"),
    ("get", "/static/status.js"),
    ("get", "/static/status.css"),
    ("get", "/status"),
    ("get", "/ping"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/routes"),
    ("get", "/routes/{name}"),
    ("put", "/routes/{name}/pause"),
    ("put", "/routes/{name}/resume"),
    ("get", "/consumer/status"),
    ("put", "/consumer/start"),
    ("put", "/consumer/stop"),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("read docs/openapi.yaml");
    serde_yaml_ng::from_str(&text).expect("docs/openapi.yaml is YAML that maps to JSON")
}

/// Follows `$ref`s within the document (`#/components/...`).
fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(reference) = value.get("$ref").and_then(Value::as_str) else {
            return value;
        };
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are supported: {reference}"));
        value = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    panic!("$ref cycle at {value}");
}

/// Checks `value` against the subset of JSON Schema the document uses: `$ref`, `type`,
/// `required`, `properties`, `items`, `enum` and a literal-prefix `pattern`. Anything
/// else in a schema makes the check fail rather than pass unchecked.
fn conform(doc: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    for key in schema.as_object().into_iter().flat_map(|m| m.keys()) {
        let known = [
            "type",
            "required",
            "properties",
            "items",
            "enum",
            "pattern",
            "description",
            "example",
        ];
        assert!(
            known.contains(&key.as_str()),
            "the checker does not know schema keyword {key:?} (at {at})"
        );
    }
    let ty = schema.get("type").and_then(Value::as_str).unwrap_or("any");
    let type_ok = match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "any" => true,
        other => panic!("unknown schema type {other:?} at {at}"),
    };
    if !type_ok {
        out.push(format!("{at}: expected {ty}, got {value}"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            out.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(pattern), Some(s)) = (
        schema.get("pattern").and_then(Value::as_str),
        value.as_str(),
    ) {
        let prefix = pattern
            .strip_prefix('^')
            .filter(|p| !p.contains(|c: char| "[](){}.*+?|\\$".contains(c)))
            .unwrap_or_else(|| panic!("the checker only knows literal-prefix patterns: {pattern}"));
        if !s.starts_with(prefix) {
            out.push(format!("{at}: {s:?} does not match {pattern:?}"));
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties");
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                out.push(format!(
                    "{at}: required property {name:?} missing in {value}"
                ));
            }
        }
        for (name, v) in object {
            if let Some(property) = properties.and_then(|p| p.get(name)) {
                conform(doc, property, v, &format!("{at}.{name}"), out);
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            conform(doc, items, item, &format!("{at}[{i}]"), out);
        }
    }
}

/// `text/plain; charset=utf-8` → `text/plain`.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// One answer of the admin server.
struct Answer {
    status: u16,
    content_type: String,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Everything in which `answer` differs from what the document says `method path` answers.
fn check(doc: &Value, method: &str, template: &str, answer: &Answer) -> Vec<String> {
    let call = format!("{} {template} → {}", method.to_uppercase(), answer.status);
    let operation = &doc["paths"][template][method];
    let Some(response) = operation["responses"].get(answer.status.to_string()) else {
        let documented: Vec<&String> = operation["responses"]
            .as_object()
            .map(|r| r.keys().collect())
            .unwrap_or_default();
        return vec![format!(
            "{call}: status not documented (documented: {documented:?}); body {:?}",
            answer.body
        )];
    };
    let response = resolve(doc, response);
    let mut out = Vec::new();
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        match answer.headers.get(name).and_then(|v| v.to_str().ok()) {
            None => out.push(format!("{call}: documented header {name} missing")),
            Some(v) => conform(
                doc,
                &header["schema"],
                &Value::String(v.to_owned()),
                &format!("{call}: header {name}"),
                &mut out,
            ),
        }
    }
    let Some(content) = response["content"].as_object() else {
        return out;
    };
    let media = content
        .iter()
        .find(|(k, _)| essence(k) == answer.content_type);
    let Some((media_type, media)) = media else {
        out.push(format!(
            "{call}: content type {:?} not documented (documented: {:?})",
            answer.content_type,
            content.keys().collect::<Vec<_>>()
        ));
        return out;
    };
    let value = if essence(media_type) == "application/json" {
        match serde_json::from_str(&answer.body) {
            Ok(v) => v,
            Err(e) => {
                out.push(format!("{call}: body is not JSON ({e}): {:?}", answer.body));
                return out;
            }
        }
    } else {
        Value::String(answer.body.clone())
    };
    conform(
        doc,
        &media["schema"],
        &value,
        &format!("{call}: body"),
        &mut out,
    );
    out
}

/// The `ferry` binary with an admin token, and a client for its admin API.
struct Server {
    ferry: Ferry,
    client: reqwest::Client,
}

impl Server {
    fn start(queue: &str, sink_url: &str) -> Self {
        let route = Route {
            source: amqp_source(queue, ""),
            sink_url,
            sink: "",
            delivery: "",
        };
        Self {
            ferry: Ferry::start_with(&route, &format!("token = \"{TOKEN}\"")),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
        }
    }

    fn log(&self) -> String {
        self.ferry.log()
    }

    async fn call(&self, method: &str, path: &str, authorization: Option<&str>) -> Answer {
        let method =
            reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("HTTP method");
        let mut request = self.client.request(
            method.clone(),
            format!("http://127.0.0.1:{}{path}", self.ferry.admin_port),
        );
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}; log:\n{}", self.log()));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(essence)
            .unwrap_or_default();
        let body = response.text().await.expect("response body");
        Answer {
            status,
            content_type,
            headers,
            body,
        }
    }

    async fn paused(&self) -> bool {
        let answer = self.call("get", &format!("/routes/{ROUTE}"), None).await;
        assert_eq!(answer.status, 200, "GET /routes/{ROUTE}: {}", answer.body);
        answer.json()["paused"]
            .as_bool()
            .unwrap_or_else(|| panic!("paused is not a boolean: {}", answer.body))
    }
}

/// What a state-changing call leaves behind: the route's `paused` after success.
fn pauses(template: &str) -> Option<bool> {
    match template {
        "/routes/{name}/pause" | "/consumer/stop" => Some(true),
        "/routes/{name}/resume" | "/consumer/start" => Some(false),
        _ => None,
    }
}

/// The checker must reject a wrong type, a missing required property and a value
/// outside an enum, or the end-to-end test below could pass vacuously.
#[test]
fn the_checker_catches_drift() {
    let doc = document();
    let route = serde_json::json!({"$ref": "#/components/schemas/Route"});
    let good = serde_json::json!({
        "name": "r", "source": "amqp", "state": "running", "paused": false, "in_flight": 0,
        "concurrency_limit": 10, "backlog": 0, "received": 1, "delivered": 1, "retried": 0,
        "dead_lettered": 0
    });
    let mut out = Vec::new();
    conform(&doc, &route, &good, "route", &mut out);
    assert_eq!(out, Vec::<String>::new());
    for (key, bad) in [
        ("paused", serde_json::json!("false")),
        ("in_flight", serde_json::json!(1.5)),
        ("state", serde_json::json!("sleeping")),
    ] {
        let mut value = good.clone();
        value[key] = bad;
        let mut out = Vec::new();
        conform(&doc, &route, &value, "route", &mut out);
        assert!(!out.is_empty(), "{key} = {} passed", value[key]);
    }
    let mut value = good.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("dead_lettered");
    }
    let mut out = Vec::new();
    conform(&doc, &route, &value, "route", &mut out);
    assert!(!out.is_empty(), "a missing required property passed");
}

/// Calls every documented operation on a running ferry: GETs plainly; PUTs without a
/// token, with a wrong one (both 401, nothing changes) and with the right one (200, and
/// the route really is paused or resumed); `{name}` with the route and with an unknown
/// name (404). Then checks that every call of the admin API is documented and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_server_answers_as_documented() {
    let doc = document();
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "not an OpenAPI 3 document"
    );
    let mut operations = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.push((method, template.as_str()));
            }
        }
    }
    let mut problems: Vec<String> = CALLS
        .iter()
        .filter(|(m, p)| !operations.contains(&(*m, *p)))
        .map(|(m, p)| format!("{} {p}: not in the document", m.to_uppercase()))
        .collect();

    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("admin-api").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let server = Server::start(&queue.name, &endpoint.url());
    server.ferry.wait_ready(Duration::from_secs(20)).await;

    let right = format!("Bearer {TOKEN}");
    let mut calls = 0;
    for &(method, template) in &operations {
        let names: &[&str] = if template.contains("{name}") {
            &[ROUTE, UNKNOWN_ROUTE]
        } else {
            &[ROUTE]
        };
        for &name in names {
            let path = template.replace("{name}", name);
            let tokens: &[Option<&str>] = if method == "get" {
                &[None]
            } else {
                &[None, Some("Bearer wrong-token"), Some(&right)]
            };
            for &authorization in tokens {
                let before = server.paused().await;
                let answer = server.call(method, &path, authorization).await;
                calls += 1;
                let call = format!(
                    "{} {path} (authorization {authorization:?})",
                    method.to_uppercase()
                );
                problems.extend(check(&doc, method, template, &answer));
                let expected = if method != "get" && authorization != Some(right.as_str()) {
                    401
                } else if name == UNKNOWN_ROUTE {
                    404
                } else {
                    200
                };
                if answer.status != expected {
                    problems.push(format!(
                        "{call}: {} instead of {expected}: {:?}",
                        answer.status, answer.body
                    ));
                    continue;
                }
                let after = server.paused().await;
                match (answer.status, pauses(template)) {
                    (200, Some(paused)) => {
                        if after != paused {
                            problems.push(format!("{call}: route paused = {after} afterwards"));
                        }
                        let body = answer.json();
                        let reported = body
                            .get("paused")
                            .and_then(Value::as_bool)
                            .or_else(|| body["status"].as_str().map(|s| s == "stopped"));
                        if reported != Some(paused) {
                            problems.push(format!("{call}: answered {body}"));
                        }
                    }
                    _ if after != before => {
                        problems.push(format!("{call}: changed paused to {after}"))
                    }
                    _ => {}
                }
            }
        }
    }

    // The other direction: each call of the admin API is served, not the router's 404
    // or 405 (which carry no JSON error).
    for (method, template) in CALLS {
        let path = template.replace("{name}", ROUTE);
        let answer = server.call(method, &path, Some(&right)).await;
        if answer.status == 405
            || (answer.status == 404 && answer.body.contains("no such admin path"))
        {
            problems.push(format!(
                "{} {path}: not served ({})",
                method.to_uppercase(),
                answer.status
            ));
        }
    }

    // A path that is not there, or a method a path does not take, answers with the same
    // JSON error as every other refusal; the scheme of the token is case-insensitive.
    for (method, path, status) in [("get", "/nope", 404), ("delete", "/routes", 405)] {
        let answer = server.call(method, path, None).await;
        let error = serde_json::from_str::<Value>(&answer.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned));
        if answer.status != status || error.is_none() {
            problems.push(format!(
                "{} {path}: {} {:?} instead of {status} with a JSON error",
                method.to_uppercase(),
                answer.status,
                answer.body
            ));
        }
    }
    let lower = format!("bearer {TOKEN}");
    let path = format!("/routes/{ROUTE}/pause");
    let answer = server.call("put", &path, Some(&lower)).await;
    if answer.status != 200 {
        problems.push(format!("PUT {path} with `bearer`: {}", answer.status));
    }
    let _ = server
        .call("put", &format!("/routes/{ROUTE}/resume"), Some(&right))
        .await;

    assert!(calls >= 20, "only {calls} calls made");
    assert!(
        problems.is_empty(),
        "the admin server and docs/openapi.yaml disagree:\n  {}\n\nlog:\n{}",
        problems.join("\n  "),
        server.log()
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

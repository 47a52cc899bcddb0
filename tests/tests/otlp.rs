//! Delivery spans exported over OTLP/HTTP to a recording collector (a real HTTP server),
//! checked against what the endpoint received: every request has its span, every span
//! hangs below the trace the message carried, and the endpoint's `traceparent` names it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply, Seen};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message as _;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    trace: String,
    id: String,
    parent: String,
    name: String,
    kind: i32,
    /// `Status.code`: 0 unset, 1 ok, 2 error.
    status: i32,
    attributes: BTreeMap<String, String>,
    service: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// Every span the collector received, decoding each request by its content type.
fn exported(collector: &Endpoint) -> Vec<Span> {
    let mut spans = Vec::new();
    for seen in collector.seen() {
        assert_eq!(
            seen.headers
                .get("x-test-auth")
                .and_then(|v| v.to_str().ok()),
            Some("collector-secret"),
            "the configured collector header is missing"
        );
        let content_type = header(&seen, "content-type");
        let request = match content_type.as_str() {
            "application/json" => serde_json::from_slice::<ExportTraceServiceRequest>(&seen.body)
                .unwrap_or_else(|e| panic!("OTLP JSON does not decode: {e}")),
            "application/x-protobuf" => ExportTraceServiceRequest::decode(seen.body.as_ref())
                .unwrap_or_else(|e| panic!("OTLP protobuf does not decode: {e}")),
            other => panic!("unexpected content type {other:?}"),
        };
        for resource in request.resource_spans {
            let service = resource
                .resource
                .map(|r| text(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        trace: hex(&span.trace_id),
                        id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        status: span.status.map_or(0, |s| s.code),
                        attributes: text(&span.attributes),
                        service: service.clone(),
                    });
                }
            }
        }
    }
    spans
}

fn header(seen: &Seen, name: &str) -> String {
    seen.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// `(trace id, parent id, flags)` of a `traceparent`.
fn parts(traceparent: &str) -> (String, String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "malformed traceparent {traceparent:?}");
    (fields[1].into(), fields[2].into(), fields[3].into())
}

fn config(collector: &Endpoint, protocol: &str, extra: &str) -> String {
    format!(
        "[otlp]\nendpoint = \"http://{}\"\nprotocol = \"{protocol}\"\nservice_name = \"ferry-test\"\n\
         headers = {{ x-test-auth = \"collector-secret\" }}\n{extra}\n",
        collector.addr()
    )
}

/// Stops ferry the way operators do; queued spans are flushed on the way out.
async fn stop(mut ferry: Ferry) {
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "ferry did not stop cleanly: {status:?}; log:\n{}",
        ferry.log()
    );
}

/// 10 messages carrying a trace context and 10 without, one of each refused once (503):
/// 22 requests, 22 spans (JSON), each request's `traceparent` naming its own span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_a_span_in_the_messages_trace() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("otlp").await;
    let collector = Endpoint::start(|_| Reply::ok()).await;
    let endpoint = Endpoint::start(|seen| {
        let body = String::from_utf8_lossy(&seen.body);
        if body.contains("fail-once") && seen.attempt == 1 {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    })
    .await;
    let mut published = BTreeMap::new();
    for i in 0..20 {
        let label = if i % 10 == 3 {
            format!("fail-once-{i}")
        } else {
            format!("m-{i}")
        };
        let body = format!(r#"{{"label":"{label}"}}"#);
        if i < 10 {
            let trace = format!("{:032x}", 0x0af7_6519_16cd_43dd_8448_eb21_1c80_3190u128 + i);
            let parent = format!("{:016x}", 0xb7ad_6b71_6920_3331u64 + i as u64);
            let traceparent = format!("00-{trace}-{parent}-01");
            let headers = [
                ("traceparent", traceparent.as_str()),
                ("tracestate", "congo=t61rcWkgMzE"),
            ];
            rabbit
                .publish_with_headers(&queue.name, body.as_bytes(), &headers)
                .await;
            published.insert(label, Some((trace, parent)));
        } else {
            rabbit
                .publish_with_headers(&queue.name, body.as_bytes(), &[])
                .await;
            published.insert(label, None);
        }
    }
    let route = Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nmin_backoff = \"10ms\"\nmax_backoff = \"50ms\"",
    };
    let ferry = Ferry::start_with(&route, &config(&collector, "http/json", ""));
    let ok = |s: &Seen| s.status == 200;
    let all = wait_until(Duration::from_secs(30), || {
        endpoint.seen().iter().filter(|s| ok(s)).count() >= 20
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    stop(ferry).await;

    let requests = endpoint.seen();
    assert_eq!(requests.len(), 22, "20 messages, 2 of them twice");
    let spans = exported(&collector);
    let by_id: BTreeMap<(String, String), &Span> = spans
        .iter()
        .map(|s| ((s.trace.clone(), s.id.clone()), s))
        .collect();
    assert_eq!(spans.len(), 22, "one span per request: {spans:#?}");
    assert_eq!(by_id.len(), 22, "span ids are unique");
    let mut traces_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for seen in &requests {
        let body: serde_json::Value = serde_json::from_slice(&seen.body).expect("envelope");
        let msg: serde_json::Value =
            serde_json::from_str(body["msg"].as_str().expect("msg")).expect("payload");
        let label = msg["label"].as_str().expect("label").to_owned();
        let (trace, span_id, flags) = parts(&header(seen, "traceparent"));
        assert_eq!(flags, "01", "{label}: sampled");
        let span = by_id
            .get(&(trace.clone(), span_id.clone()))
            .unwrap_or_else(|| {
                panic!(
                    "{label} attempt {}: no span {trace}/{span_id}",
                    seen.attempt
                )
            });
        assert_eq!(span.name, "deliver r");
        assert_eq!(span.kind, 3, "client span");
        assert_eq!(span.service, "ferry-test");
        let a = &span.attributes;
        assert_eq!(a["ferry.attempt"], seen.attempt.to_string());
        assert_eq!(
            a["messaging.message.id"],
            header(seen, "x-ferry-message-id")
        );
        assert_eq!(a["messaging.destination.name"], queue.name);
        assert_eq!(a["http.response.status_code"], seen.status.to_string());
        assert_eq!(
            span.status == 2,
            seen.status != 200,
            "{label}: error status"
        );
        match &published[&label] {
            Some((published_trace, published_parent)) => {
                assert_eq!(trace, *published_trace, "{label}: stays in its trace");
                assert_eq!(
                    span.parent, *published_parent,
                    "{label}: child of the publisher"
                );
                assert_eq!(header(seen, "tracestate"), "congo=t61rcWkgMzE");
            }
            None if seen.attempt == 1 => assert!(span.parent.is_empty(), "{label}: a root span"),
            None => {
                // A retry of a message without a trace joins its first attempt's trace.
                let first = spans
                    .iter()
                    .find(|s| s.trace == trace && s.attributes["ferry.attempt"] == "1")
                    .unwrap_or_else(|| panic!("{label}: retry outside its first attempt's trace"));
                assert_eq!(span.parent, first.id);
            }
        }
        traces_of.entry(label).or_default().insert(trace);
    }
    assert_eq!(traces_of.len(), 20);
    assert!(
        traces_of.values().all(|t| t.len() == 1),
        "each message's attempts share one trace: {traces_of:?}"
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// Protobuf export with `sample_ratio = 0`: messages whose publisher sampled their trace are
/// exported (the parent decides), new traces are not, and the endpoint is told so in the
/// `traceparent` flags; every message is delivered either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_export_follows_the_parents_sampling_decision() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("otlp-sampled").await;
    let collector = Endpoint::start(|_| Reply::ok()).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let mut sampled = BTreeSet::new();
    for i in 0..20u64 {
        let body = format!("s-{i}");
        if i % 2 == 0 {
            let trace = format!(
                "{:032x}",
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736u128 + u128::from(i)
            );
            let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
            rabbit
                .publish_with_headers(
                    &queue.name,
                    body.as_bytes(),
                    &[("traceparent", &traceparent)],
                )
                .await;
            sampled.insert(trace);
        } else {
            rabbit
                .publish_with_headers(&queue.name, body.as_bytes(), &[])
                .await;
        }
    }
    let route = Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4",
    };
    let ferry = Ferry::start_with(
        &route,
        &config(&collector, "http/protobuf", "sample_ratio = 0.0"),
    );
    let all = wait_until(Duration::from_secs(30), || endpoint.seen().len() >= 20).await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    stop(ferry).await;

    let mut told_sampled = BTreeSet::new();
    for seen in endpoint.seen() {
        let (trace, _, flags) = parts(&header(&seen, "traceparent"));
        if flags == "01" {
            told_sampled.insert(trace);
        } else {
            assert_eq!(flags, "00", "unsampled new trace");
        }
    }
    assert_eq!(
        told_sampled, sampled,
        "the endpoint hears the parent's decision"
    );
    let exported: BTreeSet<String> = exported(&collector).into_iter().map(|s| s.trace).collect();
    assert_eq!(exported, sampled, "only the sampled traces are exported");
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

/// A collector that cannot be reached costs deliveries nothing, and shutdown is not held
/// past the export timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_hold_deliveries() {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("otlp-down").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let expected = rabbit.publish_numbered(&queue.name, "d", 200).await;
    let closed = ferry_e2e::free_port();
    let route = Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 8",
    };
    let otlp = format!("[otlp]\nendpoint = \"http://127.0.0.1:{closed}\"\ntimeout = \"1s\"\n");
    let ferry = Ferry::start_with(&route, &otlp);
    let all = wait_until(Duration::from_secs(30), || {
        endpoint.delivered_set() == expected
    })
    .await;
    assert!(all, "not every message arrived; log:\n{}", ferry.log());
    let stopping = std::time::Instant::now();
    stop(ferry).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

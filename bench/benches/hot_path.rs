//! Micro-benchmarks of the per-message hot path — SNS envelope decoding, envelope
//! encoding, header building — so a regression shows here before an end-to-end run.
//!
//! `cargo bench -p ferry-bench --bench hot_path`

use std::hint::black_box;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_core::Message;

/// A 256-byte JSON payload, the size the end-to-end benchmarks use.
fn payload() -> String {
    let mut body = String::from(r#"{"order":"o-1234","items":["#);
    while body.len() < 250 {
        body.push_str(r#""sku-001","#);
    }
    body.push_str(r#""x"]}"#);
    body
}

fn message() -> Message {
    let mut m = Message::new(
        "4c1b0b6e-7f7e-5d5c-9d4e-2a7b1f3c9e10",
        payload(),
        Arc::from("orders-consumer"),
    );
    m.attributes.insert("tenant".into(), "acme".into());
    m.attributes.insert("kind".into(), "order.created".into());
    m.attempt = 2;
    m
}

fn sns_body() -> String {
    serde_json::json!({
        "Type": "Notification",
        "MessageId": "4c1b0b6e-7f7e-5d5c-9d4e-2a7b1f3c9e10",
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:orders-topic",
        "Message": payload(),
        "Timestamp": "2026-11-23T10:00:00.000Z",
        "SignatureVersion": "1",
        "MessageAttributes": {
            "tenant": {"Type": "String", "Value": "acme"},
            "kind": {"Type": "String", "Value": "order.created"}
        }
    })
    .to_string()
}

fn hot_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_message");
    group.throughput(Throughput::Elements(1));
    let body = sns_body();
    group.bench_function("sns_unwrap", |b| {
        b.iter(|| ferry_sqs::sns::unwrap(black_box(&body)))
    });
    let m = message();
    group.bench_function("envelope_encode", |b| {
        b.iter(|| ferry_http::encode_envelope(black_box(&m)))
    });
    let route = HeaderValue::from_static("orders");
    group.bench_function("headers_build", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::new();
            ferry_http::message_headers(black_box(&m), &route, &mut headers);
            headers
        })
    });
    group.finish();
}

// The macros generate undocumented items.
#[allow(missing_docs)]
mod entry {
    use super::*;
    criterion_group!(benches, hot_path);
}
criterion_main!(entry::benches);

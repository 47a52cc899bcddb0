//! SQS dead letters end to end (the real `ferry` binary, the SQS emulator, a real HTTP
//! endpoint): a dead letter counts only once it landed, a failed send is a broker error and
//! loses nothing, the copy keeps every attribute of the original within SQS's limits, and
//! a copy near the size limit still lands.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_e2e::ferry::{run_cli, scratch, sqs_source, Route};
use ferry_e2e::sqs::{self, SqsProxy};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

const DEAD_LETTERED: &str =
    r#"ferry_deliveries_total{route="r",source="sqs",sink="http",outcome="dead_lettered"}"#;

fn broker_errors(operation: &str) -> String {
    format!(
        r#"ferry_broker_errors_total{{route="r",source="sqs",sink="http",operation="{operation}"}}"#
    )
}

async fn metric(ferry: &Ferry, name: &str) -> f64 {
    ferry.metric(name).await.unwrap_or(0.0)
}

/// The route's source with its SQS calls going through `proxy`.
fn through(proxy: &SqsProxy, queue: &str, dlq: &str, extra: &str) -> String {
    sqs_source(queue, Some(dlq), extra).replace(&ferry_e2e::sqs_endpoint(), &proxy.endpoint())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_queue_that_is_gone_counts_errors_not_dead_letters_and_loses_nothing() {
    const N: usize = 10;
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "dlq-gone").await;
    let dlq = sqs::create_queue(&client, "dlq-gone-dlq").await;
    let dlq_name = dlq.rsplit('/').next().expect("queue name").to_owned();
    let endpoint = Endpoint::start(|_| Reply::status(400).body("bad")).await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(
            &queue,
            Some(&dlq),
            "receivers = 1\nvisibility_timeout = \"2s\"",
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    client
        .delete_queue()
        .queue_url(&dlq)
        .send()
        .await
        .expect("delete the dead-letter queue");

    let sent: Vec<String> = (0..N).map(|i| format!("gone-{i}")).collect();
    sqs::send(&client, &queue, &sent).await;
    // Every message is refused by the endpoint and fails to land, at least once.
    let mut failed_sends = 0.0;
    for _ in 0..150 {
        failed_sends = metric(&ferry, &broker_errors("dead_letter")).await;
        if failed_sends >= N as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed_sends >= N as f64,
        "dead-letter send failures counted: {failed_sends}; log:\n{}",
        ferry.log()
    );
    assert_eq!(
        metric(&ferry, DEAD_LETTERED).await,
        0.0,
        "nothing landed, yet dead letters were counted"
    );
    let (visible, in_flight) = sqs::depth(&client, &queue).await;
    assert_eq!(visible + in_flight, N as u64, "messages left their queue");

    // The dead-letter queue is back: every message lands there, once.
    let again = sqs::create_queue_named(&client, &dlq_name).await;
    assert_eq!(again, dlq);
    let mut landed = 0.0;
    for _ in 0..300 {
        landed = metric(&ferry, DEAD_LETTERED).await;
        if landed >= N as f64 && sqs::depth(&client, &queue).await == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(landed, N as f64, "log:\n{}", ferry.log());
    assert_eq!(sqs::depth(&client, &queue).await, (0, 0));
    let dead = sqs::drain(&client, &dlq).await;
    let bodies: Vec<String> = dead.iter().map(|d| d.body.clone()).collect();
    let unique: BTreeSet<&String> = bodies.iter().collect();
    assert_eq!(bodies.len(), N, "dead letters: {bodies:?}");
    assert_eq!(unique, sent.iter().collect::<BTreeSet<_>>());
    println!(
        "dead-letter queue gone: sent {N}, dead-lettered {} unique, {} duplicates, lost {}, \
         failed dead-letter sends counted {failed_sends}",
        unique.len(),
        bodies.len() - unique.len(),
        N - unique.len()
    );
}

fn string_attribute(value: &str) -> aws_sdk_sqs::types::MessageAttributeValue {
    aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("attribute")
}

/// The string attributes of a stored message, with the packed originals unpacked.
fn unpacked(m: &aws_sdk_sqs::types::Message) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in m.message_attributes().into_iter().flatten() {
        let text = value.string_value().unwrap_or_default().to_owned();
        if name == "ferry_original_attributes" {
            let packed: BTreeMap<String, serde_json::Value> =
                serde_json::from_str(&text).expect("packed attributes are JSON");
            for (n, v) in packed {
                out.insert(n, v["StringValue"].as_str().unwrap_or_default().to_owned());
            }
        } else {
            out.insert(name.clone(), text);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_all_twelve_attributes_and_redrive_restores_them() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "dl-attrs").await;
    let dlq = sqs::create_queue(&client, "dl-attrs-dlq").await;
    let originals: BTreeMap<String, String> = (0..12)
        .map(|i| (format!("attr{i:02}"), format!("value {i}")))
        .collect();
    // The emulator takes 12 attributes; ferry's copy must fit what SQS itself allows.
    let mut send = client
        .send_message()
        .queue_url(&queue)
        .message_body("twelve");
    for (name, value) in &originals {
        send = send.message_attributes(name, string_attribute(value));
    }
    send.send().await.expect("send");
    let proxy = SqsProxy::start(sqs::sqs_limits).await;
    let endpoint = Endpoint::start(|_| Reply::status(400).body("bad")).await;
    let route = Route {
        source: through(&proxy, &queue, &dlq, "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    };
    let mut ferry = Ferry::start(&route);
    ferry.wait_ready(Duration::from_secs(20)).await;
    let landed = wait_until(Duration::from_secs(20), || !endpoint.seen().is_empty()).await;
    assert!(landed, "never delivered; log:\n{}", ferry.log());
    let mut stored = Vec::new();
    for _ in 0..50 {
        stored = sqs::peek(&client, &dlq).await;
        if !stored.is_empty() {
            break;
        }
    }
    // A clean stop: a receive still open on the emulator would take the redriven message.
    ferry.signal("TERM");
    let exit = ferry.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    assert_eq!(
        stored.len(),
        1,
        "proxy refusals: {}",
        proxy.failed("SendMessage")
    );
    assert!(stored[0].message_attributes().map_or(0, |a| a.len()) <= 10);
    let copy = unpacked(&stored[0]);
    for (name, value) in &originals {
        assert_eq!(copy.get(name), Some(value), "{name} in the copy {copy:?}");
    }
    assert_eq!(copy["ferry_dead_letter_reason"], "bad");
    assert_eq!(copy["ferry_last_status"], "400");

    // Redrive, straight against the emulator: the message goes back as it was published.
    let direct = Route {
        source: sqs_source(&queue, Some(&dlq), ""),
        ..route
    };
    let config = scratch("redrive").join("ferry.toml");
    std::fs::write(&config, direct.config(ferry_e2e::free_port())).expect("config");
    let out = run_cli(&[
        "redrive",
        "--config",
        &config.display().to_string(),
        "--route",
        "r",
    ]);
    assert!(
        out.status.success(),
        "redrive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = sqs::drain(&client, &queue).await;
    assert_eq!(
        back.len(),
        1,
        "depth {:?}, redrive: {}{}",
        sqs::depth(&client, &queue).await,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(back[0].body, "twelve");
    let restored: BTreeMap<String, String> = back[0].attributes.clone().into_iter().collect();
    assert_eq!(restored, originals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_near_the_size_limit_still_lands() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "dl-big").await;
    let dlq = sqs::create_queue(&client, "dl-big-dlq").await;
    let attributes = [("tenant", "acme"), ("kind", "order"), ("region", "eu")];
    let extra: usize = attributes
        .iter()
        .map(|(n, v)| n.len() + "String".len() + v.len())
        .sum();
    // The original is within SQS's limit, with 300 bytes to spare.
    let body = "x".repeat(262_144 - 300 - extra);
    let mut send = client.send_message().queue_url(&queue).message_body(&body);
    for (name, value) in attributes {
        send = send.message_attributes(name, string_attribute(value));
    }
    send.send().await.expect("send");
    let proxy = SqsProxy::start(sqs::sqs_limits).await;
    // A reason of 1 KB: with it, the copy would be over the limit.
    let reason = "r".repeat(1024);
    let endpoint = Endpoint::start(move |_| Reply::status(422).body(&reason)).await;
    let ferry = Ferry::start(&Route {
        source: through(
            &proxy,
            &queue,
            &dlq,
            "receivers = 1\nvisibility_timeout = \"2s\"",
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let mut landed = 0.0;
    for _ in 0..150 {
        landed = metric(&ferry, DEAD_LETTERED).await;
        if landed >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        landed,
        1.0,
        "requests: {}, refused dead-letter sends: {}; log:\n{}",
        endpoint.seen().len(),
        proxy.failed("SendMessage"),
        ferry.log()
    );
    let stored = sqs::drain(&client, &dlq).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].body, body);
    for (name, value) in attributes {
        assert_eq!(stored[0].attributes[name], value);
    }
    let reason = &stored[0].attributes["ferry_dead_letter_reason"];
    assert!(
        !reason.is_empty() && reason.len() < 1024,
        "{} bytes",
        reason.len()
    );
    assert_eq!(proxy.failed("SendMessage"), 0);
    assert_eq!(endpoint.seen().len(), 1, "the message came back");
    assert_eq!(sqs::depth(&client, &queue).await, (0, 0));
}

//! `Idempotency-Key` on SQS end to end: an SNS envelope whose `MessageId` is empty or could
//! not be a header value is delivered under the SQS `MessageId`, never without a key.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::ferry::{sqs_source, Route};
use ferry_e2e::{sqs, wait_until, Endpoint, Ferry, Reply};

fn notification(message_id: &str, message: &str) -> String {
    serde_json::json!({
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:odd-ids",
        "Message": message,
        "Timestamp": "2024-01-02T03:04:05.678Z",
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sns_ids_unfit_for_a_header_give_way_to_the_sqs_message_id() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "odd-ids").await;
    // (SNS MessageId, whether it can be the key)
    let cases = [
        ("", false),
        ("", false),
        ("line\r\nbreak", false),
        ("line\nfeed", false),
        ("Injected: header\r\n", false),
        ("tab\there", false),
        ("caf\u{e9}", false),
        (" padded ", false),
        ("5f3c8d2e-good-id", true),
    ];
    let bodies: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, (id, _))| notification(id, &format!("m{i}")))
        .collect();
    let sqs_ids = sqs::send_ids(&client, &queue, &bodies).await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: sqs_source(&queue, None, "receivers = 1"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let done = wait_until(Duration::from_secs(30), || {
        endpoint.delivered().len() >= cases.len()
    })
    .await;
    assert!(
        done,
        "delivered {} of {}; log:\n{}",
        endpoint.delivered().len(),
        cases.len(),
        ferry.log()
    );
    let by_msg: BTreeMap<String, _> = endpoint
        .delivered()
        .into_iter()
        .filter_map(|s| Some((s.msg()?, s)))
        .collect();
    assert_eq!(by_msg.len(), cases.len(), "one request per message");
    for (i, (sns_id, fit)) in cases.iter().enumerate() {
        let seen = &by_msg[&format!("m{i}")];
        let key = seen
            .headers
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
        let expected = if *fit { *sns_id } else { sqs_ids[i].as_str() };
        assert_eq!(key.as_deref(), Some(expected), "SNS MessageId {sns_id:?}");
        assert!(!expected.is_empty());
        assert_eq!(seen.id, expected, "X-Ferry-Message-Id of {sns_id:?}");
    }
    assert_eq!(
        endpoint.seen().len(),
        cases.len(),
        "no retries, no duplicates"
    );
}

//! Forged SNS envelopes end to end (the real `ferry` binary, the SQS emulator, a real HTTP
//! endpoint, the signing certificate served over HTTPS): with `sns` set, genuine v1 and v2
//! notifications are delivered under their SNS MessageId, and every envelope that cannot be
//! shown to come from a listed topic is dead-lettered with the reason and never reaches the
//! endpoint; a certificate that cannot be fetched leaves the message on the queue.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::ferry::{sqs_source, Route};
use ferry_e2e::sns::{signing, CertServer};
use ferry_e2e::sqs;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

const TOPIC: &str = "arn:aws:sns:us-east-1:000000000000:orders";
const REASON: &str = "ferry_dead_letter_reason";

fn start(cert: &CertServer, queue: &str, dlq: &str, endpoint: &Endpoint) -> Ferry {
    let wrapper = cert.env_wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    Ferry::start_in(
        &Route {
            source: sqs_source(
                queue,
                Some(dlq),
                &format!("receivers = 1\nsns = {{ topic_arns = [\"{TOPIC}\"] }}"),
            ),
            sink_url: &endpoint.url(),
            sink: "",
            delivery: "",
        },
        "",
        &wrapper,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_envelopes_are_delivered_and_forged_ones_dead_lettered_unsent() {
    let cert = CertServer::start().await;
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "sns-sig").await;
    let dlq = sqs::create_queue(&client, "sns-sig-dlq").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = start(&cert, &queue, &dlq, &endpoint);
    ferry.wait_ready(Duration::from_secs(20)).await;
    let url = cert.cert_url();

    let mut genuine = Vec::new();
    for version in ["1", "2"] {
        for i in 0..5 {
            let id = format!("genuine-v{version}-{i}");
            let mut e = signing::notification(&id, TOPIC, &format!("msg {id}"), &url);
            if i % 2 == 0 {
                e["Subject"] = "an order".into();
            }
            signing::sign(&mut e, version);
            genuine.push((id, e.to_string()));
        }
    }
    let forged_one = |id: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let mut e = signing::notification(id, TOPIC, &format!("msg {id}"), &url);
        change(&mut e);
        e.to_string()
    };
    let signed = |e: &mut serde_json::Value| signing::sign(e, "2");
    let other_host = url.replace("localhost", "127.0.0.1");
    let plain_http = url.replace("https://", "http://");
    let forged: Vec<(&str, String, &str)> = vec![
        (
            "forged-unsigned",
            forged_one("forged-unsigned", &|e| e["SignatureVersion"] = "2".into()),
            "no Signature",
        ),
        (
            "forged-wrong-signature",
            forged_one("forged-wrong-signature", &|e| {
                signed(e);
                let mut other = signing::notification("x", TOPIC, "other", &url);
                signed(&mut other);
                e["Signature"] = other["Signature"].clone();
            }),
            "does not match",
        ),
        (
            "forged-tampered",
            forged_one("forged-tampered", &|e| {
                signed(e);
                e["Message"] = "msg tampered".into();
            }),
            "does not match",
        ),
        (
            "forged-other-host",
            forged_one("forged-other-host", &|e| {
                e["SigningCertURL"] = other_host.clone().into();
                signed(e);
            }),
            "not an https:// URL on an SNS host",
        ),
        (
            "forged-http",
            forged_one("forged-http", &|e| {
                e["SigningCertURL"] = plain_http.clone().into();
                signed(e);
            }),
            "not an https:// URL on an SNS host",
        ),
        (
            "forged-unlisted-topic",
            forged_one("forged-unlisted-topic", &|e| {
                e["TopicArn"] = "arn:aws:sns:us-east-1:000000000000:other".into();
                signed(e);
            }),
            "not in sns.topic_arns",
        ),
        (
            "forged-confirmation",
            forged_one("forged-confirmation", &|e| {
                e["Type"] = "SubscriptionConfirmation".into();
            }),
            "not a notification",
        ),
    ];
    let raw = "a raw delivery, no envelope".to_owned();

    let mut bodies: Vec<String> = genuine.iter().map(|(_, b)| b.clone()).collect();
    bodies.extend(forged.iter().map(|(_, b, _)| b.clone()));
    bodies.push(raw.clone());
    let sqs_ids = sqs::send_ids(&client, &queue, &bodies).await;
    let raw_sqs_id = sqs_ids.last().expect("an id").clone();

    let expected: BTreeSet<String> = genuine
        .iter()
        .map(|(id, _)| format!("msg {id}"))
        .chain([raw.clone()])
        .collect();
    let delivered = wait_until(Duration::from_secs(30), || {
        endpoint.delivered_set().len() >= expected.len()
    })
    .await;
    assert!(
        delivered,
        "delivered {:?}\n{}",
        endpoint.delivered_set(),
        ferry.log()
    );

    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead.len() < forged.len() && tokio::time::Instant::now() < deadline {
        dead.extend(sqs::drain(&client, &dlq).await);
    }
    let all_dead = dead.len() >= forged.len();
    assert!(all_dead, "dead letters {dead:#?}\n{}", ferry.log());
    // Nothing more arrives: give a late request the time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;

    assert_eq!(endpoint.delivered_set(), expected);
    for seen in endpoint.delivered() {
        let msg = seen.msg().expect("msg");
        if msg == raw {
            // Not an envelope: delivered as it is, under the SQS MessageId.
            assert_eq!(seen.id, raw_sqs_id);
        } else {
            let id = msg.strip_prefix("msg ").expect("a genuine message");
            assert_eq!(seen.id, id, "the SNS MessageId is the id");
            assert_eq!(
                seen.headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok()),
                Some(id)
            );
            assert_eq!(
                seen.headers
                    .get("x-ferry-attr-tenant")
                    .and_then(|v| v.to_str().ok()),
                Some("acme")
            );
        }
        assert!(
            !seen.id.starts_with("forged"),
            "a forged id reached the endpoint"
        );
    }
    assert_eq!(dead.len(), forged.len(), "{dead:#?}");
    for (id, body, why) in &forged {
        let copy = dead
            .iter()
            .find(|d| d.body == *body)
            .unwrap_or_else(|| panic!("{id}: no dead letter with its original body"));
        let reason = copy
            .attributes
            .get(REASON)
            .map(String::as_str)
            .unwrap_or("");
        assert!(
            reason.contains(why),
            "{id}: reason {reason:?}, expected {why:?}"
        );
    }
    // In = out: every id sent was delivered or dead-lettered, and none is left.
    assert_eq!(expected.len() + dead.len(), sqs_ids.len());
    assert_eq!(sqs::depth(&client, &queue).await, (0, 0));
    // One fetch served every signature: the certificate is kept, and the other host and
    // the http:// URL were never fetched.
    assert_eq!(cert.fetches(), 1);
    let dead_lettered = ferry
        .metric(
            r#"ferry_deliveries_total{route="r",source="sqs",sink="http",outcome="dead_lettered"}"#,
        )
        .await;
    assert_eq!(dead_lettered, Some(forged.len() as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_cannot_be_fetched_leaves_the_message_on_the_queue() {
    let cert = CertServer::start().await;
    cert.set_failing(true);
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "sns-cert-down").await;
    let dlq = sqs::create_queue(&client, "sns-cert-down-dlq").await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = start(&cert, &queue, &dlq, &endpoint);
    ferry.wait_ready(Duration::from_secs(20)).await;

    let mut e = signing::notification("waits", TOPIC, "msg waits", &cert.cert_url());
    signing::sign(&mut e, "1");
    sqs::send(&client, &queue, &[e.to_string()]).await;
    let tried = wait_until(Duration::from_secs(15), || cert.fetches() > 0).await;
    assert!(tried, "{}", ferry.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(endpoint.delivered().is_empty());
    assert_eq!(sqs::depth(&client, &dlq).await, (0, 0), "not dead-lettered");
    assert_eq!(
        sqs::depth(&client, &queue).await,
        (0, 1),
        "waits on the queue"
    );
    let errors = ferry
        .metric(r#"ferry_broker_errors_total{route="r",source="sqs",sink="http",operation="sns_certificate"}"#)
        .await;
    assert!(errors.unwrap_or(0.0) >= 1.0, "{errors:?}");

    // Once the certificate can be fetched, the message is delivered.
    cert.set_failing(false);
    let delivered = wait_until(Duration::from_secs(45), || {
        endpoint.delivered_set().contains("msg waits")
    })
    .await;
    assert!(delivered, "{}", ferry.log());
    assert_eq!(endpoint.delivered()[0].id, "waits");
}

//! Signed deliveries in CloudEvents mode, checked by a real endpoint the way a receiver
//! following the Standard Webhooks and CloudEvents specifications would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply, Seen};
use ferry_http::SigningKey;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    seen.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// What a receiver would refuse in this request, if anything.
fn refusal(key: &SigningKey, seen: &Seen, queue: &str) -> Option<String> {
    if let Err(e) = key.verify(
        header(seen, "webhook-id"),
        header(seen, "webhook-timestamp"),
        &seen.body,
        header(seen, "webhook-signature"),
        now(),
    ) {
        return Some(format!("signature: {e}"));
    }
    let expected = [
        ("ce-specversion", "1.0"),
        ("ce-id", header(seen, "webhook-id")),
        ("ce-source", queue),
        ("ce-type", "ferry.message"),
        ("content-type", "application/json"),
    ];
    for (name, value) in expected {
        if header(seen, name) != value {
            return Some(format!(
                "{name}: {:?}, expected {value:?}",
                header(seen, name)
            ));
        }
    }
    if header(seen, "ce-time").is_empty() {
        return Some("no ce-time".into());
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_cloudevents_are_accepted_by_a_verifying_endpoint() {
    const N: usize = 50;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("signed").await;
    let key = SigningKey::from_secret(SECRET).expect("key");
    let refused = Arc::new(Mutex::new(Vec::new()));
    let endpoint = {
        let (key, refused, queue) = (key.clone(), refused.clone(), queue.name.clone());
        Endpoint::start(move |seen| match refusal(&key, seen, &queue) {
            None => Reply::ok(),
            Some(why) => {
                refused.lock().expect("lock").push(why);
                Reply::status(401)
            }
        })
        .await
    };
    let messages: Vec<Outgoing> = (0..N)
        .map(|i| Outgoing::plain(format!(r#"{{"order":{i}}}"#)))
        .collect();
    rabbit.publish(&queue.name, &messages).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, ""),
        sink_url: &endpoint.url(),
        sink: &format!("mode = \"cloudevents\"\nsigning = {{ secret = \"{SECRET}\" }}"),
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    assert!(
        wait_until(Duration::from_secs(30), || endpoint.delivered_unique() == N).await,
        "delivered {} of {N}; refused: {:?}",
        endpoint.delivered_unique(),
        refused.lock().expect("lock")
    );
    assert!(refused.lock().expect("lock").is_empty());
    let seen = endpoint.seen();
    assert_eq!(seen.len(), N, "every request accepted at the first attempt");
    // The body is the payload itself, and the signature covers it: one byte more and the
    // same headers no longer verify.
    let first = &seen[0];
    assert!(first.body.starts_with(b"{\"order\":"));
    let mut tampered = first.clone();
    tampered.body = [&first.body[..], b" "].concat().into();
    assert!(refusal(&key, &tampered, &queue.name).is_some_and(|r| r.starts_with("signature")));
    assert!(
        !ferry.log().contains("MfKQ9r8G"),
        "the secret appears in the log"
    );
}

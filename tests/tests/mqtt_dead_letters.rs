//! Dead letters are published to the dead-letter topic with the payload, the original user
//! properties and ferry's reason as user properties, and only then acknowledged; a
//! dead-letter topic nobody subscribes to (where the broker would discard them) holds the
//! messages unacknowledged until a subscriber comes.

use std::time::Duration;

use ferry_e2e::conformance::mqtt::{self, DeadLetterTopic, Letter, ADDR};
use ferry_e2e::ferry::Route;
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

async fn bridge(source: String, endpoint: &Endpoint) -> Ferry {
    let ferry = Ferry::start(&Route {
        source,
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "max_attempts = 3\nmin_backoff = \"50ms\"\nmax_backoff = \"100ms\"",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    ferry
}

async fn stop(mut ferry: Ferry) -> String {
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(30)).await;
    let log = ferry.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "no clean exit; log:\n{log}"
    );
    log
}

async fn collect(dead: &DeadLetterTopic, n: usize) -> Vec<Letter> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(dead.take());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got
}

fn item(topic: &str, body: &str, id: &str) -> mqtt::Item {
    (
        topic.to_owned(),
        body.to_owned(),
        vec![
            ("message-id".to_owned(), id.to_owned()),
            ("tenant".to_owned(), "eu".to_owned()),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_the_reason_as_user_properties_and_the_original_is_acked() {
    mqtt::require_broker(ADDR).await;
    let base = ferry_e2e::unique("dl");
    let client_id = format!("{base}-bridge");
    let dead_topic = format!("dead/{base}");
    let dead = DeadLetterTopic::subscribe(ADDR, &dead_topic).await;
    let endpoint = Endpoint::start(|seen| match seen.msg() {
        Some(m) if m.starts_with("poison") => Reply::status(422).body("cannot parse"),
        Some(m) if m.starts_with("tired") => Reply::status(500).body("down"),
        _ => Reply::ok(),
    })
    .await;
    let ferry = bridge(
        mqtt::source(ADDR, &base, &client_id, &dead_topic, ""),
        &endpoint,
    )
    .await;
    let topic = format!("{base}/orders");
    mqtt::publish(
        ADDR,
        &[
            item(&topic, "fine-1", "id-1"),
            item(&topic, "poison-1", "id-2"),
            item(&topic, "tired-1", "id-3"),
        ],
    )
    .await;
    let letters = collect(&dead, 2).await;
    assert_eq!(
        letters.len(),
        2,
        "dead letters: {letters:?}; log:\n{}",
        ferry.log()
    );
    let arrived = wait_until(Duration::from_secs(10), || {
        endpoint.delivered_set().contains("fine-1")
    })
    .await;
    assert!(arrived, "fine-1 not delivered");
    let log = stop(ferry).await;
    for l in &letters {
        let p = |k: &str| l.properties.get(k).cloned().unwrap_or_default();
        assert_eq!(p("tenant"), "eu", "original properties kept: {l:?}");
        assert_eq!(p("ferry_route"), "r", "{l:?}");
        assert_eq!(p("ferry_topic"), topic, "{l:?}");
        match l.body.as_str() {
            "poison-1" => {
                assert_eq!(p("ferry_status"), "422", "{l:?}");
                assert!(p("ferry_reason").contains("cannot parse"), "{l:?}");
                assert_eq!(p("ferry_attempts"), "1", "{l:?}");
                assert_eq!(p("message-id"), "id-2", "{l:?}");
            }
            "tired-1" => {
                assert_eq!(p("ferry_status"), "500", "{l:?}");
                assert_eq!(p("ferry_attempts"), "3", "{l:?}");
            }
            other => panic!("unexpected dead letter {other}"),
        }
    }
    // The id came from the publisher's property.
    let ids: Vec<String> = endpoint.seen().iter().map(|s| s.id.clone()).collect();
    assert!(ids.contains(&"id-1".to_owned()), "{ids:?}");
    // Everything was acknowledged: the session holds nothing.
    assert_eq!(mqtt::held(ADDR, &client_id).await, 0, "log:\n{log}");
    mqtt::end_session(ADDR, &client_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_without_subscribers_holds_the_message_until_one_comes() {
    mqtt::require_broker(ADDR).await;
    let base = ferry_e2e::unique("dlnone");
    let client_id = format!("{base}-bridge");
    let dead_topic = format!("dead/{base}");
    let endpoint = Endpoint::start(|_| Reply::status(422).body("bad")).await;
    let ferry = bridge(
        mqtt::source(ADDR, &base, &client_id, &dead_topic, ""),
        &endpoint,
    )
    .await;
    mqtt::publish(ADDR, &[item(&format!("{base}/x"), "poison-1", "p1")]).await;
    // The broker would discard it: ferry keeps the message and says why on /routes.
    let shown = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (_, routes) = ferry.admin(reqwest::Method::GET, "/routes").await;
            let text = routes.to_string();
            if text.contains("no subscriber") {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(shown, "/routes does not say why; log:\n{}", ferry.log());
    let dead = DeadLetterTopic::subscribe(ADDR, &dead_topic).await;
    let letters = collect(&dead, 1).await;
    assert_eq!(letters.len(), 1, "log:\n{}", ferry.log());
    assert_eq!(letters[0].body, "poison-1");
    stop(ferry).await;
    assert_eq!(mqtt::held(ADDR, &client_id).await, 0);
    mqtt::end_session(ADDR, &client_id).await;
}

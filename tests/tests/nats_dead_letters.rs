//! Dead letters of a NATS route: published to the dead-letter subject with the original
//! headers and payload plus why (`Ferry-Reason`, `Ferry-Status`, ...), then acknowledged;
//! or, with `dead_letters = "term"`, terminated so the server never hands them out again.

use std::time::Duration;

use ferry_e2e::conformance::nats::{header, take_dead, unacked, NatsStream};
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::{until_zero, Endpoint, Ferry, Reply};

const DEAD_LETTERED: &str =
    r#"ferry_deliveries_total{route="r",source="nats",sink="http",outcome="dead_lettered"}"#;
const DROPPED: &str =
    r#"ferry_deliveries_total{route="r",source="nats",sink="http",outcome="dropped"}"#;

fn poison_endpoint() -> impl Fn(&ferry_e2e::Seen) -> Reply + Send + Sync + 'static {
    |seen| match seen.msg() {
        Some(m) if m.starts_with("poison") => Reply::status(422).body("cannot parse\r\nline two"),
        _ => Reply::ok(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_reach_the_subject_with_their_reason_and_headers() {
    let s = NatsStream::on_local("dl").await;
    let endpoint = Endpoint::start(poison_endpoint()).await;
    let ferry = Ferry::start(&Route {
        source: s.source(),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4\nmax_attempts = 3",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let mut messages: Vec<Outgoing> = (0..10)
        .map(|i| Outgoing::plain(format!("fine-{i}")))
        .collect();
    messages.extend((0..3).map(|i| Outgoing {
        body: format!("poison-{i}"),
        key: Some(format!("k{i}")),
    }));
    s.publish(&messages).await;

    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead.len() < 3 && tokio::time::Instant::now() < deadline {
        dead.extend(take_dead(&s.js, &format!("{}_DEAD_LETTERS", s.stream)).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = dead.len() == 3;
    assert!(all, "dead letters: {}; log:\n{}", dead.len(), ferry.log());
    for m in &dead {
        let body = String::from_utf8_lossy(&m.payload).into_owned();
        assert!(body.starts_with("poison-"), "{body}");
        let i = body.trim_start_matches("poison-");
        assert_eq!(header(m, "Ferry-Status"), "422");
        assert_eq!(
            header(m, "Ferry-Reason"),
            "cannot parse  line two",
            "one header line"
        );
        assert_eq!(header(m, "Ferry-Attempts"), "1");
        assert_eq!(header(m, "Ferry-Route"), "r");
        assert_eq!(header(m, "Ferry-Stream"), s.stream);
        assert_eq!(header(m, "Ferry-Subject"), format!("{}.k{i}", s.stream));
        assert!(header(m, "Ferry-Sequence").parse::<u64>().is_ok());
        assert_eq!(
            header(m, "Key"),
            format!("k{i}"),
            "the original headers are kept"
        );
    }
    assert!(
        until_zero(Duration::from_secs(20), || unacked(&s.js, &s.stream))
            .await
            .is_ok(),
        "the originals were not acknowledged"
    );
    assert_eq!(ferry.metric(DEAD_LETTERED).await, Some(3.0));
    assert_eq!(endpoint.seen().len(), 13, "each message asked once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_dead_letters_are_never_handed_out_again() {
    let mut s = NatsStream::on_local("term").await;
    // No dead-letter subject: the source section's line is replaced by the choice to term.
    let endpoint = Endpoint::start(poison_endpoint()).await;
    s.extra = String::new();
    let source = s
        .source()
        .lines()
        .filter(|l| !l.starts_with("dead_letter_subject"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\ndead_letters = \"term\"\n";
    let ferry = Ferry::start(&Route {
        source,
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 4",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let messages: Vec<Outgoing> = ["fine-1", "poison-1", "poison-2", "fine-2"]
        .iter()
        .map(|b| Outgoing::plain(*b))
        .collect();
    s.publish(&messages).await;
    assert!(
        until_zero(Duration::from_secs(20), || unacked(&s.js, &s.stream))
            .await
            .is_ok(),
        "terminated messages still pending"
    );
    assert_eq!(ferry.metric(DROPPED).await, Some(2.0));
    // Well past what a redelivery would take: the poison is not asked again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(endpoint.seen().len(), 4);
    assert_eq!(
        ferry_e2e::conformance::nats::consumer_counts(&s.js, &s.stream).await,
        Some((0, 0))
    );
}

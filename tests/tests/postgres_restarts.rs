//! A retry's time is kept in the row: after `kill -9` and a restart nothing is delivered
//! before it, the row keeps its attempts, and once it is due it arrives as attempt 2.

use std::collections::BTreeSet;
use std::time::Duration;

use ferry_e2e::conformance::postgres::PgTable;
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

/// Rows whose retry is written: unclaimed, one attempt, due in more than 500 s.
const WAITING: &str = "SELECT count(*) FROM {t} WHERE attempts = 1 AND locked_until IS NULL \
     AND locked_by IS NULL AND next_attempt_at > now() + interval '500 seconds'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_survives_kill_9_and_a_restart() {
    let mut table = PgTable::create("restarts", false).await;
    table.extra = "poll_interval = \"200ms\"".into();
    // Every first attempt is told to come back in ten minutes.
    let endpoint = Endpoint::start(|seen| {
        if seen.attempt <= 1 {
            let mut reply = Reply::status(429);
            reply.headers.push(("Retry-After", "600".to_owned()));
            reply
        } else {
            Reply::ok()
        }
    })
    .await;
    let start = || {
        Ferry::start(&Route {
            source: table.source(),
            sink_url: &endpoint.url(),
            sink: "",
            delivery: "concurrency = 8\nmax_backoff = \"1h\"",
        })
    };
    let ferry = start();
    ferry.wait_ready(Duration::from_secs(30)).await;
    let messages: Vec<Outgoing> = (0..20).map(|i| Outgoing::plain(format!("r-{i}"))).collect();
    table.insert(&messages).await;
    let mut written = false;
    for _ in 0..100 {
        if table.count(WAITING).await == 20 {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written, "retries not written; log:\n{}", ferry.log());
    assert_eq!(endpoint.seen().len(), 20);
    ferry.signal("KILL");
    drop(ferry);

    let ferry = start();
    ferry.wait_ready(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        endpoint.seen().len(),
        20,
        "delivered before the retry was due; log:\n{}",
        ferry.log()
    );
    assert_eq!(table.count(WAITING).await, 20, "the rows lost their retry");

    // Ten minutes pass.
    table
        .client
        .execute(
            &format!("UPDATE \"{}\" SET next_attempt_at = now()", table.name),
            &[],
        )
        .await
        .expect("make the retries due");
    let all = wait_until(Duration::from_secs(30), || endpoint.delivered().len() >= 20).await;
    assert!(all, "retries not delivered; log:\n{}", ferry.log());
    assert_eq!(
        until_zero(Duration::from_secs(20), || table
            .count("SELECT count(*) FROM {t}"))
        .await,
        Ok(())
    );
    let delivered = endpoint.delivered();
    assert!(delivered.iter().all(|s| s.attempt == 2), "{delivered:?}");
    let got: BTreeSet<String> = delivered.iter().filter_map(|s| s.msg()).collect();
    let sent: BTreeSet<String> = messages.into_iter().map(|m| m.body).collect();
    assert_eq!(got, sent);
    assert_eq!(delivered.len(), 20, "delivered twice");
}

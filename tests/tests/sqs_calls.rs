//! What an SQS route costs in API calls, counted by a proxy in front of the emulator: SQS
//! bills every call, so an idle route must not poll for nothing, a busy one must batch, and
//! a stop must not leave a long poll behind that takes a message nobody will deliver.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use ferry_e2e::ferry::Route;
use ferry_e2e::sqs::{self, SqsProxy};
use ferry_e2e::{wait_until, Endpoint, Ferry, Reply};

/// An `sqs` source with ferry's defaults (no `wait_time`, two receivers), through `proxy`.
fn default_source(queue_url: &str, proxy: &SqsProxy, extra: &str) -> String {
    format!(
        "type = \"sqs\"\nqueue_url = \"{queue_url}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\n{extra}\n",
        proxy.endpoint()
    )
}

fn total(calls: &HashMap<String, usize>) -> usize {
    calls.values().sum()
}

fn since(
    before: &HashMap<String, usize>,
    after: &HashMap<String, usize>,
) -> HashMap<String, usize> {
    after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// An idle route with the default settings makes at most 12 calls a minute (20 s long
/// polls, and no backlog polls while the receives find nothing), and says its backlog is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_route_makes_at_most_12_calls_a_minute() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "idle-calls").await;
    let proxy = SqsProxy::counting().await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: default_source(&queue, &proxy, ""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    // Past the start (queue lookups, the first backlog look, the first polls).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = proxy.calls();
    let window = Duration::from_secs(45);
    tokio::time::sleep(window).await;
    let made = since(&before, &proxy.calls());
    let per_minute = total(&made) as f64 * 60.0 / window.as_secs_f64();
    let backlog = ferry.metric("ferry_source_backlog").await;
    let log = ferry.log();
    drop(ferry);
    assert!(
        per_minute <= 12.0,
        "an idle route made {per_minute:.1} calls a minute ({made:?}); log:\n{log}"
    );
    assert_eq!(backlog, Some(0.0), "backlog of an empty queue");
}

/// A paused route still reports its queue's backlog as it grows (the receives that would
/// say it is empty are not made, so the backlog must be asked for), and a resume delivers
/// every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_route_still_reports_a_growing_backlog() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "paused-backlog").await;
    let proxy = SqsProxy::counting().await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start(&Route {
        source: default_source(&queue, &proxy, "wait_time = \"1s\""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    let (status, _) = ferry.admin(reqwest::Method::PUT, "/routes/r/pause").await;
    assert_eq!(status, 200);
    // Let a receive under way come back before anything is sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bodies: Vec<String> = (0..30).map(|i| format!("p-{i}")).collect();
    sqs::send(&client, &queue, &bodies).await;
    // ferry holds what its receivers had room for when the pause came (renewed, not
    // delivered); the backlog is what is visible on the queue besides.
    let deadline = Instant::now() + Duration::from_secs(40);
    let (reported, last) = loop {
        let (visible, _) = sqs::depth(&client, &queue).await;
        let backlog = ferry.metric("ferry_source_backlog").await;
        let right = visible > 0 && backlog == Some(visible as f64);
        if right || Instant::now() > deadline {
            break (right, (backlog, visible));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        reported,
        "backlog {:?} while paused with {} visible; log:\n{}",
        last.0,
        last.1,
        ferry.log()
    );
    assert!(endpoint.delivered().is_empty(), "delivered while paused");
    let (status, _) = ferry.admin(reqwest::Method::PUT, "/routes/r/resume").await;
    assert_eq!(status, 200);
    let all = wait_until(Duration::from_secs(30), || endpoint.delivered().len() >= 30).await;
    assert!(
        all,
        "{} of 30 delivered after the resume",
        endpoint.delivered().len()
    );
    let got: BTreeSet<String> = endpoint
        .delivered()
        .iter()
        .filter_map(|s| s.msg())
        .collect();
    assert_eq!(got, bodies.into_iter().collect::<BTreeSet<_>>());
    assert_eq!(endpoint.delivered().len(), 30, "a message delivered twice");
}

/// A stop while the receivers are in a 20 s long poll waits for the poll to answer: a
/// message sent just after SIGTERM, which that poll takes, is delivered within the grace
/// like everything else ferry holds, and nothing is left hidden on the queue. (A poll
/// dropped instead would go on receiving at SQS for a client gone away, and the message it
/// took would stay hidden for a visibility timeout and come back counted as received.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_long_poll_hides_no_message() {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "stop-in-poll").await;
    let proxy = SqsProxy::counting().await;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let mut ferry = Ferry::start(&Route {
        source: default_source(&queue, &proxy, "visibility_timeout = \"60s\""),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "",
    });
    ferry.wait_ready(Duration::from_secs(20)).await;
    // Both receivers are in a long poll by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped = Instant::now();
    ferry.signal("TERM");
    tokio::time::sleep(Duration::from_secs(3)).await;
    sqs::send(&client, &queue, &["late".to_owned()]).await;
    let status = ferry.wait_exit(Duration::from_secs(40)).await;
    let took = stopped.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "ferry did not stop cleanly ({status:?}); log:\n{}",
        ferry.log()
    );
    assert!(
        took < Duration::from_secs(25),
        "a stop took {took:?} (the long poll is 20 s)"
    );
    let delivered: Vec<String> = endpoint
        .delivered()
        .iter()
        .filter_map(|s| s.msg())
        .collect();
    assert_eq!(delivered, ["late"], "what the stop delivered");
    let (visible, in_flight) = sqs::depth(&client, &queue).await;
    assert_eq!(
        (visible, in_flight),
        (0, 0),
        "left on the queue after the stop; log:\n{}",
        ferry.log()
    );
}

/// Calls per delivered message on a busy route (a backlog to drain) with `batch_size = 10`,
/// counted from before the start: receives take ten at a time, deletes go ten to a `DeleteMessageBatch`, renewals ten to a
/// `ChangeMessageVisibilityBatch`, and the backlog is asked for no more than every 15 s.
/// Returns the calls by action and the calls per message.
async fn calls_per_message(
    latency: Duration,
    visibility: &str,
    count: usize,
) -> (HashMap<String, usize>, f64) {
    let client = sqs::client().await;
    let queue = sqs::create_queue(&client, "calls-per-message").await;
    let proxy = SqsProxy::counting().await;
    let endpoint = Endpoint::start(move |_| Reply::ok().after(latency)).await;
    // A backlog to drain, as a busy route has.
    let bodies: Vec<String> = (0..count).map(|i| format!("c-{i}")).collect();
    for chunk in bodies.chunks(100) {
        sqs::send(&client, &queue, chunk).await;
    }
    let before = proxy.calls();
    let ferry = Ferry::start(&Route {
        source: default_source(
            &queue,
            &proxy,
            &format!("wait_time = \"1s\"\nvisibility_timeout = \"{visibility}\""),
        ),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 64",
    });
    let all = wait_until(Duration::from_secs(120), || {
        endpoint.delivered().len() >= count
    })
    .await;
    assert!(
        all,
        "{} of {count} delivered; log:\n{}",
        endpoint.delivered().len(),
        ferry.log()
    );
    // Until the last deletes are through.
    let settled = ferry_e2e::until_zero(Duration::from_secs(30), || async {
        let (visible, in_flight) = sqs::depth(&client, &queue).await;
        visible + in_flight
    })
    .await;
    assert!(settled.is_ok(), "messages left on the queue: {settled:?}");
    let made = since(&before, &proxy.calls());
    drop(ferry);
    let got: BTreeSet<String> = endpoint
        .delivered()
        .iter()
        .filter_map(|s| s.msg())
        .collect();
    assert_eq!(got.len(), count, "every message delivered");
    let per_message = total(&made) as f64 / count as f64;
    eprintln!("endpoint {latency:?}, visibility {visibility}: {per_message:.3} calls per message {made:?}");
    (made, per_message)
}

/// With an endpoint that answers at once, and one that takes 20 ms: at most a quarter of a
/// call per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_route_makes_at_most_a_quarter_call_per_message() {
    for latency in [Duration::ZERO, Duration::from_millis(20)] {
        let (made, per_message) = calls_per_message(latency, "30s", 400).await;
        assert!(
            per_message <= 0.25,
            "{per_message:.3} calls per message at {latency:?}: {made:?}"
        );
    }
}

/// An endpoint slower than half the visibility timeout: every held message is renewed,
/// ten to a call, so renewals add at most a tenth of a call per message and renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_are_batched() {
    let (made, per_message) = calls_per_message(Duration::from_secs(2), "3s", 300).await;
    let renewals = made
        .get("ChangeMessageVisibilityBatch")
        .copied()
        .unwrap_or(0);
    assert!(
        renewals > 0,
        "no renewals with a 2 s endpoint and a 3 s visibility: {made:?}"
    );
    assert!(
        !made.contains_key("ChangeMessageVisibility"),
        "a renewal not batched: {made:?}"
    );
    assert!(
        per_message <= 0.5,
        "{per_message:.3} calls per message: {made:?}"
    );
}

//! The server itself goes away: a private `nats-server -js` is stopped while the bridge
//! drains its stream, and started again on the same port and store directory after 3 s.
//! The bridge reconnects by itself and nothing is lost. The conformance scenario with a
//! real restart instead of a cut connection, and one difference: a server that stops may
//! confirm its last acks without keeping them (seen with 2.9: the consumer comes back
//! with one delivered and acknowledged message still pending), so such a message comes
//! again after `ack_wait`, labelled, and the bridge runs until the server holds nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_e2e::conformance::nats::{unacked, NatsServer, NatsStream, BATCH};
use ferry_e2e::conformance::Outgoing;
use ferry_e2e::ferry::Route;
use ferry_e2e::{until_zero, wait_until, Endpoint, Ferry, Reply};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_nothing() {
    let server = NatsServer::start().await;
    let js =
        async_nats::jetstream::new(ferry_e2e::conformance::nats::connect(&server.addr()).await);
    let s = NatsStream::create(js, "restart", server.addr()).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    let mut ferry = Ferry::start(&Route {
        source: s.source(),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: "concurrency = 16",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let messages: Vec<Outgoing> = (0..400)
        .map(|i| Outgoing::plain(format!("c-{i}")))
        .collect();
    for chunk in messages[..200].chunks(100) {
        s.publish(chunk).await;
    }
    let reached = wait_until(Duration::from_secs(60), || {
        endpoint.delivered().len() >= 100
    })
    .await;
    assert!(reached, "no deliveries; log:\n{}", ferry.log());

    server.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.up().await;
    for chunk in messages[200..].chunks(100) {
        s.publish(chunk).await;
    }
    let all = wait_until(Duration::from_secs(120), || {
        endpoint.delivered_set().len() == 400
    })
    .await;
    assert!(
        all,
        "{} of 400 delivered; log:\n{}",
        endpoint.delivered_set().len(),
        ferry.log()
    );
    let settled = until_zero(Duration::from_secs(60), || unacked(&s.js, &s.stream)).await;
    assert!(
        settled.is_ok(),
        "{settled:?} left on the server; log:\n{}",
        ferry.log()
    );
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(30)).await;
    assert!(status.is_some_and(|s| s.success()), "log:\n{}", ferry.log());

    let mut copies: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for seen in endpoint.delivered() {
        copies
            .entry(seen.msg().unwrap_or_default())
            .or_default()
            .push(seen.attempt);
    }
    let twice: Vec<(&String, &Vec<u32>)> = copies.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(twice.len() <= 16 + 2 * BATCH, "{} duplicates", twice.len());
    for (body, attempts) in &twice {
        assert!(
            attempts.iter().filter(|a| **a <= 1).count() <= 1,
            "{body} came again unlabelled: {attempts:?}"
        );
    }
}

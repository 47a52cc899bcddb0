//! Fleet scenarios: three `ferry` processes on one queue or topic, as replicas run on
//! Kubernetes, counting every id in and out (see [`crate::faults::Report`]). Scale-out is
//! the broker's own: competing consumers on SQS and RabbitMQ, a consumer group on Kafka.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::conformance::{
    assert_drained, numbered, publish_in_chunks, start_bridge, stop, wait_delivered, wait_settled,
    Backend, Outgoing, Settings, TestQueue,
};
use crate::endpoint::{Endpoint, Reply};
use crate::faults::Report;
use crate::{wait_until, Ferry};

/// Replicas in every scenario.
pub const REPLICAS: usize = 3;

/// What the scenarios need to know of a broker beyond [`Backend`]: duplicates it makes by
/// itself (the SQS emulator hands out about 1 in 2,000 messages twice to concurrent
/// receivers; a Kafka rebalance re-reads what was in flight on revoked partitions).
#[derive(Debug, Clone, Copy)]
pub struct Explained {
    /// Duplicates per 1,000 messages the broker may make with several consumers.
    pub per_thousand: usize,
    /// Whether a consumer joining or leaving moves work in flight on other consumers (a
    /// Kafka rebalance): then each change of membership explains up to what is unacked.
    pub rebalances: bool,
}

fn body_set(messages: &[Outgoing]) -> BTreeSet<String> {
    messages.iter().map(|m| m.body.clone()).collect()
}

async fn start_all(queue: &impl TestQueue, endpoint: &Endpoint, settings: Settings) -> Vec<Ferry> {
    let mut bridges = Vec::new();
    for _ in 0..REPLICAS {
        bridges.push(start_bridge(queue, endpoint, settings).await);
    }
    bridges
}

async fn wait_accepted(endpoint: &Endpoint, at_least: usize, bridges: &[Ferry]) {
    let reached = wait_until(Duration::from_secs(120), || {
        endpoint.delivered().len() >= at_least
    })
    .await;
    assert!(
        reached,
        "stuck at {} of {at_least} accepted; first replica's log:\n{}",
        endpoint.delivered().len(),
        bridges.first().map(Ferry::log).unwrap_or_default()
    );
}

/// Waits for everything, stops every replica cleanly and checks what the broker holds.
async fn finish<Q: TestQueue>(
    queue: &Q,
    endpoint: &Endpoint,
    sent: &BTreeSet<String>,
    bridges: Vec<Ferry>,
) -> BTreeSet<String> {
    let first = &bridges[0];
    wait_delivered(endpoint, sent, Duration::from_secs(300), first).await;
    wait_settled(queue, first).await;
    for bridge in bridges {
        stop(bridge).await;
    }
    assert_drained(queue).await;
    queue
        .dead_letters()
        .await
        .into_iter()
        .map(|d| d.body)
        .collect()
}

/// Checks the labels: every duplicate says it is a redelivery, and no request claims an
/// attempt the endpoint never got (where the broker counts deliveries).
fn assert_labelled<B: Backend>(endpoint: &Endpoint, bridges_log: &str) {
    if !B::LABELS_REDELIVERIES {
        return;
    }
    let unlabelled = endpoint.unlabelled_duplicates();
    assert!(
        unlabelled.is_empty(),
        "duplicates without X-Ferry-Attempt > 1: {unlabelled:?}; log:\n{bridges_log}"
    );
    let burnt = endpoint.overcounted_attempts();
    assert!(
        burnt.is_empty(),
        "X-Ferry-Attempt above the requests made: {burnt:?}; log:\n{bridges_log}"
    );
}

fn emulator_bound(explained: Explained, n: usize) -> usize {
    n * explained.per_thousand / 1000 + usize::from(explained.per_thousand > 0)
}

/// Three replicas, steady state.
pub async fn steady<B: Backend>(backend: &B, name: &'static str, n: usize, e: Explained) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(10))).await;
    let settings = Settings::default();
    let bridges = start_all(&queue, &endpoint, settings).await;
    let messages = numbered("fleet-steady", 0..n);
    let sent = body_set(&messages);
    publish_in_chunks(&queue, &messages, 100).await;
    let log = bridges[0].log();
    let dead = finish(&queue, &endpoint, &sent, bridges).await;
    assert_labelled::<B>(&endpoint, &log);
    let bound = emulator_bound(e, n)
        + if e.rebalances {
            queue.max_unacked(&settings)
        } else {
            0
        };
    Report::tally(
        "3 replicas, steady",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

/// Three replicas; `kill -9` of one mid-stream, then it starts again.
pub async fn kill_one<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
    e: Explained,
) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(50))).await;
    let settings = Settings::default();
    let mut bridges = start_all(&queue, &endpoint, settings).await;
    let messages = numbered("fleet-kill", 0..n);
    let sent = body_set(&messages);
    let (first, rest) = messages.split_at(n / 2);
    publish_in_chunks(&queue, first, 100).await;
    wait_accepted(&endpoint, n / 6, &bridges).await;
    bridges[1].signal("KILL");
    bridges[1] = start_bridge(&queue, &endpoint, settings).await;
    publish_in_chunks(&queue, rest, 100).await;
    let dead = finish(&queue, &endpoint, &sent, bridges).await;
    // The killed replica's unacked work, and (Kafka) what the two rebalances moved.
    let moves = if e.rebalances { 3 } else { 1 };
    let bound = emulator_bound(e, n) + moves * queue.max_unacked(&settings);
    Report::tally(
        "3 replicas, kill -9 of one, restart",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

/// Three replicas restarted one after another (SIGTERM, then a new process) while
/// traffic flows: clean shutdowns lose nothing, duplicate nothing and burn no attempt.
pub async fn rolling_restart<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
    e: Explained,
) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(50))).await;
    let settings = Settings::default();
    let mut bridges = start_all(&queue, &endpoint, settings).await;
    let messages = numbered("fleet-rolling", 0..n);
    let sent = body_set(&messages);
    let chunks: Vec<&[Outgoing]> = messages.chunks(n.div_ceil(REPLICAS + 1)).collect();
    queue.publish(chunks[0]).await;
    for (i, chunk) in chunks.iter().skip(1).enumerate() {
        wait_accepted(&endpoint, (i + 1) * n / (REPLICAS + 2), &bridges).await;
        let leaving = std::mem::replace(
            &mut bridges[i],
            start_bridge(&queue, &endpoint, settings).await,
        );
        stop(leaving).await;
        queue.publish(chunk).await;
    }
    let log = bridges[0].log();
    let dead = finish(&queue, &endpoint, &sent, bridges).await;
    assert_labelled::<B>(&endpoint, &log);
    // A clean shutdown explains none; a Kafka rebalance moves what other members had in
    // flight (each restart is two membership changes).
    let moves = if e.rebalances { 2 * REPLICAS } else { 0 };
    let bound = emulator_bound(e, n) + moves * queue.max_unacked(&settings);
    Report::tally(
        "3 replicas, rolling restart",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

/// One replica, then three, then one again, while traffic flows.
pub async fn scale_1_3_1<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
    e: Explained,
) -> Report {
    let started = Instant::now();
    let queue = backend.queue(false).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(30))).await;
    let settings = Settings::default();
    let mut bridges = vec![start_bridge(&queue, &endpoint, settings).await];
    let messages = numbered("fleet-scale", 0..n);
    let sent = body_set(&messages);
    let (first, rest) = messages.split_at(n / 2);
    publish_in_chunks(&queue, first, 100).await;
    wait_accepted(&endpoint, n / 8, &bridges).await;
    for _ in 1..REPLICAS {
        bridges.push(start_bridge(&queue, &endpoint, settings).await);
    }
    publish_in_chunks(&queue, rest, 100).await;
    wait_accepted(&endpoint, n / 2, &bridges).await;
    while bridges.len() > 1 {
        let leaving = bridges.pop().expect("a replica");
        stop(leaving).await;
    }
    let log = bridges[0].log();
    let dead = finish(&queue, &endpoint, &sent, bridges).await;
    assert_labelled::<B>(&endpoint, &log);
    let moves = if e.rebalances { 2 * (REPLICAS - 1) } else { 0 };
    let bound = emulator_bound(e, n) + moves * queue.max_unacked(&settings);
    Report::tally(
        "scale 1 → 3 → 1",
        name,
        &sent,
        &endpoint,
        &dead,
        bound,
        started,
    )
}

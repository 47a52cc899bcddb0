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
use crate::faults::{body_set, Report};
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

async fn start_all(queue: &impl TestQueue, endpoint: &Endpoint, settings: Settings) -> Vec<Ferry> {
    let mut bridges = Vec::new();
    for _ in 0..REPLICAS {
        bridges.push(start_bridge(queue, endpoint, settings).await);
    }
    bridges
}

/// Waits until `at_least` requests were accepted; fails with the first bridge's log.
pub(crate) async fn wait_accepted(endpoint: &Endpoint, at_least: usize, bridges: &[Ferry]) {
    let reached = wait_until(Duration::from_secs(120), || {
        endpoint.delivered().len() >= at_least
    })
    .await;
    assert!(
        reached,
        "stuck at {} of {at_least} accepted; log:\n{}",
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

/// What every scenario sets up: a queue, an endpoint answering after `latency`, and `n`
/// numbered messages to send.
struct Run<Q> {
    started: Instant,
    queue: Q,
    endpoint: Endpoint,
    settings: Settings,
    messages: Vec<Outgoing>,
    sent: BTreeSet<String>,
    explained: Explained,
}

impl<Q: TestQueue> Run<Q> {
    async fn new<B: Backend<Queue = Q>>(
        backend: &B,
        prefix: &str,
        latency: Duration,
        n: usize,
        explained: Explained,
    ) -> Self {
        let started = Instant::now();
        let queue = backend.queue(false).await;
        let endpoint = Endpoint::start(move |_| Reply::ok().after(latency)).await;
        let messages = numbered(prefix, 0..n);
        let sent = body_set(&messages);
        Self {
            started,
            queue,
            endpoint,
            settings: Settings::default(),
            messages,
            sent,
            explained,
        }
    }

    async fn bridge(&self) -> Ferry {
        start_bridge(&self.queue, &self.endpoint, self.settings).await
    }

    /// Waits for everything, stops every replica, checks the labels (unless a crash made
    /// some unlabelled copies legitimate) and counts. `moves`: how many times what a
    /// replica held unacked may come again.
    async fn report<B: Backend<Queue = Q>>(
        self,
        scenario: &'static str,
        name: &'static str,
        bridges: Vec<Ferry>,
        moves: usize,
        labels: bool,
    ) -> Report {
        let log = bridges[0].log();
        let dead = finish(&self.queue, &self.endpoint, &self.sent, bridges).await;
        if labels {
            assert_labelled::<B>(&self.endpoint, &log);
        }
        let bound = emulator_bound(self.explained, self.sent.len())
            + moves * self.queue.max_unacked(&self.settings);
        Report::tally(
            scenario,
            name,
            &self.sent,
            &self.endpoint,
            &dead,
            bound,
            self.started,
        )
    }
}

/// Three replicas, steady state.
pub async fn steady<B: Backend>(backend: &B, name: &'static str, n: usize, e: Explained) -> Report {
    let run = Run::new(backend, "fleet-steady", Duration::from_millis(10), n, e).await;
    let bridges = start_all(&run.queue, &run.endpoint, run.settings).await;
    publish_in_chunks(&run.queue, &run.messages, 100).await;
    let moves = usize::from(e.rebalances);
    run.report::<B>("3 replicas, steady", name, bridges, moves, true)
        .await
}

/// Three replicas; `kill -9` of one mid-stream, then it starts again.
pub async fn kill_one<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
    e: Explained,
) -> Report {
    let run = Run::new(backend, "fleet-kill", Duration::from_millis(50), n, e).await;
    let mut bridges = start_all(&run.queue, &run.endpoint, run.settings).await;
    let (first, rest) = run.messages.split_at(n / 2);
    publish_in_chunks(&run.queue, first, 100).await;
    wait_accepted(&run.endpoint, n / 6, &bridges).await;
    bridges[1].signal("KILL");
    bridges[1] = run.bridge().await;
    publish_in_chunks(&run.queue, rest, 100).await;
    // The killed replica's unacked work, and (Kafka) what the two rebalances moved. What it
    // had received but not sent comes back counted as a delivery: no label check.
    let moves = if e.rebalances { 3 } else { 1 };
    run.report::<B>(
        "3 replicas, kill -9 of one, restart",
        name,
        bridges,
        moves,
        false,
    )
    .await
}

/// Three replicas restarted one after another (SIGTERM, then a new process) while
/// traffic flows: clean shutdowns lose nothing, duplicate nothing and burn no attempt.
pub async fn rolling_restart<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
    e: Explained,
) -> Report {
    let run = Run::new(backend, "fleet-rolling", Duration::from_millis(50), n, e).await;
    let mut bridges = start_all(&run.queue, &run.endpoint, run.settings).await;
    let chunks: Vec<&[Outgoing]> = run.messages.chunks(n.div_ceil(REPLICAS + 1)).collect();
    run.queue.publish(chunks[0]).await;
    for (i, chunk) in chunks.iter().skip(1).enumerate() {
        wait_accepted(&run.endpoint, (i + 1) * n / (REPLICAS + 2), &bridges).await;
        let leaving = std::mem::replace(&mut bridges[i], run.bridge().await);
        stop(leaving).await;
        run.queue.publish(chunk).await;
    }
    // A clean shutdown explains none; a Kafka rebalance moves what other members had in
    // flight (each restart is two membership changes).
    let moves = if e.rebalances { 2 * REPLICAS } else { 0 };
    run.report::<B>("3 replicas, rolling restart", name, bridges, moves, true)
        .await
}

/// One replica, then three, then one again, while traffic flows.
pub async fn scale_1_3_1<B: Backend>(
    backend: &B,
    name: &'static str,
    n: usize,
    e: Explained,
) -> Report {
    let run = Run::new(backend, "fleet-scale", Duration::from_millis(30), n, e).await;
    let mut bridges = vec![run.bridge().await];
    let (first, rest) = run.messages.split_at(n / 2);
    publish_in_chunks(&run.queue, first, 100).await;
    wait_accepted(&run.endpoint, n / 8, &bridges).await;
    for _ in 1..REPLICAS {
        bridges.push(run.bridge().await);
    }
    publish_in_chunks(&run.queue, rest, 100).await;
    wait_accepted(&run.endpoint, n / 2, &bridges).await;
    while bridges.len() > 1 {
        let leaving = bridges.pop().expect("a replica");
        stop(leaving).await;
    }
    let moves = if e.rebalances { 2 * (REPLICAS - 1) } else { 0 };
    run.report::<B>("scale 1 → 3 → 1", name, bridges, moves, true)
        .await
}

//! `rate_limit = { ..., shared = true }`: three replicas together stay within one limit
//! kept in Redis, and when Redis goes away each paces itself at its share: still bounded,
//! nothing lost.

use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::proxy::Proxy;
use ferry_e2e::{unique, wait_until, Endpoint, Ferry, Reply, Seen};

const PER_SECOND: usize = 300;

/// The most requests that arrived within any one second.
fn busiest_second(seen: &[Seen]) -> usize {
    let mut at: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    at.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..at.len() {
        while at[end].duration_since(at[start]) >= Duration::from_secs(1) {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_rate_limit_and_stay_bounded_without_redis() {
    const N: usize = 4_500;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("fleetrate").await;
    let sent = rabbit.publish_numbered(&queue.name, "rate", N).await;
    let endpoint = Endpoint::start(|_| Reply::ok().after(Duration::from_millis(5))).await;
    let redis = Proxy::start("127.0.0.1:6379").await;
    let admin = format!(
        "[admin.state]\nredis_url = \"redis://{}\"\nkey_prefix = \"{}\"\n",
        redis.addr(),
        unique("ferry-rate")
    );
    let delivery = format!(
        "concurrency = 16\nrate_limit = {{ per_second = {PER_SECOND}, burst = 20, shared = true }}"
    );
    let route = Route {
        source: amqp_source(&queue.name, "prefetch = 50"),
        sink_url: &endpoint.url(),
        sink: "",
        delivery: &delivery,
    };
    let replicas: Vec<Ferry> = (0..3).map(|_| Ferry::start_with(&route, &admin)).collect();
    for r in &replicas {
        r.wait_ready(Duration::from_secs(30)).await;
    }
    // Redis goes away for 4 s once a third is through.
    let third = wait_until(Duration::from_secs(60), || endpoint.seen().len() >= N / 3).await;
    assert!(third, "no progress; log:\n{}", replicas[0].log());
    let cut_at = endpoint.seen().len();
    redis.cut(Duration::from_secs(4)).await;
    let all = wait_until(Duration::from_secs(90), || endpoint.delivered_set() == sent).await;
    assert!(all, "not everything arrived; log:\n{}", replicas[0].log());
    let seen = endpoint.seen();
    let (with_redis, rest) = seen.split_at(cut_at);
    let busiest = busiest_second(&seen);
    let span = seen.last().map(|s| s.at).zip(seen.first().map(|s| s.at));
    let overall = N as f64
        / span.map_or(1.0, |(last, first)| {
            last.duration_since(first).as_secs_f64()
        });
    let shared_rate = with_redis.len() as f64
        / with_redis
            .last()
            .zip(with_redis.first())
            .map_or(1.0, |(l, f)| l.at.duration_since(f.at).as_secs_f64());
    println!(
        "busiest second {busiest} (with Redis {}, from the cut on {}), overall {overall:.0}/s, with Redis {shared_rate:.0}/s, {} after the cut",
        busiest_second(with_redis),
        busiest_second(rest),
        rest.len()
    );
    assert!(
        busiest_second(with_redis) <= PER_SECOND * 11 / 10,
        "{} requests in one second for a shared {PER_SECOND}/s; log:\n{}",
        busiest_second(with_redis),
        replicas[0].log()
    );
    // While Redis is away, and as the replicas switch over and back, still bounded.
    assert!(
        busiest <= PER_SECOND * 5 / 4,
        "{busiest} requests in one second around the Redis outage; log:\n{}",
        replicas[0].log()
    );
    assert!(
        shared_rate >= PER_SECOND as f64 * 0.9,
        "only {shared_rate:.0}/s with Redis for a shared {PER_SECOND}/s"
    );
    let fell_back = replicas
        .iter()
        .filter(|r| r.log().contains("Redis unreachable, pacing this replica"))
        .count();
    assert_eq!(fell_back, 3, "every replica says once that it paces alone");
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

//! The soak: one ferry with an SQS, a RabbitMQ and a Kafka route, fed steadily for
//! `FERRY_SOAK_SECS` (60 unless set; 600 for the table in RELIABILITY.md) while the endpoint
//! answers 10% of requests with 500, lets 1% time out and is down (503) for a stretch in
//! the middle (30 s, or a quarter of a shorter run). Every id must arrive, duplicates must
//! be labelled, and RSS and open sockets, sampled every 10 s, must stay flat (within 10%
//! after the warm-up).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, kafka_source, sqs_source, Route};
use ferry_e2e::kafka::Cluster;
use ferry_e2e::{sqs, unique, wait_until, Endpoint, Ferry, Reply};

fn soak_for() -> Duration {
    Duration::from_secs(
        std::env::var("FERRY_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    )
}

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_three_backends_with_errors_timeouts_and_an_outage_stays_flat() {
    let length = soak_for();
    let outage = Duration::from_secs(30).min(length / 4);
    let run = unique("soak");

    // The endpoint: 10% 500s, 1% slower than the sink's timeout, 503 while down.
    let down = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (flag, n) = (down.clone(), count.clone());
    let endpoint = Endpoint::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            return Reply::status(503);
        }
        match n.fetch_add(1, Ordering::SeqCst) % 100 {
            0..=9 => Reply::status(500),
            50 => Reply::ok().after(Duration::from_secs(3)),
            _ => Reply::ok().after(Duration::from_millis(2)),
        }
    })
    .await;

    let client = sqs::client().await;
    let queue_url = sqs::create_queue(&client, "soak").await;
    let dlq_url = sqs::create_queue(&client, "soak-dlq").await;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("soak").await;
    let cluster = Cluster::start();
    let topic = unique("soak");
    let dead = format!("{topic}-dlq");
    cluster.create_topic(&topic, 4);
    cluster.create_topic(&dead, 1);

    let sink = "timeout = \"1s\"";
    let delivery =
        "concurrency = 16\nmax_attempts = 1000\nmin_backoff = \"100ms\"\nmax_backoff = \"2s\"";
    let url = endpoint.url();
    let routes = [
        (
            "sqs",
            sqs_source(&queue_url, Some(&dlq_url), "wait_time = \"1s\""),
        ),
        ("amqp", amqp_source(&queue.name, "prefetch = 50")),
        (
            "kafka",
            kafka_source(cluster.bootstrap(), &format!("{topic}-g"), &topic, &dead),
        ),
    ];
    let ferry = Ferry::start_config(|port| {
        let mut text = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n\n");
        for (name, source) in &routes {
            text.push_str(
                &Route {
                    source: source.clone(),
                    sink_url: &url,
                    sink,
                    delivery,
                }
                .section(name),
            );
        }
        text
    });
    ferry.wait_ready(Duration::from_secs(30)).await;

    // Feed all three steadily: per second 20 to SQS (the emulator is slow), 100 to
    // RabbitMQ, 100 to Kafka.
    let started = Instant::now();
    let mut sent = BTreeSet::new();
    let mut samples = Vec::new();
    let mut next_sample = started + SAMPLE_EVERY;
    let mut second = 0u64;
    let outage_from = length / 2 - outage / 2;
    while started.elapsed() < length {
        let t = started.elapsed();
        down.store(
            t >= outage_from && t < outage_from + outage,
            Ordering::SeqCst,
        );
        let sqs_batch: Vec<String> = (0..20).map(|i| format!("{run}-s-{second}-{i}")).collect();
        sqs::send(&client, &queue_url, &sqs_batch).await;
        let amqp_batch = rabbit
            .publish_numbered(&queue.name, &format!("{run}-a-{second}"), 100)
            .await;
        let kafka_batch: Vec<(Option<String>, String)> = (0..100)
            .map(|i| {
                (
                    Some(format!("k{}", i % 10)),
                    format!("{run}-k-{second}-{i}"),
                )
            })
            .collect();
        cluster.produce(&topic, &kafka_batch).await;
        sent.extend(sqs_batch);
        sent.extend(amqp_batch);
        sent.extend(kafka_batch.into_iter().map(|(_, b)| b));
        second += 1;
        if Instant::now() >= next_sample {
            samples.push((started.elapsed(), ferry.rss_and_sockets()));
            next_sample += SAMPLE_EVERY;
        }
        let pace = started + Duration::from_secs(second);
        tokio::time::sleep_until(pace.into()).await;
    }
    down.store(false, Ordering::SeqCst);
    let all = wait_until(Duration::from_secs(180), || {
        sent.is_subset(&endpoint.delivered_set())
    })
    .await;
    let got = endpoint.delivered_set();
    let missing = sent.difference(&got).count();
    let seen = endpoint.seen();
    let duplicates = endpoint.delivered().len() - got.len();
    println!("| sample (s) | RSS (MiB) | open sockets |\n| ---: | ---: | ---: |");
    for (at, (rss, sockets)) in &samples {
        println!(
            "| {} | {:.1} | {sockets} |",
            at.as_secs(),
            *rss as f64 / 1048576.0
        );
    }
    println!(
        "sent {}, delivered {}, missing {missing}, duplicates {duplicates}, requests {}",
        sent.len(),
        got.len(),
        seen.len()
    );
    assert!(
        all,
        "{missing} of {} never arrived; log tail:\n{}",
        sent.len(),
        tail(&ferry.log())
    );
    let unlabelled = endpoint.unlabelled_duplicates();
    assert!(
        unlabelled.is_empty(),
        "unlabelled duplicates: {unlabelled:?}"
    );
    // After the warm-up (the first third of the samples), nothing grows more than 10%
    // above what the warm-up reached (open connections dip during the outage and come back).
    let (warm, settled) = samples.split_at(samples.len() / 3);
    let peak_rss = warm.iter().map(|(_, (rss, _))| *rss).max().unwrap_or(0);
    let peak_sockets = warm.iter().map(|(_, (_, s))| *s).max().unwrap_or(0);
    for (at, (rss, sockets)) in settled {
        assert!(
            (*rss as f64) <= peak_rss as f64 * 1.1,
            "RSS grew to {rss} at {at:?} from {peak_rss} in the warm-up: {samples:?}"
        );
        assert!(
            *sockets <= peak_sockets + (peak_sockets / 10).max(2),
            "open sockets grew to {sockets} at {at:?} from {peak_sockets}: {samples:?}"
        );
    }
    rabbit.delete(&queue.name).await;
    rabbit.delete(&queue.dead_letter).await;
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

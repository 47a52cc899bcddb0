//! The audit trail's outputs beside the file: Amazon Data Firehose, S3 and standard
//! output. Every delivered message's record arrives exactly once (read back from the
//! emulator and counted); an output that cannot be reached loses records only as counted
//! drops and never slows deliveries; shutdown flushes what is held.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::audit_store;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::proxy::Proxy;
use ferry_e2e::{Endpoint, Ferry, Reply};

/// ferry on a fresh RabbitMQ queue, delivering to an endpoint that takes everything.
struct Run {
    ferry: Ferry,
    endpoint: Endpoint,
    rabbit: Rabbit,
    queue: String,
}

/// Starts ferry with `audit` as its `[audit]` section.
async fn start_with_audit(audit: &str) -> Run {
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("audit-out").await.name;
    let endpoint = Endpoint::start(|_| Reply::ok()).await;
    let ferry = Ferry::start_with(
        &Route {
            source: amqp_source(&queue, ""),
            sink_url: &endpoint.url(),
            sink: "",
            delivery: "",
        },
        &format!("\n[audit]\n{audit}\n"),
    );
    ferry.wait_ready(Duration::from_secs(30)).await;
    Run {
        ferry,
        endpoint,
        rabbit,
        queue,
    }
}

/// [`start_with_audit`], then `n` messages published and delivered.
async fn deliver_with_audit(n: usize, audit: &str) -> Run {
    let run = start_with_audit(audit).await;
    run.rabbit.publish_numbered(&run.queue, "a", n).await;
    wait_delivered(&run.endpoint, &run.ferry, n).await;
    run
}

async fn wait_delivered(endpoint: &Endpoint, ferry: &Ferry, n: usize) {
    let delivered =
        ferry_e2e::wait_until(Duration::from_secs(60), || endpoint.delivered_unique() >= n).await;
    assert!(
        delivered,
        "{} of {n} delivered; log:\n{}",
        endpoint.delivered_unique(),
        ferry.log()
    );
}

async fn stop(mut ferry: Ferry) -> Ferry {
    ferry.signal("TERM");
    let status = ferry.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "ferry did not stop cleanly; log:\n{}",
        ferry.log()
    );
    ferry
}

/// The ids (`X-Ferry-Message-Id`) the endpoint took.
fn delivered_ids(endpoint: &Endpoint) -> BTreeSet<String> {
    endpoint.delivered().into_iter().map(|s| s.id).collect()
}

/// Each delivered id once, and nothing else.
fn assert_once(records: &[String], delivered: &BTreeSet<String>) {
    let unique: BTreeSet<String> = records.iter().cloned().collect();
    assert_eq!(unique.len(), records.len(), "a record arrived twice");
    assert_eq!(
        &unique, delivered,
        "the records are not the delivered messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_the_firehose_stream_once() {
    const N: usize = 300;
    let s3 = audit_store::s3().await;
    let bucket = audit_store::bucket(&s3, "firehose-dest").await;
    let stream = audit_store::delivery_stream(&bucket, "trail/").await;
    let audit = format!(
        "output = \"firehose\"\ndelivery_stream = \"{stream}\"\nregion = \"us-east-1\"\n\
         endpoint_url = \"{}\"\nflush_interval = \"200ms\"",
        ferry_e2e::sqs_endpoint()
    );
    let Run {
        ferry, endpoint, ..
    } = deliver_with_audit(N, &audit).await;
    let ferry = stop(ferry).await;
    let objects = audit_store::objects(&s3, &bucket, "trail/").await;
    assert!(
        !objects.is_empty(),
        "nothing in the stream's bucket; log:\n{}",
        ferry.log()
    );
    let records = audit_store::ids(objects.iter().map(|(_, text)| text.as_str()));
    assert_once(&records, &delivered_ids(&endpoint));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_reaches_s3_once_and_shutdown_flushes_the_last_object() {
    const N: usize = 300;
    let s3 = audit_store::s3().await;
    let bucket = audit_store::bucket(&s3, "audit-objects").await;
    // An hour's interval: nothing is written until shutdown flushes it.
    let audit = format!(
        "output = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"ferry/orders\"\nregion = \"us-east-1\"\n\
         endpoint_url = \"{}\"\nflush_interval = \"1h\"",
        ferry_e2e::sqs_endpoint()
    );
    let Run {
        ferry, endpoint, ..
    } = deliver_with_audit(N, &audit).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        audit_store::objects(&s3, &bucket, "ferry/")
            .await
            .is_empty(),
        "an object was written before its interval"
    );
    let ferry = stop(ferry).await;
    let objects = audit_store::objects(&s3, &bucket, "ferry/").await;
    assert_eq!(
        objects.len(),
        1,
        "{:?}; log:\n{}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>(),
        ferry.log()
    );
    let key = &objects[0].0;
    // ferry/orders/yyyy/mm/dd/hh/<replica>-000000.jsonl.gz
    let parts: Vec<&str> = key.split('/').collect();
    assert_eq!(parts.len(), 7, "{key}");
    assert_eq!((parts[0], parts[1]), ("ferry", "orders"));
    assert!(
        parts[2].len() == 4 && parts[3].len() == 2 && parts[4].len() == 2 && parts[5].len() == 2,
        "{key}"
    );
    assert!(parts[6].ends_with("-000000.jsonl.gz"), "{key}");
    let records = audit_store::ids([objects[0].1.as_str()]);
    assert_once(&records, &delivered_ids(&endpoint));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_has_one_json_line_per_record_and_nothing_else() {
    const N: usize = 50;
    let Run {
        ferry, endpoint, ..
    } = deliver_with_audit(N, "output = \"stdout\"").await;
    let ferry = stop(ferry).await;
    let out = ferry.stdout();
    let records = audit_store::ids([out.as_str()]);
    assert_once(&records, &delivered_ids(&endpoint));
    assert!(
        !ferry.log().is_empty() && !out.contains("ferry started"),
        "logs went to stdout"
    );
}

/// The S3 output behind a proxy that is cut for longer than its retries last: deliveries
/// go on at their pace meanwhile, and every delivered message's record is either in the
/// bucket or counted as dropped, never both and never twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_output_drops_only_what_it_counts_and_never_slows_deliveries() {
    const N: usize = 400;
    let s3 = audit_store::s3().await;
    let bucket = audit_store::bucket(&s3, "audit-cut").await;
    let upstream = ferry_e2e::sqs_endpoint()
        .trim_start_matches("http://")
        .to_owned();
    let proxy = Proxy::start(&upstream).await;
    let audit = format!(
        "output = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"cut\"\nregion = \"us-east-1\"\n\
         endpoint_url = \"http://{}\"\nflush_interval = \"200ms\"",
        proxy.addr()
    );
    let Run {
        ferry,
        endpoint,
        rabbit,
        queue,
    } = start_with_audit(&audit).await;
    // The first half with the output up, to measure the pace.
    let began = Instant::now();
    rabbit.publish_numbered(&queue, "up", N / 2).await;
    wait_delivered(&endpoint, &ferry, N / 2).await;
    let up = began.elapsed();
    // The second half while the output is cut off for 10 s (its retries give up after ~6 s).
    let cut = tokio::spawn(async move {
        proxy.cut(Duration::from_secs(10)).await;
        proxy
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    rabbit.publish_numbered(&queue, "down", N / 2).await;
    wait_delivered(&endpoint, &ferry, N).await;
    let down = began.elapsed();
    assert!(
        down < up * 3 + Duration::from_secs(2),
        "deliveries slowed while the audit output was down: {down:?} against {up:?}"
    );
    let _proxy = cut.await.expect("the cut");
    // Let the output settle after the cut: what it still holds goes out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dropped = ferry
        .metric("ferry_audit_dropped_total{output=\"s3\"}")
        .await
        .unwrap_or(0.0) as usize;
    let written = ferry
        .metric("ferry_audit_records_total{output=\"s3\"}")
        .await
        .unwrap_or(0.0) as usize;
    let ferry = stop(ferry).await;
    let records = audit_store::ids(
        audit_store::objects(&s3, &bucket, "cut/")
            .await
            .iter()
            .map(|(_, text)| text.as_str())
            .collect::<Vec<_>>(),
    );
    let unique: BTreeSet<&String> = records.iter().collect();
    eprintln!(
        "{} delivered with the output up in {up:?}, {} with it cut off in {down:?}; records in the bucket {}, dropped {dropped}",
        N / 2,
        N / 2,
        records.len()
    );
    assert_eq!(unique.len(), records.len(), "a record arrived twice");
    assert!(
        dropped > 0,
        "the cut cost no record: the test did not test; log:\n{}",
        ferry.log()
    );
    assert_eq!(records.len(), written, "written records not in the bucket");
    assert_eq!(
        records.len() + dropped,
        N,
        "records neither in the bucket nor counted as dropped"
    );
    let log = ferry.log();
    let failures = log
        .lines()
        .filter(|l| l.contains("audit output fails"))
        .count();
    assert_eq!(
        failures, 1,
        "the failure is not logged once per change of state:\n{log}"
    );
    assert!(log.contains("audit output works again"), "{log}");
}

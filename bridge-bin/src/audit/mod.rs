//! The audit trail (`[audit]`): one JSON record per message that ended here, written to a
//! file, standard output, Amazon Data Firehose or S3 by a thread of its own.
//!
//! Deliveries only queue a record (never wait for the output); when the queue is full, or
//! the output refuses a record after its retries, the record is dropped and counted in
//! `ferry_audit_dropped_total{output}`, and the failure is logged once until the output
//! works again. At shutdown what is queued goes out within the routes' `shutdown_grace`.

mod file;
#[cfg(feature = "audit-firehose")]
mod firehose;
#[cfg(feature = "audit-s3")]
mod s3;
mod stdout;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{AuditRecord, AuditTrail};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{AuditOutputPlan, AuditPlan};

/// Records waiting for the output at most; a burst beyond this is dropped (and counted).
const QUEUE: usize = 65_536;

/// The delivery side: queues records for the output's thread.
#[derive(Debug)]
pub struct Audit {
    queue: mpsc::Sender<AuditRecord>,
    dropped: Counter,
}

impl AuditTrail for Audit {
    fn record(&self, record: AuditRecord) {
        if self.queue.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

/// One record, as every output writes it.
#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    route: &'a str,
    source: &'a str,
    attempts: u32,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    latency_ms: f64,
    delivered_at: String,
}

/// A record as one JSON line, with its newline.
fn line(record: &AuditRecord) -> Vec<u8> {
    let line = Line {
        id: &record.id,
        route: &record.route,
        source: &record.source,
        attempts: record.attempts,
        outcome: record.outcome.as_str(),
        status: record.status,
        latency_ms: (record.latency.as_secs_f64() * 1e6).round() / 1e3,
        delivered_at: humantime::format_rfc3339_millis(record.at).to_string(),
    };
    let mut text = serde_json::to_vec(&line).unwrap_or_default();
    text.push(b'\n');
    text
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputLabels {
    output: String,
}

/// What an output counts: records that went out, and records that were lost.
#[derive(Clone)]
struct Counts {
    written: Counter,
    dropped: Counter,
}

/// Whether an output works, so that a failure is logged once, and once more when it is
/// over, however many records it costs.
struct Health {
    output: &'static str,
    target: String,
    failing: bool,
}

impl Health {
    fn new(output: &'static str, target: String) -> Self {
        Self {
            output,
            target,
            failing: false,
        }
    }

    fn ok(&mut self) {
        if self.failing {
            self.failing = false;
            info!(output = self.output, target = %self.target, "audit output works again");
        }
    }

    fn failed(&mut self, error: &str) {
        if !self.failing {
            self.failing = true;
            warn!(output = self.output, target = %self.target, error,
                "audit output fails; records are dropped (ferry_audit_dropped_total) until it works again");
        }
    }
}

/// Starts the output's thread; it ends once every route has dropped its handle and what
/// was queued went out (or `flush_within` ran out).
pub fn start(
    plan: &AuditPlan,
    registry: &mut Registry,
) -> std::io::Result<(Arc<Audit>, std::thread::JoinHandle<()>)> {
    let written = Family::<OutputLabels, Counter>::default();
    let dropped = Family::<OutputLabels, Counter>::default();
    registry.register(
        "ferry_audit_records",
        "Audit records the output took",
        written.clone(),
    );
    registry.register(
        "ferry_audit_dropped",
        "Audit records lost: the output fell behind or refused them after its retries",
        dropped.clone(),
    );
    let name = output_name(&plan.output);
    let labels = OutputLabels {
        output: name.to_owned(),
    };
    let counts = Counts {
        written: written.get_or_create(&labels).clone(),
        dropped: dropped.get_or_create(&labels).clone(),
    };
    // Opened here, so that a file that cannot be written is an error at start.
    let output = Output::open(&plan.output, counts.clone())?;
    let (queue, records) = mpsc::channel(QUEUE);
    let flush_within = plan.flush_within;
    let thread = std::thread::Builder::new()
        .name("ferry-audit".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(run(records, output, flush_within)),
                Err(e) => {
                    warn!(error = %e, "cannot start the audit output; its records are dropped")
                }
            }
        })?;
    Ok((
        Arc::new(Audit {
            queue,
            dropped: counts.dropped,
        }),
        thread,
    ))
}

fn output_name(plan: &AuditOutputPlan) -> &'static str {
    match plan {
        AuditOutputPlan::File(_) => "file",
        AuditOutputPlan::Stdout => "stdout",
        #[cfg(feature = "audit-firehose")]
        AuditOutputPlan::Firehose { .. } => "firehose",
        #[cfg(feature = "audit-s3")]
        AuditOutputPlan::S3 { .. } => "s3",
    }
}

/// The output a plan asks for.
enum Output {
    File(file::Writer),
    Stdout(stdout::Writer),
    #[cfg(feature = "audit-firehose")]
    Firehose(firehose::Writer),
    // Boxed: the S3 writer (its client and the object being filled) is the largest, and
    // there is one output per process.
    #[cfg(feature = "audit-s3")]
    S3(Box<s3::Writer>),
}

impl Output {
    fn open(plan: &AuditOutputPlan, counts: Counts) -> std::io::Result<Self> {
        Ok(match plan {
            AuditOutputPlan::File(plan) => Output::File(
                file::Writer::open(plan.clone(), counts.written, counts.dropped).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("audit.path: cannot open {}: {e}", plan.path.display()),
                    )
                })?,
            ),
            AuditOutputPlan::Stdout => Output::Stdout(stdout::Writer::new(counts)),
            #[cfg(feature = "audit-firehose")]
            AuditOutputPlan::Firehose {
                stream,
                flush_interval,
                aws,
            } => Output::Firehose(firehose::Writer::new(
                stream.clone(),
                *flush_interval,
                aws.clone(),
                counts,
            )),
            #[cfg(feature = "audit-s3")]
            AuditOutputPlan::S3 {
                bucket,
                prefix,
                flush_interval,
                max_object_bytes,
                aws,
            } => Output::S3(Box::new(s3::Writer::new(
                s3::Target {
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    flush_interval: *flush_interval,
                    max_object_bytes: *max_object_bytes,
                    aws: aws.clone(),
                },
                counts,
            ))),
        })
    }

    async fn push(&mut self, line: Vec<u8>) {
        match self {
            Output::File(writer) => writer.write(&line),
            Output::Stdout(writer) => writer.push(line),
            #[cfg(feature = "audit-firehose")]
            Output::Firehose(writer) => writer.push(line).await,
            #[cfg(feature = "audit-s3")]
            Output::S3(writer) => writer.push(line).await,
        }
    }

    /// The queue ran dry: local outputs write what they hold, so that they are current
    /// while idle; the others wait for their batch or their interval.
    fn idle(&mut self) {
        match self {
            Output::File(writer) => writer.flush(),
            Output::Stdout(writer) => writer.flush(),
            #[cfg(feature = "audit-firehose")]
            Output::Firehose(_) => {}
            #[cfg(feature = "audit-s3")]
            Output::S3(_) => {}
        }
    }

    /// When what is held must go out at the latest, if anything is held.
    fn due(&self) -> Option<tokio::time::Instant> {
        match self {
            Output::File(_) | Output::Stdout(_) => None,
            #[cfg(feature = "audit-firehose")]
            Output::Firehose(writer) => writer.due(),
            #[cfg(feature = "audit-s3")]
            Output::S3(writer) => writer.due(),
        }
    }

    async fn flush(&mut self) {
        match self {
            Output::File(writer) => writer.flush(),
            Output::Stdout(writer) => writer.flush(),
            #[cfg(feature = "audit-firehose")]
            Output::Firehose(writer) => writer.flush().await,
            #[cfg(feature = "audit-s3")]
            Output::S3(writer) => writer.flush().await,
        }
    }

    /// Records held (or being sent) that the last flush did not get out in time.
    fn abandon(&mut self) -> u64 {
        match self {
            Output::File(_) | Output::Stdout(_) => 0,
            #[cfg(feature = "audit-firehose")]
            Output::Firehose(writer) => writer.abandon(),
            #[cfg(feature = "audit-s3")]
            Output::S3(writer) => writer.abandon(),
        }
    }
}

async fn run(mut records: mpsc::Receiver<AuditRecord>, mut output: Output, flush_within: Duration) {
    loop {
        let due = output.due();
        tokio::select! {
            record = records.recv() => match record {
                Some(record) => output.push(line(&record)).await,
                None => break,
            },
            _ = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => output.flush().await,
        }
        if records.is_empty() {
            output.idle();
        }
    }
    // Every route has finished: what is held goes out within the grace.
    if tokio::time::timeout(flush_within, output.flush())
        .await
        .is_err()
    {
        let lost = output.abandon();
        warn!(records = lost, grace = ?flush_within,
            "the audit output did not take the last records within the shutdown grace; they are dropped");
    }
}

/// Waits before try `n` (1-based) of a call to an audit output: 200 ms, doubling, at most
/// 5 s.
#[cfg(any(feature = "audit-firehose", feature = "audit-s3"))]
fn backoff(n: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << n.min(5).saturating_sub(1)))
        .min(Duration::from_secs(5))
}

/// Tries of one call to an audit output before its records are dropped.
#[cfg(any(feature = "audit-firehose", feature = "audit-s3"))]
const TRIES: u32 = 6;

/// The AWS configuration of an audit output: the standard credentials chain, the
/// configured region and endpoint.
#[cfg(any(feature = "audit-firehose", feature = "audit-s3"))]
async fn aws_config(target: &crate::config::AwsTarget) -> aws_config::SdkConfig {
    // The outputs retry on their own (counting what they give up on), so the client makes
    // one try per call, bounded in time.
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        );
    if let Some(region) = &target.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &target.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

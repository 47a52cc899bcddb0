//! The sweep every broker with a filled-queue benchmark shares: for each message size,
//! endpoint latency and `concurrency`, alternate rounds of the broker's native drain and
//! of ferry end to end, measure the sink's own ceiling, then a paced phase for the latency
//! ferry adds; print one table of rates and one of latencies.

use std::collections::HashMap;
use std::future::Future;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::ceiling::sink_ceiling;
use crate::concurrency::Setting;
use crate::latency::{rate_for, Pace, Percentiles};
use crate::{cpu_seconds, peak_rss_kib, stop_ferry, Args};

/// One ferry phase, measured from its first delivery.
pub struct FerryRun {
    pub secs: f64,
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

/// One row of the sweep.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Payload bytes.
    pub size: usize,
    /// ferry's `concurrency`.
    pub setting: Setting,
    /// How long the endpoint takes to answer.
    pub latency_ms: u64,
}

impl Case {
    /// The endpoint latency.
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }
}

/// What a broker brings to the sweep.
pub trait Phases {
    /// The table's heading line.
    fn title(&self, args: &Args) -> String;
    /// Seconds a plain consumer takes to drain `args.messages()` of `size` bytes from a
    /// filled queue.
    fn native(&self, args: &Args, size: usize) -> impl Future<Output = Result<f64>>;
    /// ferry draining the same amount into the counting sink, as `case` says.
    fn ferry(&self, args: &Args, case: &Case) -> impl Future<Output = Result<FerryRun>>;
    /// Whether the paced phases below mean anything on this broker.
    fn paced(&self) -> bool {
        true
    }
    /// Publish → consume latency of a plain consumer under `pace` (see `latency.rs`).
    fn native_paced(&self, args: &Args, pace: Pace) -> impl Future<Output = Result<Percentiles>>;
    /// Publish → endpoint latency through ferry under `pace`, set up as `case` says.
    fn ferry_paced(
        &self,
        args: &Args,
        case: &Case,
        pace: Pace,
    ) -> impl Future<Output = Result<Percentiles>>;
}

struct Row {
    case: Case,
    native: f64,
    ceiling: f64,
    ferry: f64,
    cpu_per_100k: f64,
    rss_mib: f64,
    rate: f64,
    /// Native and ferry, when the broker has paced phases.
    latencies: Option<(Percentiles, Percentiles)>,
}

/// Runs every combination and prints the tables.
pub async fn sweep(args: &Args, phases: &impl Phases) -> Result<()> {
    println!("{}", phases.title(args));
    let mut rows = Vec::new();
    // The native consumer's latency depends on size and pace only: measured once each.
    let mut native_latencies: HashMap<(usize, u64), Percentiles> = HashMap::new();
    for &size in &args.size {
        for &latency_ms in &args.latency_ms {
            for setting in args.settings() {
                let case = Case {
                    size,
                    setting,
                    latency_ms,
                };
                let (mut native_secs, mut ferry_secs, mut cpu, mut rss) = (0.0, 0.0, 0.0, 0u64);
                for round in 1..=args.rounds() {
                    let native = phases.native(args, size).await?;
                    let ferry = phases.ferry(args, &case).await?;
                    println!(
                        "{size} B, c={setting}, latency={latency_ms}ms, round {round}: native {:.0} msg/s, ferry {:.0} msg/s",
                        args.messages() as f64 / native,
                        args.messages() as f64 / ferry.secs
                    );
                    native_secs += native;
                    ferry_secs += ferry.secs;
                    cpu += ferry.cpu_seconds;
                    rss = rss.max(ferry.peak_rss_kib);
                }
                let ceiling =
                    sink_ceiling(size, setting.slots(), case.latency(), args.ceiling_window())
                        .await?;
                let pace = Pace {
                    rate: rate_for(args.paced_rate, setting.slots(), latency_ms),
                    secs: args.paced_secs(),
                    size,
                };
                let latencies = if phases.paced() {
                    let key = (size, pace.rate.to_bits());
                    let native_latency = match native_latencies.get(&key) {
                        Some(p) => *p,
                        None => {
                            let p = phases.native_paced(args, pace).await?;
                            native_latencies.insert(key, p);
                            p
                        }
                    };
                    let ferry_latency = phases.ferry_paced(args, &case, pace).await?;
                    println!(
                        "  sink ceiling {ceiling:.0} msg/s; at {:.0} msg/s: native p50 {:.2} p99 {:.2} ms, ferry p50 {:.2} p99 {:.2} ms",
                        pace.rate, native_latency.p50, native_latency.p99, ferry_latency.p50, ferry_latency.p99
                    );
                    Some((native_latency, ferry_latency))
                } else {
                    println!("  sink ceiling {ceiling:.0} msg/s");
                    None
                };
                let total = (args.messages() * args.rounds()) as f64;
                rows.push(Row {
                    case,
                    native: total / native_secs,
                    ceiling,
                    ferry: total / ferry_secs,
                    cpu_per_100k: cpu / total * 100_000.0,
                    rss_mib: rss as f64 / 1024.0,
                    rate: pace.rate,
                    latencies,
                });
            }
        }
    }
    print_rates(&rows);
    print_latencies(&rows);
    Ok(())
}

fn print_rates(rows: &[Row]) {
    println!();
    println!("| size | concurrency | endpoint latency | native drain msg/s | sink ceiling msg/s | ferry msg/s | ferry ÷ min(drain, ceiling) | lower limit | ferry CPU s per 100k | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (limit, by) = if r.ceiling < r.native {
            (r.ceiling, "sink")
        } else {
            (r.native, "drain")
        };
        println!(
            "| {} B | {} | {} ms | {:.0} | {:.0} | {:.0} | {:.2} | {by} | {:.2} | {:.1} |",
            r.case.size,
            r.case.setting,
            r.case.latency_ms,
            r.native,
            r.ceiling,
            r.ferry,
            r.ferry / limit,
            r.cpu_per_100k,
            r.rss_mib
        );
    }
}

fn print_latencies(rows: &[Row]) {
    if rows.iter().all(|r| r.latencies.is_none()) {
        return;
    }
    println!();
    println!("| size | concurrency | endpoint latency | paced msg/s | native p50 / p99 ms | ferry p50 / p99 ms | added p50 / p99 ms | samples (native / ferry) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let Some((n, f)) = r.latencies else { continue };
        println!(
            "| {} B | {} | {} ms | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} |",
            r.case.size,
            r.case.setting,
            r.case.latency_ms,
            r.rate,
            n.p50,
            n.p99,
            f.p50,
            f.p99,
            f.p50 - n.p50,
            f.p99 - n.p99,
            n.samples,
            f.samples
        );
    }
}

/// Waits for a started ferry to deliver `messages` into the counting sink; the clock and
/// the CPU count start at its first delivery, as the native consumer's do (start-up is not
/// the steady state being compared). Stops ferry afterwards.
pub async fn measure_ferry(
    mut child: Child,
    pid: u32,
    delivered: Arc<AtomicU64>,
    messages: u64,
) -> Result<FerryRun> {
    while delivered.load(Ordering::SeqCst) == 0 {
        if let Some(status) = child.try_wait()? {
            bail!("ferry exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let cpu_before = cpu_seconds(pid)?;
    finish_ferry(child, pid, &delivered, messages, (started, cpu_before)).await
}

/// Waits for a ferry whose clock and CPU count started at `start` to deliver `messages`,
/// then measures it and stops it.
pub async fn finish_ferry(
    mut child: Child,
    pid: u32,
    delivered: &AtomicU64,
    messages: u64,
    (started, cpu_before): (Instant, f64),
) -> Result<FerryRun> {
    while delivered.load(Ordering::SeqCst) < messages {
        if let Some(status) = child.try_wait()? {
            bail!("ferry exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let peak_rss_kib = peak_rss_kib(pid)?;
    stop_ferry(child, pid)?;
    Ok(FerryRun {
        secs,
        cpu_seconds: cpu,
        peak_rss_kib,
    })
}

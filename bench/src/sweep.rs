//! The sweep every broker with a filled-queue benchmark shares: for each endpoint latency
//! and `concurrency`, alternate rounds of the broker's native drain and of ferry end to
//! end, then print one table of rates, ratios, CPU and memory.

use std::future::Future;
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{cpu_seconds, peak_rss_kib, stop_ferry, Args};

/// One ferry phase, measured from its first delivery.
pub struct FerryRun {
    pub secs: f64,
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

/// What a broker brings to the sweep.
pub trait Phases {
    /// The table's heading line.
    fn title(&self, args: &Args) -> String;
    /// Seconds a plain consumer takes to drain `args.messages()` from a filled queue.
    fn native(&self, args: &Args) -> impl Future<Output = Result<f64>>;
    /// ferry draining the same amount into a sink that answers after `latency_ms`.
    fn ferry(
        &self,
        args: &Args,
        concurrency: usize,
        latency_ms: u64,
    ) -> impl Future<Output = Result<FerryRun>>;
}

struct Row {
    concurrency: usize,
    latency_ms: u64,
    native: f64,
    ferry: f64,
    cpu_per_100k: f64,
    rss_mib: f64,
}

/// Runs every combination and prints the table.
pub async fn sweep(args: &Args, phases: &impl Phases) -> Result<()> {
    println!("{}", phases.title(args));
    let mut rows = Vec::new();
    for &latency_ms in &args.latency_ms {
        for &concurrency in &args.concurrency {
            let (mut native_secs, mut ferry_secs, mut cpu, mut rss) = (0.0, 0.0, 0.0, 0u64);
            for round in 1..=args.rounds {
                let native = phases.native(args).await?;
                let ferry = phases.ferry(args, concurrency, latency_ms).await?;
                println!(
                    "c={concurrency} latency={latency_ms}ms round {round}: native {:.0} msg/s, ferry {:.0} msg/s",
                    args.messages() as f64 / native,
                    args.messages() as f64 / ferry.secs
                );
                native_secs += native;
                ferry_secs += ferry.secs;
                cpu += ferry.cpu_seconds;
                rss = rss.max(ferry.peak_rss_kib);
            }
            let total = (args.messages() * args.rounds) as f64;
            rows.push(Row {
                concurrency,
                latency_ms,
                native: total / native_secs,
                ferry: total / ferry_secs,
                cpu_per_100k: cpu / total * 100_000.0,
                rss_mib: rss as f64 / 1024.0,
            });
        }
    }
    println!();
    println!("| concurrency | endpoint latency | native drain msg/s | ferry msg/s | ferry / native | ferry / (concurrency ÷ latency) | ferry CPU s per 100k | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let ceiling = if r.latency_ms == 0 {
            "-".to_owned()
        } else {
            let limit = r.concurrency as f64 * 1000.0 / r.latency_ms as f64;
            format!("{:.2} (of {limit:.0})", r.ferry / limit)
        };
        println!(
            "| {} | {} ms | {:.0} | {:.0} | {:.2} | {} | {:.2} | {:.1} |",
            r.concurrency,
            r.latency_ms,
            r.native,
            r.ferry,
            r.ferry / r.native,
            ceiling,
            r.cpu_per_100k,
            r.rss_mib
        );
    }
    Ok(())
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

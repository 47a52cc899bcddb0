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
use crate::{cpu_seconds, peak_rss_kib, stop_ferry, Args, BodyMode};

/// One ferry phase (or a peer bridge's), measured from its first delivery.
pub struct FerryRun {
    pub secs: f64,
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
    /// Cores the whole machine kept busy meanwhile (every process: the broker, the
    /// harness and its sink, the bridge), out of [`cores`]: near all of them, the phase
    /// was bound by the machine rather than by the bridge.
    pub busy_cores: f64,
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
fn machine_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().unwrap_or_default();
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let total: u64 = fields.iter().take(8).sum();
    Ok((total - idle, total))
}

/// The machine's cores.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
    /// The plain consumers (no HTTP) ferry is compared with, by name, fastest last: each a
    /// way the broker can be drained, so the ratios say how near ferry comes to the broker.
    fn natives(&self) -> &'static [&'static str] {
        &["native drain"]
    }
    /// Seconds the plain consumer `natives()[which]` takes to drain `args.messages()` of
    /// `size` bytes from a filled queue.
    fn native(&self, args: &Args, size: usize, which: usize) -> impl Future<Output = Result<f64>>;
    /// A bridge a team would write by hand instead of running ferry, draining the same
    /// amount into the same sink as `case` says, measured as ferry is; `None` when this
    /// broker has none.
    fn peer(&self, _args: &Args, _case: &Case) -> impl Future<Output = Result<Option<FerryRun>>> {
        async { Ok(None) }
    }
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

pub struct Row {
    pub case: Case,
    /// ferry's body mode (`None`: the sink's default).
    pub mode: Option<BodyMode>,
    /// Whether ferry's sink spoke HTTP/2.
    pub http2: bool,
    /// Messages per phase (fewer for big payloads, see `--max-phase-mib`).
    pub messages: u64,
    /// Each plain consumer's rate, in the order of `natives()`.
    natives: Vec<f64>,
    ceiling: f64,
    pub ferry: f64,
    pub cpu_per_100k: f64,
    pub rss_mib: f64,
    busy_cores: f64,
    /// The hand-written bridge: rate, CPU s per 100k, peak RSS MiB.
    peer: Option<(f64, f64, f64)>,
    rate: f64,
    /// Native and ferry, when the broker has paced phases.
    latencies: Option<(Percentiles, Percentiles)>,
}

/// Runs every combination and prints the tables.
pub async fn sweep(all: &Args, phases: &impl Phases) -> Result<()> {
    println!("{}", phases.title(all));
    let mut rows = Vec::new();
    // The native consumer's latency depends on size and pace only: measured once each.
    let mut native_latencies: HashMap<(usize, u64), Percentiles> = HashMap::new();
    for &size in &all.size {
        let sized = all.for_size(size);
        for ((mode, http2), &latency_ms) in sized
            .variants()
            .into_iter()
            .flat_map(|v| all.latency_ms.iter().map(move |l| (v, l)))
        {
            let args = &sized.with_variant((mode, http2));
            let mut shown_mode = mode.map_or(String::new(), |m| format!(", mode={}", m.name()));
            if http2 {
                shown_mode.push_str(", HTTP/2");
            }
            for setting in args.settings() {
                let case = Case {
                    size,
                    setting,
                    latency_ms,
                };
                let names = phases.natives();
                let mut native_secs = vec![0.0; names.len()];
                let (mut ferry_secs, mut cpu, mut rss, mut busy) = (0.0, 0.0, 0u64, 0.0);
                let (mut peer_secs, mut peer_cpu, mut peer_rss) = (0.0, 0.0, 0u64);
                let mut has_peer = false;
                let rate = |secs: f64| args.messages() as f64 / secs;
                for round in 1..=args.rounds() {
                    let mut line = format!(
                        "{size} B{shown_mode}, c={setting}, latency={latency_ms}ms, {} messages, round {round}:",
                        args.messages()
                    );
                    for (which, name) in names.iter().enumerate() {
                        let secs = phases.native(args, size, which).await?;
                        native_secs[which] += secs;
                        line.push_str(&format!(" {name} {:.0} msg/s,", rate(secs)));
                    }
                    let ferry = phases.ferry(args, &case).await?;
                    line.push_str(&format!(" ferry {:.0} msg/s", rate(ferry.secs)));
                    if let Some(peer) = phases.peer(args, &case).await? {
                        has_peer = true;
                        line.push_str(&format!(
                            ", hand-written bridge {:.0} msg/s",
                            rate(peer.secs)
                        ));
                        peer_secs += peer.secs;
                        peer_cpu += peer.cpu_seconds;
                        peer_rss = peer_rss.max(peer.peak_rss_kib);
                    }
                    println!("{line}");
                    ferry_secs += ferry.secs;
                    cpu += ferry.cpu_seconds;
                    rss = rss.max(ferry.peak_rss_kib);
                    busy += ferry.busy_cores * ferry.secs;
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
                    mode,
                    http2,
                    messages: args.messages(),
                    natives: native_secs.iter().map(|secs| total / secs).collect(),
                    ceiling,
                    ferry: total / ferry_secs,
                    cpu_per_100k: cpu / total * 100_000.0,
                    rss_mib: rss as f64 / 1024.0,
                    busy_cores: busy / ferry_secs,
                    peer: has_peer.then(|| {
                        (
                            total / peer_secs,
                            peer_cpu / total * 100_000.0,
                            peer_rss as f64 / 1024.0,
                        )
                    }),
                    rate: pace.rate,
                    latencies,
                });
            }
        }
    }
    print_rates(phases.natives(), &rows);
    print_peer(&rows);
    print_latencies(&rows);
    if let Some(path) = &all.chart {
        std::fs::write(path, crate::chart::size_chart(&phases.title(all), &rows))?;
        println!("\nchart: {}", path.display());
    }
    Ok(())
}

fn print_rates(names: &[&str], rows: &[Row]) {
    println!();
    let modes = rows.iter().any(|r| r.mode.is_some());
    let versions = rows.iter().any(|r| r.http2);
    let mut head = "| size |".to_owned();
    let mut rule = "|---|".to_owned();
    if modes {
        head.push_str(" mode | messages |");
        rule.push_str("---|---|");
    }
    if versions {
        head.push_str(" HTTP |");
        rule.push_str("---|");
    }
    head.push_str(" concurrency | endpoint latency |");
    rule.push_str("---|---|");
    for name in names {
        head.push_str(&format!(" {name} msg/s |"));
        rule.push_str("---|");
    }
    head.push_str(" sink ceiling msg/s | ferry msg/s |");
    rule.push_str("---|---|");
    for name in names {
        head.push_str(&format!(" ferry ÷ {name} |"));
        rule.push_str("---|");
    }
    head.push_str(&format!(
        " ferry ÷ ceiling | machine busy (of {} cores) | ferry CPU s per 100k | peak RSS MiB |",
        cores()
    ));
    rule.push_str("---|---|---|---|");
    println!("{head}\n{rule}");
    for r in rows {
        let mut line = format!("| {} B |", r.case.size);
        if modes {
            let mode = r.mode.map_or("envelope", BodyMode::name);
            line.push_str(&format!(" {mode} | {} |", r.messages));
        }
        if versions {
            line.push_str(if r.http2 { " 2 |" } else { " 1.1 |" });
        }
        line.push_str(&format!(" {} | {} ms |", r.case.setting, r.case.latency_ms));
        for native in &r.natives {
            line.push_str(&format!(" {native:.0} |"));
        }
        line.push_str(&format!(" {:.0} | {:.0} |", r.ceiling, r.ferry));
        for native in &r.natives {
            line.push_str(&format!(" {:.2} |", r.ferry / native));
        }
        line.push_str(&format!(
            " {:.2} | {:.2} | {:.2} | {:.1} |",
            r.ferry / r.ceiling,
            r.busy_cores,
            r.cpu_per_100k,
            r.rss_mib
        ));
        println!("{line}");
    }
}

/// ferry against the hand-written bridge, where the broker has one.
fn print_peer(rows: &[Row]) {
    if rows.iter().all(|r| r.peer.is_none()) {
        return;
    }
    println!();
    println!("| size | concurrency | endpoint latency | ferry msg/s | hand-written msg/s | ferry ÷ hand-written (rate) | ferry CPU s per 100k | hand-written CPU s per 100k | ferry ÷ hand-written (CPU per message) | peak RSS MiB (ferry / hand-written) |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let Some((rate, cpu, rss)) = r.peer else {
            continue;
        };
        println!(
            "| {} B | {} | {} ms | {:.0} | {rate:.0} | {:.2} | {:.2} | {cpu:.2} | {:.2} | {:.1} / {rss:.1} |",
            r.case.size,
            r.case.setting,
            r.case.latency_ms,
            r.ferry,
            r.ferry / rate,
            r.cpu_per_100k,
            r.cpu_per_100k / cpu,
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
    finish_ferry(child, pid, &delivered, messages, Start::now(pid)?).await
}

/// Where a phase's clock and CPU counts start: its own process's and the machine's.
pub struct Start {
    at: Instant,
    cpu: f64,
    machine: (u64, u64),
}

impl Start {
    /// Now, for the bridge process `pid`.
    pub fn now(pid: u32) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            cpu: cpu_seconds(pid)?,
            machine: machine_jiffies()?,
        })
    }
}

/// Waits for a ferry whose clock and CPU count started at `start` to deliver `messages`,
/// then measures it and stops it.
pub async fn finish_ferry(
    mut child: Child,
    pid: u32,
    delivered: &AtomicU64,
    messages: u64,
    start: Start,
) -> Result<FerryRun> {
    while delivered.load(Ordering::SeqCst) < messages {
        if let Some(status) = child.try_wait()? {
            bail!("ferry exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = start.at.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - start.cpu;
    let (busy, total) = machine_jiffies()?;
    let busy_cores =
        (busy - start.machine.0) as f64 / (total - start.machine.1).max(1) as f64 * cores() as f64;
    let peak_rss_kib = peak_rss_kib(pid)?;
    stop_ferry(child, pid)?;
    Ok(FerryRun {
        secs,
        cpu_seconds: cpu,
        peak_rss_kib,
        busy_cores,
    })
}

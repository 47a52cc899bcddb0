//! `ferry-bench`: measures, in one run on loopback, a broker's native drain rate (a
//! consumer that only acks, no HTTP) and ferry end to end into a counting HTTP sink, and
//! prints ferry's rate as a ratio of the drain rate with its CPU time and peak RSS.
//!
//! With a filled queue (RabbitMQ, Kafka) it also measures, in the same run, the counting
//! sink's own ceiling and, in a paced phase, the latency ferry adds (see `sweep.rs`).
//!
//! SQS phases publish while they drain, through the same publisher and the same window
//! of outstanding messages, because the emulator slows down with queue depth. RabbitMQ
//! and Kafka phases drain a queue or topic filled beforehand (see `sweep.rs`).

mod amqp;
mod capacity;
mod ceiling;
mod concurrency;
mod kafka;
mod latency;
mod sweep;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use clap::Parser;

use crate::concurrency::{ConcurrencyArg, Setting};

/// Which broker to measure.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Broker {
    /// SQS on the local emulator.
    Sqs,
    /// The local RabbitMQ.
    Amqp,
    /// librdkafka's mock cluster, in the bench process.
    Kafka,
}

#[derive(Parser, Clone)]
#[command(about = "A broker's native drain rate vs ferry end to end")]
struct Args {
    /// The broker.
    #[arg(long, value_enum, default_value = "sqs")]
    broker: Broker,
    /// Messages per phase [default: 20,000 on SQS, 200,000 on RabbitMQ and Kafka; with
    /// --quick 2,000 and 5,000].
    #[arg(long)]
    messages: Option<u64>,
    /// Payload size in bytes (RabbitMQ and Kafka: each of a comma-separated list, SQS the
    /// first).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    size: Vec<usize>,
    /// Receive loops, for the native drainer and for ferry alike.
    #[arg(long, default_value_t = 4)]
    receivers: usize,
    /// ferry's `concurrency`; RabbitMQ and Kafka run each of a comma-separated list, SQS
    /// the first. `adaptive` runs `concurrency = "adaptive"` with `max_concurrency` the
    /// largest number of the list (256 without one).
    #[arg(long, value_delimiter = ',', default_value = "64")]
    concurrency: Vec<ConcurrencyArg>,
    /// Endpoint latency in ms (RabbitMQ and Kafka: each of a comma-separated list).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    latency_ms: Vec<u64>,
    /// RabbitMQ server.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_uri: String,
    /// Unacked deliveries the RabbitMQ consumers (native and ferry) may hold.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Most messages published but not yet consumed.
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// The ferry binary (build it with --release).
    #[arg(long, default_value = "target/release/ferry")]
    ferry: PathBuf,
    /// The SQS endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4566")]
    endpoint: String,
    /// Alternating native / ferry rounds [default: 2, with --quick 1].
    #[arg(long)]
    rounds: Option<u64>,
    /// Seconds the sink-ceiling load generator is counted for [default: 5, with --quick 1].
    #[arg(long)]
    ceiling_secs: Option<f64>,
    /// Messages per second of the paced (latency) phases; capped per row at a quarter of
    /// `concurrency ÷ endpoint latency`.
    #[arg(long, default_value_t = 1000.0)]
    paced_rate: f64,
    /// Seconds of publishing in each paced phase [default: 5, with --quick 1].
    #[arg(long)]
    paced_secs: Option<f64>,
    /// RabbitMQ only: instead of the drain comparison, an endpoint that takes this many
    /// requests at once (503 beyond) against each fixed `concurrency` and "adaptive".
    #[arg(long)]
    capacity: Option<usize>,
    /// A smoke run: fewer messages, one round, short ceiling and paced phases.
    #[arg(long)]
    quick: bool,
}

impl Args {
    fn messages(&self) -> u64 {
        let default = match self.broker {
            Broker::Sqs => 20_000,
            Broker::Amqp | Broker::Kafka => 200_000,
        };
        // A quick sweep of two sizes, three settings and two latencies runs twelve rows.
        let quick_divisor = match self.broker {
            Broker::Sqs => 10,
            Broker::Amqp | Broker::Kafka => 40,
        };
        match (self.messages, self.quick) {
            (Some(n), _) => n,
            (None, true) => default / quick_divisor,
            (None, false) => default,
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.unwrap_or(if self.quick { 1 } else { 2 })
    }

    fn ceiling_window(&self) -> Duration {
        let secs = self
            .ceiling_secs
            .unwrap_or(if self.quick { 1.0 } else { 5.0 });
        Duration::from_secs_f64(secs)
    }

    fn paced_secs(&self) -> f64 {
        self.paced_secs
            .unwrap_or(if self.quick { 1.0 } else { 5.0 })
    }

    /// The `--concurrency` list as ferry settings.
    fn settings(&self) -> Vec<Setting> {
        concurrency::settings(&self.concurrency)
    }

    fn first_setting(&self) -> Setting {
        self.settings()
            .first()
            .copied()
            .unwrap_or(Setting::Fixed(64))
    }

    fn first_size(&self) -> usize {
        self.size.first().copied().unwrap_or(256)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    args.messages = Some(args.messages());
    match args.broker {
        Broker::Amqp => {
            return match args.capacity {
                Some(capacity) => capacity::run(&args, capacity).await,
                None => amqp::run(&args).await,
            }
        }
        Broker::Kafka => return kafka::run(&args).await,
        Broker::Sqs => {}
    }
    let client = client(&args.endpoint).await?;
    println!(
        "SQS (emulator at {}), {} messages of {} B, {} receivers",
        args.endpoint,
        args.messages(),
        args.first_size(),
        args.receivers
    );

    // The emulator's speed drifts over a run, so the phases alternate and the ratio is
    // taken over the sums.
    let mut native_secs = 0.0;
    let mut ferry_secs = 0.0;
    let mut cpu = 0.0;
    let mut rss = 0u64;
    let mut rows = Vec::new();
    for round in 1..=args.rounds() {
        let native = native_drain(&client, &args).await?;
        let ferry = ferry_run(&client, &args).await?;
        println!(
            "round {round}: native {:.0} msg/s, ferry {:.0} msg/s",
            native.rate, ferry.rate
        );
        native_secs += args.messages() as f64 / native.rate;
        ferry_secs += args.messages() as f64 / ferry.rate;
        cpu += ferry.cpu_seconds;
        rss = rss.max(ferry.peak_rss_kib);
        rows.push((native.rate, ferry.rate));
    }
    let total = (args.messages() * args.rounds()) as f64;
    let native_rate = total / native_secs;
    let ferry_rate = total / ferry_secs;
    println!();
    println!("| run | msg/s | ratio to drain | CPU s per 10k msgs | peak RSS MiB |");
    println!("|---|---|---|---|---|");
    println!("| native drain (receive + batch delete) | {native_rate:.0} | 1.00 | - | - |");
    println!(
        "| ferry end to end (concurrency {}) | {:.0} | {:.2} | {:.2} | {:.1} |",
        args.first_setting(),
        ferry_rate,
        ferry_rate / native_rate,
        cpu / total * 10_000.0,
        rss as f64 / 1024.0
    );
    Ok(())
}

async fn client(endpoint: &str) -> Result<Client> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "ferry-bench",
        ))
        .load()
        .await;
    let client = Client::new(&config);
    client.list_queues().send().await.with_context(|| {
        format!("SQS endpoint {endpoint} not reachable (scripts/moto.sh starts it)")
    })?;
    Ok(client)
}

async fn create_queue(client: &Client, name: &str) -> Result<String> {
    let name = format!(
        "{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    client
        .create_queue()
        .queue_name(name)
        .send()
        .await?
        .queue_url
        .context("no queue url")
}

/// Publishes `total` messages with at most `window` outstanding; four tasks in parallel.
fn publish(
    client: Client,
    url: String,
    args: &Args,
    consumed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<()>> {
    let total = args.messages();
    let window = args.window;
    let size = args.first_size();
    tokio::spawn(async move {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (client, url, next, consumed) =
                (client.clone(), url.clone(), next.clone(), consumed.clone());
            tasks.spawn(async move {
                loop {
                    let start = next.fetch_add(10, Ordering::SeqCst);
                    if start >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    while start.saturating_sub(consumed.load(Ordering::SeqCst)) > window {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let entries = (start..(start + 10).min(total)).map(|i| {
                        let mut body = format!("{{\"seq\":{i},\"pad\":\"");
                        while body.len() < size - 2 {
                            body.push('x');
                        }
                        body.push_str("\"}");
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(body)
                            .build()
                    });
                    client
                        .send_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries.collect::<Result<_, _>>()?))
                        .send()
                        .await?;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    })
}

struct Rate {
    rate: f64,
}

async fn native_drain(client: &Client, args: &Args) -> Result<Rate> {
    let url = create_queue(client, "bench-native").await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let publisher = publish(client.clone(), url.clone(), args, consumed.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.receivers {
        let (client, url, consumed, total, calls) = (
            client.clone(),
            url.clone(),
            consumed.clone(),
            args.messages(),
            calls.clone(),
        );
        tasks.spawn(async move {
            let mut deletes = tokio::task::JoinSet::new();
            while consumed.load(Ordering::SeqCst) < total {
                calls.fetch_add(1, Ordering::Relaxed);
                let resp = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await?;
                let messages = resp.messages.unwrap_or_default();
                if messages.is_empty() {
                    continue;
                }
                let entries = messages.iter().enumerate().filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .set_receipt_handle(m.receipt_handle.clone())
                        .build()
                        .ok()
                });
                // Deletes run beside the next receive, as a good hand-written drainer does.
                let delete = client
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries.collect()));
                let (consumed, n) = (consumed.clone(), messages.len() as u64);
                deletes.spawn(async move {
                    delete.send().await?;
                    consumed.fetch_add(n, Ordering::SeqCst);
                    Ok::<_, anyhow::Error>(())
                });
                while let Some(r) = deletes.try_join_next() {
                    r??;
                }
            }
            while let Some(r) = deletes.join_next().await {
                r??;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = started.elapsed();
    publisher.await??;
    println!(
        "native drain: {} receive calls, {:.1} messages per call",
        calls.load(Ordering::Relaxed),
        args.messages() as f64 / calls.load(Ordering::Relaxed).max(1) as f64
    );
    Ok(Rate {
        rate: args.messages() as f64 / elapsed.as_secs_f64(),
    })
}

struct FerryRun {
    rate: f64,
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

/// A counting sink: answers 200 to everything after `latency` and counts requests.
async fn counting_sink(count: Arc<AtomicU64>, latency: Duration) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || {
        let count = count.clone();
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            count.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn ferry_run(client: &Client, args: &Args) -> Result<FerryRun> {
    let url = create_queue(client, "bench-ferry").await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let latency = Duration::from_millis(args.latency_ms.first().copied().unwrap_or(0));
    let sink = counting_sink(consumed.clone(), latency).await?;
    let source = format!(
        "type = \"sqs\"\nqueue_url = \"{url}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\n\
         receivers = {}\nwait_time = \"1s\"\n",
        args.endpoint, args.receivers
    );
    let (mut child, pid) = spawn_ferry(args, &source, sink, args.first_setting())?;
    // Let it connect before the clock starts, like the native drainer's client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let publisher = publish(client.clone(), url, args, consumed.clone());
    while consumed.load(Ordering::SeqCst) < args.messages() {
        if let Some(status) = child.try_wait()? {
            bail!("ferry exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let peak_rss_kib = peak_rss_kib(pid)?;
    publisher.await??;
    stop_ferry(child, pid)?;
    Ok(FerryRun {
        rate: args.messages() as f64 / elapsed.as_secs_f64(),
        cpu_seconds: cpu,
        peak_rss_kib,
    })
}

/// utime + stime of a process, from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit(')').next().context("stat format")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmHWM missing")
}

/// Starts the ferry binary with one route `bench` from `source` (the source section's
/// body) to the counting sink; returns the process and its pid.
fn spawn_ferry(
    args: &Args,
    source: &str,
    sink: std::net::SocketAddr,
    setting: Setting,
) -> Result<(std::process::Child, u32)> {
    spawn_ferry_with(
        args,
        source,
        sink,
        setting.slots(),
        &setting.delivery_toml(),
    )
}

/// Starts ferry with one route from `source` to the sink, with this `[delivery]` body.
fn spawn_ferry_with(
    args: &Args,
    source: &str,
    sink: std::net::SocketAddr,
    pool: usize,
    delivery: &str,
) -> Result<(std::process::Child, u32)> {
    if !args.ferry.is_file() {
        bail!(
            "{} not found: cargo build --release -p ferry-bin --all-features",
            args.ferry.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[routes.bench.source]\n{source}\n\
             [routes.bench.sink]\ntype = \"http\"\nurl = \"http://{sink}/bench\"\npool_size = {pool}\n\
             [routes.bench.delivery]\n{delivery}"
        ),
    )?;
    let child = Command::new(&args.ferry)
        .args(["run", "--config"])
        .arg(&config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("FERRY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ferry")?;
    let pid = child.id();
    Ok((child, pid))
}

/// SIGTERM, then wait for the exit.
fn stop_ferry(mut child: std::process::Child, pid: u32) -> Result<()> {
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    child.wait()?;
    Ok(())
}

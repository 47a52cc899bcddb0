//! `ferry-bench`: measures, in one run on loopback, the SQS emulator's native drain rate
//! (receive + batch delete, no HTTP) and ferry end to end into a counting HTTP sink, and
//! prints ferry's rate as a ratio of the drain rate with its CPU time and peak RSS.
//!
//! Both phases publish while they drain, through the same publisher and the same window
//! of outstanding messages, because the emulator slows down with queue depth.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use clap::Parser;

#[derive(Parser, Clone)]
#[command(about = "SQS drain rate vs ferry end to end")]
struct Args {
    /// Messages per phase.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Receive loops, for the native drainer and for ferry alike.
    #[arg(long, default_value_t = 4)]
    receivers: usize,
    /// ferry's `concurrency`.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Most messages published but not yet consumed.
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// The ferry binary (build it with --release).
    #[arg(long, default_value = "target/release/ferry")]
    ferry: PathBuf,
    /// The SQS endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4566")]
    endpoint: String,
    /// Alternating native / ferry rounds.
    #[arg(long, default_value_t = 2)]
    rounds: u64,
    /// 2,000 messages instead of the default: a smoke run.
    #[arg(long)]
    quick: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.messages = 2_000;
    }
    let client = client(&args.endpoint).await?;
    println!(
        "SQS (emulator at {}), {} messages of {} B, {} receivers",
        args.endpoint, args.messages, args.size, args.receivers
    );

    // The emulator's speed drifts over a run, so the phases alternate and the ratio is
    // taken over the sums.
    let mut native_secs = 0.0;
    let mut ferry_secs = 0.0;
    let mut cpu = 0.0;
    let mut rss = 0u64;
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        let native = native_drain(&client, &args).await?;
        let ferry = ferry_run(&client, &args).await?;
        println!(
            "round {round}: native {:.0} msg/s, ferry {:.0} msg/s",
            native.rate, ferry.rate
        );
        native_secs += args.messages as f64 / native.rate;
        ferry_secs += args.messages as f64 / ferry.rate;
        cpu += ferry.cpu_seconds;
        rss = rss.max(ferry.peak_rss_kib);
        rows.push((native.rate, ferry.rate));
    }
    let total = (args.messages * args.rounds) as f64;
    let native_rate = total / native_secs;
    let ferry_rate = total / ferry_secs;
    println!();
    println!("| run | msg/s | ratio to drain | CPU s per 10k msgs | peak RSS MiB |");
    println!("|---|---|---|---|---|");
    println!("| native drain (receive + batch delete) | {native_rate:.0} | 1.00 | - | - |");
    println!(
        "| ferry end to end (concurrency {}) | {:.0} | {:.2} | {:.2} | {:.1} |",
        args.concurrency,
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
    let total = args.messages;
    let window = args.window;
    let size = args.size;
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
            args.messages,
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
        args.messages as f64 / calls.load(Ordering::Relaxed).max(1) as f64
    );
    Ok(Rate {
        rate: args.messages as f64 / elapsed.as_secs_f64(),
    })
}

struct FerryRun {
    rate: f64,
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

/// A counting sink: answers 200 to everything and counts requests.
async fn counting_sink(count: Arc<AtomicU64>) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move || {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn ferry_run(client: &Client, args: &Args) -> Result<FerryRun> {
    if !args.ferry.is_file() {
        bail!(
            "{} not found: cargo build --release -p ferry-bin",
            args.ferry.display()
        );
    }
    let url = create_queue(client, "bench-ferry").await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let sink = counting_sink(consumed.clone()).await?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[admin]
listen = "127.0.0.1:0"
[routes.bench.source]
type = "sqs"
queue_url = "{url}"
endpoint_url = "{endpoint}"
region = "us-east-1"
receivers = {receivers}
wait_time = "1s"
[routes.bench.sink]
type = "http"
url = "http://{sink}/bench"
pool_size = {concurrency}
[routes.bench.delivery]
concurrency = {concurrency}
"#,
            endpoint = args.endpoint,
            receivers = args.receivers,
            concurrency = args.concurrency,
        ),
    )?;
    let mut child = Command::new(&args.ferry)
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
    // Let it connect before the clock starts, like the native drainer's client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let publisher = publish(client.clone(), url, args, consumed.clone());
    while consumed.load(Ordering::SeqCst) < args.messages {
        if let Some(status) = child.try_wait()? {
            bail!("ferry exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let peak_rss_kib = peak_rss_kib(pid)?;
    publisher.await??;
    Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    child.wait()?;
    Ok(FerryRun {
        rate: args.messages as f64 / elapsed.as_secs_f64(),
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

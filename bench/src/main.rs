//! `ferry-bench`: measures, in one run on loopback, a broker's native drain rate (a
//! consumer that only acks, no HTTP) and ferry end to end into a counting HTTP sink, and
//! prints ferry's rate as a ratio of the drain rate with its CPU time and peak RSS.
//!
//! It also measures, in the same run, the counting sink's own ceiling and (RabbitMQ, Kafka)
//! in a paced phase the latency ferry adds.
//!
//! Every broker runs the same sweep over sizes, `concurrency` settings and endpoint
//! latencies (`sweep.rs`). SQS phases publish while they drain, through the same publisher
//! and the same window of outstanding messages, because the emulator slows down with queue
//! depth (`sqs.rs`). RabbitMQ and Kafka phases drain a queue or topic filled beforehand.

mod amqp;
mod capacity;
mod ceiling;
mod chart;
mod concurrency;
mod delay;
mod idle;
mod kafka;
mod latency;
mod mqtt;
mod nats;
mod postgres;
mod redis;
mod sqs;
mod sweep;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
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
    /// The local Redis (Streams).
    Redis,
    /// The local PostgreSQL: a table drained by the claim statement.
    Postgres,
    /// The local NATS server (JetStream).
    Nats,
    /// A Mosquitto (MQTT 5) the bench starts on a free loopback port.
    Mqtt,
}

/// How ferry's HTTP sink carries the message in the request body (`[routes.*.sink] mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BodyMode {
    /// The JSON envelope (ferry's default): the payload escaped into a JSON string.
    Envelope,
    /// The payload bytes as the body, metadata in headers.
    Raw,
    /// CloudEvents binary mode: the payload as the body, `ce-*` headers.
    Cloudevents,
}

impl BodyMode {
    /// The value of the sink's `mode` key.
    fn name(self) -> &'static str {
        match self {
            Self::Envelope => "envelope",
            Self::Raw => "raw",
            Self::Cloudevents => "cloudevents",
        }
    }
}

#[derive(Parser, Clone)]
#[command(about = "A broker's native drain rate vs ferry end to end")]
struct Args {
    /// The broker.
    #[arg(long, value_enum, default_value = "sqs")]
    broker: Broker,
    /// Messages per phase [default: 20,000 on SQS, 50,000 on PostgreSQL, 200,000 on
    /// RabbitMQ and Kafka; with --quick a tenth on SQS and PostgreSQL, 5,000 on the others].
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
    /// Redis server (`--broker redis`).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// NATS server (`--broker nats`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// PostgreSQL server and database (the bench creates and drops its tables there).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
    /// Unacked deliveries ferry's RabbitMQ consumer may hold.
    #[arg(long, default_value_t = 500)]
    prefetch: u16,
    /// Unacked deliveries the plain RabbitMQ consumers may hold: enough not to limit them.
    #[arg(long, default_value_t = 2000)]
    native_prefetch: u16,
    /// The multiple-ack drain acks once every this many deliveries.
    #[arg(long, default_value_t = 100)]
    ack_every: u64,
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
    /// A TOML file appended to ferry's configuration (a top-level section such as
    /// `[audit]`), to measure what it costs against a run without it.
    #[arg(long)]
    ferry_extra: Option<PathBuf>,
    /// Instead of the drain comparison: ferry with each of these numbers of idle routes
    /// (queues or topics with nothing in them), measured at rest.
    #[arg(long, value_delimiter = ',')]
    idle_routes: Vec<usize>,
    /// Seconds each idle configuration is measured for, once settled.
    #[arg(long, default_value_t = 30.0)]
    idle_secs: f64,
    /// Body modes of ferry's HTTP sink, each run as its own row [default: the sink's
    /// default, `envelope`, without a `mode` key].
    #[arg(long, value_enum, value_delimiter = ',')]
    mode: Vec<BodyMode>,
    /// Most payload bytes one phase moves, in MiB: a size whose `--messages` would move
    /// more runs fewer messages (at least 1,000), so that 256 KiB rows stay within what
    /// the broker holds in memory.
    #[arg(long, default_value_t = 1024)]
    max_phase_mib: u64,
    /// The HTTP versions ferry's sink speaks to the counting sink, each run as its own row
    /// (`http2`: h2c, every request on one connection).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "http1")]
    http: Vec<HttpVersion>,
    /// Also writes an SVG chart of ferry's rate and CPU per message against the message
    /// size, one line per body mode, concurrency and latency.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// A smoke run: fewer messages, one round, short ceiling and paced phases.
    #[arg(long)]
    quick: bool,
    /// The body mode of the row being measured (set by the sweep from `--mode`).
    #[arg(skip)]
    current_mode: Option<BodyMode>,
    /// Whether the row being measured speaks HTTP/2 (set by the sweep from `--http`).
    #[arg(skip)]
    current_http2: bool,
}

/// The HTTP version of ferry's sink (`[routes.*.sink] http2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum HttpVersion {
    /// HTTP/1.1, a pool of keep-alive connections (ferry's default).
    Http1,
    /// HTTP/2 with prior knowledge (h2c): every request multiplexed on one connection.
    Http2,
}

impl Args {
    fn messages(&self) -> u64 {
        let default = match self.broker {
            Broker::Sqs => 20_000,
            Broker::Postgres => 50_000,
            Broker::Amqp | Broker::Kafka | Broker::Redis | Broker::Nats | Broker::Mqtt => 200_000,
        };
        // A quick sweep of two sizes, three settings and two latencies runs twelve rows.
        let quick_divisor = match self.broker {
            Broker::Sqs | Broker::Postgres => 10,
            Broker::Amqp | Broker::Kafka | Broker::Redis | Broker::Nats | Broker::Mqtt => 40,
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

    /// These arguments for the rows of one payload size: `--messages`, capped so that a
    /// phase moves at most `--max-phase-mib`.
    fn for_size(&self, size: usize) -> Self {
        let cap = (self.max_phase_mib << 20) / size.max(1) as u64;
        let mut args = self.clone();
        args.messages = Some(self.messages().min(cap.max(1_000)));
        args
    }

    /// These arguments with ferry's sink in `mode` (`None`: the sink's default).
    fn with_variant(&self, (mode, http2): (Option<BodyMode>, bool)) -> Self {
        let mut args = self.clone();
        args.current_mode = mode;
        args.current_http2 = http2;
        args
    }

    /// Each `--mode` (the sink's default alone when none was given) with each `--http`
    /// version (`true`: HTTP/2).
    fn variants(&self) -> Vec<(Option<BodyMode>, bool)> {
        let modes = if self.mode.is_empty() {
            vec![None]
        } else {
            self.mode.iter().copied().map(Some).collect()
        };
        modes
            .into_iter()
            .flat_map(|m| self.http.iter().map(move |h| (m, *h == HttpVersion::Http2)))
            .collect()
    }

    fn first_size(&self) -> usize {
        self.size.first().copied().unwrap_or(256)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    args.messages = Some(args.messages());
    if !args.idle_routes.is_empty() {
        return idle::run(&args).await;
    }
    match args.broker {
        Broker::Amqp => match args.capacity {
            Some(capacity) => capacity::run(&args, capacity).await,
            None => amqp::run(&args).await,
        },
        Broker::Kafka => kafka::run(&args).await,
        Broker::Redis => redis::run(&args).await,
        Broker::Postgres => postgres::run(&args).await,
        Broker::Nats => nats::run(&args).await,
        Broker::Mqtt => mqtt::run(&args).await,
        Broker::Sqs => sqs::run(&args).await,
    }
}

/// A counting sink: reads each request's body, answers 200 after `latency` and counts
/// requests. It reads the body as an endpoint does: one that answers without reading it
/// has its connection closed under a big body, or over HTTP/2 its stream reset.
async fn counting_sink(count: Arc<AtomicU64>, latency: Duration) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let delay = delay::Delay::start();
    let app = axum::Router::new().fallback(move |_body: bytes::Bytes| {
        let count = count.clone();
        let delay = delay.clone();
        async move {
            delay.wait(latency).await;
            count.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
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
    status_kib(pid, "VmHWM")
}

/// A name no other phase of any run uses: the prefix, the process id and a count (a
/// stream, subject, topic or session of one phase).
fn unique(prefix: &str) -> String {
    static PHASE: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        PHASE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A size in KiB from /proc/PID/status (`VmHWM`, `VmRSS`, ...).
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} missing"))
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
    let extra = match &args.ferry_extra {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("--ferry-extra {}", path.display()))?,
        None => String::new(),
    };
    let mut mode = match args.current_mode {
        Some(mode) => format!("mode = \"{}\"\n", mode.name()),
        None => String::new(),
    };
    if args.current_http2 {
        mode.push_str("http2 = true\n");
    }
    spawn_ferry_config(
        args,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n[routes.bench.source]\n{source}\n\
             [routes.bench.sink]\ntype = \"http\"\nurl = \"http://{sink}/bench\"\npool_size = {pool}\n{mode}\
             [routes.bench.delivery]\n{delivery}"
        ),
    )
}

/// Starts the ferry binary on this configuration; returns the process and its pid.
fn spawn_ferry_config(args: &Args, text: &str) -> Result<(std::process::Child, u32)> {
    if !args.ferry.is_file() {
        bail!(
            "{} not found: cargo build --release -p ferry-bin --all-features",
            args.ferry.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("ferry-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.toml");
    std::fs::write(&config, text)?;
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

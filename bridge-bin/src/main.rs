//! `ferry`: receives messages from a broker and POSTs each one to an HTTP endpoint,
//! acknowledging it only after a 2xx.

// Built without any backend, the wiring has nothing to wire; that build exists only to
// refuse such routes with a clear error.
#![cfg_attr(
    not(any(feature = "sqs", feature = "amqp", feature = "kafka")),
    allow(unused)
)]

/// ferry allocates and frees a few small buffers per message. mimalloc, whose heap the
/// kernel may back with huge pages, cost about a tenth less CPU per message than the
/// system allocator end to end (built without huge pages the gain was gone), for some
/// 15 MiB more resident memory (`BENCHMARKS.md`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod audit;
mod config;
mod fleet_rate;
#[cfg(feature = "otlp")]
mod otlp;
mod pause;
mod redrive;
mod wiring;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_core::Metrics;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{ConfigError, LoadOptions, Plan};

/// Message bridge: broker → your HTTP endpoint, ack only after a 2xx.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every configured route until SIGTERM or SIGINT.
    Run(ConfigArgs),
    /// Check the configuration and print it resolved, with secrets redacted.
    Validate(ConfigArgs),
    /// Move a route's dead letters back to its queue (SQS and RabbitMQ routes).
    Redrive(RedriveArgs),
}

#[derive(Args)]
struct RedriveArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The route whose dead letters to move.
    #[arg(long)]
    route: String,
    /// The dead-letter queue to move from: an SQS queue URL (default: the route's
    /// `dead_letter_queue_url`) or a RabbitMQ queue name (required for RabbitMQ).
    #[arg(long)]
    from: Option<String>,
    /// Move at most this many messages.
    #[arg(long)]
    max: Option<u64>,
    /// Only count what would move.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct ConfigArgs {
    /// One configuration file (TOML, or YAML by extension) plus FERRY__ overrides.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Root of the layered configuration tree.
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    /// Environment layer: config/{env}/config.toml.
    #[arg(long, env = "ENV")]
    env: Option<String>,
    /// Scope layer: config/{env}/{scope}.config.toml.
    #[arg(long, env = "SCOPE")]
    scope: Option<String>,
}

/// How the process ends: configuration mistakes exit 2, everything else 1.
enum Failure {
    Config(Vec<ConfigError>),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Run(args) => run(&args),
        Command::Redrive(args) => redrive(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(errors)) => {
            for e in errors {
                eprintln!("ferry: {e}");
            }
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("ferry: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    // lapin logs every closed connection or channel at ERROR on its own; ferry reports
    // the same event once, with the route and what to fix, so its lines only repeat it.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(args: &ConfigArgs) -> Result<(config::Config, Plan), Failure> {
    let options = LoadOptions {
        file: args.config.clone(),
        dir: args.config_dir.clone(),
        env: args.env.clone(),
        scope: args.scope.clone(),
    };
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let (config, _files) = config::load(&options, &vars).map_err(Failure::Config)?;
    let plan = config::validate(&config).map_err(Failure::Config)?;
    Ok((config, plan))
}

fn validate(args: &ConfigArgs) -> Result<(), Failure> {
    let (config, _plan) = load(args)?;
    let text =
        toml::to_string_pretty(&config::redacted(&config)).context("printing the configuration")?;
    print!("{text}");
    Ok(())
}

fn run(args: &ConfigArgs) -> Result<(), Failure> {
    let (_config, plan) = load(args)?;
    runtime(plan.worker_threads)?.block_on(run_routes(plan))
}

/// The async runtime, with `[runtime] worker_threads` threads.
fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, Failure> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?)
}

fn redrive(args: RedriveArgs) -> Result<(), Failure> {
    let (_config, plan) = load(&args.config)?;
    let worker_threads = plan.worker_threads;
    let names: Vec<String> = plan.routes.iter().map(|r| r.name.to_string()).collect();
    let Some(route) = plan.routes.into_iter().find(|r| *r.name == *args.route) else {
        return Err(Failure::Config(vec![ConfigError::new(
            "--route",
            format!(
                "no route named {:?} (routes: {})",
                args.route,
                names.join(", ")
            ),
        )]));
    };
    let ask = redrive::Redrive {
        from: args.from,
        max: args.max,
        dry_run: args.dry_run,
    };
    runtime(worker_threads)?
        .block_on(redrive::run(route, ask))
        .map_err(Failure::Other)
}

async fn run_routes(plan: Plan) -> Result<(), Failure> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let shutdown = CancellationToken::new();
    let (audit, audit_thread) = match &plan.audit {
        Some(audit) => {
            let (trail, thread) = audit::start(audit, &mut registry)
                .with_context(|| format!("audit.path: cannot open {}", audit.path.display()))?;
            (
                Some(trail as std::sync::Arc<dyn ferry_core::AuditTrail>),
                Some(thread),
            )
        }
        None => (None, None),
    };
    #[cfg(feature = "otlp")]
    let (tracer, provider) = match &plan.otlp {
        Some(otlp) => {
            let (tracer, provider) =
                otlp::start(otlp).context("otlp: cannot build the exporter")?;
            info!(endpoint = %otlp.traces_url, "exporting delivery spans");
            (
                Some(tracer as std::sync::Arc<dyn ferry_core::DeliveryTracer>),
                Some(provider),
            )
        }
        None => (None, None),
    };
    #[cfg(not(feature = "otlp"))]
    let tracer = None;
    let hooks = wiring::Hooks { audit, tracer };

    let mut views = Vec::new();
    let mut tasks = Vec::new();
    for mut route in plan.routes {
        if let (Some(limit), Some(state)) = (route.shared_rate, &plan.state) {
            let rate = fleet_rate::RedisRate::start(
                route.name.clone(),
                &state.redis_url,
                &state.prefix,
                limit,
                shutdown.clone(),
            )
            .map_err(|e| Failure::Config(vec![ConfigError::new("start", e)]))?;
            route.policy.fleet_rate = Some(ferry_core::FleetRate(rate));
        }
        match wiring::build(route, &metrics, hooks.clone(), &shutdown).await {
            Ok((view, task)) => {
                views.push(view);
                tasks.push(task);
            }
            Err(e) if e.is_config() => {
                return Err(Failure::Config(vec![ConfigError::new(
                    "start",
                    e.to_string(),
                )]))
            }
            Err(e) => return Err(anyhow::Error::new(e).into()),
        }
    }
    let names: Vec<String> = views.iter().map(|v| v.name.to_string()).collect();
    let switches = pause::Switches::new(
        views.iter().map(|v| v.ctx.clone()).collect(),
        plan.state.as_ref(),
    )
    .map_err(|e| Failure::Config(vec![ConfigError::new("start", e)]))?;
    let switches = std::sync::Arc::new(switches);
    // Before any route receives: a replica started while its routes are paused stays so.
    switches.load().await;
    tokio::spawn(switches.clone().follow(shutdown.clone()));
    let state = admin::AdminState {
        registry,
        routes: views,
        switches,
        token: plan.admin_token.clone(),
        draining: shutdown.clone(),
    };
    // The admin server outlives the drain (it answers `/readyz` with 503 meanwhile, and
    // `/metrics` still shows the last deliveries); it stops once every route has.
    let admin_stop = CancellationToken::new();
    let admin = admin::serve(plan.admin, state, admin_stop.clone())
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", plan.admin))?;
    // The runtime's own count, so the log shows what `[runtime] worker_threads` gave.
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    info!(admin = %plan.admin, routes = ?names, worker_threads, "ferry started");

    tokio::spawn(wait_for_signal(shutdown.clone()));
    // Each route runs on a worker thread, not on this one: tasks a route spawns then start
    // on the worker's own queue instead of waking a parked worker for every message.
    let results = join_all(tasks.into_iter().map(|task| {
        let shutdown = shutdown.clone();
        let running = tokio::spawn(task);
        async move {
            let result = match running.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(join) => Err(format!("route task ended abnormally: {join}")),
            };
            if let Err(e) = &result {
                error!(error = %e, "route failed; stopping ferry");
                shutdown.cancel();
            }
            result
        }
    }))
    .await;
    shutdown.cancel();
    admin_stop.cancel();
    let _ = admin.await;
    // Every route has dropped its handle: the writer drains the queue and ends.
    drop(hooks);
    if let Some(thread) = audit_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    // Spans still queued go out now (bounded by the export timeout).
    #[cfg(feature = "otlp")]
    if let Some(provider) = provider {
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        info!("ferry stopped");
        Ok(())
    } else {
        Err(anyhow::anyhow!(failed.join("; ")).into())
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}

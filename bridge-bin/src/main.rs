//! `ferry`: receives messages from a broker and POSTs each one to an HTTP endpoint,
//! acknowledging it only after a 2xx.

// Built without any backend, the wiring has nothing to wire; that build exists only to
// refuse such routes with a clear error.
#![cfg_attr(
    not(any(
        feature = "sqs",
        feature = "amqp",
        feature = "kafka",
        feature = "redis",
        feature = "postgres",
        feature = "mqtt",
        feature = "nats"
    )),
    allow(unused)
)]

/// ferry allocates and frees a few small buffers per message; mimalloc costs about a
/// tenth less CPU per message than the system allocator end to end. It is built without
/// transparent huge pages (`no_thp`): with them, each 2 MiB page of its heap that one
/// allocation touched was resident in full, 43 MiB at `concurrency = 64` against 27 MiB
/// without, for no CPU per message that alternating runs could tell apart
/// (`BENCHMARKS.md`, "Memory").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod audit;
mod check;
mod config;
mod fleet_rate;
mod logging;
#[cfg(feature = "otlp")]
mod otlp;
mod pause;
mod redrive;
mod serve;
mod status_page;
mod wiring;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use tracing::warn;

use crate::logging::LogFormat;

use crate::config::{ConfigError, LoadOptions, Plan};

/// What `ferry --help` says ferry is.
const ABOUT: &str =
    "ferry receives messages from a broker (Amazon SQS, RabbitMQ, Kafka, Redis Streams) and POSTs \
each one to your HTTP endpoint, acknowledging it on the broker only after a 2xx answer.";

const AFTER_HELP: &str = "\
Configuration:
  --config FILE        one file, TOML (.toml) or YAML (.yaml, .yml)
  --config-dir DIR     a layered tree (default: ./config), read in this order, later files
                       overriding earlier ones:
                         DIR/config.{toml,yml,yaml}
                         DIR/$ENV/config.{toml,yml,yaml}            when ENV is set
                         DIR/$ENV/$SCOPE.config.{toml,yml,yaml}     when ENV and SCOPE are set
  FERRY__ROUTES__NAME__SINK__URL=...   environment variables override single keys.
  With neither, ferry looks for ./config/config.toml (or .yml, .yaml) and says where it looked.

Environment:
  ENV, SCOPE           the layers above (same as --env, --scope)
  FERRY_LOG            log level: error, warn, info (default), debug, trace or off, with
                       optional target=level directives (info,ferry::delivery=debug shows each
                       message's attempts and verdicts)

Exit codes: 0 stopped cleanly, 2 configuration error, 1 anything else.";

/// `ferry --version`: the version and the backends this build has.
fn long_version() -> &'static str {
    const FEATURES: &[(&str, bool)] = &[
        ("sqs", cfg!(feature = "sqs")),
        ("amqp", cfg!(feature = "amqp")),
        ("kafka", cfg!(feature = "kafka")),
        ("redis", cfg!(feature = "redis")),
        ("postgres", cfg!(feature = "postgres")),
        ("mqtt", cfg!(feature = "mqtt")),
        ("nats", cfg!(feature = "nats")),
        ("otlp", cfg!(feature = "otlp")),
        ("mimalloc", cfg!(feature = "mimalloc")),
    ];
    let enabled: Vec<&str> = FEATURES
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
    let text = format!(
        "{}\nfeatures: {}",
        env!("CARGO_PKG_VERSION"),
        if enabled.is_empty() {
            "none".to_owned()
        } else {
            enabled.join(", ")
        }
    );
    Box::leak(text.into_boxed_str())
}

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    long_version = long_version(),
    about = ABOUT,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Log format: text for people, json for log shippers (fatal errors too).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every configured route until SIGTERM or SIGINT; SIGHUP reloads the configuration.
    Run(ConfigArgs),
    /// Check the configuration and print it resolved, with secrets redacted.
    Validate(ConfigArgs),
    /// Before a deploy: connect each route's source (credentials, queues, topics, exchanges,
    /// dead-letter targets) and ask each endpoint, receiving and delivering nothing. One
    /// line per check; exits 1 if any fails.
    Check(ConfigArgs),
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
    /// One configuration file (.toml, or .yaml/.yml), plus FERRY__ overrides.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Root of the layered configuration tree (config.toml or config.yml at its top).
    #[arg(long, default_value = "config")]
    config_dir: PathBuf,
    /// Environment layer: DIR/{env}/config.toml (or .yml).
    #[arg(long, env = "ENV")]
    env: Option<String>,
    /// Scope layer: DIR/{env}/{scope}.config.toml (or .yml).
    #[arg(long, env = "SCOPE")]
    scope: Option<String>,
}

/// How the process ends: configuration mistakes exit 2, everything else 1.
pub(crate) enum Failure {
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
    let format = cli.log_format;
    let filter = match logging::filter(std::env::var("FERRY_LOG").ok().as_deref()) {
        Ok(filter) => filter,
        Err(e) => {
            logging::fatal(format, &[logging::Fatal::new(e)]);
            return ExitCode::from(2);
        }
    };
    let log = logging::init(format, filter);
    let result = match cli.command {
        Command::Validate(args) => validate(&args),
        Command::Run(args) => run(&args),
        Command::Check(args) => check(&args),
        Command::Redrive(args) => redrive(args),
    };
    // The log lines still queued go out before the fatal ones.
    drop(log);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(errors)) => {
            let lines: Vec<_> = errors
                .iter()
                .map(|e| logging::Fatal {
                    at: Some(e.at.clone()),
                    what: e.what.clone(),
                    line: e.to_string(),
                })
                .collect();
            logging::fatal(format, &lines);
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            logging::fatal(format, &[logging::Fatal::new(format!("{e:#}"))]);
            ExitCode::from(1)
        }
    }
}

fn load(args: &ConfigArgs) -> Result<(config::Config, Plan), Failure> {
    load_with(&args.options())
}

impl ConfigArgs {
    /// Where the configuration is read from: at start, and again on every reload.
    fn options(&self) -> LoadOptions {
        LoadOptions {
            file: self.config.clone(),
            dir: self.config_dir.clone(),
            env: self.env.clone(),
            scope: self.scope.clone(),
        }
    }
}

/// Reads and validates the configuration (the loader logs which files it read, in order,
/// the `ENV` and `SCOPE` in force, and any layer asked for that has no file).
pub(crate) fn load_with(options: &LoadOptions) -> Result<(config::Config, Plan), Failure> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let loaded = config::load(options, &vars).map_err(Failure::Config)?;
    let plan = loaded.plan;
    if plan.admin_token.is_none() && !plan.admin.ip().is_loopback() {
        warn!(admin = %plan.admin,
            "the admin server listens beyond this machine without [admin] token: anyone who reaches it can pause routes");
    }
    Ok((loaded.config, plan))
}

fn validate(args: &ConfigArgs) -> Result<(), Failure> {
    let (config, _plan) = load(args)?;
    let text =
        toml::to_string_pretty(&config::redacted(&config)).context("printing the configuration")?;
    print!("{text}");
    Ok(())
}

fn check(args: &ConfigArgs) -> Result<(), Failure> {
    let (_config, plan) = load(args)?;
    let lines = runtime(1)?.block_on(check::run(plan));
    for line in &lines {
        println!("{line}");
    }
    let failed = lines.iter().filter(|l| l.outcome.is_err()).count();
    if failed == 0 {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{failed} of {} checks failed", lines.len()).into())
    }
}

fn run(args: &ConfigArgs) -> Result<(), Failure> {
    let (config, plan) = load(args)?;
    runtime(plan.worker_threads)?.block_on(serve::run_routes(config, plan, args.options()))
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

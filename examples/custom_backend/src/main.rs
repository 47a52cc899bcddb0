//! `redis-streams-bridge`: Redis Streams → HTTP, a complete bridge made of a source
//! written outside ferry (`source.rs`), ferry's engine and ferry's HTTP sink.
//!
//! ```text
//! redis-streams-bridge --redis-url redis://127.0.0.1:6379 --stream orders \
//!     --group ferry --consumer bridge-1 --sink-url http://127.0.0.1:8080/orders
//! ```

mod source;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferry_core::{
    run_route, Backoff, CancellationToken, Concurrency, DeliveryPolicy, MessageOrder, Metrics,
    ResponsePolicy, Route, RouteLabels, SourceContext,
};
use ferry_http::{HttpSink, HttpSinkConfig, Mode};

use source::{RedisStreamSource, StreamConfig};

/// Redis Streams to HTTP with ferry's delivery engine.
#[derive(Debug, Parser)]
struct Args {
    /// Redis server.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Stream to read.
    #[arg(long)]
    stream: String,
    /// Consumer group.
    #[arg(long, default_value = "ferry")]
    group: String,
    /// This bridge's consumer name (stable across restarts).
    #[arg(long, default_value = "bridge-1")]
    consumer: String,
    /// Stream for dead-lettered entries (default: `<stream>.dead-letter`).
    #[arg(long)]
    dead_letter_stream: Option<String>,
    /// Entry field with the ordering key.
    #[arg(long, default_value = "key")]
    key_field: String,
    /// The endpoint.
    #[arg(long)]
    sink_url: url::Url,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Attempts before dead-lettering.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// First retry delay ceiling, in milliseconds.
    #[arg(long, default_value_t = 100)]
    min_backoff_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    max_backoff_ms: u64,
    /// Time in-flight deliveries get at shutdown, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    shutdown_grace_ms: u64,
    /// Deliver entries that share a key one after another.
    #[arg(long)]
    ordered: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let route: Arc<str> = Arc::from(args.stream.as_str());

    let source = RedisStreamSource::connect(StreamConfig {
        url: args.redis_url.clone(),
        dead_letter_stream: args
            .dead_letter_stream
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", args.stream)),
        stream: args.stream.clone(),
        group: args.group.clone(),
        consumer: args.consumer.clone(),
        key_field: args.key_field.clone(),
    })
    .await
    .context("starting the Redis Streams source")?;
    let sink = HttpSink::new(HttpSinkConfig {
        route: route.clone(),
        url: args.sink_url.clone(),
        mode: Mode::Envelope,
        timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        pool_size: args.concurrency,
        headers: Vec::new(),
        health_url: None,
        signing: None,
        tls: Default::default(),
        http2: false,
    })
    .context("building the HTTP sink")?;
    let metrics = Metrics::default().route(&RouteLabels {
        route: route.to_string(),
        source: "redis-streams".into(),
        sink: "http".into(),
    });
    let policy = DeliveryPolicy {
        concurrency: Concurrency::Fixed(args.concurrency),
        rate_limit: None,
        fleet_rate: None,
        circuit_breaker: None,
        max_attempts: args.max_attempts,
        backoff: Backoff::new(
            Duration::from_millis(args.min_backoff_ms),
            Duration::from_millis(args.max_backoff_ms),
        ),
        shutdown_grace: Duration::from_millis(args.shutdown_grace_ms),
        responses: ResponsePolicy::default(),
        order: if args.ordered {
            MessageOrder::ByKey
        } else {
            MessageOrder::Unordered
        },
        batch: None,
        max_message_bytes: None,
    };

    let shutdown = CancellationToken::new();
    let ctx = SourceContext::new(route.clone(), shutdown.clone(), metrics.backlog.clone());
    tokio::spawn(stop_on_signal(shutdown));
    tracing::info!(stream = %args.stream, group = %args.group, consumer = %args.consumer, "receiving");
    run_route(
        Route {
            name: route,
            source,
            sink,
            policy,
            metrics,
            audit: None,
            tracer: None,
        },
        ctx,
    )
    .await
    .context("route failed")?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
}

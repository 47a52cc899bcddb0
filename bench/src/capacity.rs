//! Adaptive concurrency against the best fixed setting (`--capacity N`, RabbitMQ): an
//! endpoint that takes `N` requests at once, each answered after the endpoint latency,
//! and refuses (503) whatever comes on top. Each fixed `concurrency` of the list and then
//! `"adaptive"` drain the same full queue; the table gives each one's rate, its share of
//! the best fixed rate, and the share of requests refused.
//!
//! The circuit breaker is off here (a fixed setting far above the capacity would trip
//! it) and attempts are unlimited, so every row delivers every message.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::http::StatusCode;
use lapin::options::{ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

use crate::amqp::filled_queue;
use crate::concurrency::Setting;
use crate::{cpu_seconds, spawn_ferry_with, stop_ferry, Args};

/// What the capacity-limited endpoint counted.
#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
}

async fn capacity_sink(
    counts: Arc<Counts>,
    capacity: usize,
    latency: Duration,
) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let delay = crate::delay::Delay::start();
    let app = axum::Router::new().fallback(move || {
        let counts = counts.clone();
        let delay = delay.clone();
        async move {
            let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
            let status = if open > capacity {
                counts.refused.fetch_add(1, Ordering::SeqCst);
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                delay.wait(latency).await;
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            };
            counts.open.fetch_sub(1, Ordering::SeqCst);
            status
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

struct Row {
    setting: String,
    rate: f64,
    refused_share: f64,
    cpu_per_100k: f64,
}

/// Runs the fixed settings, then adaptive, and prints the table.
pub async fn run(args: &Args, capacity: usize) -> Result<()> {
    let latency = Duration::from_millis(args.latency_ms.first().copied().unwrap_or(10));
    let connection = Connection::connect(&args.amqp_uri, ConnectionProperties::default())
        .await
        .context("RabbitMQ not reachable (is it running on 127.0.0.1:5672?)")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    println!(
        "Endpoint capacity {capacity} at once, {} ms each ({:.0} msg/s at most), {} messages per row, RabbitMQ",
        latency.as_millis(),
        capacity as f64 / latency.as_secs_f64(),
        args.messages()
    );
    // The fixed settings asked for, then adaptive with the harness's usual ceiling.
    let mut settings: Vec<Setting> = args
        .settings()
        .into_iter()
        .filter(|s| matches!(s, Setting::Fixed(_)))
        .collect();
    settings.push(Setting::Adaptive { max: 256 });
    let mut rows = Vec::new();
    for setting in settings {
        let queue = filled_queue(
            &channel,
            args.messages(),
            args.first_size(),
            "bench-capacity",
        )
        .await?;
        let counts = Arc::new(Counts::default());
        let sink = capacity_sink(counts.clone(), capacity, latency).await?;
        let source = format!(
            "type = \"amqp\"\nuri = \"{}\"\nqueue = \"{queue}\"\nprefetch = {}\ndead_letters = \"drop\"\n",
            args.amqp_uri, args.prefetch
        );
        let delivery = format!(
            "{}max_attempts = 1000\nmin_backoff = \"10ms\"\n\
             max_backoff = \"200ms\"\ncircuit_breaker = {{ failures = 0 }}\n",
            setting.delivery_toml()
        );
        let (mut child, pid) = spawn_ferry_with(args, &source, sink, setting.slots(), &delivery)?;
        while counts.accepted.load(Ordering::SeqCst) == 0 {
            if let Some(status) = child.try_wait()? {
                bail!("ferry exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let started = Instant::now();
        let cpu_before = cpu_seconds(pid)?;
        let refused_before = counts.refused.load(Ordering::SeqCst);
        while counts.accepted.load(Ordering::SeqCst) < args.messages() {
            if let Some(status) = child.try_wait()? {
                bail!("ferry exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid)? - cpu_before;
        stop_ferry(child, pid)?;
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let accepted = args.messages() as f64;
        let refused = (counts.refused.load(Ordering::SeqCst) - refused_before) as f64;
        let row = Row {
            setting: setting.to_string(),
            rate: accepted / secs,
            refused_share: refused / (accepted + refused),
            cpu_per_100k: cpu / accepted * 100_000.0,
        };
        println!(
            "concurrency {}: {:.0} msg/s, {:.2}% refused",
            row.setting,
            row.rate,
            row.refused_share * 100.0
        );
        rows.push(row);
    }
    let best = rows
        .iter()
        .filter(|r| r.setting != "adaptive")
        .map(|r| r.rate)
        .fold(0.0, f64::max);
    println!();
    println!("| concurrency | msg/s | of the best fixed | requests refused (503) | ferry CPU s per 100k |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2}% | {:.2} |",
            r.setting,
            r.rate,
            r.rate / best,
            r.refused_share * 100.0,
            r.cpu_per_100k
        );
    }
    Ok(())
}

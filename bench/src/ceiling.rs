//! The sink ceiling: how fast the counting sink accepts requests when nothing but a load
//! generator in this process feeds it, with ferry's payload size, number of requests in
//! flight and keep-alive connections, and the same endpoint latency.
//!
//! ferry cannot deliver faster than the endpoint accepts, and on a shared machine the
//! sink's own cost (and, at a latency, `concurrency ÷ latency`) can be the lower limit
//! rather than the broker; measuring it in the same run keeps the comparison honest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;

use crate::counting_sink;

/// Time the generator runs before the count starts, so connection set-up is left out as
/// ferry's start-up is.
const WARM_UP: Duration = Duration::from_millis(300);

/// Requests per second the counting sink accepted over `window`, from `connections`
/// loops that each POST `size`-byte bodies back to back on their own keep-alive
/// connection.
pub async fn sink_ceiling(
    size: usize,
    connections: usize,
    latency: Duration,
    window: Duration,
) -> Result<f64> {
    let accepted = Arc::new(AtomicU64::new(0));
    let addr = counting_sink(accepted.clone(), latency).await?;
    // The same client library and pool settings as ferry's HTTP sink.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .build()
        .context("building the load generator's client")?;
    let url = format!("http://{addr}/bench");
    let body = Bytes::from(vec![b'x'; size]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, url, body, stop) = (client.clone(), url.clone(), body.clone(), stop.clone());
        loops.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = client.post(&url).body(body.clone()).send().await?;
                if !response.status().is_success() {
                    bail!("sink answered {}", response.status());
                }
                // Read the answer to the end so the connection goes back to the pool.
                response.bytes().await?;
            }
            Ok(())
        });
    }
    tokio::time::sleep(WARM_UP).await;
    let (before, started) = (accepted.load(Ordering::SeqCst), Instant::now());
    tokio::time::sleep(window).await;
    let (after, secs) = (
        accepted.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    while let Some(result) = loops.join_next().await {
        result??;
    }
    Ok((after - before) as f64 / secs)
}

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
use ferry_core::{Message, Sink, SinkResponse};
use ferry_http::{HttpSink, HttpSinkConfig, Mode, TlsConfig};

use crate::counting_sink;

/// Time the generator runs before the count starts, so connection set-up is left out as
/// ferry's start-up is.
const WARM_UP: Duration = Duration::from_millis(300);

/// Requests per second the counting sink accepted over `window`, from `connections`
/// loops that each POST a `size`-byte body back to back through ferry's HTTP sink.
pub async fn sink_ceiling(
    size: usize,
    connections: usize,
    latency: Duration,
    window: Duration,
) -> Result<f64> {
    let accepted = Arc::new(AtomicU64::new(0));
    let addr = counting_sink(accepted.clone(), latency).await?;
    // ferry's own HTTP sink, with the same pool size: the ceiling is then what ferry's
    // client could push into this endpoint with no broker and no engine in the way.
    let sink = HttpSink::new(HttpSinkConfig {
        route: Arc::from("ceiling"),
        url: format!("http://{addr}/bench").parse()?,
        mode: Mode::Raw,
        timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        pool_size: connections,
        headers: Vec::new(),
        health_url: None,
        signing: None,
        tls: TlsConfig::default(),
        http2: false,
    })
    .context("building the load generator's sink")?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = tokio::task::JoinSet::new();
    for i in 0..connections {
        let (sink, stop) = (sink.clone(), stop.clone());
        let message = Message::new(format!("ceiling-{i}"), vec![b'x'; size], Arc::from("bench"));
        loops.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match sink.deliver(&message).await {
                    SinkResponse::Status {
                        status: 200..=299, ..
                    } => {}
                    other => bail!("sink answered {other:?}"),
                }
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

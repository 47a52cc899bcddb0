//! Added latency: how long a message takes from the broker to the endpoint through ferry,
//! against how long it takes to reach a plain consumer of the same broker.
//!
//! A paced phase publishes at a steady rate well below capacity, each payload stamped with
//! its publish time (unix nanoseconds), so that queueing behind a backlog does not enter
//! the figure. The native consumer records publish → consume; with ferry, a timing sink
//! records publish → arrival (the request fully received, before the endpoint latency).
//! The difference of the two is what ferry adds. The publisher, the consumer and the sink
//! all live in this process, so one clock serves both ends.
//!
//! The throughput phases keep their counting sink, which never looks at a body.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use axum::body::Bytes;

/// The stamp's marker; the digits follow it.
const MARK: &[u8] = b"t=";
/// Digits of a nanosecond unix time, zero-padded so the stamp has a fixed length.
const DIGITS: usize = 20;
/// How long warm-up messages go out for at most before a phase gives up.
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);
/// How long a phase waits for its last paced messages after publishing them.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Unix time in nanoseconds.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A payload of `size` bytes (at least the stamp's 23) carrying the publish time now.
/// It is ASCII, so ferry's envelope carries it as a string and the sink finds it there.
pub fn stamped(size: usize) -> Vec<u8> {
    let mut payload = format!("t={:0DIGITS$};", unix_nanos()).into_bytes();
    payload.resize(size.max(payload.len()), b'x');
    payload
}

/// The publish time in a body that holds a stamp anywhere (raw payload or envelope).
pub fn stamp_of(body: &[u8]) -> Option<u64> {
    let at = body.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let digits = std::str::from_utf8(body.get(at..at + DIGITS)?).ok()?;
    digits.parse().ok()
}

/// Publish time and latency (ns) of every stamped message seen.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<(u64, u64)>>>);

impl Recorder {
    /// Records `body`'s latency up to now; bodies without a stamp are ignored.
    pub fn record(&self, body: &[u8]) {
        let now = unix_nanos();
        if let Some(sent) = stamp_of(body) {
            self.samples().push((sent, now.saturating_sub(sent)));
        }
    }

    fn samples(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_since(&self, since: u64) -> usize {
        self.samples()
            .iter()
            .filter(|(sent, _)| *sent >= since)
            .count()
    }

    /// Latencies (ns) of the messages published at or after `since`, sorted.
    fn since(&self, since: u64) -> Vec<u64> {
        let mut latencies: Vec<u64> = self
            .samples()
            .iter()
            .filter(|(sent, _)| *sent >= since)
            .map(|(_, latency)| *latency)
            .collect();
        latencies.sort_unstable();
        latencies
    }
}

/// An HTTP endpoint like the counting sink that also records each body's latency on
/// arrival, then answers 200 after `latency`.
pub async fn timing_sink(recorder: Recorder, latency: Duration) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let recorder = recorder.clone();
        async move {
            recorder.record(&body);
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            "ok"
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// A paced phase: `rate` messages per second of `size` bytes for `secs`.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Messages per second.
    pub rate: f64,
    /// Seconds of publishing.
    pub secs: f64,
    /// Payload bytes.
    pub size: usize,
}

/// Median and 99th percentile, in milliseconds, and how many samples they rest on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    /// 50th percentile, ms.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Samples.
    pub samples: usize,
}

impl Percentiles {
    fn of(sorted: &[u64]) -> Self {
        let at = |q: f64| {
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[rank - 1] as f64 / 1e6
        };
        if sorted.is_empty() {
            return Self::default();
        }
        Self {
            p50: at(0.50),
            p99: at(0.99),
            samples: sorted.len(),
        }
    }
}

/// Runs one paced phase through `publish` while a consumer (or ferry and the timing sink)
/// feeds `recorder`: first warm-up messages until one comes through (the consumer has
/// joined), then the paced ones; returns the paced messages' latencies.
pub async fn paced<P, F>(pace: Pace, recorder: &Recorder, mut publish: P) -> Result<Percentiles>
where
    P: FnMut(Vec<u8>) -> F,
    F: Future<Output = Result<()>>,
{
    let warm_up_since = Instant::now();
    while recorder.count_since(0) == 0 {
        if warm_up_since.elapsed() > WARM_UP_LIMIT {
            bail!("no message reached the consumer within {WARM_UP_LIMIT:?}");
        }
        publish(stamped(pace.size)).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let warm-up messages still in flight (a consumer that joined late) pass.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let since = unix_nanos();
    let total = (pace.rate * pace.secs).round().max(1.0) as usize;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / pace.rate));
    for _ in 0..total {
        ticks.tick().await;
        publish(stamped(pace.size)).await?;
    }
    let drain_since = Instant::now();
    while recorder.count_since(since) < total && drain_since.elapsed() < DRAIN_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let latencies = recorder.since(since);
    if latencies.len() < total {
        println!(
            "  warning: {} of {total} paced messages arrived within {DRAIN_LIMIT:?}",
            latencies.len()
        );
    }
    Ok(Percentiles::of(&latencies))
}

/// The paced rate for a row: the asked rate, but at most a quarter of what the endpoint
/// can take (`slots ÷ latency`), so that requests never wait for a free slot and the
/// figure stays a latency rather than a queue.
pub fn rate_for(asked: f64, slots: usize, latency_ms: u64) -> f64 {
    if latency_ms == 0 {
        return asked;
    }
    asked.min(slots as f64 * 1000.0 / latency_ms as f64 / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_found_in_a_payload_and_in_an_envelope() {
        let payload = stamped(256);
        assert_eq!(payload.len(), 256);
        let sent = stamp_of(&payload).expect("a stamp");
        let envelope = format!(
            "{{\"id\":\"1\",\"msg\":\"{}\",\"timestamp\":\"x\"}}",
            std::str::from_utf8(&payload).expect("ASCII")
        );
        assert_eq!(stamp_of(envelope.as_bytes()), Some(sent));
        assert_eq!(stamp_of(b"xxxx"), None);
        assert!(stamped(4).len() > 4);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        let p = Percentiles::of(&ns);
        assert_eq!((p.p50, p.p99, p.samples), (50.0, 99.0, 100));
        assert_eq!(Percentiles::of(&[]).samples, 0);
    }

    #[test]
    fn the_pace_stays_under_a_quarter_of_the_endpoint() {
        assert_eq!(rate_for(1000.0, 16, 0), 1000.0);
        assert_eq!(rate_for(1000.0, 16, 20), 200.0);
        assert_eq!(rate_for(1000.0, 256, 20), 1000.0);
    }
}

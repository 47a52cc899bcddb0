//! The status page at `/`: one card per route with its state, a chart of the last five
//! minutes, its gauges and latencies, its last failure, and pause and resume buttons.
//!
//! Operators would rather look than read JSON, often from a phone or from a network that
//! reaches nothing but ferry. So the page is a few small files compiled into the binary
//! (no build step, nothing from elsewhere: its Content-Security-Policy only lets it talk to
//! ferry itself), and it polls `/status`, which is made of the same counters, gauges and
//! histograms as `/metrics`. A sampler keeps one snapshot per route per second for five
//! minutes, so a page opened now already shows the recent past; the latency quantiles are
//! those of the same five minutes, interpolated in the buckets as Prometheus'
//! `histogram_quantile` does.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{header, HeaderName};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use ferry_core::histogram_buckets;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::admin::{describe, AdminState, RouteView};

/// How often a route's numbers are sampled (the chart's resolution).
const STEP: Duration = Duration::from_secs(1);
/// How far back the chart and the quantiles look.
const WINDOW: Duration = Duration::from_secs(300);
/// Samples kept per route: the window's steps and the sample the first step starts from.
const KEEP: usize = (WINDOW.as_secs() / STEP.as_secs()) as usize + 1;

const PAGE: &str = include_str!("status_page/index.html");
const SCRIPT: &str = include_str!("status_page/status.js");
const STYLE: &str = include_str!("status_page/status.css");

/// Only ferry itself: no script, style, image or connection from anywhere else, no
/// framing, no form posts. The page works the same behind a policy that allows nothing.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One route's numbers at one moment.
#[derive(Clone)]
struct Sample {
    at: SystemTime,
    delivered: u64,
    retried: u64,
    dead_lettered: u64,
    request: Vec<(f64, u64)>,
    end_to_end: Vec<(f64, u64)>,
}

impl Sample {
    fn of(route: &RouteView) -> Self {
        let m = &route.metrics;
        Self {
            at: SystemTime::now(),
            delivered: m.delivered.get(),
            retried: m.retried.get(),
            dead_lettered: m.dead_lettered.get(),
            request: histogram_buckets(&m.request_duration),
            end_to_end: histogram_buckets(&m.end_to_end),
        }
    }
}

/// The last five minutes of samples of every route, by name.
#[derive(Default)]
struct History(Mutex<HashMap<Arc<str>, VecDeque<Sample>>>);

impl History {
    /// Takes one sample of every running route and forgets routes that are gone.
    fn sample(&self, routes: &[RouteView]) {
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        all.retain(|name, _| routes.iter().any(|r| r.name == *name));
        for route in routes {
            let samples = all.entry(route.name.clone()).or_default();
            samples.push_back(Sample::of(route));
            while samples.len() > KEEP {
                samples.pop_front();
            }
        }
    }

    fn of(&self, name: &str) -> Vec<Sample> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The page, its script and style, and `/status`; starts the sampler, which stops with
/// `shutdown`.
pub fn routes(state: &Arc<AdminState>, shutdown: CancellationToken) -> Router<Arc<AdminState>> {
    let history = Arc::new(History::default());
    tokio::spawn(sample(state.clone(), history.clone(), shutdown));
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            "/static/status.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/static/status.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .route(
            "/status",
            get(move |State(state): State<Arc<AdminState>>| {
                let history = history.clone();
                async move { Json(status(&state, &history)) }
            }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A page left open across an upgrade loads the new script on reload.
            (header::CACHE_CONTROL, "no-cache"),
            (HeaderName::from_static("x-frame-options"), "DENY"),
        ],
        body,
    )
}

async fn sample(state: Arc<AdminState>, history: Arc<History>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(STEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => history.sample(&state.routes()),
        }
    }
}

/// Everything the page shows: `/routes`' description of each route, plus its chart, its
/// quantiles and its last failure.
fn status(state: &AdminState, history: &History) -> Value {
    let routes: Vec<Value> = state
        .routes()
        .iter()
        .map(|route| {
            let samples = history.of(&route.name);
            let now = Sample::of(route);
            let mut described = describe(route);
            if let Some(fields) = described.as_object_mut() {
                for (key, value) in details(route, &samples, &now) {
                    fields.insert(key.to_owned(), value);
                }
            }
            described
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "token_required": state.token_required(),
        "step_seconds": STEP.as_secs(),
        "window_seconds": WINDOW.as_secs(),
        "routes": routes,
    })
}

fn details(route: &RouteView, samples: &[Sample], now: &Sample) -> Vec<(&'static str, Value)> {
    // The window starts at the oldest sample still in it (the route's start, early on).
    let since = now.at.checked_sub(WINDOW).unwrap_or(SystemTime::UNIX_EPOCH);
    let base = samples.iter().find(|s| s.at >= since);
    let rates = |count: fn(&Sample) -> u64| -> Vec<Value> {
        samples
            .windows(2)
            .map(|pair| {
                let seconds = pair[1]
                    .at
                    .duration_since(pair[0].at)
                    .unwrap_or_default()
                    .as_secs_f64();
                let n = count(&pair[1]).saturating_sub(count(&pair[0])) as f64;
                let rate = if seconds > 0.0 { n / seconds } else { 0.0 };
                json!((rate * 100.0).round() / 100.0)
            })
            .collect()
    };
    let quantiles = |buckets: fn(&Sample) -> &Vec<(f64, u64)>| {
        let recent = match base {
            Some(base) => since_then(buckets(now), buckets(base)),
            None => buckets(now).clone(),
        };
        json!({ "p50": quantile(0.5, &recent), "p99": quantile(0.99, &recent) })
    };
    let mut out = vec![
        (
            "throughput",
            json!({
                "delivered": rates(|s| s.delivered),
                "retried": rates(|s| s.retried),
                "dead_lettered": rates(|s| s.dead_lettered),
            }),
        ),
        ("request_seconds", quantiles(|s| &s.request)),
        ("end_to_end_seconds", quantiles(|s| &s.end_to_end)),
    ];
    if let Some((message, at)) = route.metrics.last_failure.get() {
        out.push((
            "last_error",
            json!({ "message": message, "at": humantime::format_rfc3339_millis(at).to_string() }),
        ));
    }
    out
}

/// The observations made between `base` and `now`, bucket by bucket.
fn since_then(now: &[(f64, u64)], base: &[(f64, u64)]) -> Vec<(f64, u64)> {
    if base.len() != now.len() {
        return now.to_vec();
    }
    now.iter()
        .zip(base)
        .map(|(&(bound, n), &(_, b))| (bound, n.saturating_sub(b)))
        .collect()
}

/// The `q`-quantile of cumulative buckets, interpolated linearly within its bucket as
/// Prometheus' `histogram_quantile` does (the first bucket starts at 0; a quantile in the
/// infinite bucket is the highest finite bound). `None` without observations.
fn quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = count.saturating_sub(below) as f64;
            let share = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * share);
        }
        (lower, below) = (bound, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_their_bucket_as_prometheus_does() {
        let buckets = [(0.1, 50), (0.2, 90), (0.4, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(0.5, &buckets), Some(0.1));
        let p75 = quantile(0.75, &buckets).expect("p75");
        assert!((p75 - 0.1625).abs() < 1e-9, "{p75}");
        let p99 = quantile(0.99, &buckets).expect("p99");
        assert!((p99 - 0.38).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &[(0.1, 0), (f64::INFINITY, 0)]), None);
        assert_eq!(quantile(0.99, &[(0.1, 1), (f64::INFINITY, 10)]), Some(0.1));
        assert_eq!(quantile(0.5, &[]), None);
    }

    #[test]
    fn the_window_counts_only_what_happened_since_its_start() {
        let base = [(0.1, 5), (f64::INFINITY, 5)];
        let now = [(0.1, 5), (f64::INFINITY, 9)];
        assert_eq!(since_then(&now, &base), vec![(0.1, 0), (f64::INFINITY, 4)]);
    }
}

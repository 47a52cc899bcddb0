//! The metrics of DESIGN section 5, one set of children per route.
//!
//! Families live in one [`Metrics`] value that the binary registers once; each route
//! resolves its own children up front ([`Metrics::route`]) so the hot path only touches
//! atomics, never the family maps.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

/// The labels every ferry metric carries.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route name from the configuration.
    pub route: String,
    /// Source kind (`sqs`, ...).
    pub source: String,
    /// Sink kind (`http`, ...).
    pub sink: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    source: String,
    sink: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    route: String,
    source: String,
    sink: String,
    class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    route: String,
    source: String,
    sink: String,
    operation: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric family ferry exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    received: Family<RouteLabels, Counter>,
    deliveries: Family<OutcomeLabels, Counter>,
    responses: Family<ClassLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    in_flight: Family<RouteLabels, Gauge>,
    concurrency_limit: Family<RouteLabels, Gauge>,
    circuit_open: Family<RouteLabels, Gauge>,
    paused: Family<RouteLabels, Gauge>,
    backlog: Family<RouteLabels, Gauge>,
    end_to_end: Family<RouteLabels, Histogram>,
    broker_errors: Family<OperationLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            received: Family::default(),
            deliveries: Family::default(),
            responses: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            concurrency_limit: Family::default(),
            circuit_open: Family::default(),
            paused: Family::default(),
            backlog: Family::default(),
            end_to_end: Family::new_with_constructor(latency_histogram),
            broker_errors: Family::default(),
        }
    }
}

impl Metrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ferry_messages_received",
            "Messages handed out by the broker",
            m.received.clone(),
        );
        registry.register(
            "ferry_deliveries",
            "Delivery outcomes: delivered, retried, dead_lettered, dropped (dead letters of a route told to drop them), taken_back (the broker took the message back before it was sent)",
            m.deliveries.clone(),
        );
        registry.register(
            "ferry_http_responses",
            "Endpoint answers by class: 2xx, 4xx, 5xx, timeout, error",
            m.responses.clone(),
        );
        registry.register(
            "ferry_http_request_duration_seconds",
            "Time from request start to the endpoint's answer",
            m.request_duration.clone(),
        );
        registry.register(
            "ferry_in_flight",
            "Requests in flight to the endpoint",
            m.in_flight.clone(),
        );
        registry.register(
            "ferry_concurrency_limit",
            "Current cap on requests in flight",
            m.concurrency_limit.clone(),
        );
        registry.register(
            "ferry_circuit_open",
            "1 while the endpoint is considered down and the route does not receive",
            m.circuit_open.clone(),
        );
        registry.register(
            "ferry_route_paused",
            "1 while the route is paused by an operator (admin API or shared state)",
            m.paused.clone(),
        );
        registry.register(
            "ferry_source_backlog",
            "Messages waiting in the broker (visible backlog)",
            m.backlog.clone(),
        );
        registry.register(
            "ferry_end_to_end_seconds",
            "From the broker's sent timestamp to the ack",
            m.end_to_end.clone(),
        );
        registry.register(
            "ferry_broker_errors",
            "Broker calls that failed after their retries, by operation (delete, visibility, renew, ack, commit, dead_letter, ...)",
            m.broker_errors.clone(),
        );
        m
    }

    /// Resolves the children of one route.
    pub fn route(&self, labels: &RouteLabels) -> RouteMetrics {
        let outcome = |outcome| {
            self.deliveries
                .get_or_create(&OutcomeLabels {
                    route: labels.route.clone(),
                    source: labels.source.clone(),
                    sink: labels.sink.clone(),
                    outcome,
                })
                .clone()
        };
        let class = |class| {
            self.responses
                .get_or_create(&ClassLabels {
                    route: labels.route.clone(),
                    source: labels.source.clone(),
                    sink: labels.sink.clone(),
                    class,
                })
                .clone()
        };
        RouteMetrics {
            received: self.received.get_or_create(labels).clone(),
            delivered: outcome("delivered"),
            retried: outcome("retried"),
            dead_lettered: outcome("dead_lettered"),
            dropped: outcome("dropped"),
            stale: outcome("taken_back"),
            responses: HTTP_CLASSES.map(class),
            request_duration: self.request_duration.get_or_create(labels).clone(),
            in_flight: self.in_flight.get_or_create(labels).clone(),
            concurrency_limit: self.concurrency_limit.get_or_create(labels).clone(),
            circuit_open: self.circuit_open.get_or_create(labels).clone(),
            paused: self.paused.get_or_create(labels).clone(),
            backlog: self.backlog.get_or_create(labels).clone(),
            end_to_end: self.end_to_end.get_or_create(labels).clone(),
            broker_errors: BrokerErrors {
                family: self.broker_errors.clone(),
                labels: labels.clone(),
            },
            last_failure: LastFailure::default(),
        }
    }
}

/// The latest failure of a route (an endpoint answer that was not 2xx, a timeout, a
/// connection error, a dead letter) and when it happened. Counters say how often; an
/// operator looking at a route also wants to know what went wrong last and how long ago,
/// without searching the logs. Holds the same one-line description the log gets, which
/// never carries a secret.
#[derive(Debug, Clone, Default)]
pub struct LastFailure(Arc<Mutex<Option<(String, SystemTime)>>>);

impl LastFailure {
    /// Records `what` as the latest failure, now.
    pub fn set(&self, what: impl Into<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((what.into(), SystemTime::now()));
    }

    /// The latest failure and when it was recorded, if there was one.
    pub fn get(&self) -> Option<(String, SystemTime)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The cumulative bucket counts of `histogram` (upper bound, count of observations at or
/// below it; the last bound is infinite), exactly as `/metrics` shows them. The histogram
/// type keeps its buckets to itself, so they are read back through the text encoding, the
/// one view of them that is public; cheap enough for a status page polled every second or so.
pub fn histogram_buckets(histogram: &Histogram) -> Vec<(f64, u64)> {
    let mut registry = Registry::default();
    registry.register("h", "", histogram.clone());
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("h_bucket{le=\"")?;
            let (bound, count) = rest.split_once("\"}")?;
            let bound = match bound {
                "+Inf" => f64::INFINITY,
                b => b.parse().ok()?,
            };
            let count = count.split_whitespace().next()?.parse().ok()?;
            Some((bound, count))
        })
        .collect()
}

/// `ferry_broker_errors_total{operation}` of one route: broker calls that failed for good
/// (a delete, a visibility change, an ack, a commit, a dead-letter send), so an operator can
/// alert on settlements that did not reach the broker. Errors are rare, so the label set is
/// resolved per error rather than up front.
#[derive(Debug, Clone, Default)]
pub struct BrokerErrors {
    family: Family<OperationLabels, Counter>,
    labels: RouteLabels,
}

impl BrokerErrors {
    /// Counts `n` failed broker calls (or entries of a batch call) of `operation`.
    pub fn count(&self, operation: &'static str, n: u64) {
        self.counter(operation).inc_by(n);
    }

    /// How many failures of `operation` were counted (for `/routes` and tests).
    pub fn get(&self, operation: &'static str) -> u64 {
        self.counter(operation).get()
    }

    fn counter(&self, operation: &'static str) -> Counter {
        self.family
            .get_or_create(&OperationLabels {
                route: self.labels.route.clone(),
                source: self.labels.source.clone(),
                sink: self.labels.sink.clone(),
                operation,
            })
            .clone()
    }
}

const HTTP_CLASSES: [&str; 5] = ["2xx", "4xx", "5xx", "timeout", "error"];

/// One route's metric children; cloning shares the same counters.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// `ferry_messages_received_total`
    pub received: Counter,
    /// `ferry_deliveries_total{outcome="delivered"}`
    pub delivered: Counter,
    /// `ferry_deliveries_total{outcome="retried"}`
    pub retried: Counter,
    /// `ferry_deliveries_total{outcome="dead_lettered"}`
    pub dead_lettered: Counter,
    /// `ferry_deliveries_total{outcome="dropped"}`: dead letters of a route configured to
    /// drop them, counted by the source as it drops them.
    pub dropped: Counter,
    /// `ferry_deliveries_total{outcome="taken_back"}`: not sent because the broker took
    /// the message back first (connection lost, partition revoked).
    pub stale: Counter,
    responses: [Counter; 5],
    /// `ferry_http_request_duration_seconds`
    pub request_duration: Histogram,
    /// `ferry_in_flight`
    pub in_flight: Gauge,
    /// `ferry_concurrency_limit`
    pub concurrency_limit: Gauge,
    /// `ferry_circuit_open`
    pub circuit_open: Gauge,
    /// `ferry_route_paused`
    pub paused: Gauge,
    /// `ferry_source_backlog`
    pub backlog: Gauge,
    /// `ferry_end_to_end_seconds`
    pub end_to_end: Histogram,
    /// `ferry_broker_errors_total{operation}`
    pub broker_errors: BrokerErrors,
    /// The latest failed request or dead letter, for the admin server's status page.
    pub last_failure: LastFailure,
}

impl RouteMetrics {
    /// Counts one endpoint answer under its class label.
    pub fn count_response(&self, class: &str) {
        if let Some(i) = HTTP_CLASSES.iter().position(|c| *c == class) {
            self.responses[i].inc();
        }
    }

    /// The count of one response class (for `/routes`).
    pub fn responses(&self, class: &str) -> u64 {
        HTTP_CLASSES
            .iter()
            .position(|c| *c == class)
            .map_or(0, |i| self.responses[i].get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_those_of_the_text_encoding() {
        let h = latency_histogram();
        for v in [0.0005, 0.003, 0.003, 100.0] {
            h.observe(v);
        }
        let buckets = histogram_buckets(&h);
        assert_eq!(buckets.len(), 18, "{buckets:?}");
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[1], (0.002, 1));
        assert_eq!(buckets[2], (0.004, 3));
        assert_eq!(buckets[16].1, 3);
        assert_eq!(buckets[17], (f64::INFINITY, 4));
    }

    #[test]
    fn the_last_failure_is_the_latest_one() {
        let last = LastFailure::default();
        assert!(last.get().is_none());
        let shared = last.clone();
        shared.set("status 500");
        let before = SystemTime::now();
        shared.set("timeout");
        let (what, at) = last.get().expect("a failure");
        assert_eq!(what, "timeout");
        assert!(at >= before);
    }

    #[test]
    fn every_contract_metric_is_exported() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let route = metrics.route(&RouteLabels {
            route: "orders".into(),
            source: "sqs".into(),
            sink: "http".into(),
        });
        route.received.inc();
        route.count_response("2xx");
        route.broker_errors.count("delete", 2);
        assert_eq!(route.broker_errors.get("delete"), 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for name in [
            "ferry_messages_received_total",
            "ferry_deliveries_total",
            "ferry_http_responses_total",
            "ferry_http_request_duration_seconds_bucket",
            "ferry_in_flight",
            "ferry_concurrency_limit",
            "ferry_source_backlog",
            "ferry_end_to_end_seconds_bucket",
            "ferry_broker_errors_total",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.contains(
            r#"ferry_http_responses_total{route="orders",source="sqs",sink="http",class="2xx"} 1"#
        ));
    }
}

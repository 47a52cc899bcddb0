//! Builds each route from its validated plan; the only place besides config validation
//! that knows which backends are compiled in.

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use ferry_core::{
    run_route, AuditTrail, DeliveryTracer, EngineError, Metrics, Route, RouteLabels, SourceContext,
    SourceCounts,
};
use ferry_http::HttpSink;
use tokio_util::sync::CancellationToken;

use crate::admin::RouteView;
use crate::config::{RoutePlan, SourcePlan};

/// A route ready to run.
pub type RouteTask = Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send>>;

/// Why a route could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration names something that does not exist or is refused.
    #[error("routes.{route}.{detail}")]
    Config { route: String, detail: String },
    /// The broker or endpoint could not be reached or set up.
    #[error("routes.{route}.{detail}")]
    Unavailable { route: String, detail: String },
}

impl StartError {
    /// Configuration mistakes exit with 2, like a bad file.
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config { .. })
    }
}

/// What every route reports to besides its metrics.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// The audit trail, when configured.
    pub audit: Option<Arc<dyn AuditTrail>>,
    /// The span exporter, when configured.
    pub tracer: Option<Arc<dyn DeliveryTracer>>,
}

/// Connects the route's source and builds its sink.
pub async fn build(
    plan: RoutePlan,
    metrics: &Metrics,
    hooks: Hooks,
    shutdown: &CancellationToken,
) -> Result<(RouteView, RouteTask), StartError> {
    let route = plan.name.to_string();
    let sink = HttpSink::new(plan.sink).map_err(|e| StartError::Config {
        route: route.clone(),
        detail: format!("sink.{e}"),
    })?;
    // Every backend connects (reporting a wrong setting as a configuration error) and is
    // then assembled the same way.
    macro_rules! connected {
        ($connect:expr) => {{
            let source = $connect
                .await
                .map_err(|e| source_error(&route, &e, e.is_config()))?;
            Ok(assemble(
                plan.name,
                source,
                sink,
                plan.policy,
                metrics,
                hooks,
                shutdown,
            ))
        }};
    }
    match plan.source {
        #[cfg(feature = "sqs")]
        SourcePlan::Sqs(config) => connected!(ferry_sqs::SqsSource::connect(config)),
        #[cfg(feature = "kafka")]
        SourcePlan::Kafka(config) => connected!(ferry_kafka::KafkaSource::connect(config)),
        #[cfg(feature = "amqp")]
        SourcePlan::Amqp(config) => connected!(ferry_amqp::AmqpSource::connect(config)),
        #[cfg(feature = "redis")]
        SourcePlan::Redis(config) => connected!(ferry_redis::RedisSource::connect(config)),
        #[cfg(feature = "postgres")]
        SourcePlan::Postgres(config) => connected!(ferry_postgres::PostgresSource::connect(config)),
        #[cfg(feature = "mqtt")]
        SourcePlan::Mqtt(config) => connected!(ferry_mqtt::MqttSource::connect(config)),
        #[cfg(feature = "nats")]
        SourcePlan::Nats(config) => connected!(ferry_nats::NatsSource::connect(config)),
    }
}

fn source_error(route: &str, e: &dyn std::fmt::Display, config: bool) -> StartError {
    let (route, detail) = (route.to_owned(), format!("source.{e}"));
    if config {
        StartError::Config { route, detail }
    } else {
        StartError::Unavailable { route, detail }
    }
}

fn assemble<S: ferry_core::Source>(
    name: Arc<str>,
    source: S,
    sink: HttpSink,
    policy: ferry_core::DeliveryPolicy,
    metrics: &Metrics,
    hooks: Hooks,
    shutdown: &CancellationToken,
) -> (RouteView, RouteTask) {
    let kind = source.kind();
    let metrics = metrics.route(&RouteLabels {
        route: name.to_string(),
        source: kind.to_owned(),
        sink: "http".to_owned(),
    });
    let ctx = SourceContext::new(
        name.clone(),
        shutdown.child_token(),
        metrics.backlog.clone(),
    )
    .with_counts(SourceCounts::from(&metrics));
    let view = RouteView {
        name: name.clone(),
        source: kind,
        ctx: ctx.clone(),
        metrics: metrics.clone(),
    };
    let route = Route {
        name,
        source,
        sink,
        policy,
        metrics,
        audit: hooks.audit,
        tracer: hooks.tracer,
    };
    (view, Box::pin(run_route(route, ctx)))
}

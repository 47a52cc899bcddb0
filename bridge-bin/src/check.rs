//! `ferry check`: before a deploy, what `validate` cannot see. For every route it connects
//! the source as `run` would (AWS credentials resolve, the queue, topic or exchange and the
//! dead-letter target exist and answer) without receiving anything, and asks the endpoint
//! (its `health_url`, else `OPTIONS` on the URL) without delivering anything; it also
//! reaches the shared state's Redis. One line per check, `✓` or `✗` with the reason.

use std::time::Duration;

use crate::config::{Plan, RoutePlan, SourcePlan};

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);

/// One check's outcome.
pub struct Line {
    /// What was checked (a key path).
    pub at: String,
    /// Passed or not, and what was found.
    pub outcome: Result<String, String>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(what) => write!(f, "✓ {}: {what}", self.at),
            Err(why) => write!(f, "✗ {}: {why}", self.at),
        }
    }
}

/// Runs every check of `plan`, in order: routes by name (source, then sink), then the
/// shared state.
pub async fn run(plan: Plan) -> Vec<Line> {
    let mut lines = Vec::new();
    for route in plan.routes {
        let at = format!("routes.{}", route.name);
        let (source, sink) = check_route(route).await;
        lines.push(Line {
            at: format!("{at}.source"),
            outcome: source,
        });
        lines.push(Line {
            at: format!("{at}.sink"),
            outcome: sink,
        });
    }
    if let Some(state) = &plan.state {
        lines.push(Line {
            at: "admin.state.redis_url".to_owned(),
            outcome: timed(redis_ping(&state.redis_url)).await,
        });
    }
    lines
}

async fn check_route(route: RoutePlan) -> (Result<String, String>, Result<String, String>) {
    let sink = match ferry_http::HttpSink::new(route.sink) {
        Ok(sink) => timed(sink.probe()).await,
        Err(e) => Err(e.to_string()),
    };
    (timed(connect(route.source)).await, sink)
}

/// Connects the source as `ferry run` would (each backend checks what it needs there),
/// then drops it.
async fn connect(source: SourcePlan) -> Result<String, String> {
    match source {
        #[cfg(feature = "sqs")]
        SourcePlan::Sqs(config) => {
            let what = match &config.dead_letter_queue_url {
                Some(dlq) => format!(
                    "credentials resolved; queue {} and dead-letter queue {dlq} answer",
                    config.queue_url
                ),
                None => format!("credentials resolved; queue {} answers", config.queue_url),
            };
            ferry_sqs::SqsSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "amqp")]
        SourcePlan::Amqp(config) => {
            let what = match &config.dead_letters {
                ferry_amqp::DeadLetters::Exchange { exchange, .. } => format!(
                    "logged in; queue {} and dead-letter exchange {exchange:?} exist",
                    config.queue
                ),
                _ => format!("logged in; queue {} exists", config.queue),
            };
            ferry_amqp::AmqpSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "kafka")]
        SourcePlan::Kafka(config) => {
            let what = format!(
                "brokers {} answer; topics {} exist",
                config.brokers,
                config.topics.join(", ")
            );
            ferry_kafka::KafkaSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "redis")]
        SourcePlan::Redis(config) => {
            let what = format!("stream {} and group {} exist", config.stream, config.group);
            ferry_redis::RedisSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "nats")]
        SourcePlan::Nats(config) => {
            let what = format!(
                "stream {} and consumer {} exist",
                config.stream, config.consumer
            );
            ferry_nats::NatsSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "postgres")]
        SourcePlan::Postgres(config) => {
            let what = match &config.dead_letters {
                ferry_postgres::DeadLetters::Table(dead) => format!(
                    "connected; table {} and dead-letter table {dead} have their columns and grants",
                    config.table
                ),
                ferry_postgres::DeadLetters::Drop => {
                    format!("connected; table {} has its columns and grants", config.table)
                }
            };
            ferry_postgres::PostgresSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "mqtt")]
        SourcePlan::Mqtt(config) => {
            let what = format!(
                "connected as {}; subscribed to {}",
                config.client_id,
                config.filters().join(", ")
            );
            ferry_mqtt::MqttSource::connect(config)
                .await
                .map(|_| what)
                .map_err(|e| e.to_string())
        }
    }
}

async fn redis_ping(url: &str) -> Result<String, String> {
    let shown = ferry_core::redact::url(url);
    let client = redis::Client::open(url).map_err(|e| format!("{shown}: {e}"))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot reach {shown}: {e}"))?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(|pong| format!("{shown} answered {pong}"))
        .map_err(|e| format!("{shown}: {e}"))
}

async fn timed(
    check: impl std::future::Future<Output = Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(CHECK_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())))
}

//! Pure validation: no I/O, every error with its key path, and a typed plan per route that
//! the wiring consumes. `ferry validate` runs only this half.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::num::NonZeroU32;

use ferry_core::{
    Backoff, Batching, CircuitBreaker, Concurrency, DeliveryPolicy, MessageOrder, RateLimit,
    ResponsePolicy,
};
use url::Url;

use super::{
    key, AdminConfig, AmqpDeadLetters, AmqpSourceConfig, ConcurrencySetting, Config, ConfigError,
    DeliveryConfig, HttpSinkConfig, KafkaSourceConfig, Ordering, OtlpConfig, RateLimitConfig,
    SinkConfig, SinkMode, SourceConfig, SqsSourceConfig, StateConfig,
};

/// A route ready to be built.
#[derive(Debug)]
pub struct RoutePlan {
    /// Route name.
    pub name: Arc<str>,
    /// Validated source settings.
    pub source: SourcePlan,
    /// Validated sink settings.
    pub sink: ferry_http::HttpSinkConfig,
    /// Validated delivery policy.
    pub policy: DeliveryPolicy,
    /// `rate_limit` with `shared = true`: the fleet's limit, kept in `[admin.state]`.
    pub shared_rate: Option<RateLimit>,
}

/// A validated source, one variant per backend built in.
#[derive(Debug)]
#[non_exhaustive]
pub enum SourcePlan {
    /// Amazon SQS.
    #[cfg(feature = "sqs")]
    Sqs(ferry_sqs::SqsConfig),
    /// RabbitMQ.
    #[cfg(feature = "amqp")]
    Amqp(ferry_amqp::AmqpConfig),
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka(ferry_kafka::KafkaConfig),
    /// Redis Streams.
    #[cfg(feature = "redis")]
    Redis(ferry_redis::RedisConfig),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(ferry_postgres::PostgresConfig),
    /// MQTT 5.
    #[cfg(feature = "mqtt")]
    Mqtt(ferry_mqtt::MqttConfig),
    /// NATS JetStream.
    #[cfg(feature = "nats")]
    Nats(ferry_nats::NatsConfig),
}

/// Everything `ferry run` needs, validated.
#[derive(Debug)]
pub struct Plan {
    /// Admin server address.
    pub admin: SocketAddr,
    /// Token required on state-changing admin calls.
    pub admin_token: Option<String>,
    /// Shared pause/resume state.
    pub state: Option<StatePlan>,
    /// The audit trail file.
    pub audit: Option<AuditPlan>,
    /// The span exporter (only ever set in a build with the `otlp` feature).
    #[cfg_attr(not(feature = "otlp"), allow(dead_code))]
    pub otlp: Option<OtlpPlan>,
    /// Threads of the async runtime.
    pub worker_threads: usize,
    /// The routes.
    pub routes: Vec<RoutePlan>,
}

/// Most `runtime.worker_threads` accepted: far beyond what a bridge can use, low enough
/// that a typo does not start thousands of threads.
const MAX_WORKER_THREADS: usize = 256;

/// `[admin.state]`, validated.
#[derive(Debug, Clone)]
pub struct StatePlan {
    /// The Redis URL.
    pub redis_url: String,
    /// What every key ferry keeps there starts with.
    pub prefix: String,
    /// The Redis hash that holds every route's state.
    pub key: String,
    /// How often each replica reads it.
    pub poll_interval: Duration,
}

/// `[audit]`, validated.
#[derive(Debug, Clone)]
pub struct AuditPlan {
    /// Where the records go.
    pub output: AuditOutputPlan,
    /// How long the records still queued at shutdown may take to go out: the longest
    /// `shutdown_grace` of the routes.
    pub flush_within: Duration,
}

/// An audit output, validated.
#[derive(Debug, Clone)]
pub enum AuditOutputPlan {
    /// JSON lines in a file.
    File(AuditFilePlan),
    /// JSON lines on standard output.
    Stdout,
    /// Amazon Data Firehose.
    #[cfg(feature = "audit-firehose")]
    Firehose {
        /// The delivery stream.
        stream: String,
        /// The longest a record waits for its batch.
        flush_interval: Duration,
        /// Region and endpoint.
        aws: AwsTarget,
    },
    /// Objects in S3.
    #[cfg(feature = "audit-s3")]
    S3 {
        /// The bucket.
        bucket: String,
        /// What every key starts with (no trailing slash).
        prefix: String,
        /// The longest a record waits for its object.
        flush_interval: Duration,
        /// An object is written once it holds this many bytes of records.
        max_object_bytes: usize,
        /// Region and endpoint.
        aws: AwsTarget,
    },
}

/// `[audit] output = "file"`, validated.
#[derive(Debug, Clone)]
pub struct AuditFilePlan {
    /// The file.
    pub path: std::path::PathBuf,
    /// Rotate beyond this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: usize,
}

/// Where an AWS client of an audit output connects.
#[derive(Debug, Clone, Default)]
#[cfg_attr(
    not(any(feature = "audit-firehose", feature = "audit-s3")),
    allow(dead_code)
)]
pub struct AwsTarget {
    /// The region, else the environment's.
    pub region: Option<String>,
    /// A local emulator, else AWS.
    pub endpoint_url: Option<String>,
}

/// `[otlp]`, validated.
#[derive(Clone)]
pub struct OtlpPlan {
    /// Where spans are POSTed (`<endpoint>/v1/traces`).
    pub traces_url: String,
    /// JSON instead of protobuf.
    pub json: bool,
    /// `service.name`.
    pub service_name: String,
    /// Share of new traces recorded.
    pub sample_ratio: f64,
    /// Headers for the collector (may hold secrets).
    pub headers: Vec<(String, String)>,
    /// Timeout of one export.
    pub timeout: Duration,
}

impl std::fmt::Debug for OtlpPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpPlan")
            .field("traces_url", &redact_url(&self.traces_url))
            .field("json", &self.json)
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, at: impl Into<String>, what: impl Into<String>) {
        self.0.push(ConfigError::new(at, what));
    }
}

/// Validates the whole configuration, reporting every error at once.
pub fn validate(config: &Config) -> Result<Plan, Vec<ConfigError>> {
    let mut errors = Errors(Vec::new());
    let admin = config.admin.listen.parse::<SocketAddr>().map_err(|_| {
        errors.push(
            "admin.listen",
            format!(
                "{:?} is not an address like 0.0.0.0:8080",
                config.admin.listen
            ),
        )
    });
    if config.routes.is_empty() {
        errors.push("routes", "no routes configured");
    }
    match config.admin.token.as_deref().map(str::trim) {
        Some("") => errors.push(
            "admin.token",
            "is empty (leave it out to not require a token)",
        ),
        // A short token is guessed by trying; the admin server may be reachable by
        // everything in the cluster.
        Some(t) if t.chars().count() < MIN_TOKEN_CHARS => errors.push(
            "admin.token",
            format!(
                "is {} characters long; use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 16`)",
                t.chars().count()
            ),
        ),
        _ => {}
    }
    let state = config
        .admin
        .state
        .as_ref()
        .and_then(|s| state_plan(s, &mut errors));
    let flush_within = config
        .routes
        .values()
        .map(|r| r.delivery.shutdown_grace.0)
        .max()
        .unwrap_or(Duration::from_secs(30));
    let audit = config
        .audit
        .as_ref()
        .and_then(|a| audit_plan(a, flush_within, &mut errors));
    let otlp = config.otlp.as_ref().and_then(|o| otlp_plan(o, &mut errors));
    let worker_threads = config.runtime.worker_threads;
    if !(1..=MAX_WORKER_THREADS).contains(&worker_threads) {
        errors.push(
            "runtime.worker_threads",
            format!("must be between 1 and {MAX_WORKER_THREADS}"),
        );
    }
    let mut routes = Vec::new();
    for (name, route) in &config.routes {
        let at = format!("routes.{}", key(name));
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            errors.push(&at, "route names use only a-z, 0-9 and _");
        }
        let ordering = route.delivery.ordering;
        let source = source_plan(
            &route.source,
            ordering,
            route.delivery.shutdown_grace.0,
            &format!("{at}.source"),
            &mut errors,
        );
        let SinkConfig::Http(http) = &route.sink;
        let sink = http_sink(name, http, &format!("{at}.sink"), &mut errors);
        let mut policy = delivery(&route.delivery, &format!("{at}.delivery"), &mut errors);
        if route.delivery.batch.is_some() {
            let SinkConfig::Http(http) = &route.sink;
            if http.mode != SinkMode::Envelope {
                errors.push(
                    format!("{at}.delivery.batch"),
                    "batches are JSON arrays of envelopes: use mode = \"envelope\"",
                );
            }
            let kafka = matches!(route.source, SourceConfig::Kafka(_));
            if !matches!(ordering, Some(Ordering::None)) && (kafka || ordering.is_some()) {
                errors.push(
                    format!("{at}.delivery.batch"),
                    "a batch does not keep key order: set ordering = \"none\" to batch",
                );
            }
        }
        match (&route.source, ordering) {
            // A Kafka partition is ordered; ferry keeps that per key unless told otherwise.
            (SourceConfig::Kafka(_), None | Some(Ordering::Partition)) => {
                policy.order = MessageOrder::ByKey;
            }
            (SourceConfig::Kafka(_), _) => {}
            (_, Some(Ordering::Partition)) => errors.push(
                format!("{at}.delivery.ordering"),
                "\"partition\" is only for kafka sources; use \"key\"",
            ),
            _ => {}
        }
        let shared_rate = match route.delivery.rate_limit {
            Some(r) if r.shared => {
                if config.admin.state.is_none() {
                    errors.push(
                        format!("{at}.delivery.rate_limit.shared"),
                        "needs [admin.state] redis_url, where the replicas keep the limit",
                    );
                }
                policy.rate_limit
            }
            _ => None,
        };
        if let (Some(source), Some(sink)) = (source, sink) {
            routes.push(RoutePlan {
                name: Arc::from(name.as_str()),
                source,
                sink,
                policy,
                shared_rate,
            });
        }
    }
    match admin {
        Ok(admin) if errors.0.is_empty() => Ok(Plan {
            admin,
            admin_token: config.admin.token.clone(),
            state,
            audit,
            otlp,
            worker_threads,
            routes,
        }),
        _ => Err(errors.0),
    }
}

fn otlp_plan(otlp: &super::OtlpConfig, errors: &mut Errors) -> Option<OtlpPlan> {
    if !cfg!(feature = "otlp") {
        errors.push(
            "otlp",
            "is not built into this ferry; rebuild with --features otlp",
        );
        return None;
    }
    let mut ok = true;
    let traces_url = match Url::parse(&otlp.endpoint) {
        Ok(mut url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
            // The signal's path goes after the base path, before any query.
            let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
            url.set_path(&path);
            url.to_string()
        }
        _ => {
            ok = false;
            errors.push(
                "otlp.endpoint",
                format!(
                    "{:?} is not an http(s) URL like http://127.0.0.1:4318",
                    redact_url(&otlp.endpoint)
                ),
            );
            String::new()
        }
    };
    let json = match otlp.protocol.as_str() {
        "http/protobuf" => false,
        "http/json" => true,
        other => {
            ok = false;
            errors.push(
                "otlp.protocol",
                format!("{other:?} is not \"http/protobuf\" or \"http/json\""),
            );
            false
        }
    };
    if !(0.0..=1.0).contains(&otlp.sample_ratio) {
        ok = false;
        errors.push("otlp.sample_ratio", "must be between 0 and 1");
    }
    if otlp.service_name.trim().is_empty() {
        ok = false;
        errors.push("otlp.service_name", "is empty");
    }
    if otlp.timeout.0.is_zero() {
        ok = false;
        errors.push("otlp.timeout", "must be more than 0");
    }
    for (name, value) in &otlp.headers {
        let at = format!("otlp.headers.{}", super::key(name));
        if let Err(reason) = ferry_http::static_header(name, value) {
            ok = false;
            errors.push(at, reason);
        }
    }
    ok.then(|| OtlpPlan {
        traces_url,
        json,
        service_name: otlp.service_name.clone(),
        sample_ratio: otlp.sample_ratio,
        headers: otlp
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        timeout: otlp.timeout.0,
    })
}

fn state_plan(state: &super::StateConfig, errors: &mut Errors) -> Option<StatePlan> {
    let mut ok = true;
    match Url::parse(&state.redis_url) {
        Ok(url) if url.scheme() == "redis" && url.has_host() => {}
        _ => {
            ok = false;
            errors.push(
                "admin.state.redis_url",
                format!(
                    "{:?} is not a URL like redis://127.0.0.1:6379",
                    redact_url(&state.redis_url)
                ),
            );
        }
    }
    if state.key_prefix.is_empty() || state.key_prefix.chars().any(char::is_whitespace) {
        ok = false;
        errors.push(
            "admin.state.key_prefix",
            "must be non-empty, without spaces",
        );
    }
    if state.poll_interval.0 < Duration::from_millis(100) {
        ok = false;
        errors.push("admin.state.poll_interval", "must be at least 100ms");
    }
    ok.then(|| StatePlan {
        redis_url: state.redis_url.clone(),
        prefix: state.key_prefix.clone(),
        key: format!("{}:paused", state.key_prefix),
        poll_interval: state.poll_interval.0,
    })
}

fn http_url(value: &str, at: &str, errors: &mut Errors) -> Option<Url> {
    match Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Some(url),
        Ok(url) => {
            errors.push(
                at,
                format!("scheme {:?} is not http or https", url.scheme()),
            );
            None
        }
        Err(e) => {
            errors.push(at, e.to_string());
            None
        }
    }
}

fn range<T: PartialOrd + std::fmt::Display>(
    value: T,
    min: T,
    max: T,
    at: &str,
    errors: &mut Errors,
) -> T {
    if value < min || value > max {
        errors.push(at, format!("{value} is out of range {min}..={max}"));
    }
    value
}

#[cfg_attr(
    all(
        feature = "sqs",
        feature = "amqp",
        feature = "kafka",
        feature = "redis",
        feature = "postgres",
        feature = "mqtt",
        feature = "nats"
    ),
    allow(dead_code)
)]
fn missing_feature(at: &str, kind: &str, errors: &mut Errors) -> Option<SourcePlan> {
    errors.push(
        format!("{at}.type"),
        format!("\"{kind}\" is not built into this ferry; rebuild with --features {kind}"),
    );
    None
}

/// Where an `amqp` route's dead letters go, checked.
#[cfg_attr(not(feature = "amqp"), allow(dead_code))]
enum AmqpDeadLetterPlan {
    /// Exchange and routing key.
    Exchange(String, String),
    Queue,
    Drop,
}

/// Checks `dead_letters`, `dead_letter_exchange` and `dead_letter_routing_key`: one
/// choice must be made (RabbitMQ silently discards what is rejected on a queue without a
/// dead-letter exchange, so that is never a default).
fn amqp_dead_letters(amqp: &AmqpSourceConfig, at: &str, errors: &mut Errors) -> AmqpDeadLetterPlan {
    if amqp.dead_letter_routing_key.is_some() && amqp.dead_letter_exchange.is_none() {
        errors.push(
            format!("{at}.dead_letter_routing_key"),
            "only applies with dead_letter_exchange",
        );
    }
    match (amqp.dead_letters, &amqp.dead_letter_exchange) {
        (None | Some(AmqpDeadLetters::Exchange), Some(exchange)) => {
            let routing_key = amqp
                .dead_letter_routing_key
                .clone()
                .unwrap_or_else(|| amqp.queue.clone());
            if exchange.is_empty() && routing_key == amqp.queue {
                errors.push(
                    format!("{at}.dead_letter_routing_key"),
                    "with the default exchange (\"\") the routing key names the dead-letter \
                     queue; it must not be the route's own queue",
                );
            }
            AmqpDeadLetterPlan::Exchange(exchange.clone(), routing_key)
        }
        (Some(AmqpDeadLetters::Exchange), None) => {
            errors.push(
                format!("{at}.dead_letter_exchange"),
                "must be set when dead_letters = \"exchange\"",
            );
            AmqpDeadLetterPlan::Drop
        }
        (Some(choice @ (AmqpDeadLetters::Queue | AmqpDeadLetters::Drop)), exchange) => {
            if exchange.is_some() {
                errors.push(
                    format!("{at}.dead_letters"),
                    "dead_letter_exchange is set too: drop one of them",
                );
            }
            match choice {
                AmqpDeadLetters::Queue => AmqpDeadLetterPlan::Queue,
                _ => AmqpDeadLetterPlan::Drop,
            }
        }
        (None, None) => {
            errors.push(
                at,
                "say where dead letters go: dead_letter_exchange = \"...\" (ferry publishes them \
                 there, confirmed, then acks), dead_letters = \"queue\" (rejected to the queue's \
                 own x-dead-letter-exchange; RabbitMQ discards them if it has none) or \
                 dead_letters = \"drop\"",
            );
            AmqpDeadLetterPlan::Drop
        }
    }
}

/// The `sns` key of an SQS source: at least one topic, each an SNS topic ARN.
#[cfg(feature = "sqs")]
fn sns_plan(sns: &super::SqsSnsConfig, at: &str, errors: &mut Errors) -> ferry_sqs::SnsConfig {
    check_topic_arns(&sns.topic_arns, at, errors);
    ferry_sqs::SnsConfig {
        topic_arns: sns.topic_arns.clone(),
        verify_signature: sns.verify_signature,
    }
}

#[cfg(not(feature = "sqs"))]
fn sns_plan(sns: &super::SqsSnsConfig, at: &str, errors: &mut Errors) {
    check_topic_arns(&sns.topic_arns, at, errors);
}

fn check_topic_arns(arns: &[String], at: &str, errors: &mut Errors) {
    if arns.is_empty() {
        errors.push(
            format!("{at}.sns.topic_arns"),
            "list at least one topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
        );
    }
    for (i, arn) in arns.iter().enumerate() {
        let parts: Vec<&str> = arn.split(':').collect();
        let sns_arn = parts.len() == 6
            && parts[0] == "arn"
            && parts[1].starts_with("aws")
            && parts[2] == "sns"
            && parts[3..].iter().all(|p| !p.is_empty());
        if !sns_arn {
            errors.push(
                format!("{at}.sns.topic_arns[{i}]"),
                format!("{arn:?} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"),
            );
        }
    }
}

#[cfg_attr(
    not(all(
        feature = "sqs",
        feature = "amqp",
        feature = "kafka",
        feature = "redis",
        feature = "postgres",
        feature = "mqtt",
        feature = "nats"
    )),
    allow(unused_variables)
)]
fn source_plan(
    source: &SourceConfig,
    ordering: Option<Ordering>,
    shutdown_grace: Duration,
    at: &str,
    errors: &mut Errors,
) -> Option<SourcePlan> {
    match source {
        SourceConfig::Sqs(sqs) => {
            http_url(&sqs.queue_url, &format!("{at}.queue_url"), errors);
            if let Some(e) = &sqs.endpoint_url {
                http_url(e, &format!("{at}.endpoint_url"), errors);
            }
            if let Some(d) = &sqs.dead_letter_queue_url {
                http_url(d, &format!("{at}.dead_letter_queue_url"), errors);
            }
            range(sqs.receivers, 1, 64, &format!("{at}.receivers"), errors);
            range(sqs.batch_size, 1, 10, &format!("{at}.batch_size"), errors);
            if sqs.wait_time.0 > Duration::from_secs(20) {
                errors.push(
                    format!("{at}.wait_time"),
                    "at most 20s (SQS long-poll limit)",
                );
            }
            let vis = sqs.visibility_timeout.0;
            if vis < Duration::from_secs(1) || vis > Duration::from_secs(43_200) {
                errors.push(
                    format!("{at}.visibility_timeout"),
                    "must be between 1s and 12h",
                );
            }
            let sns = sqs.sns.as_ref().map(|sns| sns_plan(sns, at, errors));
            #[cfg(feature = "sqs")]
            {
                Some(SourcePlan::Sqs(ferry_sqs::SqsConfig {
                    queue_url: sqs.queue_url.clone(),
                    endpoint_url: sqs.endpoint_url.clone(),
                    region: sqs.region.clone(),
                    receivers: sqs.receivers,
                    batch_size: sqs.batch_size as i32,
                    wait_time: sqs.wait_time.0,
                    visibility_timeout: vis,
                    dead_letter_queue_url: sqs.dead_letter_queue_url.clone(),
                    sns,
                }))
            }
            #[cfg(not(feature = "sqs"))]
            missing_feature(at, "sqs", errors)
        }
        SourceConfig::Amqp(amqp) => {
            match amqp.uri.split_once("://") {
                Some(("amqp" | "amqps", _)) => {}
                _ => errors.push(format!("{at}.uri"), "not an amqp:// or amqps:// URI"),
            }
            if amqp.queue.is_empty() {
                errors.push(format!("{at}.queue"), "must not be empty");
            }
            if amqp.prefetch == 0 {
                errors.push(format!("{at}.prefetch"), "must be at least 1");
            }
            let dead_letters = amqp_dead_letters(amqp, at, errors);
            #[cfg(feature = "amqp")]
            {
                Some(SourcePlan::Amqp(ferry_amqp::AmqpConfig {
                    uri: amqp.uri.clone(),
                    queue: amqp.queue.clone(),
                    prefetch: amqp.prefetch,
                    declare: amqp.declare,
                    ordering_header: amqp.ordering_header.clone(),
                    dead_letters: match dead_letters {
                        AmqpDeadLetterPlan::Exchange(exchange, routing_key) => {
                            ferry_amqp::DeadLetters::Exchange {
                                exchange,
                                routing_key,
                            }
                        }
                        AmqpDeadLetterPlan::Queue => ferry_amqp::DeadLetters::Queue,
                        AmqpDeadLetterPlan::Drop => ferry_amqp::DeadLetters::Drop,
                    },
                }))
            }
            #[cfg(not(feature = "amqp"))]
            missing_feature(at, "amqp", errors)
        }
        SourceConfig::Kafka(kafka) => {
            if kafka.brokers.trim().is_empty() {
                errors.push(format!("{at}.brokers"), "must not be empty");
            }
            if kafka.group_id.trim().is_empty() {
                errors.push(format!("{at}.group_id"), "must not be empty");
            }
            if kafka.topics.is_empty() {
                errors.push(format!("{at}.topics"), "name at least one topic");
            }
            if kafka.topics.iter().any(|t| t.trim().is_empty()) {
                errors.push(format!("{at}.topics"), "a topic name is empty");
            }
            if let Some(dlt) = &kafka.dead_letter_topic {
                if kafka.topics.contains(dlt) {
                    errors.push(
                        format!("{at}.dead_letter_topic"),
                        "is also in topics: dead letters would be delivered again",
                    );
                }
            }
            match (&kafka.dead_letter_topic, kafka.dead_letters) {
                (None, None) => errors.push(
                    at,
                    "no dead-letter destination: set dead_letter_topic, or dead_letters = \"drop\" to drop dead letters",
                ),
                (Some(_), Some(super::KafkaDeadLetters::Drop)) => errors.push(
                    format!("{at}.dead_letters"),
                    "\"drop\" contradicts dead_letter_topic: keep one of them",
                ),
                _ => {}
            }
            let settings = super::Setting::flatten(&kafka.librdkafka);
            for key in settings.keys() {
                if RESERVED_KAFKA_SETTINGS.contains(&key.as_str()) {
                    errors.push(
                        format!("{at}.librdkafka.{key}"),
                        "is set by ferry (offsets are committed only after delivery)",
                    );
                }
            }
            #[cfg(feature = "kafka")]
            {
                Some(SourcePlan::Kafka(ferry_kafka::KafkaConfig {
                    brokers: kafka.brokers.clone(),
                    group_id: kafka.group_id.clone(),
                    topics: kafka.topics.clone(),
                    dead_letters: match &kafka.dead_letter_topic {
                        Some(topic) => ferry_kafka::DeadLetterTarget::Topic(topic.clone()),
                        None => ferry_kafka::DeadLetterTarget::Drop,
                    },
                    shutdown_grace,
                    librdkafka: settings,
                    key_from: match ordering {
                        Some(Ordering::Partition) => ferry_kafka::KeyFrom::Partition,
                        _ => ferry_kafka::KeyFrom::RecordKey,
                    },
                }))
            }
            #[cfg(not(feature = "kafka"))]
            missing_feature(at, "kafka", errors)
        }
        SourceConfig::Redis(redis) => {
            let found = redis.check(ordering, at);
            let ok = found.is_empty();
            errors.0.extend(found);
            #[cfg(feature = "redis")]
            {
                ok.then(|| SourcePlan::Redis(redis.plan()))
            }
            #[cfg(not(feature = "redis"))]
            {
                let _ = ok;
                missing_feature(at, "redis", errors)
            }
        }
        SourceConfig::Postgres(postgres) => {
            postgres.check(at, &mut errors.0);
            #[cfg(feature = "postgres")]
            {
                Some(SourcePlan::Postgres(postgres.plan(ordering)))
            }
            #[cfg(not(feature = "postgres"))]
            missing_feature(at, "postgres", errors)
        }
        SourceConfig::Mqtt(mqtt) => {
            let found = mqtt.check(at);
            let ok = found.is_empty();
            errors.0.extend(found);
            #[cfg(feature = "mqtt")]
            {
                let route = at
                    .strip_prefix("routes.")
                    .and_then(|r| r.strip_suffix(".source"))
                    .unwrap_or(at);
                ok.then(|| SourcePlan::Mqtt(mqtt.plan(route)))
            }
            #[cfg(not(feature = "mqtt"))]
            {
                let _ = ok;
                missing_feature(at, "mqtt", errors)
            }
        }
        SourceConfig::Nats(nats) => {
            let found = nats.check(ordering, at);
            let ok = found.is_empty();
            errors.0.extend(found);
            #[cfg(feature = "nats")]
            {
                ok.then(|| SourcePlan::Nats(nats.plan()))
            }
            #[cfg(not(feature = "nats"))]
            {
                let _ = ok;
                missing_feature(at, "nats", errors)
            }
        }
    }
}

/// Client settings ferry owns: it commits offsets itself, only after delivery.
const RESERVED_KAFKA_SETTINGS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
];

fn http_sink(
    route: &str,
    http: &HttpSinkConfig,
    at: &str,
    errors: &mut Errors,
) -> Option<ferry_http::HttpSinkConfig> {
    let url = http_url(&http.url, &format!("{at}.url"), errors);
    let health_url = http
        .health_url
        .as_ref()
        .and_then(|h| http_url(h, &format!("{at}.health_url"), errors));
    if http.timeout.0.is_zero() {
        errors.push(format!("{at}.timeout"), "must be more than 0s");
    }
    if http.connect_timeout.0.is_zero() {
        errors.push(format!("{at}.connect_timeout"), "must be more than 0s");
    }
    range(
        http.pool_size,
        1,
        10_000,
        &format!("{at}.pool_size"),
        errors,
    );
    for (name, value) in &http.headers {
        let at = format!("{at}.headers.{}", key(name));
        // The sink's own check: what passes here is exactly what it can send.
        if let Err(reason) = ferry_http::static_header(name, value) {
            errors.push(at, reason);
        }
    }
    let signing = signing_key(http.signing.as_ref(), &format!("{at}.signing"), errors);
    let tls = tls_files(http, at, errors);
    Some(ferry_http::HttpSinkConfig {
        route: Arc::from(route),
        url: url?,
        mode: match http.mode {
            SinkMode::Envelope => ferry_http::Mode::Envelope,
            SinkMode::Raw => ferry_http::Mode::Raw,
            SinkMode::CloudEvents => ferry_http::Mode::CloudEvents,
        },
        timeout: http.timeout.0,
        connect_timeout: http.connect_timeout.0,
        pool_size: http.pool_size,
        headers: http
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        health_url,
        signing: signing?,
        tls: tls?,
        http2: http.http2,
    })
}

/// Reads the CA and client certificate files (their content is checked when the client
/// is built, with the same key in the message).
fn tls_files(
    http: &HttpSinkConfig,
    at: &str,
    errors: &mut Errors,
) -> Option<ferry_http::TlsConfig> {
    let mut ok = true;
    let mut read = |key: &str, path: &Option<String>| -> Option<Vec<u8>> {
        let path = path.as_ref()?;
        match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                ok = false;
                errors.push(format!("{at}.{key}"), format!("cannot read {path:?}: {e}"));
                None
            }
        }
    };
    let ca_pem = read("ca_file", &http.ca_file);
    let cert = read("client_cert_file", &http.client_cert_file);
    let key = read("client_key_file", &http.client_key_file);
    let identity_pem = match (cert, key) {
        (Some(mut cert), Some(key)) => {
            cert.push(b'\n');
            cert.extend_from_slice(&key);
            Some(cert)
        }
        (None, None) => None,
        _ => {
            if http.client_cert_file.is_some() != http.client_key_file.is_some() {
                ok = false;
                errors.push(
                    format!("{at}.client_cert_file"),
                    "client_cert_file and client_key_file go together",
                );
            }
            None
        }
    };
    ok.then_some(ferry_http::TlsConfig {
        ca_pem,
        identity_pem,
    })
}

/// The signing key, read from the secret or its file; `Some(None)` when not signing.
fn signing_key(
    signing: Option<&super::SigningConfig>,
    at: &str,
    errors: &mut Errors,
) -> Option<Option<ferry_http::SigningKey>> {
    let Some(signing) = signing else {
        return Some(None);
    };
    let (secret, at) = match (&signing.secret, &signing.secret_file) {
        (Some(secret), None) => (secret.clone(), format!("{at}.secret")),
        (None, Some(path)) => {
            let at = format!("{at}.secret_file");
            // A secret is short; a path to something endless must not hang the start.
            let read = std::fs::File::open(path).and_then(|f| {
                let mut secret = String::new();
                std::io::Read::read_to_string(&mut std::io::Read::take(f, 4096), &mut secret)
                    .map(|_| secret)
            });
            match read {
                Ok(secret) => (secret, at),
                Err(e) => {
                    errors.push(at, format!("cannot read {path:?}: {e}"));
                    return None;
                }
            }
        }
        _ => {
            errors.push(at, "set exactly one of secret and secret_file");
            return None;
        }
    };
    match ferry_http::SigningKey::from_secret(&secret) {
        Ok(key) => Some(Some(key)),
        Err(e) => {
            errors.push(at, e.to_string());
            None
        }
    }
}

fn concurrency(d: &DeliveryConfig, at: &str, errors: &mut Errors) -> Concurrency {
    let bounds = d.min_concurrency.is_some() || d.max_concurrency.is_some();
    match &d.concurrency {
        ConcurrencySetting::Fixed(n) => {
            if bounds {
                errors.push(
                    format!("{at}.min_concurrency"),
                    "min_concurrency and max_concurrency apply only to concurrency = \"adaptive\"",
                );
            }
            Concurrency::Fixed(range(*n, 1, 100_000, &format!("{at}.concurrency"), errors))
        }
        ConcurrencySetting::Mode(mode) if mode == "adaptive" => {
            let min = range(
                d.min_concurrency.unwrap_or(1),
                1,
                100_000,
                &format!("{at}.min_concurrency"),
                errors,
            );
            let max = range(
                d.max_concurrency.unwrap_or(256),
                1,
                100_000,
                &format!("{at}.max_concurrency"),
                errors,
            );
            if min > max {
                errors.push(
                    format!("{at}.min_concurrency"),
                    format!("{min} is larger than max_concurrency ({max})"),
                );
            }
            Concurrency::Adaptive { min, max }
        }
        ConcurrencySetting::Mode(other) => {
            errors.push(
                format!("{at}.concurrency"),
                format!("\"{other}\" is neither a number nor \"adaptive\""),
            );
            Concurrency::Fixed(1)
        }
    }
}

fn rate_limit(r: &RateLimitConfig, at: &str, errors: &mut Errors) -> Option<RateLimit> {
    let per_second = NonZeroU32::new(r.per_second);
    if per_second.is_none() {
        errors.push(format!("{at}.rate_limit.per_second"), "must be at least 1");
    }
    let per_second = per_second?;
    let burst = r.burst.unwrap_or(r.per_second / 10);
    Some(RateLimit {
        per_second,
        burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
    })
}

fn delivery(d: &DeliveryConfig, at: &str, errors: &mut Errors) -> DeliveryPolicy {
    let concurrency = concurrency(d, at, errors);
    let rate_limit = d
        .rate_limit
        .as_ref()
        .and_then(|r| rate_limit(r, at, errors));
    range(
        d.max_attempts,
        1,
        1_000,
        &format!("{at}.max_attempts"),
        errors,
    );
    if d.min_backoff.0 > d.max_backoff.0 {
        errors.push(format!("{at}.min_backoff"), "is larger than max_backoff");
    }
    for s in &d.dead_letter_statuses {
        if !(100..=599).contains(s) {
            errors.push(
                format!("{at}.dead_letter_statuses"),
                format!("{s} is not an HTTP status"),
            );
        } else if (200..300).contains(s) {
            // A 2xx is a delivery: the message is acked, never dead-lettered.
            errors.push(
                format!("{at}.dead_letter_statuses"),
                format!("{s} is a success status; a 2xx answer always acks the message"),
            );
        }
    }
    let breaker = &d.circuit_breaker;
    if breaker.open_for.0.is_zero() {
        errors.push(
            format!("{at}.circuit_breaker.open_for"),
            "must be longer than zero",
        );
    }
    DeliveryPolicy {
        concurrency,
        rate_limit,
        fleet_rate: None,
        circuit_breaker: (breaker.failures > 0).then_some(CircuitBreaker {
            failures: breaker.failures,
            open_for: breaker.open_for.0,
        }),
        max_attempts: d.max_attempts,
        backoff: Backoff::new(d.min_backoff.0, d.max_backoff.0),
        shutdown_grace: d.shutdown_grace.0,
        responses: ResponsePolicy {
            dead_letter_statuses: d.dead_letter_statuses.clone(),
        },
        order: match d.ordering {
            Some(Ordering::Key | Ordering::Partition) => MessageOrder::ByKey,
            Some(Ordering::None) | None => MessageOrder::Unordered,
        },
        batch: d.batch.as_ref().and_then(|b| {
            let at = format!("{at}.batch");
            let before = errors.0.len();
            range(
                b.max_messages,
                1,
                1_000,
                &format!("{at}.max_messages"),
                errors,
            );
            if b.max_wait.0 > Duration::from_secs(10) {
                errors.push(format!("{at}.max_wait"), "must be at most 10s");
            }
            (errors.0.len() == before).then_some(Batching {
                max_messages: b.max_messages,
                max_wait: b.max_wait.0,
            })
        }),
        max_message_bytes: d.max_message_bytes.map(|bytes| {
            let at = format!("{at}.max_message_bytes");
            usize::try_from(range(bytes, 1, 1 << 30, &at, errors)).unwrap_or(usize::MAX)
        }),
    }
}

/// `[audit]`: each output's own keys, and only those.
fn audit_plan(
    a: &super::AuditConfig,
    flush_within: Duration,
    errors: &mut Errors,
) -> Option<AuditPlan> {
    use super::AuditOutput;
    let output = a.output;
    let keys: [(&str, bool, &[AuditOutput]); 10] = [
        ("path", a.path.is_some(), &[AuditOutput::File]),
        ("max_file_mb", a.max_file_mb.is_some(), &[AuditOutput::File]),
        ("max_files", a.max_files.is_some(), &[AuditOutput::File]),
        (
            "delivery_stream",
            a.delivery_stream.is_some(),
            &[AuditOutput::Firehose],
        ),
        ("bucket", a.bucket.is_some(), &[AuditOutput::S3]),
        ("prefix", a.prefix.is_some(), &[AuditOutput::S3]),
        (
            "max_object_mb",
            a.max_object_mb.is_some(),
            &[AuditOutput::S3],
        ),
        (
            "flush_interval",
            a.flush_interval.is_some(),
            &[AuditOutput::Firehose, AuditOutput::S3],
        ),
        (
            "region",
            a.region.is_some(),
            &[AuditOutput::Firehose, AuditOutput::S3],
        ),
        (
            "endpoint_url",
            a.endpoint_url.is_some(),
            &[AuditOutput::Firehose, AuditOutput::S3],
        ),
    ];
    let mut ok = true;
    for (key, set, outputs) in keys {
        if set && !outputs.contains(&output) {
            ok = false;
            let names: Vec<String> = outputs
                .iter()
                .map(|o| format!("{:?}", o.as_str()))
                .collect();
            errors.push(
                format!("audit.{key}"),
                format!(
                    "is only for output = {} (this is output = {:?})",
                    names.join(" or "),
                    output.as_str()
                ),
            );
        }
    }
    let required = |value: &Option<String>, key: &str, errors: &mut Errors| -> Option<String> {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => Some(v.to_owned()),
            _ => {
                errors.push(
                    format!("audit.{key}"),
                    format!("is required with output = {:?}", output.as_str()),
                );
                None
            }
        }
    };
    let plan = match output {
        AuditOutput::File => {
            let path = required(&a.path, "path", errors);
            let max_file_mb = a.max_file_mb.unwrap_or(100);
            if !(1..=100_000).contains(&max_file_mb) {
                ok = false;
                errors.push("audit.max_file_mb", "must be between 1 and 100000");
            }
            let keep = a.max_files.unwrap_or(5);
            if keep > 1000 {
                ok = false;
                errors.push("audit.max_files", "must be at most 1000");
            }
            path.map(|path| {
                AuditOutputPlan::File(AuditFilePlan {
                    path: path.into(),
                    max_bytes: max_file_mb * 1024 * 1024,
                    keep,
                })
            })
        }
        AuditOutput::Stdout => Some(AuditOutputPlan::Stdout),
        AuditOutput::Firehose | AuditOutput::S3 => {
            if let Some(url) = &a.endpoint_url {
                if http_url(url, "audit.endpoint_url", errors).is_none() {
                    ok = false;
                }
            }
            let flush_interval = a.flush_interval.map(|d| d.0);
            if flush_interval.is_some_and(|d| d.is_zero()) {
                ok = false;
                errors.push("audit.flush_interval", "must be more than 0");
            }
            let aws = AwsTarget {
                region: a.region.clone(),
                endpoint_url: a.endpoint_url.clone(),
            };
            aws_audit_plan(a, output, flush_interval, aws, errors)
        }
    };
    plan.filter(|_| ok).map(|output| AuditPlan {
        output,
        flush_within,
    })
}

/// The Firehose and S3 outputs, each in a build with its feature.
fn aws_audit_plan(
    a: &super::AuditConfig,
    output: super::AuditOutput,
    flush_interval: Option<Duration>,
    aws: AwsTarget,
    errors: &mut Errors,
) -> Option<AuditOutputPlan> {
    let _ = (&aws, flush_interval);
    match output {
        #[cfg(feature = "audit-firehose")]
        super::AuditOutput::Firehose => {
            let stream = a
                .delivery_stream
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty());
            if stream.is_none() {
                errors.push(
                    "audit.delivery_stream",
                    "is required with output = \"firehose\"",
                );
            }
            Some(AuditOutputPlan::Firehose {
                stream: stream?.to_owned(),
                flush_interval: flush_interval.unwrap_or(Duration::from_secs(1)),
                aws,
            })
        }
        #[cfg(feature = "audit-s3")]
        super::AuditOutput::S3 => {
            let bucket = a.bucket.as_deref().map(str::trim).filter(|s| !s.is_empty());
            if bucket.is_none() {
                errors.push("audit.bucket", "is required with output = \"s3\"");
            }
            let max_object_mb = a.max_object_mb.unwrap_or(64);
            if !(1..=5_000).contains(&max_object_mb) {
                errors.push("audit.max_object_mb", "must be between 1 and 5000");
                return None;
            }
            Some(AuditOutputPlan::S3 {
                bucket: bucket?.to_owned(),
                prefix: a
                    .prefix
                    .as_deref()
                    .unwrap_or("audit")
                    .trim_matches('/')
                    .to_owned(),
                flush_interval: flush_interval.unwrap_or(Duration::from_secs(60)),
                max_object_bytes: usize::try_from(max_object_mb * 1024 * 1024)
                    .unwrap_or(usize::MAX),
                aws,
            })
        }
        other => {
            let _ = a;
            let feature = match other {
                super::AuditOutput::Firehose => "audit-firehose",
                _ => "audit-s3",
            };
            errors.push(
                "audit.output",
                format!(
                    "{:?} is not built into this ferry; rebuild with --features {feature}",
                    other.as_str()
                ),
            );
            None
        }
    }
}

/// The shortest admin token accepted.
const MIN_TOKEN_CHARS: usize = 16;

/// The configuration as `ferry validate` prints it: header values, tokens, URL passwords
/// and query values replaced, since any of them may hold a secret.
pub fn redacted(config: &Config) -> Config {
    let mut config = config.clone();
    config.admin = config.admin.redacted();
    config.otlp = config.otlp.as_ref().map(OtlpConfig::redacted);
    for route in config.routes.values_mut() {
        let SinkConfig::Http(http) = &route.sink;
        route.sink = SinkConfig::Http(http.redacted());
        route.source = match &route.source {
            SourceConfig::Sqs(sqs) => SourceConfig::Sqs(sqs.redacted()),
            SourceConfig::Amqp(amqp) => SourceConfig::Amqp(amqp.redacted()),
            SourceConfig::Kafka(kafka) => SourceConfig::Kafka(kafka.redacted()),
            SourceConfig::Redis(redis) => SourceConfig::Redis(redis.redacted()),
            SourceConfig::Postgres(postgres) => SourceConfig::Postgres(postgres.redacted()),
            SourceConfig::Mqtt(mqtt) => SourceConfig::Mqtt(mqtt.redacted()),
            SourceConfig::Nats(nats) => SourceConfig::Nats(nats.redacted()),
        };
    }
    config
}

fn redact_url(value: &str) -> String {
    ferry_core::redact::url(value)
}

fn redact_values<V>(values: &mut BTreeMap<String, V>, with: impl Fn() -> V) {
    for value in values.values_mut() {
        *value = with();
    }
}

fn hidden() -> String {
    ferry_core::redact::REDACTED.to_owned()
}

impl AdminConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.token = c.token.as_ref().map(|_| hidden());
        c.state = c.state.as_ref().map(StateConfig::redacted);
        c
    }
}

impl StateConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.redis_url = redact_url(&c.redis_url);
        c
    }
}

impl OtlpConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.endpoint = redact_url(&c.endpoint);
        redact_values(&mut c.headers, hidden);
        c
    }
}

impl HttpSinkConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        redact_values(&mut c.headers, hidden);
        c.url = redact_url(&c.url);
        c.health_url = c.health_url.as_deref().map(redact_url);
        if let Some(secret) = c.signing.as_mut().and_then(|s| s.secret.as_mut()) {
            *secret = hidden();
        }
        c
    }
}

impl SqsSourceConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.queue_url = redact_url(&c.queue_url);
        c.endpoint_url = c.endpoint_url.as_deref().map(redact_url);
        c
    }
}

impl AmqpSourceConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.uri = redact_url(&c.uri);
        c
    }
}

impl KafkaSourceConfig {
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        redact_values(&mut c.librdkafka, || super::Setting::Text(hidden()));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        toml::from_str(text).expect("parses")
    }

    const GOOD: &str = r#"
        [routes.orders.source]
        type = "sqs"
        queue_url = "http://localhost:4566/000000000000/orders"
        [routes.orders.sink]
        type = "http"
        url = "http://localhost:4000/orders"
        headers = { Authorization = "Bearer s3cret" }
    "#;

    /// Each audit output takes its own keys and refuses the others', naming both.
    #[test]
    fn audit_outputs_take_their_own_keys() {
        let route = "[routes.r.source]\ntype = \"sqs\"\nqueue_url = \"http://localhost:4566/000000000000/q\"\n\
                     [routes.r.sink]\ntype = \"http\"\nurl = \"http://localhost:4000/\"\n";
        for (audit, expect) in [
            (
                "output = \"s3\"\nbucket = \"b\"\npath = \"x\"",
                "audit.path: is only for output = \"file\"",
            ),
            ("output = \"s3\"", "audit.bucket: is required"),
            (
                "output = \"firehose\"",
                "audit.delivery_stream: is required",
            ),
            (
                "output = \"stdout\"\nflush_interval = \"1s\"",
                "audit.flush_interval: is only for",
            ),
            (
                "path = \"a.jsonl\"\nbucket = \"b\"",
                "audit.bucket: is only for output = \"s3\"",
            ),
        ] {
            let config = parse(&format!("{route}[audit]\n{audit}\n"));
            let errors = validate(&config).expect_err(audit);
            assert!(
                errors.iter().any(|e| e.to_string().starts_with(expect)),
                "{audit}: {errors:?}"
            );
        }
        let config = parse(&format!(
            "{route}[audit]\noutput = \"s3\"\nbucket = \"b\"\nprefix = \"/a/b/\"\n"
        ));
        let plan = validate(&config).expect("valid").audit.expect("audit");
        match plan.output {
            #[cfg(feature = "audit-s3")]
            AuditOutputPlan::S3 {
                prefix,
                flush_interval,
                ..
            } => {
                assert_eq!(
                    (prefix.as_str(), flush_interval),
                    ("a/b", Duration::from_secs(60))
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn good_config_validates_and_redacts() {
        let config = parse(GOOD);
        let plan = validate(&config).expect("valid");
        assert_eq!(plan.routes.len(), 1);
        assert_eq!(plan.worker_threads, 1, "one runtime thread unless asked");
        let more = validate(&parse(&format!("[runtime]\nworker_threads = 4\n{GOOD}")));
        assert_eq!(more.expect("valid").worker_threads, 4);
        let shown = toml::to_string(&redacted(&config)).expect("toml");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn sns_topics_are_listed_and_checked_and_verification_is_on_by_default() {
        let with = |sns: &str| {
            let text = GOOD.replace(
                "queue_url = \"http://localhost:4566/000000000000/orders\"",
                &format!("queue_url = \"http://localhost:4566/000000000000/orders\"\nsns = {sns}"),
            );
            validate(&parse(&text))
        };
        // Built with SQS alone, the plan has no other variant.
        #[cfg(feature = "sqs")]
        #[allow(irrefutable_let_patterns)]
        {
            let plan = with(r#"{ topic_arns = ["arn:aws:sns:us-east-1:000000000000:orders"] }"#)
                .expect("valid");
            let SourcePlan::Sqs(sqs) = &plan.routes[0].source else {
                panic!("an SQS plan");
            };
            let sns = sqs.sns.as_ref().expect("sns");
            assert!(sns.verify_signature);
            assert_eq!(
                sns.topic_arns,
                ["arn:aws:sns:us-east-1:000000000000:orders"]
            );
            let plan = with(
                r#"{ topic_arns = ["arn:aws-cn:sns:cn-north-1:1:t"], verify_signature = false }"#,
            )
            .expect("valid");
            let SourcePlan::Sqs(sqs) = &plan.routes[0].source else {
                panic!("an SQS plan");
            };
            assert!(!sqs.sns.as_ref().expect("sns").verify_signature);
        }
        let errors: Vec<String> = with(r#"{ topic_arns = [] }"#)
            .expect_err("empty")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("routes.orders.source.sns.topic_arns: list at least one")),
            "{errors:#?}"
        );
        let errors: Vec<String> =
            with(r#"{ topic_arns = ["arn:aws:sqs:us-east-1:1:q", "orders"] }"#)
                .expect_err("not SNS ARNs")
                .iter()
                .map(ToString::to_string)
                .collect();
        for i in 0..2 {
            let at = format!("routes.orders.source.sns.topic_arns[{i}]: ");
            assert!(errors.iter().any(|e| e.starts_with(&at)), "{errors:#?}");
        }
    }

    #[test]
    fn sink_headers_are_checked_as_the_sink_sends_them() {
        let config = parse(&GOOD.replace(
            r#"headers = { Authorization = "Bearer s3cret" }"#,
            r#"headers = { "X Bad" = "v", X-Secret = "line\nbreak s3cret" }"#,
        ));
        let errors: Vec<String> = validate(&config)
            .expect_err("bad headers")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            errors.contains(
                &"routes.orders.sink.headers.\"X Bad\": not a valid header name".to_owned()
            ),
            "{errors:#?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("routes.orders.sink.headers.X-Secret: value has characters")),
            "{errors:#?}"
        );
        assert!(!errors.iter().any(|e| e.contains("s3cret")), "{errors:#?}");
    }

    #[test]
    fn every_error_has_its_path() {
        let config = parse(
            r#"
            [admin]
            listen = "nowhere"
            [routes.Orders.source]
            type = "sqs"
            queue_url = "not a url"
            batch_size = 11
            [routes.Orders.sink]
            type = "http"
            url = "/relative"
            [routes.Orders.delivery]
            concurrency = 0
            "#,
        );
        let errors = validate(&config).expect_err("invalid");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let expect = [
            "admin.listen:",
            "routes.Orders: route names",
            "routes.Orders.source.queue_url: relative URL without a base",
            "routes.Orders.source.batch_size: 11 is out of range",
            "routes.Orders.sink.url: relative URL without a base",
            "routes.Orders.delivery.concurrency: 0 is out of range",
        ];
        for e in expect {
            assert!(
                text.iter().any(|t| t.starts_with(e)),
                "{e} not in {text:#?}"
            );
        }
    }

    fn delivery_of(section: &str) -> Result<DeliveryPolicy, Vec<String>> {
        let config = parse(&format!("{GOOD}\n[routes.orders.delivery]\n{section}\n"));
        match validate(&config) {
            Ok(mut plan) => Ok(plan.routes.remove(0).policy),
            Err(errors) => Err(errors.iter().map(ToString::to_string).collect()),
        }
    }

    #[test]
    fn adaptive_concurrency_and_rate_limit() {
        let p = delivery_of(
            "concurrency = \"adaptive\"\nmax_concurrency = 64\n\
             rate_limit = { per_second = 200 }",
        )
        .expect("valid");
        assert_eq!(p.concurrency, Concurrency::Adaptive { min: 1, max: 64 });
        let r = p.rate_limit.expect("limited");
        assert_eq!((r.per_second.get(), r.burst.get()), (200, 20));
        assert_eq!(
            p.circuit_breaker,
            Some(CircuitBreaker {
                failures: 10,
                open_for: Duration::from_secs(2)
            }),
            "on by default"
        );
        let p = delivery_of("circuit_breaker = { failures = 0 }").expect("valid");
        assert_eq!(p.circuit_breaker, None, "failures = 0 turns it off");
        let p = delivery_of("rate_limit = { per_second = 5, burst = 1 }").expect("valid");
        assert_eq!(p.concurrency, Concurrency::Fixed(10));
        assert_eq!(p.rate_limit.expect("limited").burst.get(), 1);

        for (section, error) in [
            (
                "concurrency = \"lots\"",
                "routes.orders.delivery.concurrency: \"lots\" is neither a number nor \"adaptive\"",
            ),
            (
                "concurrency = 8\nmax_concurrency = 9",
                "routes.orders.delivery.min_concurrency: min_concurrency and max_concurrency apply only",
            ),
            (
                "concurrency = \"adaptive\"\nmin_concurrency = 9\nmax_concurrency = 4",
                "routes.orders.delivery.min_concurrency: 9 is larger than max_concurrency (4)",
            ),
            (
                "rate_limit = { per_second = 0 }",
                "routes.orders.delivery.rate_limit.per_second: must be at least 1",
            ),
        ] {
            let errors = delivery_of(section).expect_err(section);
            assert!(
                errors.iter().any(|e| e.starts_with(error)),
                "{error} not in {errors:#?}"
            );
        }
    }

    /// `[otlp]`: the traces URL is the base plus `/v1/traces`, the defaults are the OTLP
    /// ones, and the collector's credentials are never shown.
    #[cfg(feature = "otlp")]
    #[test]
    fn otlp_keys() {
        let text = format!(
            "{GOOD}\n[otlp]\nendpoint = \"https://ci:pw@collector:4318/\"\n\
             headers = {{ authorization = \"Bearer s3cr\" }}\n"
        );
        let config = parse(&text);
        let otlp = validate(&config).expect("valid").otlp.expect("otlp");
        assert_eq!(otlp.traces_url, "https://ci:pw@collector:4318/v1/traces");
        assert!(!otlp.json);
        assert_eq!(
            (otlp.service_name.as_str(), otlp.sample_ratio),
            ("ferry", 1.0)
        );
        assert_eq!(otlp.timeout, Duration::from_secs(10));
        let shown = toml::to_string(&redacted(&config)).expect("toml") + &format!("{otlp:?}");
        for hidden in ["s3cr", ":pw@"] {
            assert!(!shown.contains(hidden), "{hidden} shown in {shown}");
        }
    }

    /// The operations keys: valid forms are taken, secrets never shown, and each mistake
    /// is one error at its own path.
    #[test]
    fn operations_keys() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let text = format!(
            "[admin]\ntoken = \"t0p-secret-0123456\"\n[admin.state]\nredis_url = \"redis://:pw@127.0.0.1:6379\"\n\
             [audit]\npath = \"audit/ferry.jsonl\"\n{}\nsigning = {{ secret = \"{secret}\" }}\n\
             [routes.orders.delivery]\nbatch = {{ max_messages = 25 }}\n",
            GOOD.replace("[admin]", "")
        );
        let config = parse(&text);
        let plan = validate(&config).expect("valid");
        assert_eq!(plan.admin_token.as_deref(), Some("t0p-secret-0123456"));
        let state = plan.state.expect("shared state");
        assert_eq!(
            (state.key.as_str(), state.poll_interval),
            ("ferry:paused", Duration::from_secs(1))
        );
        let audit = plan.audit.expect("audit");
        let AuditOutputPlan::File(file) = audit.output else {
            panic!("not the file output: {audit:?}");
        };
        assert_eq!((file.max_bytes, file.keep), (100 * 1024 * 1024, 5));
        let route = &plan.routes[0];
        assert!(route.sink.signing.is_some());
        let batch = route.policy.batch.expect("batch");
        assert_eq!(
            (batch.max_messages, batch.max_wait),
            (25, Duration::from_millis(50))
        );
        let shown = toml::to_string(&redacted(&config)).expect("toml");
        for hidden in ["t0p", ":pw@", "MfKQ9r8G"] {
            assert!(!shown.contains(hidden), "{hidden} shown in {shown}");
        }

        // Built without the feature, any `[otlp]` is refused by name instead.
        fn otlp_error(with_feature: &'static str) -> &'static str {
            if cfg!(feature = "otlp") {
                with_feature
            } else {
                "otlp: is not built into this ferry"
            }
        }
        for (section, error) in [
            ("[admin]\ntoken = \"\"", "admin.token: is empty"),
            (
                "[admin.state]\nredis_url = \"http://x\"",
                "admin.state.redis_url: \"http://x\" is not a URL like redis://",
            ),
            (
                "[routes.orders.sink.signing]\nsecret = \"plain\"",
                "routes.orders.sink.signing.secret: is not \"whsec_\" followed by a base64 key",
            ),
            (
                "[routes.orders.sink.signing]\nsecret_file = \"/nonexistent/secret\"",
                "routes.orders.sink.signing.secret_file: cannot read",
            ),
            (
                "[routes.orders.delivery]\nordering = \"key\"\nbatch = {}",
                "routes.orders.delivery.batch: a batch does not keep key order",
            ),
            (
                "[routes.orders.delivery]\nbatch = { max_messages = 0 }",
                "routes.orders.delivery.batch.max_messages: 0 is out of range",
            ),
            (
                "[routes.orders.delivery]\nmax_message_bytes = 0",
                "routes.orders.delivery.max_message_bytes: 0 is out of range 1..=1073741824",
            ),
            (
                "[audit]\npath = \"a.jsonl\"\nmax_file_mb = 0",
                "audit.max_file_mb: must be between",
            ),
            (
                "[runtime]\nworker_threads = 0",
                "runtime.worker_threads: must be between 1 and 256",
            ),
            (
                "[runtime]\nworker_threads = 100000",
                "runtime.worker_threads: must be between 1 and 256",
            ),
            (
                "[otlp]\nendpoint = \"127.0.0.1:4318\"",
                otlp_error("otlp.endpoint: \"127.0.0.1:4318\" is not an http(s) URL"),
            ),
            (
                "[otlp]\nendpoint = \"http://c:4318\"\nprotocol = \"grpc\"",
                otlp_error("otlp.protocol: \"grpc\" is not"),
            ),
            (
                "[otlp]\nendpoint = \"http://c:4318\"\nsample_ratio = 1.5",
                otlp_error("otlp.sample_ratio: must be between 0 and 1"),
            ),
            (
                "[otlp]\nendpoint = \"http://c:4318\"\nheaders = { \"a b\" = \"x\" }",
                otlp_error("otlp.headers.\"a b\": not a valid header name"),
            ),
        ] {
            let config = parse(&format!("{GOOD}\n{section}\n"));
            let errors: Vec<String> = validate(&config)
                .expect_err(section)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert!(
                errors.iter().any(|e| e.starts_with(error)),
                "{error} not in {errors:#?}"
            );
        }
    }
}

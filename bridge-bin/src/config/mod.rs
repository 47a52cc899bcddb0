//! The configuration file (DESIGN section 4): serde types that reject unknown keys, the
//! layered loader, and validation that collects every error with its key path.

mod duration;
mod load;
mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use duration::Dur;
pub use load::{load, LoadOptions};
// For the library target (fuzzing, embedding): the binary only loads files.
#[allow(unused_imports)]
pub use load::{load_str, Format};
#[cfg(any(feature = "audit-firehose", feature = "audit-s3"))]
pub use validate::AwsTarget;
#[cfg(feature = "otlp")]
pub use validate::OtlpPlan;
pub use validate::{
    redacted, validate, AuditFilePlan, AuditOutputPlan, AuditPlan, Plan, RoutePlan, SourcePlan,
    StatePlan,
};

/// One error in the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path (`routes.orders.sink.url`) or file name.
    pub at: String,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for ConfigError {
    /// One line per error, whatever a key or a value holds: control characters (a line
    /// break in a key or in an environment variable) are written escaped.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", OneLine(&self.at), OneLine(&self.what))
    }
}

struct OneLine<'a>(&'a str);

impl std::fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// The mistake, if any, in a source's choice of where its dead letters go: a destination
/// (`destination_key`, set or not) or `dead_letters = "<word>"` (the broker's own way to
/// be rid of them, `verb` in the message): exactly one of the two. Returns the key under
/// the source (empty: the source itself) and what is wrong.
pub(super) fn dead_letter_choice(
    destination_key: &str,
    destination: bool,
    word: &str,
    verb: &str,
    chosen: bool,
) -> Option<(&'static str, String)> {
    match (destination, chosen) {
        (false, false) => Some((
            "",
            format!(
                "no dead-letter destination: set {destination_key}, or dead_letters = \"{word}\" to {verb} dead letters"
            ),
        )),
        (true, true) => Some((
            "dead_letters",
            format!("\"{word}\" contradicts {destination_key}: keep one of them"),
        )),
        _ => None,
    }
}

/// A key as one segment of a key path: as it is when it is a bare TOML key, quoted as
/// TOML would write it otherwise, so that an empty key or one with a dot or a space still
/// names exactly one place.
pub(crate) fn key(name: &str) -> std::borrow::Cow<'_, str> {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        name.into()
    } else {
        format!("{name:?}").into()
    }
}

impl ConfigError {
    /// An error at a key path (or file name).
    pub fn new(at: impl Into<String>, what: impl Into<String>) -> Self {
        Self {
            at: at.into(),
            what: what.into(),
        }
    }
}

/// `Debug` of the types that may hold a secret: what `ferry validate` shows of them, so
/// that a `{:?}` in a log line or a panic message never carries one.
macro_rules! debug_redacted {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let shown = serde_json::to_value(self.redacted()).map_err(|_| std::fmt::Error)?;
                write!(f, "{} {shown}", stringify!($t))
            }
        }
    )*};
}

debug_redacted!(
    OtlpConfig,
    AdminConfig,
    StateConfig,
    KafkaSourceConfig,
    AmqpSourceConfig,
    SqsSourceConfig,
    HttpSinkConfig
);

pub mod mqtt;
pub mod nats;
pub mod postgres;
pub mod redis;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin server.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The audit trail file, when wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditConfig>,
    /// Where delivery spans are exported, when wanted (built with the `otlp` feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<OtlpConfig>,
    /// The threads that run every route.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Routes by name (`[a-z0-9_]+`).
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
}

/// `[runtime]`: how many threads run the routes.
///
/// One is the default because a message costs ferry little beside the system calls that
/// move it: on two cores, a second thread handing work back and forth cost a third or
/// more CPU per message and moved no more messages (`BENCHMARKS.md`). Raise it
/// when ferry keeps one core busy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that poll every route, sink and the admin server.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            worker_threads: default_worker_threads(),
        }
    }
}

fn default_worker_threads() -> usize {
    1
}

/// `[audit]`: one JSON record per message that ended here, to the `output` chosen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `file` (the default), `stdout`, `firehose` or `s3`.
    #[serde(default)]
    pub output: AuditOutput,
    /// `file`: the file; rotated copies get `.1`, `.2`, ... appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `file`: size in MB beyond which the file is rotated (100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_mb: Option<u64>,
    /// `file`: rotated files kept (5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<usize>,
    /// `firehose`: the delivery stream's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_stream: Option<String>,
    /// `s3`: the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// `s3`: what every object key starts with (`audit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `firehose` (1s) and `s3` (60s): the longest a record waits to be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval: Option<Dur>,
    /// `s3`: an object is written once it holds this many MB of records (64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_object_mb: Option<u64>,
    /// `firehose`, `s3`: the AWS region; from the environment when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `firehose`, `s3`: only for local emulators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
}

/// Where audit records go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditOutput {
    /// JSON lines in a local file, rotated by size.
    #[default]
    File,
    /// One JSON line per record on standard output, for a log shipper.
    Stdout,
    /// Amazon Data Firehose `PutRecordBatch`.
    Firehose,
    /// Gzipped JSON-lines objects in S3.
    S3,
}

impl AuditOutput {
    /// The name in the configuration and in the `output` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutput::File => "file",
            AuditOutput::Stdout => "stdout",
            AuditOutput::Firehose => "firehose",
            AuditOutput::S3 => "s3",
        }
    }
}

/// `[otlp]`: one span per delivery attempt, exported to an OpenTelemetry collector.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL; spans go to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// `http/protobuf` (the default) or `http/json`.
    #[serde(default = "default_otlp_protocol")]
    pub protocol: String,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Share of new traces recorded (0 to 1); a message's own trace keeps its decision.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Headers sent to the collector (may hold secrets; never logged).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Timeout of one export request.
    #[serde(default = "default_otlp_timeout")]
    pub timeout: Dur,
}

fn default_otlp_protocol() -> String {
    "http/protobuf".to_owned()
}

fn default_service_name() -> String {
    "ferry".to_owned()
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_otlp_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

/// `[admin]`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where `/ping`, `/metrics` and friends listen.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Bearer token that state-changing admin calls must carry, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Where pause/resume is shared with the other replicas, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            state: None,
        }
    }
}

/// `[admin.state]`: the paused/running state of every route, kept in Redis.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis://[user:password@]host:port[/db]`
    pub redis_url: String,
    /// Prefix of the Redis key, so that deployments sharing one Redis stay apart.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How often each replica reads the shared state.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Dur,
}

fn default_key_prefix() -> String {
    "ferry".to_owned()
}

fn default_poll_interval() -> Dur {
    Dur(Duration::from_secs(1))
}

fn default_listen() -> String {
    "0.0.0.0:8080".to_owned()
}

/// `[routes.NAME]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Where messages come from.
    pub source: SourceConfig,
    /// Where they go.
    pub sink: SinkConfig,
    /// How they are delivered.
    #[serde(default)]
    pub delivery: DeliveryConfig,
}

/// `[routes.NAME.source]`, by `type`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    /// Amazon SQS.
    Sqs(SqsSourceConfig),
    /// RabbitMQ (AMQP 0-9-1).
    Amqp(AmqpSourceConfig),
    /// Apache Kafka.
    Kafka(KafkaSourceConfig),
    /// Redis Streams.
    Redis(redis::RedisSourceConfig),
    /// A PostgreSQL queue table or transactional outbox.
    Postgres(postgres::PostgresSourceConfig),
    /// MQTT 5.
    Mqtt(mqtt::MqttSourceConfig),
    /// NATS JetStream.
    Nats(nats::NatsSourceConfig),
}

/// `type = "kafka"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap brokers, `host:port,host:port`.
    pub brokers: String,
    /// Consumer group shared by the replicas of this route.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Where dead letters are produced.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// `"drop"`: no `dead_letter_topic`, dead letters are logged, counted and dropped. One
    /// of the two is required, so that losing dead letters is a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<KafkaDeadLetters>,
    /// librdkafka settings passed through (`security.protocol`, `sasl.password`, ...).
    /// Written as TOML keys, `session.timeout.ms = 6000` and
    /// `"session.timeout.ms" = "6000"` mean the same.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, Setting>,
}

/// `dead_letters` of a Kafka route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KafkaDeadLetters {
    /// Log, count and drop them.
    Drop,
}

/// A pass-through client setting: librdkafka takes every value as text.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Setting {
    /// `"value"`
    Text(String),
    /// `6000`
    Int(i64),
    /// `true`
    Bool(bool),
    /// `0.5`
    Float(f64),
    /// A dotted key written as nested TOML keys.
    Nested(BTreeMap<String, Setting>),
}

impl Setting {
    /// Flattens nested keys into librdkafka's dotted names.
    pub fn flatten(settings: &BTreeMap<String, Setting>) -> BTreeMap<String, String> {
        fn walk(
            prefix: &str,
            settings: &BTreeMap<String, Setting>,
            out: &mut BTreeMap<String, String>,
        ) {
            for (key, value) in settings {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                let text = match value {
                    Setting::Text(s) => s.clone(),
                    Setting::Int(n) => n.to_string(),
                    Setting::Bool(b) => b.to_string(),
                    Setting::Float(f) => f.to_string(),
                    Setting::Nested(inner) => {
                        walk(&name, inner, out);
                        continue;
                    }
                };
                out.insert(name, text);
            }
        }
        let mut out = BTreeMap::new();
        walk("", settings, &mut out);
        out
    }
}

/// `type = "amqp"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSourceConfig {
    /// `amqp://user:password@host:port/vhost`.
    pub uri: String,
    /// The queue to consume; must exist unless `declare = true`.
    pub queue: String,
    /// Unacked deliveries at most; keep it at least `concurrency`.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare the queue (durable) if it does not exist.
    #[serde(default)]
    pub declare: bool,
    /// Header carrying the ordering key; the routing key when absent.
    #[serde(default)]
    pub ordering_header: Option<String>,
    /// The exchange ferry publishes dead letters to (with confirms) before acking them.
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    /// Their routing key; the queue name when absent.
    #[serde(default)]
    pub dead_letter_routing_key: Option<String>,
    /// `exchange` (implied by `dead_letter_exchange`), `queue` (reject to the queue's own
    /// dead-letter exchange) or `drop`; one of them must be chosen.
    #[serde(default)]
    pub dead_letters: Option<AmqpDeadLetters>,
}

/// `dead_letters` of an `amqp` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AmqpDeadLetters {
    /// Published by ferry to `dead_letter_exchange`.
    Exchange,
    /// Rejected without requeue: the queue's `x-dead-letter-exchange` takes them.
    Queue,
    /// Acked and discarded.
    Drop,
}

fn default_prefetch() -> u16 {
    100
}

/// `type = "sqs"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSourceConfig {
    /// The queue to consume.
    pub queue_url: String,
    /// Only for local emulators.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// AWS region; from the environment when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// Concurrent ReceiveMessage loops.
    #[serde(default = "default_receivers")]
    pub receivers: usize,
    /// Messages per receive, 1..=10.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Long-poll wait, at most 20 s. The default, 20 s, is SQS's own advice: an idle
    /// receiver makes three calls a minute instead of sixty, and a busy one is not slowed
    /// (a long poll answers as soon as there are messages). Shutdown waits for a poll under
    /// way, so an idle route takes up to this long to stop.
    #[serde(default = "default_wait_time")]
    pub wait_time: Dur,
    /// Visibility given at receive and renewed while held.
    #[serde(default = "default_visibility")]
    pub visibility_timeout: Dur,
    /// Where dead-letters go; without it the queue's redrive policy applies.
    #[serde(default)]
    pub dead_letter_queue_url: Option<String>,
    /// Which SNS envelopes are genuine; without it every `Notification` body is unwrapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sns: Option<SqsSnsConfig>,
}

/// `sns = { topic_arns = [...], verify_signature = true }` of an SQS source: anyone who may
/// send to the queue can write a body that looks like an SNS notification, so only those
/// from these topics, signed by SNS, are unwrapped; other envelopes are dead-lettered.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSnsConfig {
    /// The topics this queue is subscribed to (exact ARNs), at least one.
    pub topic_arns: Vec<String>,
    /// Whether the SNS signature must hold; on unless turned off.
    #[serde(default = "default_verify_signature")]
    pub verify_signature: bool,
}

fn default_verify_signature() -> bool {
    true
}

fn default_receivers() -> usize {
    2
}
fn default_batch_size() -> u32 {
    10
}
fn default_wait_time() -> Dur {
    Dur(Duration::from_secs(20))
}
fn default_visibility() -> Dur {
    Dur(Duration::from_secs(30))
}

/// `[routes.NAME.sink]`, by `type`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    /// HTTP POST to the team's endpoint.
    Http(HttpSinkConfig),
}

/// `type = "http"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Absolute http(s) URL.
    pub url: String,
    /// `envelope`, `raw` or `cloudevents`.
    #[serde(default)]
    pub mode: SinkMode,
    /// One attempt's whole-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// TCP + TLS connect timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Idle keep-alive connections kept.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Static headers; values may use `${VAR}` for secrets.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// GET answering 2xx while the endpoint is up; checked every `open_for` of the
    /// circuit breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_url: Option<String>,
    /// Standard Webhooks signatures on every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningConfig>,
    /// PEM file of CA certificates to trust besides the public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM client certificate (chain) for endpoints that require mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// PEM private key of `client_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
    /// HTTP/2 to the endpoint: h2c (prior knowledge) on `http://`, ALPN on `https://`.
    /// Every request shares one connection; `pool_size` does not apply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http2: bool,
}

/// `[routes.NAME.delivery.batch]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Messages per request at most.
    #[serde(default = "default_batch_messages")]
    pub max_messages: usize,
    /// How long the first message waits for others.
    #[serde(default = "default_batch_wait")]
    pub max_wait: Dur,
}

fn default_batch_messages() -> usize {
    10
}

fn default_batch_wait() -> Dur {
    Dur(Duration::from_millis(50))
}

/// `[routes.NAME.sink.signing]`: the secret inline (usually `${VAR}`) or in a file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// `whsec_` followed by the base64 key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A file holding the secret (a mounted secret volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
}

/// Body format of the HTTP sink.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SinkMode {
    /// `{"id", "msg", "timestamp", "attributes"}`.
    #[default]
    Envelope,
    /// The payload unchanged.
    Raw,
    /// CloudEvents 1.0, HTTP binary mode.
    CloudEvents,
}

fn default_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_pool_size() -> usize {
    20
}

/// `[routes.NAME.delivery]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Requests in flight at most, or `"adaptive"`.
    #[serde(default = "default_concurrency")]
    pub concurrency: ConcurrencySetting,
    /// Lowest adaptive limit (only with `concurrency = "adaptive"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_concurrency: Option<usize>,
    /// Highest adaptive limit (only with `concurrency = "adaptive"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    /// Requests per second at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// When to stop receiving because the endpoint is down.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Attempts before dead-lettering.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay ceiling.
    #[serde(default = "default_min_backoff")]
    pub min_backoff: Dur,
    /// Longest retry delay (also caps `Retry-After`).
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Dur,
    /// Time in-flight deliveries get to finish at shutdown.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Dur,
    /// Statuses that dead-letter at once.
    #[serde(default = "default_dead_letter_statuses")]
    pub dead_letter_statuses: Vec<u16>,
    /// Message order; unset means the source's natural default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
    /// Several messages per request, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchConfig>,
    /// Larger messages are dead-lettered unsent; unset: the broker's own maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<u64>,
}

/// `concurrency = 10` or `concurrency = "adaptive"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConcurrencySetting {
    /// A fixed number of requests in flight.
    Fixed(usize),
    /// A mode by name; only `"adaptive"` exists.
    Mode(String),
}

/// By hand rather than `untagged`, so that a wrong value says what is expected instead
/// of "did not match any variant".
impl<'de> Deserialize<'de> for ConcurrencySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, Unexpected};
        struct Visitor;
        const EXPECTED: &str = "a positive integer or \"adaptive\"";
        impl de::Visitor<'_> for Visitor {
            type Value = ConcurrencySetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                usize::try_from(v)
                    .map(ConcurrencySetting::Fixed)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ConcurrencySetting::Mode(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `rate_limit = { per_second = 200, burst = 20 }`
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests that may go at once after a quiet spell; a tenth of a second's worth
    /// by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// One limit for every replica, kept in the `[admin.state]` Redis.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// `circuit_breaker = { failures = 10, open_for = "2s" }`; `failures = 0` turns it off.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive refused connections, timeouts or 502/503/504 that open the circuit.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// Time between probes while open.
    #[serde(default = "default_open_for")]
    pub open_for: Dur,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failures: default_breaker_failures(),
            open_for: default_open_for(),
        }
    }
}

fn default_breaker_failures() -> u32 {
    10
}
fn default_open_for() -> Dur {
    Dur(Duration::from_secs(2))
}

/// `ordering = "none" | "key" | "partition"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Every message independent.
    None,
    /// Same ordering key in order, different keys in parallel.
    Key,
    /// Kafka only: each partition in order, partitions in parallel.
    Partition,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            min_concurrency: None,
            max_concurrency: None,
            rate_limit: None,
            circuit_breaker: CircuitBreakerConfig::default(),
            max_attempts: default_max_attempts(),
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            shutdown_grace: default_shutdown_grace(),
            dead_letter_statuses: default_dead_letter_statuses(),
            ordering: None,
            batch: None,
            max_message_bytes: None,
        }
    }
}

fn default_concurrency() -> ConcurrencySetting {
    ConcurrencySetting::Fixed(10)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_min_backoff() -> Dur {
    Dur(Duration::from_millis(100))
}
fn default_max_backoff() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_shutdown_grace() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_dead_letter_statuses() -> Vec<u16> {
    ferry_core::ResponsePolicy::default().dead_letter_statuses
}

//! The MQTT 5 source of ferry.
//!
//! ferry subscribes with QoS 1 under a persistent session (`clean_start = false` and a
//! session expiry interval), so the broker keeps the subscription and every message not
//! yet acknowledged while ferry is away, and acknowledges each message (`PUBACK`) only once
//! the engine settles it: after the endpoint's 2xx, or once its dead letter is published.
//! With a `shared_group` the subscription is shared (`$share/<group>/<filter>`): the
//! replicas of a route split the messages between them.
//!
//! What MQTT does not do shapes the rest:
//! - no negative acknowledgement and no delayed redelivery: a broker sends a message it
//!   has not had the `PUBACK` of again only when the client reconnects. Retries wait in
//!   ferry, holding the `PUBACK`; a message ferry gives up holding (a release) comes back at
//!   the next connection, which ferry then makes at once.
//! - no message id: the id is a user property when the publisher set one
//!   (`id_property`), else one ferry makes up (never repeated); a redelivery is told apart
//!   by the DUP flag only.
//! - no backlog count: the gauge shows what this replica holds unacknowledged.
//!
//! Packet identifiers are the only handle on a message, and the broker reuses one as soon
//! as it has the `PUBACK`. So a `PUBACK` is only ever sent on the connection that received
//! the message (or the copy the broker sent again on reconnect), never carried over to a
//! later connection, where it could acknowledge another message; see [`table`].

mod connection;
mod convert;
mod dead_letter;
mod options;
mod settle;
mod table;

pub use dead_letter::DEAD_LETTER_PROPERTIES;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Delivery, Source, SourceContext, SourceError};
use tokio::sync::mpsc;

/// The `[routes.x.source]` section of an `mqtt` route, validated.
#[derive(Clone)]
pub struct MqttConfig {
    /// `mqtt://[user:password@]host[:port]`; holds a secret, never logged as is.
    pub url: String,
    /// The topic filters subscribed to (`orders/#`, `sensors/+/reading`).
    pub topics: Vec<String>,
    /// The shared-subscription group the replicas share, when set (`$share/<group>/...`).
    pub shared_group: Option<String>,
    /// The client identifier: the persistent session's name, the same across restarts and
    /// different for each replica.
    pub client_id: String,
    /// How long the broker keeps the session (subscription and unacknowledged messages)
    /// after ferry disconnects.
    pub session_expiry: Duration,
    /// Unacknowledged messages the broker may have sent ferry at once (MQTT's Receive
    /// Maximum): in flight, retrying and waiting together.
    pub receive_maximum: u16,
    /// The user property that holds the message id, when the publisher sets one.
    pub id_property: String,
    /// The user property that holds the ordering key; `None` orders by topic.
    pub key_property: Option<String>,
    /// How often a ping proves the connection alive.
    pub keep_alive: Duration,
    /// Where dead letters go.
    pub dead_letters: DeadLetters,
}

/// Where a dead letter goes. There is no default: dropping must be a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// Published (QoS 1) to this topic with the original properties and ferry's reason
    /// user properties; the original is acknowledged once the broker has it.
    Topic(String),
    /// Acknowledged and discarded, logged and counted as dropped.
    Drop,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &ferry_core::redact::url(&self.url))
            .field("topics", &self.topics)
            .field("shared_group", &self.shared_group)
            .field("client_id", &self.client_id)
            .field("session_expiry", &self.session_expiry)
            .field("receive_maximum", &self.receive_maximum)
            .field("id_property", &self.id_property)
            .field("key_property", &self.key_property)
            .field("keep_alive", &self.keep_alive)
            .field("dead_letters", &self.dead_letters)
            .finish()
    }
}

impl MqttConfig {
    /// The filters as subscribed: each under `$share/<group>/` when shared.
    pub fn filters(&self) -> Vec<String> {
        self.topics
            .iter()
            .map(|t| match &self.shared_group {
                Some(g) => format!("$share/{g}/{t}"),
                None => t.clone(),
            })
            .collect()
    }
}

/// The client id of a route that does not set one: `ferry-<route>-<host>`, the host name
/// being a Kubernetes pod's name (`HOSTNAME`), so each replica has its own session.
pub fn default_client_id(route: &str) -> String {
    let from_env = std::env::var("HOSTNAME").ok();
    let from_kernel = || std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let host = from_env
        .or_else(from_kernel)
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ferry".to_owned());
    format!("ferry-{route}-{host}")
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// The URL is not one ferry takes.
    #[error("url: {0}")]
    Url(String),
    /// The broker could not be reached (or did not answer in time).
    #[error("url: cannot reach {url}: {detail}")]
    Unreachable {
        /// The URL, password redacted.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The broker refused the connection or a subscription: a setting is wrong.
    #[error("{key}: {detail}")]
    Refused {
        /// The configuration key at fault (`url`, `client_id`, `topics`).
        key: &'static str,
        /// What the broker said.
        detail: String,
    },
}

impl MqttError {
    /// True when the configuration is wrong rather than the broker unreachable.
    pub fn is_config(&self) -> bool {
        !matches!(self, MqttError::Unreachable { .. })
    }
}

/// A checked MQTT source; build it with [`MqttSource::connect`].
pub struct MqttSource {
    config: Arc<MqttConfig>,
    options: rumqttc::v5::MqttOptions,
}

impl MqttSource {
    /// Connects once with the route's session, subscribes (so the broker keeps messages
    /// for it from now on, even before the route runs) and disconnects, keeping the
    /// session: a wrong URL, login, client id or filter is one line at start.
    pub async fn connect(config: MqttConfig) -> Result<Self, MqttError> {
        let options = options::build(&config)?;
        connection::check(&config, &options).await?;
        Ok(Self {
            config: Arc::new(config),
            options,
        })
    }
}

/// The wait before reconnection number `failures`: 100 ms doubling up to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(5))
}

impl Source for MqttSource {
    fn kind(&self) -> &'static str {
        "mqtt"
    }

    /// The broker never has more than `receive_maximum` messages unacknowledged with
    /// ferry; the engine may hold all of them.
    fn buffer(&self) -> usize {
        usize::from(self.config.receive_maximum)
    }

    /// MQTT's largest packet (256 MiB), less the header.
    fn max_message_bytes(&self) -> Option<usize> {
        Some(268_435_455)
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        connection::run(self.config, self.options, out, ctx).await;
        Ok(())
    }
}

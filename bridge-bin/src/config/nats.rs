//! `type = "nats"`: a NATS JetStream source, its checks and its redaction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Dur, Ordering};

/// `type = "nats"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSourceConfig {
    /// `nats://[user:password@]host:port`
    pub url: String,
    /// The stream.
    pub stream: String,
    /// The subjects of a stream made by `declare` (default `<stream>.>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// The durable pull consumer the replicas share.
    pub consumer: String,
    /// The filter subject of a consumer made by `declare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_subject: Option<String>,
    /// Create the stream, the consumer and the dead-letter stream when missing.
    #[serde(default)]
    pub declare: bool,
    /// `ack_wait` of a consumer made by `declare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_wait: Option<Dur>,
    /// `max_ack_pending` of a consumer made by `declare`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ack_pending: Option<i64>,
    /// Messages per pull request.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where the ordering key comes from: `"subject"` or `"header:<name>"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Where dead letters are published (a stream must capture it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_subject: Option<String>,
    /// `"term"`: no `dead_letter_subject`, dead letters are terminated (never redelivered,
    /// left in the stream). One of the two is required, so that it is a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<NatsDeadLetters>,
}

debug_redacted!(NatsSourceConfig);

/// `dead_letters` of a NATS route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NatsDeadLetters {
    /// `+TERM` them.
    Term,
}

fn default_batch_size() -> usize {
    100
}

/// The defaults of the consumer ferry declares; only the plan (built with the backend) uses them.
#[cfg(feature = "nats")]
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
#[cfg(feature = "nats")]
const DEFAULT_MAX_ACK_PENDING: i64 = 1000;

/// A subject without spaces, empty tokens or (unless allowed) wildcards.
fn valid_subject(subject: &str, wildcards: bool) -> bool {
    !subject.is_empty()
        && !subject.chars().any(char::is_whitespace)
        && subject
            .split('.')
            .all(|t| !t.is_empty() && (wildcards || (t != "*" && t != ">")))
}

/// What the server takes as a stream or consumer name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

impl NatsSourceConfig {
    /// Every mistake, with its key path under `at` (`routes.NAME.source`).
    pub(super) fn check(&self, ordering: Option<Ordering>, at: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut push = |key: &str, what: &str| {
            let place = if key.is_empty() {
                at.to_owned()
            } else {
                format!("{at}.{key}")
            };
            errors.push(ConfigError::new(place, what));
        };
        match url::Url::parse(&self.url) {
            Ok(url) if url.scheme() == "nats" && url.has_host() => {}
            _ => push(
                "url",
                "not a URL like nats://127.0.0.1:4222 (tls:// is not built in)",
            ),
        }
        if !valid_name(&self.stream) {
            push("stream", "not a stream name (no spaces, '.', '*', '>')");
        }
        if !valid_name(&self.consumer) {
            push("consumer", "not a consumer name (no spaces, '.', '*', '>')");
        }
        if self.subjects.iter().any(|s| !valid_subject(s, true)) {
            push("subjects", "each must be a subject like orders.>");
        }
        if !self.subjects.is_empty() && !self.declare {
            push("subjects", "only applies with declare = true");
        }
        if let Some(filter) = &self.filter_subject {
            if !valid_subject(filter, true) {
                push("filter_subject", "not a subject");
            }
            if !self.declare {
                push("filter_subject", "only applies with declare = true");
            }
        }
        if let Some(wait) = self.ack_wait {
            if wait.0 < Duration::from_secs(1) {
                push("ack_wait", "at least 1s");
            }
            if !self.declare {
                push(
                    "ack_wait",
                    "only applies with declare = true (an existing consumer's own is used)",
                );
            }
        }
        if let Some(pending) = self.max_ack_pending {
            if pending < 1 {
                push("max_ack_pending", "must be at least 1");
            }
            if !self.declare {
                push("max_ack_pending", "only applies with declare = true");
            }
        }
        if !(1..=10_000).contains(&self.batch_size) {
            push("batch_size", "must be between 1 and 10000");
        }
        match self.key.as_deref() {
            None | Some("subject") => {}
            Some(k)
                if k.strip_prefix("header:")
                    .is_some_and(|h| !h.trim().is_empty()) => {}
            Some(_) => push("key", "\"subject\" or \"header:<name>\""),
        }
        if ordering == Some(Ordering::Key) && self.key.is_none() {
            push(
                "key",
                "ordering = \"key\" needs where the key is: \"subject\" or \"header:<name>\"",
            );
        }
        if let Some((key, what)) = super::dead_letter_choice(
            "dead_letter_subject",
            self.dead_letter_subject.is_some(),
            "term",
            "terminate",
            self.dead_letters.is_some(),
        ) {
            push(key, &what);
        } else if let Some(dl) = &self.dead_letter_subject {
            if !valid_subject(dl, false) {
                push("dead_letter_subject", "not a subject (no wildcards)");
            }
        }
        errors
    }

    /// The source's settings (after [`NatsSourceConfig::check`] found nothing).
    #[cfg(feature = "nats")]
    pub(super) fn plan(&self) -> ferry_nats::NatsConfig {
        ferry_nats::NatsConfig {
            url: self.url.clone(),
            stream: self.stream.clone(),
            subjects: self.subjects.clone(),
            consumer: self.consumer.clone(),
            filter_subject: self.filter_subject.clone(),
            declare: self.declare,
            ack_wait: self.ack_wait.map_or(DEFAULT_ACK_WAIT, |d| d.0),
            max_ack_pending: self.max_ack_pending.unwrap_or(DEFAULT_MAX_ACK_PENDING),
            batch_size: self.batch_size,
            key: self
                .key
                .as_deref()
                .map(|k| match k.strip_prefix("header:") {
                    Some(header) => ferry_nats::KeyFrom::Header(header.trim().to_owned()),
                    None => ferry_nats::KeyFrom::Subject,
                }),
            dead_letters: match &self.dead_letter_subject {
                Some(subject) => ferry_nats::DeadLetters::Subject(subject.clone()),
                None => ferry_nats::DeadLetters::Term,
            },
        }
    }

    /// As `ferry validate` shows it: the URL's password out.
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.url = ferry_core::redact::url(&c.url);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> NatsSourceConfig {
        toml::from_str(&format!(
            "url = \"nats://ferry:s3cret@127.0.0.1:4222\"\nstream = \"ORDERS\"\nconsumer = \"ferry\"\n{extra}"
        ))
        .expect("parses")
    }

    #[test]
    fn a_dead_letter_choice_is_required_and_must_be_one() {
        let at = "routes.r.source";
        let errors = parse("").check(None, at);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].at, at);
        assert!(parse("dead_letters = \"term\"").check(None, at).is_empty());
        let both = parse("dead_letters = \"term\"\ndead_letter_subject = \"dl\"").check(None, at);
        assert_eq!(both[0].at, "routes.r.source.dead_letters");
        let wild = parse("dead_letter_subject = \"dl.>\"").check(None, at);
        assert_eq!(wild[0].at, "routes.r.source.dead_letter_subject");
    }

    #[test]
    fn each_mistake_names_its_key() {
        let mut c =
            parse("dead_letters = \"term\"\nack_wait = \"10s\"\nbatch_size = 0\nkey = \"body\"");
        c.stream = "a.b".to_owned();
        let at: Vec<String> = c
            .check(Some(Ordering::Key), "s")
            .into_iter()
            .map(|e| e.at)
            .collect();
        assert_eq!(at, ["s.stream", "s.ack_wait", "s.batch_size", "s.key"]);
        let keyless = parse("dead_letters = \"term\"").check(Some(Ordering::Key), "s");
        assert_eq!(keyless[0].at, "s.key");
    }

    #[test]
    fn the_password_is_redacted() {
        let shown = format!("{:?}", parse("dead_letters = \"term\""));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}

//! `type = "redis"`: a Redis Streams source, its checks and its redaction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Dur, Ordering};

/// `type = "redis"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceConfig {
    /// `redis://[user:password@]host:port[/db]`
    pub url: String,
    /// The stream key.
    pub stream: String,
    /// The consumer group the replicas share.
    pub group: String,
    /// This replica's consumer name (default: the host name, a Kubernetes pod's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Create the stream and the group when missing.
    #[serde(default)]
    pub declare: bool,
    /// Where a group made by `declare` starts: `"0"` (the whole stream, the default) or
    /// `"$"` (new entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<RedisStart>,
    /// The entry field that holds the payload.
    #[serde(default = "default_body_field")]
    pub body_field: String,
    /// The entry field that holds the ordering key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    /// How long an entry may stay pending unheard of before any consumer takes it over.
    #[serde(default = "default_claim_idle")]
    pub claim_idle: Dur,
    /// Entries per `XREADGROUP`.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Where dead letters are `XADD`ed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_stream: Option<String>,
    /// `MAXLEN ~` of the dead-letter stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_maxlen: Option<u64>,
    /// `"drop"`: no `dead_letter_stream`, dead letters are logged, counted and dropped. One
    /// of the two is required, so that losing dead letters is a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<RedisDeadLetters>,
}

debug_redacted!(RedisSourceConfig);

/// `start` of a group made by `declare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum RedisStart {
    /// Every entry already in the stream.
    #[serde(rename = "0")]
    Oldest,
    /// Entries added from now on.
    #[serde(rename = "$")]
    New,
}

/// `dead_letters` of a Redis route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisDeadLetters {
    /// Log, count and drop them.
    Drop,
}

fn default_body_field() -> String {
    "body".to_owned()
}

fn default_claim_idle() -> Dur {
    Dur(Duration::from_secs(300))
}

fn default_batch_size() -> usize {
    100
}

impl RedisSourceConfig {
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
            Ok(url) if url.scheme() == "redis" && url.has_host() => {}
            _ => push(
                "url",
                "not a URL like redis://127.0.0.1:6379 (rediss:// is not built in)",
            ),
        }
        for (key, value) in [
            ("stream", &self.stream),
            ("group", &self.group),
            ("body_field", &self.body_field),
        ] {
            if value.trim().is_empty() {
                push(key, "must not be empty");
            }
        }
        if self
            .consumer
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            push(
                "consumer",
                "must not be empty (leave it out for the host name)",
            );
        }
        if self.start.is_some() && !self.declare {
            push("start", "only applies with declare = true");
        }
        if self
            .key_field
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            push("key_field", "must not be empty");
        }
        if ordering == Some(Ordering::Key) && self.key_field.is_none() {
            push(
                "key_field",
                "ordering = \"key\" needs the entry field that holds the key",
            );
        }
        if self.claim_idle.0 < Duration::from_secs(1) {
            push(
                "claim_idle",
                "at least 1s (and longer than the longest delivery)",
            );
        }
        if !(1..=10_000).contains(&self.batch_size) {
            push("batch_size", "must be between 1 and 10000");
        }
        if let Some((key, what)) = super::dead_letter_choice(
            "dead_letter_stream",
            self.dead_letter_stream.is_some(),
            "drop",
            "drop",
            self.dead_letters.is_some(),
        ) {
            push(key, &what);
        } else if let Some(dl) = &self.dead_letter_stream {
            if *dl == self.stream {
                push(
                    "dead_letter_stream",
                    "is the stream itself: dead letters would be delivered again",
                );
            } else if dl.trim().is_empty() {
                push("dead_letter_stream", "must not be empty");
            }
        }
        if self.dead_letter_maxlen.is_some() && self.dead_letter_stream.is_none() {
            push("dead_letter_maxlen", "only applies with dead_letter_stream");
        }
        if self.dead_letter_maxlen == Some(0) {
            push("dead_letter_maxlen", "must be at least 1");
        }
        errors
    }

    /// The source's settings (after [`RedisSourceConfig::check`] found nothing).
    #[cfg(feature = "redis")]
    pub(super) fn plan(&self) -> ferry_redis::RedisConfig {
        ferry_redis::RedisConfig {
            url: self.url.clone(),
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: self.consumer.clone(),
            declare: self.declare,
            start: match self.start {
                Some(RedisStart::New) => ferry_redis::GroupStart::New,
                Some(RedisStart::Oldest) | None => ferry_redis::GroupStart::Oldest,
            },
            body_field: self.body_field.clone(),
            key_field: self.key_field.clone(),
            claim_idle: self.claim_idle.0,
            batch_size: self.batch_size,
            dead_letters: match &self.dead_letter_stream {
                Some(stream) => ferry_redis::DeadLetters::Stream {
                    stream: stream.clone(),
                    max_len: self.dead_letter_maxlen,
                },
                None => ferry_redis::DeadLetters::Drop,
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

    fn parse(extra: &str) -> RedisSourceConfig {
        toml::from_str(&format!(
            "url = \"redis://:s3cret@127.0.0.1:6379\"\nstream = \"orders\"\ngroup = \"ferry\"\n{extra}"
        ))
        .expect("parses")
    }

    #[test]
    fn a_dead_letter_choice_is_required_and_must_be_one() {
        let at = "routes.r.source";
        let errors = parse("").check(None, at);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].at, at);
        assert!(parse("dead_letters = \"drop\"").check(None, at).is_empty());
        let both = parse("dead_letters = \"drop\"\ndead_letter_stream = \"dl\"").check(None, at);
        assert_eq!(both[0].at, "routes.r.source.dead_letters");
        let itself = parse("dead_letter_stream = \"orders\"").check(None, at);
        assert_eq!(itself[0].at, "routes.r.source.dead_letter_stream");
    }

    #[test]
    fn each_mistake_names_its_key() {
        let c =
            parse("dead_letters = \"drop\"\nclaim_idle = \"100ms\"\nbatch_size = 0\nstart = \"$\"");
        let at: Vec<String> = c
            .check(Some(Ordering::Key), "s")
            .into_iter()
            .map(|e| e.at)
            .collect();
        assert_eq!(
            at,
            ["s.start", "s.key_field", "s.claim_idle", "s.batch_size"]
        );
    }

    #[test]
    fn the_password_is_redacted() {
        let shown = format!("{:?}", parse("dead_letters = \"drop\""));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}

//! `type = "mqtt"`: an MQTT 5 source, its checks and its redaction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Dur};

/// `type = "mqtt"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// `mqtt://[user:password@]host[:port]`
    pub url: String,
    /// Topic filters to subscribe to.
    pub topics: Vec<String>,
    /// Subscribe as `$share/<group>/<filter>`, so the replicas split the messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_group: Option<String>,
    /// The persistent session's client id (default `ferry-<route>-<host name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// How long the broker keeps the session while ferry is away.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: Dur,
    /// Messages the broker may have out to ferry unacknowledged (Receive Maximum).
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u32,
    /// The user property that holds the message id.
    #[serde(default = "default_id_property")]
    pub id_property: String,
    /// The user property that holds the ordering key (default: the topic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_property: Option<String>,
    /// How often a ping proves the connection alive.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    /// Where dead letters are published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// `"drop"`: no `dead_letter_topic`, dead letters are logged, counted and dropped. One
    /// of the two is required, so that losing dead letters is a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<MqttDeadLetters>,
}

debug_redacted!(MqttSourceConfig);

/// `dead_letters` of an MQTT route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttDeadLetters {
    /// Log, count and drop them.
    Drop,
}

fn default_session_expiry() -> Dur {
    Dur(Duration::from_secs(7 * 86_400))
}

fn default_receive_maximum() -> u32 {
    100
}

fn default_id_property() -> String {
    "message-id".to_owned()
}

fn default_keep_alive() -> Dur {
    Dur(Duration::from_secs(10))
}

/// What is wrong with a topic filter, if anything.
fn filter_problem(filter: &str) -> Option<&'static str> {
    if filter.is_empty() {
        return Some("must not be empty");
    }
    if filter.contains('\0') {
        return Some("must not contain NUL");
    }
    if filter.starts_with("$share/") {
        return Some("subscribe to the plain filter and set shared_group instead of $share/");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Some("# must be a whole level, the last one");
        }
        if level.contains('+') && *level != "+" {
            return Some("+ must be a whole level");
        }
    }
    None
}

/// Whether `topic` (a topic name) matches `filter`.
fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$') || !filter.starts_with('#'),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl MqttSourceConfig {
    /// Every mistake, with its key path under `at` (`routes.NAME.source`).
    pub(super) fn check(&self, at: &str) -> Vec<ConfigError> {
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
            Ok(url)
                if url.scheme() == "mqtt"
                    && url.has_host()
                    && url.path().trim_matches('/').is_empty() => {}
            _ => push(
                "url",
                "not a URL like mqtt://127.0.0.1:1883 (mqtts:// is not built in)",
            ),
        }
        if self.topics.is_empty() {
            push("topics", "must name at least one topic filter");
        }
        for (i, t) in self.topics.iter().enumerate() {
            if let Some(problem) = filter_problem(t) {
                push(&format!("topics[{i}]"), &format!("{t:?}: {problem}"));
            }
        }
        if let Some(g) = &self.shared_group {
            if g.is_empty() || g.contains(['/', '+', '#', '\0']) {
                push("shared_group", "must be a non-empty name without /, + or #");
            }
        }
        if let Some(id) = &self.client_id {
            if id.trim().is_empty() || id.starts_with(' ') || id.len() > 65_535 {
                push(
                    "client_id",
                    "must be a non-empty name (leave it out for ferry-<route>-<host>)",
                );
            }
        }
        if self.session_expiry.0 < Duration::from_secs(1)
            || self.session_expiry.0.as_secs() > u64::from(u32::MAX)
        {
            push(
                "session_expiry",
                "must be between 1s and about 136 years (longer than any restart takes)",
            );
        }
        if !(1..=65_535).contains(&self.receive_maximum) {
            push("receive_maximum", "must be between 1 and 65535");
        }
        if self.id_property.is_empty() {
            push("id_property", "must not be empty");
        }
        if self.key_property.as_deref().is_some_and(str::is_empty) {
            push(
                "key_property",
                "must not be empty (leave it out to order by topic)",
            );
        }
        if self.keep_alive.0 < Duration::from_secs(1) || self.keep_alive.0.as_secs() > 65_535 {
            push("keep_alive", "must be between 1s and 65535s");
        }
        if let Some((key, what)) = super::dead_letter_choice(
            "dead_letter_topic",
            self.dead_letter_topic.is_some(),
            "drop",
            "drop",
            self.dead_letters.is_some(),
        ) {
            push(key, &what);
        } else if let Some(dl) = &self.dead_letter_topic {
            if dl.is_empty() || dl.contains(['+', '#', '\0']) {
                push(
                    "dead_letter_topic",
                    "must be a topic name (not empty, no wildcards)",
                );
            } else if self.topics.iter().any(|f| matches(f, dl)) {
                push(
                    "dead_letter_topic",
                    "is matched by topics: dead letters would be delivered again",
                );
            }
        }
        errors
    }

    /// The source's settings (after [`MqttSourceConfig::check`] found nothing); `route`
    /// names the default client id.
    #[cfg(feature = "mqtt")]
    pub(super) fn plan(&self, route: &str) -> ferry_mqtt::MqttConfig {
        ferry_mqtt::MqttConfig {
            url: self.url.clone(),
            topics: self.topics.clone(),
            shared_group: self.shared_group.clone(),
            client_id: self
                .client_id
                .clone()
                .unwrap_or_else(|| ferry_mqtt::default_client_id(route)),
            session_expiry: self.session_expiry.0,
            receive_maximum: u16::try_from(self.receive_maximum).unwrap_or(u16::MAX),
            id_property: self.id_property.clone(),
            key_property: self.key_property.clone(),
            keep_alive: self.keep_alive.0,
            dead_letters: match &self.dead_letter_topic {
                Some(t) => ferry_mqtt::DeadLetters::Topic(t.clone()),
                None => ferry_mqtt::DeadLetters::Drop,
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

    fn parse(extra: &str) -> MqttSourceConfig {
        let topics = if extra.contains("topics") {
            ""
        } else {
            "topics = [\"orders/#\"]\n"
        };
        toml::from_str(&format!(
            "url = \"mqtt://u:s3cret@127.0.0.1:1883\"\n{topics}{extra}"
        ))
        .expect("parses")
    }

    #[test]
    fn a_dead_letter_choice_is_required_and_must_be_one() {
        let at = "routes.r.source";
        let errors = parse("").check(at);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].at, at);
        assert!(parse("dead_letters = \"drop\"").check(at).is_empty());
        let both = parse("dead_letters = \"drop\"\ndead_letter_topic = \"dl\"").check(at);
        assert_eq!(both[0].at, "routes.r.source.dead_letters");
        let looped = parse("dead_letter_topic = \"orders/dead\"").check(at);
        assert_eq!(looped[0].at, "routes.r.source.dead_letter_topic");
        assert!(parse("dead_letter_topic = \"dead/orders\"")
            .check(at)
            .is_empty());
    }

    #[test]
    fn each_mistake_names_its_key() {
        let c = parse(
            "dead_letters = \"drop\"\ntopics = [\"a/#/b\", \"$share/g/x\"]\nshared_group = \"a/b\"\n\
             receive_maximum = 0\nkeep_alive = \"100ms\"\nclient_id = \"\"",
        );
        let at: Vec<String> = c.check("s").into_iter().map(|e| e.at).collect();
        assert_eq!(
            at,
            [
                "s.topics[0]",
                "s.topics[1]",
                "s.shared_group",
                "s.client_id",
                "s.receive_maximum",
                "s.keep_alive"
            ]
        );
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("#", "x"));
        assert!(!matches("#", "$SYS/x"));
    }

    #[test]
    fn the_password_is_redacted() {
        let shown = format!("{:?}", parse("dead_letters = \"drop\""));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}

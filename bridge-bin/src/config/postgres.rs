//! `type = "postgres"`: the section, its checks, and what `ferry validate` shows of it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Dur};

/// `type = "postgres"`
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// The table, `name` or `schema.name`; must exist unless `declare = true`.
    pub table: String,
    /// Create the table, its indexes, its NOTIFY trigger and the dead-letter table.
    #[serde(default)]
    pub declare: bool,
    /// `declare` only: the payload column's type, `bytea` (the default), `text` or `jsonb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_type: Option<PayloadType>,
    /// Rows claimed by one statement at most.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a claimed row stays this replica's; renewed while it is held.
    #[serde(default = "default_lease")]
    pub lease: Dur,
    /// The longest ferry sleeps without looking at the table (a missed notification).
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Dur,
    /// The channel the insert trigger notifies; the table's name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_channel: Option<String>,
    /// `delete` (the default) or `mark` (`done_at` set).
    #[serde(default)]
    pub on_success: OnSuccess,
    /// Where dead letters are moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_table: Option<String>,
    /// `"drop"`: no `dead_letter_table`, dead letters are deleted, logged and counted.
    /// One of the two is required, so that losing dead letters is a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<DropDeadLetters>,
}

/// `payload_type` of a declared table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadType {
    /// The bytes as they are.
    Bytea,
    /// UTF-8 text.
    Text,
    /// JSON.
    Jsonb,
}

/// `on_success`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSuccess {
    /// Delete the row.
    #[default]
    Delete,
    /// Keep it with `done_at` set.
    Mark,
}

/// `dead_letters` of a `postgres` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DropDeadLetters {
    /// Delete, log and count them.
    Drop,
}

fn default_batch_size() -> usize {
    100
}
fn default_lease() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_poll_interval() -> Dur {
    Dur(Duration::from_secs(5))
}

/// PostgreSQL's longest identifier, in bytes.
const MAX_IDENTIFIER: usize = 63;
/// The longest suffix `declare` appends to the table's name (`_ferry_notify`).
const DECLARED_SUFFIX: usize = 13;

debug_redacted!(PostgresSourceConfig);

impl PostgresSourceConfig {
    /// The section as `ferry validate` shows it: the URL's password and query values
    /// replaced.
    pub(super) fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.url = ferry_core::redact::url(&c.url);
        c
    }

    /// Checks every key, pushing errors at their key paths under `at`.
    pub(super) fn check(&self, at: &str, errors: &mut Vec<ConfigError>) {
        let mut push = |key: &str, what: String| {
            let place = if key.is_empty() {
                at.to_owned()
            } else {
                format!("{at}.{key}")
            };
            errors.push(ConfigError::new(place, what));
        };
        match url::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "postgres" | "postgresql") => {
                let tls = url
                    .query_pairs()
                    .find(|(k, _)| k == "sslmode")
                    .map(|(_, v)| v);
                if let Some(mode @ ("require" | "verify-ca" | "verify-full")) = tls.as_deref() {
                    push(
                        "url",
                        format!(
                            "sslmode={mode}: ferry's postgres source does not speak TLS; use \
                             sslmode=disable on a trusted network, or reach the server through \
                             a TLS proxy (pgbouncer, stunnel) on localhost"
                        ),
                    );
                }
            }
            Ok(url) => push(
                "url",
                format!("scheme {:?} is not postgres or postgresql", url.scheme()),
            ),
            Err(e) => push("url", e.to_string()),
        }
        let suffix = if self.declare { DECLARED_SUFFIX } else { 0 };
        if let Some(what) = table_name_problem(&self.table, suffix) {
            push("table", what);
        }
        if let Some((key, what)) = super::dead_letter_choice(
            "dead_letter_table",
            self.dead_letter_table.is_some(),
            "drop",
            "drop",
            self.dead_letters.is_some(),
        ) {
            push(key, what);
        } else if let Some(dead) = &self.dead_letter_table {
            if let Some(what) = table_name_problem(dead, 0) {
                push("dead_letter_table", what);
            } else if same_table(dead, &self.table) {
                push(
                    "dead_letter_table",
                    "is the source table: dead letters would be delivered again".to_owned(),
                );
            }
        }
        if self.payload_type.is_some() && !self.declare {
            push(
                "payload_type",
                "only applies with declare = true (an existing table's type is read from it)"
                    .to_owned(),
            );
        }
        if !(1..=1000).contains(&self.batch_size) {
            push(
                "batch_size",
                format!("{} is out of range 1..=1000", self.batch_size),
            );
        }
        if self.lease.0 < Duration::from_secs(1) || self.lease.0 > Duration::from_secs(43_200) {
            push("lease", "must be between 1s and 12h".to_owned());
        }
        if self.poll_interval.0 < Duration::from_millis(10)
            || self.poll_interval.0 > Duration::from_secs(3600)
        {
            push("poll_interval", "must be between 10ms and 1h".to_owned());
        }
        if let Some(channel) = &self.notify_channel {
            if channel.is_empty() || channel.len() > MAX_IDENTIFIER || channel.contains('\0') {
                push(
                    "notify_channel",
                    format!("must be 1 to {MAX_IDENTIFIER} bytes"),
                );
            }
        }
        if self.notify_channel.is_none() && self.table.len() > MAX_IDENTIFIER {
            push(
                "notify_channel",
                format!("the table's name is longer than a channel may be ({MAX_IDENTIFIER} bytes): name a channel"),
            );
        }
    }

    /// The validated source.
    #[cfg(feature = "postgres")]
    pub(super) fn plan(&self, ordering: Option<super::Ordering>) -> ferry_postgres::PostgresConfig {
        ferry_postgres::PostgresConfig {
            url: self.url.clone(),
            table: self.table.clone(),
            declare: self.declare,
            payload_type: match self.payload_type {
                None | Some(PayloadType::Bytea) => ferry_postgres::PayloadType::Bytea,
                Some(PayloadType::Text) => ferry_postgres::PayloadType::Text,
                Some(PayloadType::Jsonb) => ferry_postgres::PayloadType::Jsonb,
            },
            batch_size: self.batch_size,
            lease: self.lease.0,
            poll_interval: self.poll_interval.0,
            notify_channel: self
                .notify_channel
                .clone()
                .unwrap_or_else(|| self.table.clone()),
            on_success: match self.on_success {
                OnSuccess::Delete => ferry_postgres::OnSuccess::Delete,
                OnSuccess::Mark => ferry_postgres::OnSuccess::Mark,
            },
            dead_letters: match &self.dead_letter_table {
                Some(table) => ferry_postgres::DeadLetters::Table(table.clone()),
                None => ferry_postgres::DeadLetters::Drop,
            },
            ordered: ordering == Some(super::Ordering::Key),
        }
    }
}

/// What is wrong with a table name (`name` or `schema.name`), if anything; `suffix`
/// bytes must still fit after the name (the objects `declare` names after it).
fn table_name_problem(name: &str, suffix: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Some(format!(
            "{name:?} is not a table name (`name` or `schema.name`)"
        ));
    }
    if name.contains('\0') {
        return Some("holds a NUL character".to_owned());
    }
    let longest = MAX_IDENTIFIER - suffix;
    if parts.iter().any(|p| p.len() > longest) {
        return Some(format!(
            "a name is longer than {longest} bytes{}",
            if suffix > 0 {
                " (declare = true names the index and trigger after it)"
            } else {
                ""
            }
        ));
    }
    None
}

/// Whether two configured names are the same table (`outbox` and `public.outbox` are
/// taken to be, on the default search path).
fn same_table(a: &str, b: &str) -> bool {
    let bare = |n: &str| n.strip_prefix("public.").unwrap_or(n).to_owned();
    bare(a) == bare(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> PostgresSourceConfig {
        toml::from_str(text).expect("parses")
    }

    fn errors(text: &str) -> Vec<String> {
        let mut errors = Vec::new();
        section(text).check("routes.r.source", &mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_good_section_passes_and_hides_its_password() {
        let text = "url = \"postgres://ferry:s3cret@db/app\"\ntable = \"app.outbox\"\ndead_letter_table = \"app.outbox_dead\"\n";
        assert_eq!(errors(text), Vec::<String>::new());
        let shown = format!("{:?}", section(text));
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn mistakes_are_named_by_key() {
        let got = errors(
            "url = \"mysql://db/app?sslmode=require\"\ntable = \"a.b.c\"\nbatch_size = 0\nlease = \"100ms\"\npayload_type = \"text\"\n",
        );
        for want in [
            "routes.r.source.url: scheme \"mysql\"",
            "routes.r.source.table: \"a.b.c\" is not a table name",
            "routes.r.source: no dead-letter destination",
            "routes.r.source.payload_type: only applies with declare = true",
            "routes.r.source.batch_size: 0 is out of range",
            "routes.r.source.lease: must be between",
        ] {
            assert!(
                got.iter().any(|e| e.starts_with(want)),
                "{want} not in {got:?}"
            );
        }
        let tls = errors("url = \"postgres://db/app?sslmode=verify-full\"\ntable = \"t\"\ndead_letters = \"drop\"\n");
        assert!(tls[0].contains("does not speak TLS"), "{tls:?}");
        let same = errors(
            "url = \"postgres://db/app\"\ntable = \"t\"\ndead_letter_table = \"public.t\"\n",
        );
        assert!(same[0].contains("is the source table"), "{same:?}");
    }
}

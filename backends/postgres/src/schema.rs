//! The tables as SQL: quoted names, what `declare = true` creates, and the statements the
//! source runs. Pure text, so that the README's DDL can be checked against it.

use crate::{DeadLetters, OnSuccess, PayloadType, PostgresConfig};

/// A table name as configured (`outbox` or `schema.outbox`), with its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Name {
    schema: Option<String>,
    name: String,
}

/// `name` as a quoted SQL identifier: always quoted, so that any name (`order`, `User`,
/// one with a dot or a space) means exactly what was configured.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as an SQL string literal (standard conforming strings: only `'` is special).
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl Name {
    /// Splits `schema.table` at its first dot; a name without one is found on the
    /// `search_path`.
    pub(crate) fn parse(configured: &str) -> Self {
        match configured.split_once('.') {
            Some((schema, name)) => Self {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            },
            None => Self {
                schema: None,
                name: configured.to_owned(),
            },
        }
    }

    /// The quoted, qualified name.
    pub(crate) fn sql(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", ident(schema), ident(&self.name)),
            None => ident(&self.name),
        }
    }

    /// An object beside the table (index, function), `<table>_<suffix>`, in its schema.
    pub(crate) fn sibling(&self, suffix: &str) -> Name {
        Name {
            schema: self.schema.clone(),
            name: format!("{}_{suffix}", self.name),
        }
    }

    /// The unqualified quoted name (indexes and triggers live in the table's schema).
    pub(crate) fn bare(&self) -> String {
        ident(&self.name)
    }
}

impl PayloadType {
    /// The column type.
    pub fn sql(self) -> &'static str {
        match self {
            PayloadType::Bytea => "bytea",
            PayloadType::Text => "text",
            PayloadType::Jsonb => "jsonb",
        }
    }

    /// The column type named by `format_type`, if ferry can read it.
    pub(crate) fn of(format_type: &str) -> Option<Self> {
        match format_type {
            "bytea" => Some(PayloadType::Bytea),
            "jsonb" | "json" => Some(PayloadType::Jsonb),
            t if t == "text" || t.starts_with("character varying") => Some(PayloadType::Text),
            _ => None,
        }
    }

    /// How the claim reads the payload: as bytes whatever the column holds.
    fn select(self) -> &'static str {
        match self {
            PayloadType::Bytea => "t.payload",
            PayloadType::Text | PayloadType::Jsonb => "convert_to(t.payload::text, 'UTF8')",
        }
    }
}

/// The columns the source table must have, and those of the dead-letter table.
pub(crate) const COLUMNS: [&str; 9] = [
    "id",
    "payload",
    "headers",
    "key",
    "created_at",
    "attempts",
    "next_attempt_at",
    "locked_until",
    "locked_by",
];

/// Besides [`COLUMNS`], with `on_success = "mark"`.
pub(crate) const DONE_AT: &str = "done_at";

/// The columns of the dead-letter table.
pub(crate) const DEAD_LETTER_COLUMNS: [&str; 10] = [
    "id",
    "payload",
    "headers",
    "key",
    "created_at",
    "attempts",
    "reason",
    "last_status",
    "route",
    "failed_at",
];

/// What `declare = true` creates, each statement idempotent: the table, the index the
/// claim reads, the index key order needs (`ordering = "key"`), the function and trigger
/// that notify the channel on every insert statement, and the dead-letter table. The
/// payload column of the dead-letter table has the source's type.
pub fn ddl(config: &PostgresConfig, payload: PayloadType) -> String {
    let table = Name::parse(&config.table);
    let t = table.sql();
    let pending = match config.on_success {
        OnSuccess::Delete => "",
        OnSuccess::Mark => " WHERE done_at IS NULL",
    };
    let function = table.sibling("ferry_notify");
    let trigger = function.bare();
    let mut out = format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    id              bigserial PRIMARY KEY,
    payload         {payload} NOT NULL,
    headers         jsonb NOT NULL DEFAULT '{{}}',
    key             text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    locked_by       text,
    done_at         timestamptz
);
CREATE INDEX IF NOT EXISTS {ready} ON {t} (next_attempt_at, id){pending};
",
        payload = payload.sql(),
        ready = table.sibling("ready").bare(),
    );
    if config.ordered {
        let and_pending = match config.on_success {
            OnSuccess::Delete => "",
            OnSuccess::Mark => " AND done_at IS NULL",
        };
        out.push_str(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {t} (key, id) WHERE key IS NOT NULL{and_pending};\n",
            table.sibling("key").bare()
        ));
    }
    out.push_str(&format!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $ferry$
BEGIN
    PERFORM pg_notify({channel}, '');
    RETURN NULL;
END
$ferry$;
DO $ferry$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = {regclass}::regclass AND tgname = {trigger_name}) THEN
        CREATE TRIGGER {trigger} AFTER INSERT ON {t}
            FOR EACH STATEMENT EXECUTE FUNCTION {f}();
    END IF;
END
$ferry$;
",
        f = function.sql(),
        channel = literal(&config.notify_channel),
        regclass = literal(&t),
        trigger_name = literal(&function.name),
    ));
    if let DeadLetters::Table(dead) = &config.dead_letters {
        out.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
    id          bigint NOT NULL,
    payload     {} NOT NULL,
    headers     jsonb,
    key         text,
    created_at  timestamptz,
    attempts    integer NOT NULL,
    reason      text NOT NULL,
    last_status text NOT NULL,
    route       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now()
);
",
            Name::parse(dead).sql(),
            payload.sql()
        ));
    }
    out
}

/// The statements the source runs, prepared on each connection (public for benchmarks
/// that drain the table the way the source does).
#[derive(Debug, Clone)]
pub struct Sql {
    /// `$1` rows at most, leased for `$2` ms to `$3`; returns id, payload (bytes),
    /// headers (text), key, created_at and attempts.
    pub claim: String,
    /// `$1` ids delivered: deleted or marked done.
    pub done: String,
    /// `$1` ids, `$2` their claims' attempts, `$3` delays in ms; `$4` the claimer.
    pub retry: String,
    /// `$1` ids, `$2` attempts; `$3` the claimer. Gives the attempt back.
    pub release: String,
    /// `$1` ids, `$2` attempts, `$3` attempts made, `$4` reasons, `$5` last statuses;
    /// `$6` the claimer, `$7` the route (only with a dead-letter table). Moves rows to the
    /// dead-letter table, or deletes them when dead letters are dropped; returns the ids.
    pub dead_letter: String,
    /// `$1` ids, `$2` attempts, `$3` the lease in ms, `$4` the claimer; returns the ids
    /// extended.
    pub renew: String,
    /// Rows ready now (the backlog gauge).
    pub backlog: String,
    /// Seconds until the next row waiting for a retry is due, if any.
    pub next_due: String,
}

impl Sql {
    /// The statements for this table, its payload read as `payload`.
    pub fn new(config: &PostgresConfig, payload: PayloadType) -> Self {
        let t = Name::parse(&config.table).sql();
        let (pending, pending_p) = match config.on_success {
            OnSuccess::Delete => ("", ""),
            OnSuccess::Mark => (" AND done_at IS NULL", " AND p.done_at IS NULL"),
        };
        // Key order: a row is claimed only when no earlier row of its key is still
        // there (claimed, waiting for a retry, or not yet claimed), so one key never
        // has two rows out at once, across every replica.
        let ordered = if config.ordered {
            format!(
                "\n      AND (o.key IS NULL OR NOT EXISTS (SELECT 1 FROM {t} p WHERE p.key = o.key AND p.id < o.id{pending_p}))"
            )
        } else {
            String::new()
        };
        let claim = format!(
            "WITH ready AS (
    SELECT o.id FROM {t} o
    WHERE o.next_attempt_at <= now() AND (o.locked_until IS NULL OR o.locked_until < now()){pending}{ordered}
    ORDER BY o.id LIMIT $1 FOR UPDATE SKIP LOCKED)
UPDATE {t} t SET attempts = t.attempts + 1,
    locked_until = now() + $2::float8 * interval '1 millisecond', locked_by = $3::text
FROM ready WHERE t.id = ready.id
RETURNING t.id::int8, {payload}, t.headers::text, t.key::text, t.created_at::timestamptz, t.attempts::int4",
            payload = payload.select(),
        );
        let done = match config.on_success {
            OnSuccess::Delete => format!("DELETE FROM {t} WHERE id = ANY($1::int8[])"),
            OnSuccess::Mark => format!(
                "UPDATE {t} SET done_at = now(), locked_until = NULL WHERE id = ANY($1::int8[])"
            ),
        };
        let mine = "t.id = u.id AND t.attempts = u.attempts AND t.locked_by = $";
        let retry = format!(
            "UPDATE {t} t SET next_attempt_at = now() + u.delay * interval '1 millisecond',
    locked_until = NULL, locked_by = NULL
FROM unnest($1::int8[], $2::int4[], $3::float8[]) AS u(id, attempts, delay)
WHERE {mine}4::text"
        );
        let release = format!(
            "UPDATE {t} t SET locked_until = NULL, locked_by = NULL, attempts = greatest(t.attempts - 1, 0)
FROM unnest($1::int8[], $2::int4[]) AS u(id, attempts)
WHERE {mine}3::text"
        );
        let delete = format!(
            "DELETE FROM {t} t
    USING unnest($1::int8[], $2::int4[], $3::int4[], $4::text[], $5::text[])
        AS u(id, attempts, made, reason, last_status)
    WHERE {mine}6::text"
        );
        let dead_letter = match &config.dead_letters {
            DeadLetters::Table(dead) => format!(
                "WITH moved AS (
    {delete}
    RETURNING t.id, t.payload, t.headers, t.key, t.created_at, u.made, u.reason, u.last_status)
INSERT INTO {dead} (id, payload, headers, key, created_at, attempts, reason, last_status, route, failed_at)
SELECT id, payload, headers, key, created_at, made, reason, last_status, $7::text, now() FROM moved
RETURNING id::int8",
                dead = Name::parse(dead).sql()
            ),
            DeadLetters::Drop => format!("{delete}\nRETURNING t.id::int8"),
        };
        let renew = format!(
            "UPDATE {t} t SET locked_until = now() + $3::float8 * interval '1 millisecond'
FROM unnest($1::int8[], $2::int4[]) AS u(id, attempts)
WHERE {mine}4::text
RETURNING t.id::int8"
        );
        let backlog = format!(
            "SELECT count(*)::int8 FROM {t}
WHERE next_attempt_at <= now() AND (locked_until IS NULL OR locked_until < now()){pending}"
        );
        let next_due = format!(
            "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8 FROM {t}
WHERE next_attempt_at > now(){pending}"
        );
        Self {
            claim,
            done,
            retry,
            release,
            dead_letter,
            renew,
            backlog,
            next_due,
        }
    }

    /// Every statement, with what it is for (start errors name it).
    pub(crate) fn all(&self) -> [(&'static str, &str); 8] {
        [
            ("claim", &self.claim),
            ("settle", &self.done),
            ("retry", &self.retry),
            ("release", &self.release),
            ("dead letter", &self.dead_letter),
            ("renew", &self.renew),
            ("backlog", &self.backlog),
            ("next due", &self.next_due),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn example() -> PostgresConfig {
        PostgresConfig {
            url: "postgres://ferry@127.0.0.1/app".into(),
            table: "outbox".into(),
            declare: true,
            payload_type: PayloadType::Bytea,
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(5),
            notify_channel: "outbox".into(),
            on_success: OnSuccess::Delete,
            dead_letters: DeadLetters::Table("outbox_dead_letter".into()),
            ordered: false,
        }
    }

    #[test]
    fn names_are_quoted_and_qualified() {
        assert_eq!(Name::parse("outbox").sql(), "\"outbox\"");
        assert_eq!(Name::parse("app.outbox").sql(), "\"app\".\"outbox\"");
        assert_eq!(
            Name::parse("app.outbox").sibling("ready").sql(),
            "\"app\".\"outbox_ready\""
        );
        assert_eq!(Name::parse("we\"ird").sql(), "\"we\"\"ird\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    /// The README shows exactly what `declare = true` runs for the example.
    #[test]
    fn the_readme_shows_the_ddl() {
        let readme = include_str!("../../../README.md");
        let ddl = ddl(&example(), PayloadType::Bytea);
        assert!(
            readme.contains(&ddl),
            "README.md must hold the DDL of the example as ddl() makes it:\n{ddl}"
        );
    }

    #[test]
    fn key_order_and_mark_change_the_claim() {
        let mut config = example();
        assert!(!Sql::new(&config, PayloadType::Bytea)
            .claim
            .contains("NOT EXISTS"));
        config.ordered = true;
        config.on_success = OnSuccess::Mark;
        let sql = Sql::new(&config, PayloadType::Text);
        assert!(sql.claim.contains("NOT EXISTS"));
        assert!(sql.claim.contains("done_at IS NULL"));
        assert!(sql.claim.contains("convert_to(t.payload::text"));
        assert!(sql.done.starts_with("UPDATE"));
        let ddl = ddl(&config, PayloadType::Text);
        assert!(ddl.contains("(key, id) WHERE key IS NOT NULL AND done_at IS NULL"));
        assert!(ddl.contains("payload         text NOT NULL"));
    }
}

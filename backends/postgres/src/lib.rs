//! The PostgreSQL source of ferry: a queue table, or the transactional outbox an
//! application writes in its own transactions.
//!
//! Rows are claimed with one statement (`UPDATE ... WHERE id IN (SELECT ... FOR UPDATE
//! SKIP LOCKED) RETURNING ...`) that counts the attempt and leases the row to this
//! process for `lease`: no transaction stays open while the endpoint answers, replicas
//! share the table without taking a row twice, and the rows of a replica that died come
//! back once their lease ends. Leases are renewed while a row is held. After the 2xx the
//! row is deleted (or marked done); a retry writes its time into the row, so it survives
//! a restart; a dead letter is moved to the dead-letter table in one statement. When the
//! table has no ready row, the source sleeps until a trigger's `NOTIFY`, the next retry's
//! time or a slow fallback poll. Lost connections are opened again with backoff.

mod check;
mod conn;
mod convert;
mod lease;
mod receive;
mod schema;
mod settle;

pub use schema::{ddl, Sql as Statements};

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Delivery, Source, SourceContext, SourceError};
use tokio::sync::{mpsc, Notify};
use tokio_postgres::NoTls;
use tracing::{info, warn};

use crate::conn::{describe, Conn};
use crate::schema::Sql;

/// The `[routes.x.source]` section of a `postgres` route, validated.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`; holds a secret, never logged.
    pub url: String,
    /// The table, `name` or `schema.name`.
    pub table: String,
    /// Create the table, its indexes, its `NOTIFY` trigger and the dead-letter table.
    pub declare: bool,
    /// The payload column's type when `declare` creates the table.
    pub payload_type: PayloadType,
    /// Rows claimed by one statement at most.
    pub batch_size: usize,
    /// How long a claimed row stays this process's; renewed while it is held.
    pub lease: Duration,
    /// The longest the source sleeps without looking at the table.
    pub poll_interval: Duration,
    /// The channel the insert trigger notifies.
    pub notify_channel: String,
    /// What becomes of a delivered row.
    pub on_success: OnSuccess,
    /// Where dead letters go.
    pub dead_letters: DeadLetters,
    /// `ordering = "key"`: never claim a row while an earlier row of its key is there.
    pub ordered: bool,
}

/// The payload column's type: ferry reads it as bytes, whichever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadType {
    /// `bytea`, the bytes as they are.
    Bytea,
    /// `text` (or `varchar`), as UTF-8.
    Text,
    /// `jsonb` (or `json`), as its JSON text.
    Jsonb,
}

/// What becomes of a row after its 2xx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSuccess {
    /// Deleted.
    Delete,
    /// Kept, with `done_at` set.
    Mark,
}

/// Where dead letters go: there is no default, so that dropping them is a choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetters {
    /// Moved to this table with the reason, in the statement that deletes them.
    Table(String),
    /// Deleted, logged and counted.
    Drop,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &ferry_core::redact::url(&self.url))
            .field("table", &self.table)
            .field("declare", &self.declare)
            .field("payload_type", &self.payload_type)
            .field("batch_size", &self.batch_size)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("notify_channel", &self.notify_channel)
            .field("on_success", &self.on_success)
            .field("dead_letters", &self.dead_letters)
            .field("ordered", &self.ordered)
            .finish()
    }
}

/// Why the source could not start; `Display` starts with the configuration key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The server could not be reached, or refused the login or the database.
    #[error("url: cannot connect to {url}: {detail}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// What went wrong.
        detail: String,
        /// The server answered and refused (a configuration mistake).
        refused: bool,
    },
    /// The table is missing, lacks a column, or may not be used.
    #[error("table: {table}: {detail}")]
    Table {
        /// The table as configured.
        table: String,
        /// What is wrong.
        detail: String,
    },
    /// The dead-letter table is missing, lacks a column, or may not be written.
    #[error("dead_letter_table: {table}: {detail}")]
    DeadLetterTable {
        /// The table as configured.
        table: String,
        /// What is wrong.
        detail: String,
    },
    /// `declare = true` could not create what it creates.
    #[error("declare: cannot create {table} and its trigger: {detail}")]
    Declare {
        /// The table as configured.
        table: String,
        /// What the server said.
        detail: String,
    },
}

impl PostgresError {
    /// True when the configuration is wrong rather than the server unreachable.
    pub fn is_config(&self) -> bool {
        match self {
            PostgresError::Connect { refused, .. } => *refused,
            PostgresError::Table { .. }
            | PostgresError::DeadLetterTable { .. }
            | PostgresError::Declare { .. } => true,
        }
    }
}

/// A checked PostgreSQL source; build it with [`PostgresSource::connect`].
pub struct PostgresSource {
    config: Arc<PostgresConfig>,
    client: tokio_postgres::Config,
    sql: Arc<Sql>,
    table: Arc<str>,
}

impl PostgresSource {
    /// Connects, creates the tables when `declare` is set, and checks the table, its
    /// columns and privileges, the dead-letter table and every statement the source will
    /// run, so that a wrong name or a missing grant is reported at start.
    pub async fn connect(config: PostgresConfig) -> Result<Self, PostgresError> {
        let url = ferry_core::redact::url(&config.url);
        let mut client: tokio_postgres::Config =
            config.url.parse().map_err(|e| PostgresError::Connect {
                url: url.clone(),
                detail: format!("not a PostgreSQL URL: {}", describe(&e)),
                refused: true,
            })?;
        conn::tune(&mut client, "start");
        let (setup, connection) =
            client
                .connect(NoTls)
                .await
                .map_err(|e| PostgresError::Connect {
                    url: url.clone(),
                    detail: describe(&e),
                    // The server answered: wrong password, role or database.
                    refused: e.as_db_error().is_some(),
                })?;
        let driver = tokio::spawn(connection);
        let checked = check::run(&setup, &config).await;
        drop(setup);
        let _ = driver.await;
        let payload = checked?;
        Ok(Self {
            table: Arc::from(config.table.as_str()),
            sql: Arc::new(Sql::new(&config, payload)),
            client,
            config: Arc::new(config),
        })
    }
}

/// `locked_by` of this process's claims: the host and 64 random bits, so that it is
/// told apart from every other replica and from this host's earlier runs.
fn instance() -> Arc<str> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().chars().take(64).collect::<String>())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ferry".to_owned());
    Arc::from(format!("{host}/{:016x}", rand::random::<u64>()))
}

impl Source for PostgresSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn buffer(&self) -> usize {
        self.config.batch_size.max(1)
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let mut client = self.client.clone();
        conn::tune(&mut client, &ctx.route);
        let me = instance();
        let wake = Arc::new(Notify::new());
        let leases = Arc::new(settle::Leases::new(self.config.lease));
        let receiver_conn = Conn::new(
            client.clone(),
            self.sql.clone(),
            Some((&self.config.notify_channel, wake.clone())),
        );
        let settle_conn = Arc::new(Conn::new(client, self.sql.clone(), None));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let settler = tokio::spawn(
            settle::Settler {
                conn: settle_conn.clone(),
                leases: leases.clone(),
                me: me.clone(),
                ctx: ctx.clone(),
                wake: wake.clone(),
                ordered: self.config.ordered,
                dead_letter_table: match &self.config.dead_letters {
                    DeadLetters::Table(t) => Some(t.clone()),
                    DeadLetters::Drop => None,
                },
                failing: Default::default(),
            }
            .run(settle_rx),
        );
        let lease_stop = tokio_util::sync::CancellationToken::new();
        let lease_task = tokio::spawn(ferry_core::lease::keep_renewed(
            leases.clone(),
            lease::Renewal {
                conn: settle_conn.clone(),
                me: me.clone(),
                route: ctx.route.clone(),
                errors: ctx.counts.broker_errors.clone(),
            },
            lease_stop.clone(),
        ));
        let backlog = tokio::spawn(receive::poll_backlog(settle_conn, ctx.clone()));
        info!(route = %ctx.route, table = %self.table, claimer = %me,
            batch_size = self.config.batch_size, "receiving");
        receive::run(
            receive::Receiver {
                conn: receiver_conn,
                leases,
                settle: settle_tx,
                wake,
                table: self.table.clone(),
                me,
                batch_size: self.config.batch_size.max(1),
                lease: self.config.lease,
                poll_interval: self.config.poll_interval,
            },
            out,
            ctx.clone(),
        )
        .await;
        backlog.abort();
        // Every handle holds a sender of the settler: it ends once all have settled (or
        // were released by dropping) and their statements ran.
        if let Err(e) = settler.await {
            warn!(route = %ctx.route, error = %e, "settler task ended abnormally");
        }
        lease_stop.cancel();
        let _ = lease_task.await;
        ctx.set_connected(false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_shown() {
        let config = PostgresConfig {
            url: "postgres://ferry:s3cret@db/app".into(),
            table: "outbox".into(),
            declare: false,
            payload_type: PayloadType::Bytea,
            batch_size: 1,
            lease: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            notify_channel: "outbox".into(),
            on_success: OnSuccess::Delete,
            dead_letters: DeadLetters::Drop,
            ordered: false,
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret") && shown.contains("ferry:<redacted>@db"));
    }
}

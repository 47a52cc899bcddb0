//! PostgreSQL (the local server) in the conformance suite, and the table helpers the
//! `postgres_*` tests share. The bridge reaches the server through a [`Proxy`] so that
//! the suite can cut it off mid-stream; the tests' own connection goes straight to it.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::proxy::Proxy;

/// The local server, database `test`, trust authentication.
pub const ADDR: &str = "127.0.0.1:5432";

/// Rows one claim takes at most (`batch_size`): what a bridge may hold beyond its
/// requests in flight.
pub const BATCH: usize = 64;

/// `postgres://postgres@<addr>/test`
pub fn url(addr: &str) -> String {
    format!("postgres://postgres@{addr}/test")
}

/// A connection of the test's own to the local server.
pub async fn connect() -> Arc<Client> {
    let (client, connection) = tokio_postgres::connect(&url(ADDR), NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {ADDR} with database `test` ({e}); start it with \
                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` (and \
                 `createdb -U postgres test`), or run scripts/services.sh"
            )
        });
    tokio::spawn(connection);
    Arc::new(client)
}

/// The local server.
pub struct Postgres;

/// A fresh table and dead-letter table, made with the DDL `declare = true` runs.
pub struct PgTable {
    /// The test's connection.
    pub client: Arc<Client>,
    /// The table.
    pub name: String,
    /// Its dead-letter table.
    pub dead: String,
    /// What the bridge connects through.
    pub proxy: Proxy,
    /// More `[routes.r.source]` lines.
    pub extra: String,
    /// `batch_size` of the bridge ([`BATCH`] unless a test sets it).
    pub batch_size: usize,
}

/// A table name no other test uses (a valid identifier: `unique` with `_` for `-`).
pub fn table_name(prefix: &str) -> String {
    crate::unique(prefix).replace('-', "_")
}

impl PgTable {
    /// Creates the tables; `ordered` adds the key index `ordering = "key"` uses.
    pub async fn create(prefix: &str, ordered: bool) -> Self {
        let client = connect().await;
        let name = table_name(prefix);
        let dead = format!("{name}_dead");
        let config = ferry_postgres::PostgresConfig {
            url: url(ADDR),
            table: name.clone(),
            declare: true,
            payload_type: ferry_postgres::PayloadType::Bytea,
            batch_size: BATCH,
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_secs(5),
            notify_channel: name.clone(),
            on_success: ferry_postgres::OnSuccess::Delete,
            dead_letters: ferry_postgres::DeadLetters::Table(dead.clone()),
            ordered,
        };
        let ddl = ferry_postgres::ddl(&config, ferry_postgres::PayloadType::Bytea);
        client.batch_execute(&ddl).await.expect("create the tables");
        Self {
            client,
            name,
            dead,
            proxy: Proxy::start(ADDR).await,
            extra: String::new(),
            batch_size: BATCH,
        }
    }

    /// The `[routes.r.source]` body of a bridge on this table, through the proxy.
    pub fn source(&self) -> String {
        format!(
            "type = \"postgres\"\nurl = \"{}\"\ntable = \"{}\"\ndead_letter_table = \"{}\"\n\
             batch_size = {}\nlease = \"10s\"\n{}\n",
            url(&self.proxy.addr().to_string()),
            self.name,
            self.dead,
            self.batch_size,
            self.extra
        )
    }

    /// Inserts the messages, in order, in one statement (one transaction).
    pub async fn insert(&self, messages: &[Outgoing]) {
        let bodies: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| m.body.clone().into_bytes())
            .collect();
        let keys: Vec<Option<String>> = messages.iter().map(|m| m.key.clone()).collect();
        self.client
            .execute(
                &format!(
                    "INSERT INTO \"{}\" (payload, key) SELECT * FROM unnest($1::bytea[], $2::text[])",
                    self.name
                ),
                &[&bodies, &keys],
            )
            .await
            .expect("insert rows");
    }

    /// One number from `sql` (a `count(*)`, say), with `{t}` standing for the table.
    pub async fn count(&self, sql: &str) -> u64 {
        let sql = sql.replace("{t}", &format!("\"{}\"", self.name));
        let n: i64 = self
            .client
            .query_one(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0);
        u64::try_from(n).unwrap_or(0)
    }

    /// Rows a claim could take now.
    pub async fn ready_rows(&self) -> u64 {
        self.count(
            "SELECT count(*) FROM {t} WHERE next_attempt_at <= now() \
             AND (locked_until IS NULL OR locked_until < now())",
        )
        .await
    }
}

impl Backend for Postgres {
    type Queue = PgTable;
    /// The row counts its claims (`attempts`).
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, ordered: bool) -> PgTable {
        PgTable::create("conf", ordered).await
    }
}

impl TestQueue for PgTable {
    fn bridge(&self) -> Bridge {
        Bridge::Ferry {
            source: self.source(),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        self.insert(messages).await;
    }

    async fn ready(&self) -> u64 {
        self.ready_rows().await
    }

    async fn remaining(&self) -> u64 {
        self.count("SELECT count(*) FROM {t}").await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        self.client
            .query(
                &format!(
                    "DELETE FROM \"{}\" RETURNING convert_from(payload, 'UTF8'), reason",
                    self.dead
                ),
                &[],
            )
            .await
            .expect("take dead letters")
            .iter()
            .map(|row| DeadLettered {
                body: row.get(0),
                reason: row.get(1),
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy.cut(down).await;
    }

    fn max_unacked(&self, settings: &Settings) -> usize {
        // In flight, plus a claim's worth waiting for a slot.
        settings.concurrency + BATCH
    }
}

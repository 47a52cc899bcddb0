//! PostgreSQL: a native drain (the claim statement ferry runs, then one `DELETE` of the
//! claimed ids, in a tight loop on one connection, no HTTP) against ferry end to end into
//! the counting sink, for each `concurrency` × endpoint latency asked for.
//!
//! Each phase gets a fresh table filled with all its rows first (one `INSERT ... SELECT`),
//! so both sides drain the same full table; the clock runs from the first row claimed (or
//! delivered) to the last.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, NoTls};

use crate::latency::{Pace, Percentiles};
use crate::sweep::{measure_ferry, sweep, Case, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, Args};

/// Rows one claim takes, for the native drain and ferry (`batch_size`) alike.
const BATCH: usize = 100;

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let (client, connection) = tokio_postgres::connect(&args.pg_url, NoTls)
        .await
        .with_context(|| format!("PostgreSQL not reachable at {}", args.pg_url))?;
    tokio::spawn(connection);
    sweep(args, &Postgres { client }).await
}

struct Postgres {
    client: Client,
}

/// The source's configuration for a bench table.
fn config(args: &Args, table: &str) -> ferry_postgres::PostgresConfig {
    ferry_postgres::PostgresConfig {
        url: args.pg_url.clone(),
        table: table.to_owned(),
        declare: true,
        payload_type: ferry_postgres::PayloadType::Bytea,
        batch_size: BATCH,
        lease: Duration::from_secs(30),
        poll_interval: Duration::from_secs(5),
        notify_channel: table.to_owned(),
        on_success: ferry_postgres::OnSuccess::Delete,
        dead_letters: ferry_postgres::DeadLetters::Drop,
        ordered: false,
    }
}

impl Phases for Postgres {
    fn title(&self, args: &Args) -> String {
        format!(
            "PostgreSQL, {} rows per phase, batch {BATCH}, {} round(s)",
            args.messages(),
            args.rounds()
        )
    }

    async fn native(&self, args: &Args, size: usize, _which: usize) -> Result<f64> {
        let table = self.filled(args, size, "bench_native").await?;
        let sql = ferry_postgres::Statements::new(
            &config(args, &table),
            ferry_postgres::PayloadType::Bytea,
        );
        let claim = self.client.prepare(&sql.claim).await?;
        let delete = self.client.prepare(&sql.done).await?;
        let (limit, lease_ms, me) = (BATCH as i64, 30_000.0f64, "bench");
        let mut started = None;
        let mut drained = 0u64;
        while drained < args.messages() {
            let rows = self.client.query(&claim, &[&limit, &lease_ms, &me]).await?;
            started.get_or_insert_with(Instant::now);
            if rows.is_empty() {
                bail!("the table ran dry after {drained} rows");
            }
            let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            self.client.execute(&delete, &[&ids]).await?;
            drained += ids.len() as u64;
        }
        let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        self.drop_table(&table).await?;
        Ok(secs)
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        let table = self.filled(args, case.size, "bench_ferry").await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let sink = counting_sink(delivered.clone(), case.latency()).await?;
        let source = format!(
            "type = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\nbatch_size = {BATCH}\ndead_letters = \"drop\"\n",
            args.pg_url
        );
        let (child, pid) = spawn_ferry(args, &source, sink, case.setting)?;
        let run = measure_ferry(child, pid, delivered, args.messages()).await?;
        self.drop_table(&table).await?;
        Ok(run)
    }

    /// Paced phases measure a broker's push latency; here that is the NOTIFY wake-up,
    /// which `tests/tests/postgres_notify.rs` measures.
    fn paced(&self) -> bool {
        false
    }

    async fn native_paced(&self, _args: &Args, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phase on PostgreSQL")
    }

    async fn ferry_paced(&self, _args: &Args, _case: &Case, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phase on PostgreSQL")
    }
}

impl Postgres {
    /// A fresh table, made as `declare = true` makes it, holding every row of a phase.
    async fn filled(&self, args: &Args, size: usize, prefix: &str) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        let table = format!("{prefix}_{}_{now}", std::process::id());
        let ddl = ferry_postgres::ddl(&config(args, &table), ferry_postgres::PayloadType::Bytea);
        self.client.batch_execute(&ddl).await?;
        let rows = i64::try_from(args.messages())?;
        let size = i32::try_from(size)?;
        self.client
            .execute(
                &format!(
                    "INSERT INTO \"{table}\" (payload) \
                     SELECT convert_to(repeat('x', $2::int4), 'UTF8') FROM generate_series(1, $1::int8)"
                ),
                &[&rows, &size],
            )
            .await?;
        self.client
            .batch_execute(&format!("VACUUM ANALYZE \"{table}\""))
            .await?;
        Ok(table)
    }

    async fn drop_table(&self, table: &str) -> Result<()> {
        self.client
            .batch_execute(&format!("DROP TABLE \"{table}\""))
            .await?;
        Ok(())
    }
}

//! Redis Streams: the native drain rate (one consumer of a group reading `XREADGROUP
//! COUNT 100` and acknowledging each batch with `XACK`, sent in the same pipeline as the
//! next read; no HTTP) against ferry end to end into the counting sink. Each phase gets a
//! fresh stream filled beforehand and deletes it afterwards. There are no paced phases.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use crate::latency::{Pace, Percentiles};
use crate::sweep::{measure_ferry, sweep, Case, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, unique, Args};

/// Entries per read, for the native consumer and ferry (`batch_size`) alike.
const COUNT: usize = 100;

const GROUP: &str = "bench";

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let client = redis::Client::open(args.redis_url.as_str())?;
    let con = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis at {} (start it with redis-server)", args.redis_url))?;
    sweep(
        args,
        &Redis {
            con,
            url: args.redis_url.clone(),
        },
    )
    .await
}

struct Redis {
    con: MultiplexedConnection,
    url: String,
}

impl Redis {
    /// A fresh stream holding `args.messages()` entries of `size` bytes, with the group
    /// at its start.
    async fn filled(&self, prefix: &str, args: &Args, size: usize) -> Result<String> {
        let stream = unique(prefix);
        let mut con = self.con.clone();
        let body = vec![b'x'; size];
        let mut left = args.messages();
        while left > 0 {
            let n = left.min(1_000);
            let mut pipe = redis::pipe();
            for _ in 0..n {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("body")
                    .arg(&body)
                    .ignore();
            }
            pipe.query_async::<()>(&mut con).await?;
            left -= n;
        }
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .query_async::<()>(&mut con)
            .await?;
        Ok(stream)
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        redis::cmd("DEL")
            .arg(stream)
            .query_async::<()>(&mut self.con.clone())
            .await?;
        Ok(())
    }
}

impl Phases for Redis {
    fn title(&self, args: &Args) -> String {
        format!(
            "Redis Streams (local server, XREADGROUP COUNT {COUNT}), {} messages per phase, {} round(s)",
            args.messages(),
            args.rounds()
        )
    }

    async fn native(&self, args: &Args, size: usize, _which: usize) -> Result<f64> {
        let stream = self.filled("bench-native", args, size).await?;
        let mut con = self.con.clone();
        let started = Instant::now();
        let mut acked: Vec<String> = Vec::new();
        let mut count = 0u64;
        while count < args.messages() {
            let mut pipe = redis::pipe();
            if !acked.is_empty() {
                pipe.cmd("XACK")
                    .arg(&stream)
                    .arg(GROUP)
                    .arg(&acked)
                    .ignore();
            }
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg("native")
                .arg("COUNT")
                .arg(COUNT)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">");
            let (reply,): (Option<StreamReadReply>,) = pipe.query_async(&mut con).await?;
            acked = reply
                .map(|r| {
                    r.keys
                        .into_iter()
                        .flat_map(|k| k.ids)
                        .map(|e| e.id)
                        .collect()
                })
                .unwrap_or_default();
            if acked.is_empty() {
                bail!("the stream ran dry after {count} entries");
            }
            count += acked.len() as u64;
        }
        redis::cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(&acked)
            .query_async::<()>(&mut con)
            .await?;
        let secs = started.elapsed().as_secs_f64();
        self.delete(&stream).await?;
        Ok(secs)
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        let stream = self.filled("bench-ferry", args, case.size).await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let sink = counting_sink(delivered.clone(), case.latency()).await?;
        let source = format!(
            "type = \"redis\"\nurl = \"{}\"\nstream = \"{stream}\"\ngroup = \"{GROUP}\"\n\
             consumer = \"ferry\"\nbatch_size = {COUNT}\ndead_letters = \"drop\"\n",
            self.url
        );
        let (child, pid) = spawn_ferry(args, &source, sink, case.setting)?;
        let run = measure_ferry(child, pid, delivered, args.messages()).await?;
        self.delete(&stream).await?;
        Ok(run)
    }

    fn paced(&self) -> bool {
        false
    }

    async fn native_paced(&self, _args: &Args, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phases on Redis")
    }

    async fn ferry_paced(&self, _args: &Args, _case: &Case, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phases on Redis")
    }
}

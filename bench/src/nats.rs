//! NATS JetStream: the native drain rate (one durable pull consumer pulling batches of 100
//! and acknowledging each message, as ferry does; no HTTP) against ferry end to end into
//! the counting sink. Each phase gets a fresh stream filled beforehand and deletes it
//! afterwards. There are no paced phases.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, stream, Context};
use futures::StreamExt;

use crate::latency::{Pace, Percentiles};
use crate::sweep::{measure_ferry, sweep, Case, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, unique, Args};

/// Messages per pull, for the native consumer and ferry (`batch_size`) alike.
const BATCH: usize = 100;

const CONSUMER: &str = "bench";

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let client = async_nats::connect(args.nats_url.as_str())
        .await
        .with_context(|| format!("NATS at {} (start it with nats-server -js)", args.nats_url))?;
    sweep(
        args,
        &Nats {
            js: jetstream::new(client),
            url: args.nats_url.clone(),
        },
    )
    .await
}

struct Nats {
    js: Context,
    url: String,
}

impl Nats {
    /// A fresh stream holding `args.messages()` messages of `size` bytes, with the durable
    /// consumer at its start.
    async fn filled(&self, prefix: &str, args: &Args, size: usize) -> Result<String> {
        let name = unique(prefix);
        let stream = self
            .js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{name}.>")],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let body = bytes::Bytes::from(vec![b'x'; size]);
        let subject = format!("{name}.m");
        let mut left = args.messages();
        while left > 0 {
            let n = left.min(1_000);
            let mut acks = Vec::with_capacity(n as usize);
            for _ in 0..n {
                acks.push(self.js.publish(subject.clone(), body.clone()).await?);
            }
            for ack in acks {
                ack.await?;
            }
            left -= n;
        }
        stream
            .create_consumer(pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await?;
        Ok(name)
    }

    async fn delete(&self, stream: &str) -> Result<()> {
        self.js.delete_stream(stream).await?;
        Ok(())
    }
}

impl Phases for Nats {
    fn title(&self, args: &Args) -> String {
        format!(
            "NATS JetStream (local server, pull batches of {BATCH}), {} messages per phase, {} round(s)",
            args.messages(),
            args.rounds()
        )
    }

    async fn native(&self, args: &Args, size: usize, _which: usize) -> Result<f64> {
        let name = self.filled("bench-native", args, size).await?;
        let consumer: pull::Stream = {
            let stream = self.js.get_stream(&name).await?;
            let consumer: jetstream::consumer::PullConsumer =
                stream
                    .get_consumer(CONSUMER)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            consumer
                .stream()
                .max_messages_per_batch(BATCH)
                .messages()
                .await?
        };
        let mut messages = consumer;
        let started = Instant::now();
        let mut count = 0u64;
        while count < args.messages() {
            let Some(message) = messages.next().await else {
                bail!("the consumer ran dry after {count} messages");
            };
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            count += 1;
        }
        self.js.client().flush().await?;
        let secs = started.elapsed().as_secs_f64();
        drop(messages);
        self.delete(&name).await?;
        Ok(secs)
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        let name = self.filled("bench-ferry", args, case.size).await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let sink = counting_sink(delivered.clone(), case.latency()).await?;
        let source = format!(
            "type = \"nats\"\nurl = \"{}\"\nstream = \"{name}\"\nconsumer = \"{CONSUMER}\"\n\
             batch_size = {BATCH}\ndead_letters = \"term\"\n",
            self.url
        );
        let (child, pid) = spawn_ferry(args, &source, sink, case.setting)?;
        let run = measure_ferry(child, pid, delivered, args.messages()).await?;
        self.delete(&name).await?;
        Ok(run)
    }

    fn paced(&self) -> bool {
        false
    }

    async fn native_paced(&self, _args: &Args, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phases on NATS")
    }

    async fn ferry_paced(&self, _args: &Args, _case: &Case, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phases on NATS")
    }
}

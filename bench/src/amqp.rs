//! RabbitMQ: the broker's native drain rate (a consumer that only acks, one ack per
//! message, no HTTP) against ferry end to end into the counting sink, for each
//! `concurrency` × endpoint latency asked for.
//!
//! Each phase gets a fresh queue filled with all its messages first, so both sides
//! drain the same full queue; the clock runs from the first message consumed to the last.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::sweep::{measure_ferry, sweep, FerryRun, Phases};
use crate::{counting_sink, spawn_ferry, Args};

/// Runs every combination and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    let connection = Connection::connect(&args.amqp_uri, ConnectionProperties::default())
        .await
        .with_context(|| "RabbitMQ not reachable (is it running on 127.0.0.1:5672?)")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    sweep(
        args,
        &Rabbit {
            connection,
            channel,
        },
    )
    .await
}

struct Rabbit {
    connection: Connection,
    channel: Channel,
}

impl Phases for Rabbit {
    fn title(&self, args: &Args) -> String {
        format!(
            "RabbitMQ, {} messages of {} B per phase, prefetch {}, {} round(s)",
            args.messages(),
            args.size,
            args.prefetch,
            args.rounds
        )
    }

    async fn native(&self, args: &Args) -> Result<f64> {
        native_drain(&self.connection, &self.channel, args).await
    }

    async fn ferry(&self, args: &Args, concurrency: usize, latency_ms: u64) -> Result<FerryRun> {
        ferry_run(&self.channel, args, concurrency, latency_ms).await
    }
}

fn queue_name(prefix: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!("{prefix}-{}-{now}", std::process::id())
}

/// A fresh queue holding `messages` payloads of `size` bytes.
pub(crate) async fn filled_queue(channel: &Channel, args: &Args, prefix: &str) -> Result<String> {
    let name = queue_name(prefix);
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let payload = vec![b'x'; args.size];
    let mut confirms = Vec::new();
    for _ in 0..args.messages() {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    name.as_str().into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default(),
                )
                .await?,
        );
        if confirms.len() >= 5_000 {
            for c in confirms.drain(..) {
                c.await?;
            }
        }
    }
    for c in confirms {
        c.await?;
    }
    Ok(name)
}

/// Seconds a plain consumer takes to take and ack every message (one ack each).
async fn native_drain(connection: &Connection, publisher: &Channel, args: &Args) -> Result<f64> {
    let queue = filled_queue(publisher, args, "bench-native").await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "bench-native".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut started = None;
    let mut count = 0u64;
    while count < args.messages() {
        let delivery = consumer.next().await.context("consumer ended")??;
        started.get_or_insert_with(Instant::now);
        delivery.ack(BasicAckOptions::default()).await?;
        count += 1;
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    channel.close(200, "done".into()).await?;
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(secs)
}

async fn ferry_run(
    publisher: &Channel,
    args: &Args,
    concurrency: usize,
    latency_ms: u64,
) -> Result<FerryRun> {
    let queue = filled_queue(publisher, args, "bench-ferry").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let sink = counting_sink(delivered.clone(), Duration::from_millis(latency_ms)).await?;
    let source = format!(
        "type = \"amqp\"\nuri = \"{}\"\nqueue = \"{queue}\"\nprefetch = {}\n",
        args.amqp_uri, args.prefetch
    );
    let (child, pid) = spawn_ferry(args, &source, sink, concurrency)?;
    let run = measure_ferry(child, pid, delivered, args.messages()).await?;
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(run)
}

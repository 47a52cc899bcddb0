//! RabbitMQ: the broker's native drain rate against ferry end to end into the counting
//! sink, for each `concurrency` × endpoint latency asked for. Two plain consumers (no HTTP)
//! set the ceiling: one that acks every message without waiting for the ack to go out
//! (pipelined), and one that acks with `multiple` every `--ack-every` deliveries, the
//! fewest frames the broker can be drained with. Both may hold `--native-prefetch`
//! unacked, enough that the prefetch does not limit them. A third phase runs the bridge a
//! team would write by hand (`plain-bridge`): what ferry is for, measured the same way.
//!
//! Each phase gets a fresh queue filled with all its messages first, so both sides
//! drain the same full queue; the clock runs from the first message consumed to the last.
//! The paced (latency) phases start on an empty queue and publish as they go.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::latency::{paced, timing_sink, Pace, Percentiles, Recorder};
use crate::sweep::{measure_ferry, sweep, Case, FerryRun, Phases};
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
            "RabbitMQ, {} messages per phase, prefetch {} (plain consumers {}, multiple acks every {}), {} round(s)",
            args.messages(),
            args.prefetch,
            args.native_prefetch,
            args.ack_every,
            args.rounds()
        )
    }

    fn natives(&self) -> &'static [&'static str] {
        &["pipelined-ack drain", "multiple-ack drain"]
    }

    async fn native(&self, args: &Args, size: usize, which: usize) -> Result<f64> {
        let acks = match which {
            0 => Acks::EachPipelined,
            _ => Acks::Multiple(args.ack_every.max(1)),
        };
        native_drain(&self.connection, &self.channel, args, size, acks).await
    }

    async fn peer(&self, args: &Args, case: &Case) -> Result<Option<FerryRun>> {
        plain_bridge_run(&self.channel, args, case).await.map(Some)
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        ferry_run(&self.channel, args, case).await
    }

    async fn native_paced(&self, args: &Args, pace: Pace) -> Result<Percentiles> {
        let queue = empty_queue(&self.channel, "bench-native-paced").await?;
        let (channel, mut consumer) = native_consumer(
            &self.connection,
            args.prefetch,
            &queue,
            "bench-native-paced",
        )
        .await?;
        let recorder = Recorder::default();
        let consuming = {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                while let Some(delivery) = consumer.next().await {
                    let delivery = delivery?;
                    recorder.record(&delivery.data);
                    delivery.ack(BasicAckOptions::default()).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        };
        let result = self.publish_paced(&queue, pace, &recorder).await;
        // Every paced message has been recorded (or waited for): the consumer may go.
        consuming.abort();
        channel.close(200, "done".into()).await?;
        self.channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        result
    }

    async fn ferry_paced(&self, args: &Args, case: &Case, pace: Pace) -> Result<Percentiles> {
        let queue = empty_queue(&self.channel, "bench-ferry-paced").await?;
        let recorder = Recorder::default();
        let sink = timing_sink(recorder.clone(), case.latency()).await?;
        let (child, pid) = spawn_ferry(args, &source(args, &queue), sink, case.setting)?;
        let result = self.publish_paced(&queue, pace, &recorder).await;
        crate::stop_ferry(child, pid)?;
        self.channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        result
    }
}

impl Rabbit {
    /// Publishes a paced phase into `queue` on a channel of its own without publisher
    /// confirms, so that each publish leaves at once.
    async fn publish_paced(
        &self,
        queue: &str,
        pace: Pace,
        recorder: &Recorder,
    ) -> Result<Percentiles> {
        let channel = self.connection.create_channel().await?;
        let channel = &channel;
        let result = paced(pace, recorder, |payload| async move {
            channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default(),
                )
                .await?;
            Ok::<_, anyhow::Error>(())
        })
        .await;
        channel.close(200, "done".into()).await?;
        result
    }
}

/// ferry's source section for `queue`.
fn source(args: &Args, queue: &str) -> String {
    format!(
        "type = \"amqp\"\nuri = \"{}\"\nqueue = \"{queue}\"\nprefetch = {}\ndead_letters = \"drop\"\n",
        args.amqp_uri, args.prefetch
    )
}

fn queue_name(prefix: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!("{prefix}-{}-{now}", std::process::id())
}

/// A fresh, empty queue.
pub(crate) async fn empty_queue(channel: &Channel, prefix: &str) -> Result<String> {
    let name = queue_name(prefix);
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(name)
}

/// A fresh queue holding `messages` payloads of `size` bytes.
pub(crate) async fn filled_queue(
    channel: &Channel,
    messages: u64,
    size: usize,
    prefix: &str,
) -> Result<String> {
    let name = empty_queue(channel, prefix).await?;
    let payload = vec![b'x'; size];
    let mut confirms = Vec::new();
    for _ in 0..messages {
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

/// How a plain consumer acks.
#[derive(Clone, Copy)]
enum Acks {
    /// One `basic.ack` per message, sent without waiting for the previous one.
    EachPipelined,
    /// One `basic.ack` with `multiple` every this many deliveries (and one for the rest).
    Multiple(u64),
}

/// Seconds a plain consumer takes to take and ack every message.
async fn native_drain(
    connection: &Connection,
    publisher: &Channel,
    args: &Args,
    size: usize,
    acks: Acks,
) -> Result<f64> {
    let queue = filled_queue(publisher, args.messages(), size, "bench-native").await?;
    let (channel, mut consumer) =
        native_consumer(connection, args.native_prefetch, &queue, "bench-native").await?;
    let mut started = None;
    let mut count = 0u64;
    // Acks on their way: polled beside the consumer, never waited for one by one.
    let mut sending = FuturesUnordered::new();
    while count < args.messages() {
        let delivery = tokio::select! {
            biased;
            Some(sent) = sending.next(), if !sending.is_empty() => {
                sent?;
                continue;
            }
            delivery = consumer.next() => delivery.context("consumer ended")??,
        };
        started.get_or_insert_with(Instant::now);
        count += 1;
        match acks {
            // Acks of single tags may reach the broker in any order.
            Acks::EachPipelined => sending.push(async move {
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(anyhow::Error::from)
            }),
            // A `multiple` ack must not overtake the one before it (the broker refuses a
            // tag already covered), so each is sent in turn; one wait per `every`
            // deliveries, while the prefetch keeps the broker sending.
            Acks::Multiple(every) => {
                if count % every == 0 || count == args.messages() {
                    delivery
                        .acker
                        .ack(BasicAckOptions { multiple: true })
                        .await?;
                }
            }
        }
    }
    while let Some(sent) = sending.next().await {
        sent?;
    }
    let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    channel.close(200, "done".into()).await?;
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(secs)
}

/// The hand-written bridge (`plain-bridge`, next to this harness) on a filled queue into
/// the counting sink, measured as ferry is: from its first delivery, its own CPU and RSS.
async fn plain_bridge_run(publisher: &Channel, args: &Args, case: &Case) -> Result<FerryRun> {
    let queue = filled_queue(publisher, args.messages(), case.size, "bench-plain").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let sink = counting_sink(delivered.clone(), case.latency()).await?;
    let program = std::env::current_exe()?.with_file_name("plain-bridge");
    if !program.is_file() {
        anyhow::bail!(
            "{} not found: cargo build --release -p ferry-bench",
            program.display()
        );
    }
    let child = std::process::Command::new(&program)
        .args(["--amqp-uri", &args.amqp_uri, "--queue", &queue])
        .args(["--url", &format!("http://{sink}/bench")])
        .args(["--concurrency", &case.setting.slots().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    let run = measure_ferry(child, pid, delivered, args.messages()).await?;
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(run)
}

async fn ferry_run(publisher: &Channel, args: &Args, case: &Case) -> Result<FerryRun> {
    let queue = filled_queue(publisher, args.messages(), case.size, "bench-ferry").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let sink = counting_sink(delivered.clone(), case.latency()).await?;
    let (child, pid) = spawn_ferry(args, &source(args, &queue), sink, case.setting)?;
    let run = measure_ferry(child, pid, delivered, args.messages()).await?;
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(run)
}

/// A plain consumer on its own channel (returned to be closed after) with `prefetch`
/// unacked deliveries at most.
async fn native_consumer(
    connection: &Connection,
    prefetch: u16,
    queue: &str,
    tag: &str,
) -> Result<(Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

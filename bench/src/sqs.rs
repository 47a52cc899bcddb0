//! SQS on the local emulator: phases that publish while they drain, through the same
//! publisher and the same window of outstanding messages, because the emulator slows down
//! with queue depth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

use crate::latency::{Pace, Percentiles};
use crate::sweep::{finish_ferry, Case, FerryRun, Phases, Start};
use crate::{counting_sink, spawn_ferry, Args};

/// The emulator and a client for it.
pub struct Sqs {
    client: Client,
}

/// Runs the sweep against the emulator at `--endpoint`.
pub async fn run(args: &Args) -> Result<()> {
    let sqs = Sqs {
        client: client(&args.endpoint).await?,
    };
    crate::sweep::sweep(args, &sqs).await
}

impl Phases for Sqs {
    fn title(&self, args: &Args) -> String {
        format!(
            "SQS (emulator at {}), {} messages per phase, {} receivers, at most {} outstanding, {} round(s)",
            args.endpoint,
            args.messages(),
            args.receivers,
            args.window,
            args.rounds()
        )
    }

    /// `receivers` loops of `ReceiveMessage(10)` + `DeleteMessageBatch`, as ferry has.
    fn natives(&self) -> &'static [&'static str] {
        &["receive + delete-batch drain"]
    }

    async fn native(&self, args: &Args, size: usize, _which: usize) -> Result<f64> {
        native_drain(&self.client, args, size).await
    }

    async fn ferry(&self, args: &Args, case: &Case) -> Result<FerryRun> {
        ferry_run(&self.client, args, case).await
    }

    /// The emulator answers a long poll in tens of milliseconds at best, which is all a
    /// paced phase would measure; the latency ferry adds is measured on RabbitMQ and Kafka.
    fn paced(&self) -> bool {
        false
    }

    async fn native_paced(&self, _args: &Args, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phase on SQS")
    }

    async fn ferry_paced(&self, _args: &Args, _case: &Case, _pace: Pace) -> Result<Percentiles> {
        bail!("no paced phase on SQS")
    }
}

pub(crate) async fn client(endpoint: &str) -> Result<Client> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "ferry-bench",
        ))
        .load()
        .await;
    let client = Client::new(&config);
    client.list_queues().send().await.with_context(|| {
        format!("SQS endpoint {endpoint} not reachable (scripts/moto.sh starts it)")
    })?;
    Ok(client)
}

pub(crate) async fn create_queue(client: &Client, name: &str) -> Result<String> {
    let name = format!(
        "{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    client
        .create_queue()
        .queue_name(name)
        .send()
        .await?
        .queue_url
        .context("no queue url")
}

/// Publishes `args.messages()` of `size` bytes with at most `args.window` outstanding;
/// four tasks in parallel.
fn publish(
    client: Client,
    url: String,
    args: &Args,
    size: usize,
    consumed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Result<()>> {
    let total = args.messages();
    let window = args.window;
    tokio::spawn(async move {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (client, url, next, consumed) =
                (client.clone(), url.clone(), next.clone(), consumed.clone());
            tasks.spawn(async move {
                loop {
                    let start = next.fetch_add(10, Ordering::SeqCst);
                    if start >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    while start.saturating_sub(consumed.load(Ordering::SeqCst)) > window {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let entries = (start..(start + 10).min(total)).map(|i| {
                        let mut body = format!("{{\"seq\":{i},\"pad\":\"");
                        while body.len() < size - 2 {
                            body.push('x');
                        }
                        body.push_str("\"}");
                        SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(body)
                            .build()
                    });
                    client
                        .send_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries.collect::<Result<_, _>>()?))
                        .send()
                        .await?;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    })
}

/// A consumer on the same AWS SDK that only receives and deletes; seconds to drain.
async fn native_drain(client: &Client, args: &Args, size: usize) -> Result<f64> {
    let url = create_queue(client, "bench-native").await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let publisher = publish(client.clone(), url.clone(), args, size, consumed.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.receivers {
        let (client, url, consumed, total) = (
            client.clone(),
            url.clone(),
            consumed.clone(),
            args.messages(),
        );
        tasks.spawn(async move {
            let mut deletes = tokio::task::JoinSet::new();
            while consumed.load(Ordering::SeqCst) < total {
                let resp = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .send()
                    .await?;
                let messages = resp.messages.unwrap_or_default();
                if messages.is_empty() {
                    continue;
                }
                let entries = messages.iter().enumerate().filter_map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .set_receipt_handle(m.receipt_handle.clone())
                        .build()
                        .ok()
                });
                // Deletes run beside the next receive, as a good hand-written drainer does.
                let delete = client
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries.collect()));
                let (consumed, n) = (consumed.clone(), messages.len() as u64);
                deletes.spawn(async move {
                    delete.send().await?;
                    consumed.fetch_add(n, Ordering::SeqCst);
                    Ok::<_, anyhow::Error>(())
                });
                while let Some(r) = deletes.try_join_next() {
                    r??;
                }
            }
            while let Some(r) = deletes.join_next().await {
                r??;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let elapsed = started.elapsed();
    publisher.await??;
    Ok(elapsed.as_secs_f64())
}

/// The release ferry on a fresh queue into the counting sink, timed like the native drain
/// (from the first publish, once ferry is connected).
async fn ferry_run(client: &Client, args: &Args, case: &Case) -> Result<FerryRun> {
    let url = create_queue(client, "bench-ferry").await?;
    let consumed = Arc::new(AtomicU64::new(0));
    let sink = counting_sink(consumed.clone(), case.latency()).await?;
    let source = format!(
        "type = \"sqs\"\nqueue_url = \"{url}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\n\
         receivers = {}\nwait_time = \"1s\"\n",
        args.endpoint, args.receivers
    );
    let (child, pid) = spawn_ferry(args, &source, sink, case.setting)?;
    // Let it connect before the clock starts, like the native drainer's client.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Start::now(pid)?;
    let publisher = publish(client.clone(), url, args, case.size, consumed.clone());
    let run = finish_ferry(child, pid, &consumed, args.messages(), start).await?;
    publisher.await??;
    Ok(run)
}

//! The bridge a team would write by hand instead of running ferry, as the peer ferry's
//! figures are compared with: one lapin consumer with `prefetch = concurrency`, a task per
//! delivery that POSTs the body with reqwest and acks after a 2xx (nacks it back to the
//! queue otherwise). No batching of acks, no retries of its own, no metrics: the simplest
//! bridge that is correct (nothing acked before the endpoint took it).

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[derive(Parser)]
#[command(about = "A hand-written RabbitMQ → HTTP bridge, for comparison")]
struct Args {
    /// The RabbitMQ server.
    #[arg(long)]
    amqp_uri: String,
    /// The queue to drain.
    #[arg(long)]
    queue: String,
    /// Where each message is POSTed.
    #[arg(long)]
    url: String,
    /// Deliveries held (and so requests in flight) at most.
    #[arg(long, default_value_t = 64)]
    concurrency: u16,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let connection = Connection::connect(&args.amqp_uri, ConnectionProperties::default())
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(args.concurrency, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            args.queue.as_str().into(),
            "plain-bridge".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let http = reqwest::Client::new();
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let (http, url) = (http.clone(), args.url.clone());
        tokio::spawn(async move {
            let answer = http.post(&url).body(delivery.data.clone()).send().await;
            let accepted = matches!(answer, Ok(ref a) if a.status().is_success());
            let settled = if accepted {
                delivery.acker.ack(BasicAckOptions::default()).await
            } else {
                let back = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                delivery.acker.nack(back).await
            };
            if let Err(e) = settled {
                eprintln!("settling a delivery failed: {e}");
            }
        });
    }
    Ok(())
}

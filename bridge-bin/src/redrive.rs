//! `ferry redrive`: moves a route's dead letters back to its queue once the cause is
//! fixed, with a progress bar on a terminal and a count at the end.

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{RoutePlan, SourcePlan};

/// What to move.
pub struct Redrive {
    /// The dead-letter queue to move from, when not the route's own setting.
    pub from: Option<String>,
    /// Messages to move at most, if limited.
    pub max: Option<u64>,
    /// Only count what would move.
    pub dry_run: bool,
}

/// `(at most N)` when the move is limited.
fn limit(max: Option<u64>) -> String {
    max.map(|n| format!(" (at most {n})")).unwrap_or_default()
}

/// A progress bar over `total` messages; it draws only on a terminal.
fn bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} messages ({per_sec})") {
        bar.set_style(style);
    }
    bar
}

/// Prints what a dry run would move, or moves with a progress bar and prints the count.
/// `run(max, progress)` moves up to `max` and says how many moved and how many the broker
/// refused.
async fn dry_run_or_move<F, Fut>(
    ask: &Redrive,
    waiting: u64,
    from: &str,
    to: &str,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(u64, ProgressBar) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(u64, u64)>>,
{
    if ask.dry_run {
        println!(
            "dry run: {waiting} message(s) in {from} would move to {to}{}",
            limit(ask.max)
        );
        return Ok(());
    }
    let max = ask.max.unwrap_or(u64::MAX);
    let progress = bar(waiting.min(max));
    let (moved, refused) = run(max, progress.clone()).await?;
    progress.finish_and_clear();
    println!("moved {moved} message(s) from {from} to {to}");
    if refused > 0 {
        bail!("{refused} message(s) were refused and stay in {from}");
    }
    Ok(())
}

/// Runs the redrive for one route and prints the result.
pub async fn run(route: RoutePlan, ask: Redrive) -> anyhow::Result<()> {
    let name = route.name.clone();
    let at = || format!("routes.{name}.source");
    match route.source {
        #[cfg(feature = "sqs")]
        SourcePlan::Sqs(mut config) => {
            if let Some(from) = ask.from.clone() {
                config.dead_letter_queue_url = Some(from);
            }
            let to = config.queue_url.clone();
            let from = config.dead_letter_queue_url.clone().unwrap_or_default();
            let source = ferry_sqs::SqsSource::connect(config)
                .await
                .with_context(at)?;
            let waiting = source.dead_letter_depth().await.with_context(at)?;
            dry_run_or_move(&ask, waiting, &from, &to, |max, progress| async move {
                let done = source
                    .redrive(max, |n| progress.set_position(n))
                    .await
                    .with_context(at)?;
                Ok((done.moved, done.failed))
            })
            .await
        }
        #[cfg(feature = "amqp")]
        SourcePlan::Amqp(config) => {
            let Some(from) = ask.from.clone().or_else(|| config.dead_letter_queue()) else {
                bail!(
                    "--from: name the dead-letter queue to move from (RabbitMQ does not say \
                     over AMQP where a queue dead-letters to)"
                );
            };
            let to = config.queue.clone();
            let source = ferry_amqp::AmqpSource::connect(config)
                .await
                .with_context(at)?;
            let waiting = source.depth_of(&from).await.context("--from")?;
            let (source, dead) = (&source, from.as_str());
            dry_run_or_move(&ask, waiting, &from, &to, |max, progress| async move {
                let moved = source
                    .redrive(dead, max, |n| progress.set_position(n))
                    .await
                    .with_context(at)?;
                Ok((moved, 0))
            })
            .await
        }
        #[cfg(feature = "kafka")]
        SourcePlan::Kafka(_) => bail!(
            "--route {name}: redrive moves SQS and RabbitMQ dead letters; replay a Kafka \
             dead_letter_topic with your Kafka tools"
        ),
        #[cfg(feature = "redis")]
        SourcePlan::Redis(_) => bail!(
            "--route {name}: redrive moves SQS and RabbitMQ dead letters; a Redis \
             dead_letter_stream keeps the original fields, XADD them back to the stream"
        ),
        #[cfg(feature = "postgres")]
        SourcePlan::Postgres(config) => bail!(
            "--route {name}: redrive moves SQS and RabbitMQ dead letters; move PostgreSQL dead \
             letters back with one statement: WITH moved AS (DELETE FROM {} RETURNING payload, \
             headers, key) INSERT INTO {} (payload, headers, key) SELECT * FROM moved",
            match &config.dead_letters {
                ferry_postgres::DeadLetters::Table(dead) => dead.as_str(),
                ferry_postgres::DeadLetters::Drop => "<dead_letter_table>",
            },
            config.table
        ),
        #[cfg(feature = "mqtt")]
        SourcePlan::Mqtt(_) => bail!(
            "--route {name}: redrive moves SQS and RabbitMQ dead letters; an MQTT \
             dead_letter_topic keeps the payload and properties, publish them back to the topic"
        ),
        #[cfg(feature = "nats")]
        SourcePlan::Nats(_) => bail!(
            "--route {name}: redrive moves SQS and RabbitMQ dead letters; a NATS dead letter \
             keeps the original headers and payload and its Ferry-Subject header, publish it \
             back there"
        ),
    }
}

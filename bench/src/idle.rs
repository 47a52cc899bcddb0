//! What a route costs at rest: ferry with 1, 10 and 100 idle routes on one broker, each on
//! a queue (topic) of its own with nothing in it and ferry's default settings, measured
//! once settled: resident memory, and CPU over `--idle-secs`. The cost of one more idle
//! route is the difference between two counts over the routes added.

use std::time::Duration;

use anyhow::{Context, Result};
use lapin::{Connection, ConnectionProperties};
use rdkafka::mocking::MockCluster;

use crate::{cpu_seconds, spawn_ferry_config, status_kib, stop_ferry, Args, Broker};

/// How long ferry gets to connect every route before it is measured.
const SETTLE: Duration = Duration::from_secs(10);

struct Measured {
    routes: usize,
    rss_kib: u64,
    /// Share of one core, in percent.
    cpu_percent: f64,
}

/// Measures each `--idle-routes` count and prints the table.
pub async fn run(args: &Args) -> Result<()> {
    println!(
        "{:?}: ferry at rest with {:?} idle routes (default settings), {} s measured after {} s to settle",
        args.broker,
        args.idle_routes,
        args.idle_secs,
        SETTLE.as_secs()
    );
    // The Kafka mock cluster lives as long as the measurement.
    let kafka = match args.broker {
        Broker::Kafka => Some(MockCluster::new(1).context("starting librdkafka's mock cluster")?),
        _ => None,
    };
    let mut rows = Vec::new();
    for &routes in &args.idle_routes {
        let sources = sources(args, routes, kafka.as_ref()).await?;
        let mut config = "[admin]\nlisten = \"127.0.0.1:0\"\n".to_owned();
        for (i, source) in sources.iter().enumerate() {
            // Nothing arrives, so the endpoint is never called: a closed port will do.
            config.push_str(&format!(
                "[routes.idle{i}.source]\n{source}\n[routes.idle{i}.sink]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/idle\"\n"
            ));
        }
        let (child, pid) = spawn_ferry_config(args, &config)?;
        tokio::time::sleep(SETTLE).await;
        let before = cpu_seconds(pid)?;
        tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
        let cpu = cpu_seconds(pid)? - before;
        let rss_kib = status_kib(pid, "VmRSS")?;
        stop_ferry(child, pid)?;
        let row = Measured {
            routes,
            rss_kib,
            cpu_percent: cpu / args.idle_secs * 100.0,
        };
        println!(
            "{routes} routes: RSS {:.1} MiB, CPU {:.3}% of a core",
            row.rss_kib as f64 / 1024.0,
            row.cpu_percent
        );
        rows.push(row);
    }
    println!();
    println!("| idle routes | RSS MiB | CPU % of a core | per route added: RSS KiB | per route added: CPU % of a core |");
    println!("|---|---|---|---|---|");
    let mut last: Option<&Measured> = None;
    for r in &rows {
        let added = last.map(|l| {
            let n = r.routes.saturating_sub(l.routes).max(1) as f64;
            (
                (r.rss_kib as f64 - l.rss_kib as f64) / n,
                (r.cpu_percent - l.cpu_percent) / n,
            )
        });
        let (rss, cpu) = added.map_or(("–".to_owned(), "–".to_owned()), |(rss, cpu)| {
            (format!("{rss:.0}"), format!("{cpu:.4}"))
        });
        println!(
            "| {} | {:.1} | {:.3} | {rss} | {cpu} |",
            r.routes,
            r.rss_kib as f64 / 1024.0,
            r.cpu_percent
        );
        last = Some(r);
    }
    Ok(())
}

/// `routes` source sections, each on an empty queue or topic of its own.
async fn sources(
    args: &Args,
    routes: usize,
    kafka: Option<&MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(routes);
    match args.broker {
        Broker::Redis | Broker::Postgres | Broker::Nats | Broker::Mqtt => {
            anyhow::bail!("--idle-routes measures SQS, RabbitMQ and Kafka")
        }
        Broker::Sqs => {
            let client = crate::sqs::client(&args.endpoint).await?;
            for i in 0..routes {
                let url = crate::sqs::create_queue(&client, &format!("bench-idle-{i}")).await?;
                out.push(format!(
                    "type = \"sqs\"\nqueue_url = \"{url}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\n",
                    args.endpoint
                ));
            }
        }
        Broker::Amqp => {
            let connection = Connection::connect(&args.amqp_uri, ConnectionProperties::default())
                .await
                .context("RabbitMQ not reachable (is it running on 127.0.0.1:5672?)")?;
            let channel = connection.create_channel().await?;
            for _ in 0..routes {
                let queue = crate::amqp::empty_queue(&channel, "bench-idle").await?;
                out.push(format!(
                    "type = \"amqp\"\nuri = \"{}\"\nqueue = \"{queue}\"\ndead_letters = \"drop\"\n",
                    args.amqp_uri
                ));
            }
        }
        Broker::Kafka => {
            let mock = kafka.context("no mock cluster")?;
            for i in 0..routes {
                let topic = format!("bench-idle-{}-{routes}-{i}", std::process::id());
                mock.create_topic(&topic, 1, 1)?;
                out.push(format!(
                    "type = \"kafka\"\nbrokers = \"{}\"\ngroup_id = \"{topic}\"\ntopics = [\"{topic}\"]\ndead_letters = \"drop\"\n",
                    mock.bootstrap_servers()
                ));
            }
        }
    }
    Ok(out)
}

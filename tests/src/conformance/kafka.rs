//! Kafka in the conformance suite: librdkafka's mock cluster in the test process, a
//! four-partition topic, and a dead-letter topic that keeps ferry's reason in headers.

use std::time::Duration;

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::kafka::{Cluster, Reader};

const PARTITIONS: i32 = 4;

/// A fresh mock cluster per queue.
pub struct Kafka;

/// A topic, its dead-letter topic and the consumer group the bridge joins.
pub struct KafkaQueue {
    // Dropped first: closing a consumer waits for the brokers of `cluster`.
    dead: Reader,
    cluster: Cluster,
    topic: String,
    dead_letter_topic: String,
    group: String,
}

impl Backend for Kafka {
    type Queue = KafkaQueue;
    /// Kafka does not count reads: a record read again after a crash is attempt 1.
    const LABELS_REDELIVERIES: bool = false;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> KafkaQueue {
        let cluster = Cluster::start();
        let topic = crate::unique("conf");
        let dead_letter_topic = format!("{topic}-dlq");
        cluster.create_topic(&topic, PARTITIONS);
        cluster.create_topic(&dead_letter_topic, 1);
        let dead = cluster.reader(&dead_letter_topic, 1);
        KafkaQueue {
            group: format!("{topic}-group"),
            cluster,
            topic,
            dead_letter_topic,
            dead,
        }
    }
}

impl TestQueue for KafkaQueue {
    fn bridge(&self) -> Bridge {
        Bridge::Ferry {
            source: crate::ferry::kafka_source(
                self.cluster.bootstrap(),
                &self.group,
                &self.topic,
                &self.dead_letter_topic,
            ),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        let records: Vec<(Option<String>, String)> = messages
            .iter()
            .map(|m| (m.key.clone(), m.body.clone()))
            .collect();
        self.cluster.produce(&self.topic, &records).await;
    }

    async fn ready(&self) -> u64 {
        self.cluster.lag(&self.group, &self.topic, PARTITIONS).await
    }

    async fn remaining(&self) -> u64 {
        self.cluster.lag(&self.group, &self.topic, PARTITIONS).await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        self.dead
            .take(Duration::from_millis(500))
            .await
            .into_iter()
            .map(|r| DeadLettered {
                reason: r
                    .headers
                    .iter()
                    .find(|(k, _)| k == "ferry_reason")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                body: r.body,
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.cluster.set_down(true);
        tokio::time::sleep(down).await;
        self.cluster.set_down(false);
    }

    fn max_unacked(&self, settings: &Settings) -> usize {
        // In flight, waiting in the engine's buffer (16), or finished within the last
        // commit interval (200 ms) at up to `concurrency` per 100 ms request.
        settings.concurrency * 2 + 16
    }
}

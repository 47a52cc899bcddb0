//! Kafka for the tests: librdkafka's mock cluster, in this process, speaking the real
//! Kafka protocol on loopback ports that a separate `ferry` process connects to.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A one-broker cluster that lives as long as this value.
pub struct Cluster {
    // Fields drop in order: clients must go before the brokers they would wait for.
    producer: FutureProducer,
    mock: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
}

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    /// The payload as text.
    pub body: String,
    /// Headers with text values.
    pub headers: Vec<(String, String)>,
}

impl Cluster {
    /// Starts the cluster (fails loudly: there is no broker to skip to).
    pub fn start() -> Self {
        let mock = MockCluster::new(1).expect("start librdkafka's mock Kafka cluster");
        let bootstrap = mock.bootstrap_servers();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .create()
            .expect("producer for the mock cluster");
        Self {
            producer,
            mock,
            bootstrap,
        }
    }

    /// `host:port` of the broker.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Creates a topic.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.mock
            .create_topic(topic, partitions, 1)
            .expect("create topic on the mock cluster");
    }

    /// Produces `(key, body)` records in order and waits until the broker has them all.
    pub async fn produce(&self, topic: &str, records: &[(Option<String>, String)]) {
        let mut pending = Vec::with_capacity(records.len());
        for (key, body) in records {
            loop {
                let mut record = FutureRecord::to(topic).payload(body.as_bytes()).headers(
                    OwnedHeaders::new().insert(Header {
                        key: "traceparent",
                        value: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                    }),
                );
                if let Some(key) = key {
                    record = record.key(key.as_bytes());
                }
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    // The local queue is full: let deliveries drain, then try again.
                    Err((_, _)) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
        for delivery in pending {
            delivery
                .await
                .expect("delivery report")
                .expect("produce to the mock cluster");
        }
    }

    /// Takes the broker away (connections refused and closed) or brings it back.
    pub fn set_down(&self, down: bool) {
        let r = if down {
            self.mock.broker_down(-1)
        } else {
            self.mock.broker_up(-1)
        };
        r.expect("change the mock broker's state");
    }

    /// Records of `topic` the consumer group `group` has not committed yet, over all
    /// partitions (the group's lag).
    pub async fn lag(&self, group: &str, topic: &str, partitions: i32) -> u64 {
        let bootstrap = self.bootstrap.clone();
        let (group, topic) = (group.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", &group)
                .create()
                .expect("lag consumer");
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed offsets");
            let mut lag = 0;
            for p in 0..partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                let from = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                lag += (high - from).max(0) as u64;
            }
            lag
        })
        .await
        .expect("lag task")
    }

    /// A reader of the `partitions` of `topic` from their beginning; each
    /// [`Reader::take`] returns what is new.
    ///
    /// The partitions are assigned, not subscribed to as a group member: a member dropped
    /// while its group's assignment is arriving can block forever in librdkafka's close
    /// (the rebalance it handles there waits on a queue nobody serves), which hung a test
    /// after all its checks had passed.
    pub fn reader(&self, topic: &str, partitions: i32) -> Reader {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", crate::unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader consumer");
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .expect("reader offset");
        }
        consumer.assign(&assignment).expect("assign reader");
        Reader { consumer }
    }
}

/// Reads a topic for the tests.
pub struct Reader {
    consumer: StreamConsumer,
}

impl Reader {
    /// What arrived since the last call (waits up to `wait` for the first record).
    pub async fn take(&self, wait: Duration) -> Vec<Record> {
        let mut out = Vec::new();
        let mut limit = wait;
        while let Ok(Ok(m)) = tokio::time::timeout(limit, self.consumer.recv()).await {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .filter_map(|h| {
                            Some((h.key.to_owned(), String::from_utf8(h.value?.to_vec()).ok()?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                body: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                headers,
            });
            limit = Duration::from_millis(300);
        }
        out
    }
}

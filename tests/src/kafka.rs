//! Kafka for the tests: librdkafka's mock cluster, in this process, speaking the real
//! Kafka protocol on loopback ports that a separate `ferry` process connects to.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// A one-broker cluster that lives as long as this value.
pub struct Cluster {
    // Fields drop in order: clients must go before the brokers they would wait for.
    producer: FutureProducer,
    mock: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
}

/// A topic of the tests on a cluster of its own, with a one-partition dead-letter topic
/// beside it and the consumer group the tests' bridges join.
pub struct Topic {
    /// The cluster.
    pub cluster: Cluster,
    /// The topic.
    pub name: String,
    /// The dead-letter topic.
    pub dead: String,
    /// The consumer group.
    pub group: String,
    /// How many partitions `name` has.
    pub partitions: i32,
}

impl Topic {
    /// Starts a cluster with the two topics.
    pub fn new(prefix: &str, partitions: i32) -> Self {
        let cluster = Cluster::start();
        let name = crate::unique(prefix);
        let dead = format!("{name}-dlq");
        cluster.create_topic(&name, partitions);
        cluster.create_topic(&dead, 1);
        Self {
            group: format!("{name}-group"),
            cluster,
            name,
            dead,
            partitions,
        }
    }

    /// The route's source section.
    pub fn source(&self) -> String {
        self.source_with("")
    }

    /// The route's source section with more librdkafka settings (`"key" = value, ...`).
    pub fn source_with(&self, settings: &str) -> String {
        let source = crate::ferry::kafka_source(
            self.cluster.bootstrap(),
            &self.group,
            &self.name,
            &self.dead,
        );
        if settings.is_empty() {
            return source;
        }
        source.replace(
            "\"heartbeat.interval.ms\" = 100",
            &format!("\"heartbeat.interval.ms\" = 100, {settings}"),
        )
    }

    /// Publishes records without a key whose bodies are `m-<i>`.
    pub async fn publish(&self, range: std::ops::Range<usize>) {
        let records: Vec<(Option<String>, String)> =
            range.map(|i| (None, format!("m-{i}"))).collect();
        self.cluster.produce(&self.name, &records).await;
    }

    /// Starts a ferry whose route `r` reads the topic into `sink_url`.
    pub fn start(&self, sink_url: &str, delivery: &str) -> crate::Ferry {
        crate::Ferry::start(&crate::ferry::Route {
            source: self.source(),
            sink_url,
            sink: "",
            delivery,
        })
    }

    /// The group's lag over the topic.
    pub async fn lag(&self) -> u64 {
        self.cluster
            .lag(&self.group, &self.name, self.partitions)
            .await
    }
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

    /// Delays every answer of the broker by `delay` (zero for none): a slow or distant
    /// cluster, where each synchronous call waits that long.
    pub fn set_round_trip(&self, delay: Duration) {
        self.mock
            .broker_round_trip_time(1, delay)
            .expect("change the mock broker's round-trip time");
    }

    /// The next `times` produce requests to the cluster fail with `error` (librdkafka
    /// retries a retriable one by itself until `message.timeout.ms`).
    pub fn fail_produce(&self, error: RDKafkaRespErr, times: usize) {
        self.mock
            .request_errors(RDKafkaApiKey::Produce, &vec![error; times]);
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

//! RabbitMQ (the local broker) in the conformance suite. The bridge connects through a
//! [`Proxy`] so that the suite can cut its connection mid-stream.

use std::time::Duration;

use lapin::types::AMQPValue;

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::amqp::{Rabbit, RabbitQueue};
use crate::proxy::Proxy;

/// Unacked deliveries the bridge may hold.
const PREFETCH: usize = 64;

/// The local broker.
pub struct Amqp;

/// A durable queue whose rejected messages go to its dead-letter queue.
pub struct AmqpQueue {
    rabbit: Rabbit,
    queue: RabbitQueue,
    proxy: Proxy,
}

impl Backend for Amqp {
    type Queue = AmqpQueue;
    /// `x-delivery-count` on quorum queues, the redelivered flag on classic ones.
    const LABELS_REDELIVERIES: bool = true;
    /// A rejected message keeps its headers but not ferry's words: `x-death` says
    /// `rejected`.
    const KEEPS_REASON: bool = false;

    async fn queue(&self, _ordered: bool) -> AmqpQueue {
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.queue("conf").await;
        AmqpQueue {
            rabbit,
            queue,
            proxy: Proxy::start("127.0.0.1:5672").await,
        }
    }
}

impl TestQueue for AmqpQueue {
    fn bridge(&self) -> Bridge {
        Bridge::Ferry {
            source: format!(
                "type = \"amqp\"\nuri = \"amqp://guest:guest@{}/%2f\"\nqueue = \"{}\"\nprefetch = {PREFETCH}\nordering_header = \"key\"\ndead_letters = \"queue\"\n",
                self.proxy.addr(),
                self.queue.name
            ),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        self.rabbit.publish(&self.queue.name, messages).await;
    }

    async fn ready(&self) -> u64 {
        self.rabbit.depth(&self.queue.name).await.into()
    }

    async fn remaining(&self) -> u64 {
        self.rabbit.held(&self.queue.name).await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        self.rabbit
            .drain(&self.queue.dead_letter)
            .await
            .into_iter()
            .map(|(body, headers)| {
                let reason = headers
                    .inner()
                    .get("x-death")
                    .and_then(|v| match v {
                        AMQPValue::FieldArray(deaths) => deaths.as_slice().first().cloned(),
                        _ => None,
                    })
                    .and_then(|death| match death {
                        AMQPValue::FieldTable(t) => t.inner().get("reason").cloned(),
                        _ => None,
                    })
                    .map(|r| match r {
                        AMQPValue::LongString(s) => s.to_string(),
                        AMQPValue::ShortString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                DeadLettered { body, reason }
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy.cut(down).await;
    }

    fn max_unacked(&self, _settings: &Settings) -> usize {
        PREFETCH
    }
}

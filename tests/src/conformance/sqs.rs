//! SQS (on the local emulator) in the conformance suite. The bridge reaches the
//! emulator through a [`Proxy`] so that the suite can take SQS away mid-stream.

use std::time::Duration;

use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::proxy::Proxy;
use crate::sqs;

/// The emulator.
pub struct Sqs {
    client: Client,
}

impl Sqs {
    /// Connects; panics with a clear message when the emulator is not running.
    pub async fn connect() -> Self {
        Self {
            client: sqs::client().await,
        }
    }
}

/// A queue (FIFO when ordered) with a dead-letter queue.
pub struct SqsQueue {
    client: Client,
    url: String,
    dead_letter: String,
    fifo: bool,
    proxy: Proxy,
}

impl Backend for Sqs {
    type Queue = SqsQueue;
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, ordered: bool) -> SqsQueue {
        let url = if ordered {
            self.client
                .create_queue()
                .queue_name(format!("{}.fifo", crate::unique("conf")))
                .attributes(QueueAttributeName::FifoQueue, "true")
                .send()
                .await
                .expect("create FIFO queue")
                .queue_url
                .expect("queue url")
        } else {
            sqs::create_queue(&self.client, "conf").await
        };
        let dead_letter = sqs::create_queue(&self.client, "conf-dlq").await;
        let endpoint = crate::sqs_endpoint();
        let upstream = endpoint.trim_start_matches("http://").trim_end_matches('/');
        SqsQueue {
            client: self.client.clone(),
            url,
            dead_letter,
            fifo: ordered,
            proxy: Proxy::start(upstream).await,
        }
    }
}

impl TestQueue for SqsQueue {
    fn bridge(&self) -> Bridge {
        // One receiver: the emulator hands out rare duplicates to concurrent receivers.
        Bridge::Ferry {
            source: format!(
                "type = \"sqs\"\nqueue_url = \"{}\"\nendpoint_url = \"http://{}\"\nregion = \"us-east-1\"\n\
                 dead_letter_queue_url = \"{}\"\nreceivers = 1\nvisibility_timeout = \"10s\"\nwait_time = \"1s\"\n",
                self.url,
                self.proxy.addr(),
                self.dead_letter
            ),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        if !self.fifo {
            let bodies: Vec<String> = messages.iter().map(|m| m.body.clone()).collect();
            return sqs::send(&self.client, &self.url, &bodies).await;
        }
        for chunk in messages.chunks(10) {
            let entries = chunk.iter().enumerate().map(|(i, m)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&m.body)
                    .message_group_id(m.key.as_deref().unwrap_or("none"))
                    .message_deduplication_id(crate::unique("d"))
                    .build()
                    .expect("entry")
            });
            let resp = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries.collect()))
                .send()
                .await
                .expect("send batch");
            assert!(resp.failed.is_empty(), "send failures: {:?}", resp.failed);
        }
    }

    async fn ready(&self) -> u64 {
        sqs::depth(&self.client, &self.url).await.0
    }

    async fn remaining(&self) -> u64 {
        let (visible, in_flight) = sqs::depth(&self.client, &self.url).await;
        visible + in_flight
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        sqs::drain(&self.client, &self.dead_letter)
            .await
            .into_iter()
            .map(|m| {
                let attr = |k: &str| m.attributes.get(k).cloned().unwrap_or_default();
                DeadLettered {
                    reason: format!(
                        "{} (last status {})",
                        attr("ferry_dead_letter_reason"),
                        attr("ferry_last_status")
                    ),
                    body: m.body,
                }
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy.cut(down).await;
    }

    fn max_unacked(&self, settings: &Settings) -> usize {
        // In flight, one receive batch waiting, and deletes still queued.
        2 * settings.concurrency + 20
    }
}

//! The real AWS SDK against the local emulator: queues, publishing, depth.

use std::collections::HashMap;

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

/// An SQS client for the emulator; panics with a clear message when it is not running.
pub async fn client() -> Client {
    let endpoint = crate::sqs_endpoint();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "ferry-tests",
        ))
        .load()
        .await;
    let client = Client::new(&config);
    if let Err(e) = client.list_queues().send().await {
        panic!(
            "the SQS emulator is not reachable at {endpoint} ({}); start it with scripts/moto.sh \
             or run the tests through scripts/test.sh",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        );
    }
    client
}

/// Creates a queue with a unique name; returns its URL.
pub async fn create_queue(client: &Client, prefix: &str) -> String {
    let name = crate::unique(prefix);
    client
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url")
}

/// The queue's ARN (for SNS subscriptions).
pub async fn queue_arn(client: &Client, url: &str) -> String {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .expect("queue arn")
}

/// Sends bodies in batches of 10; each may carry string attributes.
pub async fn send(client: &Client, url: &str, bodies: &[String]) {
    for chunk in bodies.chunks(10) {
        let entries = chunk.iter().enumerate().map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
                .expect("entry")
        });
        let resp = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries.collect()))
            .send()
            .await
            .expect("send batch");
        assert!(resp.failed.is_empty(), "send failures: {:?}", resp.failed);
    }
}

/// Visible plus in-flight messages.
pub async fn depth(client: &Client, url: &str) -> (u64, u64) {
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .unwrap_or_default();
    let get = |k: &QueueAttributeName| {
        attrs
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    (
        get(&QueueAttributeName::ApproximateNumberOfMessages),
        get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

/// A message read back from a queue (for dead-letter checks).
#[derive(Debug)]
pub struct Stored {
    /// The body.
    pub body: String,
    /// String message attributes.
    pub attributes: HashMap<String, String>,
}

/// Receives (and deletes) everything currently visible on a queue.
pub async fn drain(client: &Client, url: &str) -> Vec<Stored> {
    let mut out = Vec::new();
    loop {
        let resp = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive");
        let messages = resp.messages.unwrap_or_default();
        if messages.is_empty() {
            return out;
        }
        for m in messages {
            if let Some(rh) = &m.receipt_handle {
                client
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(rh)
                    .send()
                    .await
                    .expect("delete");
            }
            let attributes = m
                .message_attributes
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v): (String, MessageAttributeValue)| Some((k, v.string_value?)))
                .collect();
            out.push(Stored {
                body: m.body.unwrap_or_default(),
                attributes,
            });
        }
    }
}

//! Redrive: moving messages from the route's dead-letter queue back to its queue once the
//! cause is fixed (`ferry redrive`).
//!
//! Each message is sent to the queue first and deleted from the dead-letter queue only
//! once SQS has taken it, so an interruption leaves a copy in both (the endpoint sees the
//! same id twice) and never loses one.

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use tracing::warn;

use crate::dead_letter::{self, ORIGINAL_ATTRIBUTES};
use crate::{describe, SqsError, SqsSource};

/// The attributes ferry adds when it dead-letters a message: a redriven message goes back
/// as it was first published; the original attributes that did not fit next to them were packed into
/// [`ORIGINAL_ATTRIBUTES`]: redrive unpacks them again.
pub const DEAD_LETTER_ATTRIBUTES: [&str; 5] = [
    dead_letter::REASON,
    dead_letter::LAST_STATUS,
    dead_letter::ATTEMPTS,
    dead_letter::ROUTE,
    ORIGINAL_ATTRIBUTES,
];

/// How long a received dead letter stays hidden while it is being moved.
const MOVE_VISIBILITY_SECS: i32 = 60;

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redriven {
    /// Sent to the queue and deleted from the dead-letter queue.
    pub moved: u64,
    /// Refused by SQS; still in the dead-letter queue (visible again within a minute).
    pub failed: u64,
}

impl SqsSource {
    fn dead_letter_url(&self) -> Result<&str, SqsError> {
        self.config
            .dead_letter_queue_url
            .as_deref()
            .ok_or(SqsError::NoDeadLetterQueue)
    }

    /// Messages waiting in the dead-letter queue (SQS's approximate count).
    pub async fn dead_letter_depth(&self) -> Result<u64, SqsError> {
        let url = self.dead_letter_url()?;
        let answer = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .map_err(|e| queue_error(url, describe(&e)))?;
        Ok(answer
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::ApproximateNumberOfMessages))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// Moves up to `max` messages from the dead-letter queue to the queue, calling
    /// `progress` with the number moved so far; stops when the dead-letter queue has
    /// nothing more to hand out.
    pub async fn redrive(
        &self,
        max: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<Redriven, SqsError> {
        let from = self.dead_letter_url()?;
        let to = self.config.queue_url.as_str();
        let fifo = to.ends_with(".fifo");
        let mut done = Redriven::default();
        while done.moved + done.failed < max {
            let want = (max - done.moved - done.failed).min(10) as i32;
            let received = self
                .client
                .receive_message()
                .queue_url(from)
                .max_number_of_messages(want)
                .wait_time_seconds(1)
                .visibility_timeout(MOVE_VISIBILITY_SECS)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                .send()
                .await
                .map_err(|e| queue_error(from, describe(&e)))?;
            let messages = received.messages.unwrap_or_default();
            if messages.is_empty() {
                break;
            }
            let mut entries = Vec::with_capacity(messages.len());
            for (i, m) in messages.iter().enumerate() {
                let mut entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(m.body().unwrap_or_default());
                let stored = m.message_attributes.clone().unwrap_or_default();
                let restored = dead_letter::restore(&stored).unwrap_or_else(|e| {
                    // Kept packed as it is rather than lost.
                    warn!(id = m.message_id().unwrap_or_default(), error = %e,
                        "the packed original attributes cannot be unpacked; sent back packed");
                    stored
                        .iter()
                        .filter(|(name, _)| {
                            name.as_str() == ORIGINAL_ATTRIBUTES
                                || !DEAD_LETTER_ATTRIBUTES.contains(&name.as_str())
                        })
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect()
                });
                for (name, value) in restored {
                    entry = entry.message_attributes(name, value);
                }
                if fifo {
                    let group = m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                        .cloned()
                        .unwrap_or_else(|| "ferry-redrive".to_owned());
                    entry = entry
                        .message_group_id(group)
                        .message_deduplication_id(m.message_id().unwrap_or_default());
                }
                entries.push(entry.build().map_err(|e| queue_error(to, e.to_string()))?);
            }
            let sent = self
                .client
                .send_message_batch()
                .queue_url(to)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| queue_error(to, describe(&e)))?;
            done.failed += sent.failed().len() as u64;
            let deletes: Vec<DeleteMessageBatchRequestEntry> = sent
                .successful()
                .iter()
                .filter_map(|ok| {
                    let m = messages.get(ok.id().parse::<usize>().ok()?)?;
                    DeleteMessageBatchRequestEntry::builder()
                        .id(ok.id())
                        .receipt_handle(m.receipt_handle()?)
                        .build()
                        .ok()
                })
                .collect();
            if !deletes.is_empty() {
                let moved = deletes.len() as u64;
                self.client
                    .delete_message_batch()
                    .queue_url(from)
                    .set_entries(Some(deletes))
                    .send()
                    .await
                    .map_err(|e| queue_error(from, describe(&e)))?;
                done.moved += moved;
            }
            progress(done.moved);
        }
        Ok(done)
    }
}

fn queue_error(url: &str, detail: String) -> SqsError {
    SqsError::Queue {
        key: "redrive",
        url: url.to_owned(),
        detail,
        not_found: false,
    }
}

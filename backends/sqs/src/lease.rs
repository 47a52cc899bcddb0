//! Visibility leases: the core lease service, renewed through
//! `ChangeMessageVisibilityBatch`, ten receipts per call.

use std::time::Duration;

use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;
use aws_sdk_sqs::Client;
use ferry_core::lease::Renew;
use tracing::debug;

/// The receipt handles of every message ferry holds.
pub(crate) type Leases = ferry_core::lease::Leases<String>;

/// Extends the visibility of one queue's messages.
pub(crate) struct Visibility {
    pub(crate) client: Client,
    pub(crate) queue_url: String,
}

impl Renew<String> for Visibility {
    async fn renew(&self, due: Vec<String>, length: Duration) {
        let timeout = i32::try_from(length.as_secs()).unwrap_or(i32::MAX);
        for chunk in due.chunks(10) {
            let entries = chunk.iter().enumerate().filter_map(|(i, receipt)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(timeout)
                    .build()
                    .ok()
            });
            let result = self
                .client
                .change_message_visibility_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            // A message settled meanwhile has a stale receipt: failing to extend it is fine.
            if let Err(e) = result {
                debug!(error = %crate::describe(&e), "visibility extension failed");
            }
        }
    }
}

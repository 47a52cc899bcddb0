//! Visibility leases: the core lease service, renewed through
//! `ChangeMessageVisibilityBatch`, ten receipts per call.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry;
use aws_sdk_sqs::Client;
use ferry_core::lease::Renew;
use ferry_core::BrokerErrors;
use tracing::warn;

/// The receipt handles of every message ferry holds.
pub(crate) type Leases = ferry_core::lease::Leases<String>;

/// Extends the visibility of one queue's messages.
pub(crate) struct Visibility {
    pub(crate) client: Client,
    pub(crate) queue_url: String,
    pub(crate) route: Arc<str>,
    pub(crate) errors: BrokerErrors,
}

impl Renew<String> for Visibility {
    /// Every receipt SQS did not confirm, whether the call failed or only its entry, is
    /// logged and counted (`renew`); the lease service tries it again at its next check.
    async fn renew(&self, due: Vec<String>, length: Duration) -> Vec<bool> {
        let timeout = i32::try_from(length.as_secs()).unwrap_or(i32::MAX);
        let mut extended = vec![false; due.len()];
        for (n, chunk) in due.chunks(10).enumerate() {
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
            match result {
                Ok(resp) => {
                    for ok in &resp.successful {
                        let slot = ok.id.parse::<usize>().ok().map(|i| n * 10 + i);
                        if let Some(e) = slot.and_then(|i| extended.get_mut(i)) {
                            *e = true;
                        }
                    }
                    if let Some(first) = resp.failed.first() {
                        self.errors.count("renew", resp.failed.len() as u64);
                        warn!(route = %self.route, count = resp.failed.len(), code = %first.code,
                            message = first.message.as_deref().unwrap_or(""),
                            "visibility renewal refused; trying again");
                    }
                }
                Err(e) => {
                    self.errors.count("renew", chunk.len() as u64);
                    warn!(route = %self.route, count = chunk.len(), error = %crate::describe(&e),
                        "visibility renewal failed; trying again");
                }
            }
        }
        extended
    }
}

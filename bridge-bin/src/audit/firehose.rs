//! `output = "firehose"`: records to an Amazon Data Firehose delivery stream with
//! `PutRecordBatch`, one JSON line (with its newline) per record, so that what the stream
//! delivers to S3 is newline-delimited JSON.
//!
//! A batch goes when it holds 500 records or 4 MiB (the API's limits) or its oldest record
//! has waited `flush_interval`. A batch the stream takes only in part is sent again with
//! only the records it refused; after the retries, what is left is dropped and counted.

use std::time::Duration;

use aws_sdk_firehose::primitives::Blob;
use aws_sdk_firehose::types::{PutRecordBatchResponseEntry, Record};
use aws_sdk_firehose::Client;
use tokio::time::Instant;

use super::{Counts, Health};
use crate::config::AwsTarget;

/// Records per `PutRecordBatch` at most.
const MAX_RECORDS: usize = 500;
/// Bytes per `PutRecordBatch` at most.
const MAX_BYTES: usize = 4 * 1024 * 1024;

pub(super) struct Writer {
    stream: String,
    flush_interval: Duration,
    aws: AwsTarget,
    client: Option<Client>,
    pending: Vec<Vec<u8>>,
    bytes: usize,
    /// When the oldest pending record came.
    since: Option<Instant>,
    /// Records of the batch being sent, until it is settled.
    sending: u64,
    counts: Counts,
    health: Health,
}

impl Writer {
    pub(super) fn new(
        stream: String,
        flush_interval: Duration,
        aws: AwsTarget,
        counts: Counts,
    ) -> Self {
        let health = Health::new("firehose", stream.clone());
        Self {
            stream,
            flush_interval,
            aws,
            client: None,
            pending: Vec::new(),
            bytes: 0,
            since: None,
            sending: 0,
            counts,
            health,
        }
    }

    pub(super) async fn push(&mut self, line: Vec<u8>) {
        if self.pending.len() >= MAX_RECORDS || self.bytes + line.len() > MAX_BYTES {
            self.flush().await;
        }
        self.bytes += line.len();
        self.pending.push(line);
        self.since.get_or_insert_with(Instant::now);
    }

    pub(super) fn due(&self) -> Option<Instant> {
        self.since.map(|since| since + self.flush_interval)
    }

    pub(super) async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.pending);
        self.bytes = 0;
        self.since = None;
        self.sending = batch.len() as u64;
        let client = match &self.client {
            Some(client) => client.clone(),
            None => {
                let client = Client::new(&super::aws_config(&self.aws).await);
                self.client = Some(client.clone());
                client
            }
        };
        let mut error = String::new();
        for attempt in 1..=super::TRIES {
            if attempt > 1 {
                tokio::time::sleep(super::backoff(attempt - 1)).await;
            }
            let records = batch
                .iter()
                .map(|data| Record::builder().data(Blob::new(data.clone())).build())
                .collect::<Result<Vec<_>, _>>();
            let records = match records {
                Ok(records) => records,
                Err(e) => {
                    error = e.to_string();
                    break;
                }
            };
            let sent = client
                .put_record_batch()
                .delivery_stream_name(&self.stream)
                .set_records(Some(records))
                .send()
                .await;
            match sent {
                Ok(answer) => {
                    let (refused, code) = refused(&batch, answer.request_responses());
                    self.counts
                        .written
                        .inc_by((batch.len() - refused.len()) as u64);
                    if refused.is_empty() {
                        self.health.ok();
                        self.sending = 0;
                        return;
                    }
                    error = format!(
                        "{} of {} records refused: {code}",
                        refused.len(),
                        batch.len()
                    );
                    batch = refused;
                    self.sending = batch.len() as u64;
                }
                Err(e) => error = ferry_core::error_chain(&e),
            }
        }
        self.counts.dropped.inc_by(batch.len() as u64);
        self.sending = 0;
        self.health.failed(&error);
    }

    pub(super) fn abandon(&mut self) -> u64 {
        let lost = self.sending + self.pending.len() as u64;
        self.counts.dropped.inc_by(lost);
        self.pending.clear();
        self.sending = 0;
        lost
    }
}

/// The records of `batch` the stream refused (those whose answer carries an error code),
/// in order, and the first refusal's code and message. An answer with fewer entries than
/// records leaves the rest refused too: nothing is taken for delivered that the stream
/// did not say it took.
fn refused(batch: &[Vec<u8>], answers: &[PutRecordBatchResponseEntry]) -> (Vec<Vec<u8>>, String) {
    let mut code = String::new();
    let mut again = Vec::new();
    for (i, record) in batch.iter().enumerate() {
        let failed = match answers.get(i) {
            Some(answer) => answer.error_code().is_some(),
            None => true,
        };
        if failed {
            if code.is_empty() {
                code = answers
                    .get(i)
                    .map(|a| {
                        format!(
                            "{}: {}",
                            a.error_code().unwrap_or_default(),
                            a.error_message().unwrap_or_default()
                        )
                    })
                    .unwrap_or_else(|| "no answer for the record".to_owned());
            }
            again.push(record.clone());
        }
    }
    (again, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> PutRecordBatchResponseEntry {
        PutRecordBatchResponseEntry::builder()
            .record_id("r")
            .build()
    }

    fn failed() -> PutRecordBatchResponseEntry {
        PutRecordBatchResponseEntry::builder()
            .error_code("ServiceUnavailableException")
            .error_message("slow down")
            .build()
    }

    #[test]
    fn only_refused_records_go_again() {
        let batch: Vec<Vec<u8>> = (0..4).map(|i| vec![i]).collect();
        let (again, code) = refused(&batch, &[ok(), failed(), ok(), failed()]);
        assert_eq!(again, vec![vec![1], vec![3]]);
        assert_eq!(code, "ServiceUnavailableException: slow down");
        let (again, _) = refused(&batch, &[ok(), ok(), ok(), ok()]);
        assert!(again.is_empty());
        // Fewer answers than records: the unanswered ones are not taken as delivered.
        let (again, code) = refused(&batch, &[ok(), ok()]);
        assert_eq!(again, vec![vec![2], vec![3]]);
        assert_eq!(code, "no answer for the record");
    }
}

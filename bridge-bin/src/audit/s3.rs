//! `output = "s3"`: records gathered into gzipped JSON-lines objects, one object per flush,
//! at `<prefix>/yyyy/mm/dd/hh/<replica>-<seq>.jsonl.gz` (UTC hour the object was begun).
//!
//! An object is written when it holds `max_object_mb` of records or its first record has
//! waited `flush_interval`, and at shutdown. `<replica>` is the host name (a pod's name on
//! Kubernetes) and a random tag drawn at start, so that replicas, and a replica restarted
//! under the same name, never write the same key; `<seq>` counts the objects of the process.

use std::io::Write;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use flate2::write::GzEncoder;
use flate2::Compression;
use tokio::time::Instant;

use super::{Counts, Health};
use crate::config::AwsTarget;

/// Where objects go.
pub(super) struct Target {
    pub(super) bucket: String,
    pub(super) prefix: String,
    pub(super) flush_interval: Duration,
    pub(super) max_object_bytes: usize,
    pub(super) aws: AwsTarget,
}

/// The object being filled.
struct Object {
    gz: GzEncoder<Vec<u8>>,
    records: u64,
    bytes: usize,
    begun: Instant,
    at: SystemTime,
}

pub(super) struct Writer {
    target: Target,
    replica: String,
    seq: u64,
    client: Option<Client>,
    object: Option<Object>,
    /// Records of the object being sent, until it is settled.
    sending: u64,
    counts: Counts,
    health: Health,
}

impl Writer {
    pub(super) fn new(target: Target, counts: Counts) -> Self {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            })
            .unwrap_or_else(|| "ferry".to_owned());
        let replica = format!("{host}-{:08x}", rand::random::<u32>());
        let health = Health::new("s3", format!("s3://{}/{}", target.bucket, target.prefix));
        Self {
            target,
            replica,
            seq: 0,
            client: None,
            object: None,
            sending: 0,
            counts,
            health,
        }
    }

    pub(super) async fn push(&mut self, line: Vec<u8>) {
        let object = self.object.get_or_insert_with(|| Object {
            gz: GzEncoder::new(Vec::new(), Compression::default()),
            records: 0,
            bytes: 0,
            begun: Instant::now(),
            at: SystemTime::now(),
        });
        // Writing into memory cannot fail.
        let _ = object.gz.write_all(&line);
        object.records += 1;
        object.bytes += line.len();
        if object.bytes >= self.target.max_object_bytes {
            self.flush().await;
        }
    }

    pub(super) fn due(&self) -> Option<Instant> {
        self.object
            .as_ref()
            .map(|o| o.begun + self.target.flush_interval)
    }

    /// The key of the object begun at `at`: `<prefix>/yyyy/mm/dd/hh/<replica>-<seq>.jsonl.gz`.
    fn key(&self, at: SystemTime) -> String {
        let stamp = humantime::format_rfc3339_seconds(at).to_string();
        let (date, hour) = (&stamp[..10], &stamp[11..13]);
        let path = format!(
            "{}/{hour}/{}-{:06}.jsonl.gz",
            date.replace('-', "/"),
            self.replica,
            self.seq
        );
        if self.target.prefix.is_empty() {
            path
        } else {
            format!("{}/{path}", self.target.prefix)
        }
    }

    pub(super) async fn flush(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        let key = self.key(object.at);
        self.seq += 1;
        let records = object.records;
        self.sending = records;
        let body = match object.gz.finish() {
            Ok(body) => body,
            Err(e) => {
                self.counts.dropped.inc_by(records);
                self.sending = 0;
                self.health.failed(&e.to_string());
                return;
            }
        };
        let client = match &self.client {
            Some(client) => client.clone(),
            None => {
                let shared = super::aws_config(&self.target.aws).await;
                let mut config = aws_sdk_s3::config::Builder::from(&shared);
                // An emulator serves buckets by path, not as host names of their own.
                if self.target.aws.endpoint_url.is_some() {
                    config = config.force_path_style(true);
                }
                let client = Client::from_conf(config.build());
                self.client = Some(client.clone());
                client
            }
        };
        let mut error = String::new();
        for attempt in 1..=super::TRIES {
            if attempt > 1 {
                tokio::time::sleep(super::backoff(attempt - 1)).await;
            }
            let put = client
                .put_object()
                .bucket(&self.target.bucket)
                .key(&key)
                .content_type("application/gzip")
                .body(ByteStream::from(body.clone()))
                .send()
                .await;
            match put {
                Ok(_) => {
                    self.counts.written.inc_by(records);
                    self.sending = 0;
                    self.health.ok();
                    return;
                }
                Err(e) => error = ferry_core::error_chain(&e),
            }
        }
        self.counts.dropped.inc_by(records);
        self.sending = 0;
        self.health.failed(&format!("{key}: {error}"));
    }

    pub(super) fn abandon(&mut self) -> u64 {
        let lost = self.sending + self.object.take().map_or(0, |o| o.records);
        self.counts.dropped.inc_by(lost);
        self.sending = 0;
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_hour_and_never_repeat() {
        let counts = Counts {
            written: Default::default(),
            dropped: Default::default(),
        };
        let target = Target {
            bucket: "b".into(),
            prefix: "audit/orders".into(),
            flush_interval: Duration::from_secs(60),
            max_object_bytes: 1024,
            aws: AwsTarget::default(),
        };
        let mut writer = Writer::new(target, counts);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_660_000); // 2025-12-02T07:20:00Z
        let first = writer.key(at);
        assert!(first.starts_with("audit/orders/2025/12/02/07/"), "{first}");
        assert!(first.ends_with("-000000.jsonl.gz"), "{first}");
        writer.seq += 1;
        assert_ne!(writer.key(at), first);
        let other = Writer::new(
            Target {
                bucket: "b".into(),
                prefix: String::new(),
                flush_interval: Duration::from_secs(60),
                max_object_bytes: 1024,
                aws: AwsTarget::default(),
            },
            writer.counts.clone(),
        );
        // Another process under the same host name draws another tag.
        assert_ne!(other.replica, writer.replica);
        assert!(other.key(at).starts_with("2025/12/02/07/"));
    }
}

//! The audit trail file (`[audit]`): one JSON line per message that ended here, written by
//! a thread of its own and rotated by size.
//!
//! Deliveries only queue a record (never wait for the disk); when the queue is full or the
//! file cannot be written, the record is dropped and counted in
//! `ferry_audit_dropped_total`, and the failure is logged once until writing works again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_core::{AuditRecord, AuditTrail};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::AuditPlan;

/// Records waiting for the writer at most; a burst beyond this is dropped (and counted).
const QUEUE: usize = 65_536;

/// The delivery side: queues records for the writer thread.
#[derive(Debug)]
pub struct AuditFile {
    queue: mpsc::Sender<AuditRecord>,
    dropped: Counter,
}

impl AuditTrail for AuditFile {
    fn record(&self, record: AuditRecord) {
        if self.queue.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

/// One line of the file.
#[derive(Serialize)]
struct Line<'a> {
    id: &'a str,
    route: &'a str,
    source: &'a str,
    attempts: u32,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    latency_ms: f64,
    delivered_at: String,
}

/// Opens the file and starts the writer thread; the thread ends once every route has
/// dropped its handle and the last record is on disk.
pub fn start(
    plan: &AuditPlan,
    registry: &mut Registry,
) -> std::io::Result<(Arc<AuditFile>, std::thread::JoinHandle<()>)> {
    let written = Counter::default();
    let dropped = Counter::default();
    registry.register(
        "ferry_audit_records",
        "Audit records written to the audit file",
        written.clone(),
    );
    registry.register(
        "ferry_audit_dropped",
        "Audit records lost: the writer fell behind or the file could not be written",
        dropped.clone(),
    );
    let mut writer = Writer::open(plan.clone(), written, dropped.clone())?;
    let (queue, mut records) = mpsc::channel(QUEUE);
    let thread = std::thread::Builder::new()
        .name("ferry-audit".into())
        .spawn(move || {
            while let Some(record) = records.blocking_recv() {
                writer.write(&record);
                // Flush whenever the queue runs dry, so the file is current while idle.
                if records.is_empty() {
                    writer.flush();
                }
            }
            writer.flush();
        })?;
    Ok((Arc::new(AuditFile { queue, dropped }), thread))
}

struct Writer {
    plan: AuditPlan,
    file: File,
    /// Bytes in the file.
    size: u64,
    /// Lines not yet written, and how many records they hold.
    buffer: Vec<u8>,
    pending: u64,
    written: Counter,
    dropped: Counter,
    failing: bool,
}

/// Lines are written in chunks of about this size.
const CHUNK: usize = 64 * 1024;

fn open(path: &Path) -> std::io::Result<(File, u64)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// `ferry.jsonl.N`, the Nth newest rotated file.
fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

impl Writer {
    fn open(plan: AuditPlan, written: Counter, dropped: Counter) -> std::io::Result<Self> {
        let (file, size) = open(&plan.path)?;
        Ok(Self {
            plan,
            file,
            size,
            buffer: Vec::with_capacity(CHUNK),
            pending: 0,
            written,
            dropped,
            failing: false,
        })
    }

    fn write(&mut self, record: &AuditRecord) {
        let line = Line {
            id: &record.id,
            route: &record.route,
            source: &record.source,
            attempts: record.attempts,
            outcome: record.outcome.as_str(),
            status: record.status,
            latency_ms: (record.latency.as_secs_f64() * 1e6).round() / 1e3,
            delivered_at: humantime::format_rfc3339_millis(record.at).to_string(),
        };
        let mut text = serde_json::to_vec(&line).unwrap_or_default();
        text.push(b'\n');
        let total = self.size + (self.buffer.len() + text.len()) as u64;
        if total > self.plan.max_bytes && self.size + self.buffer.len() as u64 > 0 {
            self.flush();
            let result = self.rotate();
            self.outcome(result);
        }
        self.buffer.extend_from_slice(&text);
        self.pending += 1;
        if self.buffer.len() >= CHUNK {
            self.flush();
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let path = &self.plan.path;
        for n in (1..self.plan.keep).rev() {
            let from = rotated(path, n);
            if from.exists() {
                std::fs::rename(&from, rotated(path, n + 1))?;
            }
        }
        if self.plan.keep > 0 {
            std::fs::rename(path, rotated(path, 1))?;
        } else {
            std::fs::remove_file(path)?;
        }
        let (file, size) = open(path)?;
        self.file = file;
        self.size = size;
        Ok(())
    }

    /// Writes the buffered lines; they count as written or as dropped, never both.
    fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let result = self.file.write_all(&self.buffer);
        if result.is_ok() {
            self.size += self.buffer.len() as u64;
            self.written.inc_by(self.pending);
        } else {
            self.dropped.inc_by(self.pending);
        }
        self.buffer.clear();
        self.pending = 0;
        self.outcome(result);
    }

    /// Logs a failure once, and once more when writing works again.
    fn outcome(&mut self, result: std::io::Result<()>) {
        match result {
            Ok(()) if self.failing => {
                self.failing = false;
                info!(path = %self.plan.path.display(), "audit file writable again");
            }
            Ok(()) => {}
            Err(e) => {
                if !self.failing {
                    warn!(path = %self.plan.path.display(), error = %e, "cannot write the audit file; records are dropped (ferry_audit_dropped_total) until it works again");
                }
                self.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::AuditOutcome;
    use std::time::{Duration, SystemTime};

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            id: format!("m{i}"),
            route: Arc::from("orders"),
            source: Arc::from("orders-queue"),
            attempts: 1,
            outcome: AuditOutcome::Delivered,
            status: Some(200),
            latency: Duration::from_micros(1500),
            at: SystemTime::now(),
        }
    }

    /// Rotation keeps `keep` old files, every line is a whole JSON record, and what is
    /// left is the newest records in order.
    #[test]
    fn rotates_by_size_and_keeps_the_newest_records() {
        let dir = std::env::temp_dir().join(format!("ferry-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("audit.jsonl");
        let plan = AuditPlan {
            path: path.clone(),
            max_bytes: 10_000,
            keep: 2,
        };
        let (written, dropped) = (Counter::default(), Counter::default());
        let mut writer = Writer::open(plan, written.clone(), dropped.clone()).expect("open");
        for i in 0..1000 {
            writer.write(&record(i));
        }
        writer.flush();
        assert_eq!((written.get(), dropped.get()), (1000, 0));
        assert!(rotated(&path, 2).exists());
        assert!(!rotated(&path, 3).exists());
        let mut ids = Vec::new();
        for file in [rotated(&path, 2), rotated(&path, 1), path.clone()] {
            let text = std::fs::read_to_string(&file).expect("read");
            assert!(
                text.len() <= 10_000,
                "{} has {} bytes",
                file.display(),
                text.len()
            );
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("json line");
                assert_eq!(v["route"], "orders");
                assert_eq!(v["outcome"], "delivered");
                assert_eq!(v["status"], 200);
                assert_eq!(v["latency_ms"], 1.5);
                ids.push(v["id"].as_str().expect("id").to_owned());
            }
        }
        let first: usize = ids[0][1..].parse().expect("number");
        let expected: Vec<String> = (first..1000).map(|i| format!("m{i}")).collect();
        assert_eq!(ids, expected);
        assert!(ids.len() > 100, "only {} records kept", ids.len());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file that cannot take the records (a full disk) loses them visibly: every record
    /// counts as dropped, none as written, and nothing panics or blocks.
    #[test]
    fn a_full_disk_drops_records_and_counts_them() {
        let plan = AuditPlan {
            path: PathBuf::from("/dev/full"),
            max_bytes: u64::MAX,
            keep: 0,
        };
        let (written, dropped) = (Counter::default(), Counter::default());
        let mut writer = Writer::open(plan, written.clone(), dropped.clone()).expect("open");
        for i in 0..3000 {
            writer.write(&record(i));
        }
        writer.flush();
        assert_eq!((written.get(), dropped.get()), (0, 3000));
        assert!(writer.failing);
    }
}

//! `output = "file"`: JSON lines in a local file, rotated by size.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use crate::config::AuditFilePlan;

pub(super) struct Writer {
    plan: AuditFilePlan,
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
    pub(super) fn open(
        plan: AuditFilePlan,
        written: Counter,
        dropped: Counter,
    ) -> std::io::Result<Self> {
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

    /// Buffers one line (a whole JSON record and its newline).
    pub(super) fn write(&mut self, text: &[u8]) {
        let total = self.size + (self.buffer.len() + text.len()) as u64;
        if total > self.plan.max_bytes && self.size + self.buffer.len() as u64 > 0 {
            self.flush();
            let result = self.rotate();
            self.outcome(result);
        }
        self.buffer.extend_from_slice(text);
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
    pub(super) fn flush(&mut self) {
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
    use ferry_core::{AuditOutcome, AuditRecord};
    use std::sync::Arc;
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
        let plan = AuditFilePlan {
            path: path.clone(),
            max_bytes: 10_000,
            keep: 2,
        };
        let (written, dropped) = (Counter::default(), Counter::default());
        let mut writer = Writer::open(plan, written.clone(), dropped.clone()).expect("open");
        for i in 0..1000 {
            writer.write(&super::super::line(&record(i)));
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
        let plan = AuditFilePlan {
            path: PathBuf::from("/dev/full"),
            max_bytes: u64::MAX,
            keep: 0,
        };
        let (written, dropped) = (Counter::default(), Counter::default());
        let mut writer = Writer::open(plan, written.clone(), dropped.clone()).expect("open");
        for i in 0..3000 {
            writer.write(&super::super::line(&record(i)));
        }
        writer.flush();
        assert_eq!((written.get(), dropped.get()), (0, 3000));
        assert!(writer.failing);
    }
}

//! `output = "stdout"`: one JSON line per record on standard output, for a log shipper
//! that reads the container's output (ferry's own logs go to standard error).

use std::io::Write;

use super::{Counts, Health};

/// Lines are written in chunks of about this size.
const CHUNK: usize = 64 * 1024;

pub(super) struct Writer {
    buffer: Vec<u8>,
    pending: u64,
    counts: Counts,
    health: Health,
}

impl Writer {
    pub(super) fn new(counts: Counts) -> Self {
        Self {
            buffer: Vec::with_capacity(CHUNK),
            pending: 0,
            counts,
            health: Health::new("stdout", "standard output".to_owned()),
        }
    }

    pub(super) fn push(&mut self, line: Vec<u8>) {
        self.buffer.extend_from_slice(&line);
        self.pending += 1;
        if self.buffer.len() >= CHUNK {
            self.flush();
        }
    }

    /// Writes what is buffered in one go (whole lines only, so that lines of other
    /// writers never cut into a record).
    pub(super) fn flush(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let result = out.write_all(&self.buffer).and_then(|()| out.flush());
        match result {
            Ok(()) => {
                self.counts.written.inc_by(self.pending);
                self.health.ok();
            }
            Err(e) => {
                self.counts.dropped.inc_by(self.pending);
                self.health.failed(&e.to_string());
            }
        }
        self.buffer.clear();
        self.pending = 0;
    }
}

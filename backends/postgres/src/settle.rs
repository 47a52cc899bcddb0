//! Settling rows, off the delivery path: every handle queues its word to one task that
//! writes whatever has gathered while its last statement ran, one statement per kind.
//!
//! A row stays leased (and renewed) until its settlement is written. A statement that
//! fails is counted, logged once, and tried again with backoff; the rows it carried
//! stay claimed meanwhile. Every statement but the delete of a delivered row applies
//! only to the claim it settles (`locked_by` and `attempts` match): a handle whose lease
//! lapsed, and whose row another consumer claimed since, changes nothing there.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Backoff, DeadLetter, Settle, Settlement, SourceContext};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::conn::{describe, Conn};

/// The rows ferry holds, by lease key: each one's id and the attempt its claim counted.
pub(crate) type Leases = ferry_core::lease::Leases<Claim>;

/// One claim of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) id: i64,
    pub(crate) attempts: i32,
}

/// Settlements one statement carries at most.
const MAX_BATCH: usize = 1000;

/// How long settlements that cannot be written are still tried once every handle is
/// gone (at shutdown); their rows come back when their lease ends.
const LAST_TRIES: Duration = Duration::from_secs(5);

/// What became of a row.
#[derive(Debug)]
enum What {
    Done,
    Retry(Duration),
    Release,
    DeadLetter(DeadLetter),
}

/// One settled row.
#[derive(Debug)]
pub(crate) struct Op {
    key: u64,
    claim: Claim,
    what: What,
}

/// The settlement of one claimed row.
pub(crate) struct PgAck {
    pub(crate) key: u64,
    pub(crate) claim: Claim,
    pub(crate) leases: Arc<Leases>,
    pub(crate) settle: mpsc::UnboundedSender<Op>,
}

impl Settle for PgAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let what = match settlement {
            Settlement::Ack => What::Done,
            Settlement::Retry { delay } => What::Retry(delay),
            Settlement::Release => What::Release,
            Settlement::DeadLetter(why) => What::DeadLetter(why),
        };
        // The settler ends only once every handle is gone, so this cannot fail.
        let _ = self.settle.send(Op {
            key: self.key,
            claim: self.claim,
            what,
        });
    }

    /// The retry's time is written into the row (`next_attempt_at`): it survives a
    /// restart, and no replica claims the row before then.
    fn holds_retries(&self) -> bool {
        true
    }

    fn is_current(&self) -> bool {
        self.leases.is_current(self.key)
    }

    /// A dead letter counts once it is in the dead-letter table (or, dropped, deleted).
    fn counts_dead_letters(&self) -> bool {
        true
    }
}

/// Writes the settlements of one route.
pub(crate) struct Settler {
    pub(crate) conn: Arc<Conn>,
    pub(crate) leases: Arc<Leases>,
    /// `locked_by` of this process's claims.
    pub(crate) me: Arc<str>,
    pub(crate) ctx: SourceContext,
    /// Wakes the receiver: a row released, retried or settled may let another be claimed.
    pub(crate) wake: Arc<Notify>,
    /// Whether a settled row may make the next row of its key claimable.
    pub(crate) ordered: bool,
    /// The dead-letter table, or `None` when dead letters are dropped.
    pub(crate) dead_letter_table: Option<String>,
    /// Whether settling fails, so that it is logged when it starts and when it ends.
    pub(crate) failing: AtomicBool,
}

/// The rows of one batch, by what became of them.
#[derive(Default)]
struct Batch {
    done: Vec<Op>,
    retry: Vec<Op>,
    release: Vec<Op>,
    dead: Vec<Op>,
}

impl Batch {
    fn push(&mut self, op: Op) {
        match op.what {
            What::Done => self.done.push(op),
            What::Retry(_) => self.retry.push(op),
            What::Release => self.release.push(op),
            What::DeadLetter(_) => self.dead.push(op),
        }
    }

    fn len(&self) -> usize {
        self.done.len() + self.retry.len() + self.release.len() + self.dead.len()
    }

    fn ops(self) -> impl Iterator<Item = Op> {
        self.done
            .into_iter()
            .chain(self.retry)
            .chain(self.release)
            .chain(self.dead)
    }
}

fn claims(ops: &[Op]) -> (Vec<i64>, Vec<i32>) {
    ops.iter()
        .map(|op| (op.claim.id, op.claim.attempts))
        .unzip()
}

impl Settler {
    /// Runs until every handle is gone and what they settled is written (or, the
    /// database being unreachable, until [`LAST_TRIES`] after that).
    pub(crate) async fn run(self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut pending = Batch::default();
        let mut failures = 0u32;
        let mut closed = false;
        let mut closed_at: Option<Instant> = None;
        loop {
            if pending.len() == 0 {
                if closed {
                    break;
                }
                match rx.recv().await {
                    Some(op) => pending.push(op),
                    None => break,
                }
            }
            // Whatever settled while the last statement ran goes in this batch.
            while !closed && pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => pending.push(op),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
                }
            }
            pending = self.write(pending).await;
            if pending.len() == 0 {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(route = %self.ctx.route, "settlements are written again");
                }
                failures = 0;
                continue;
            }
            failures += 1;
            if closed {
                let since = *closed_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= LAST_TRIES {
                    warn!(route = %self.ctx.route, rows = pending.len(),
                        "stopping with settlements not written; those rows come back when their lease ends");
                    for op in pending.ops() {
                        self.leases.release(op.key);
                    }
                    break;
                }
            }
            // Back off, still taking new settlements in.
            let wait = tokio::time::sleep(backoff.ceiling(failures));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    op = rx.recv(), if !closed => match op {
                        Some(op) => pending.push(op),
                        None => closed = true,
                    },
                }
            }
        }
    }

    /// Writes a batch, one statement per kind; returns what could not be written.
    async fn write(&self, batch: Batch) -> Batch {
        let mut failed = Batch::default();
        let session = match self.conn.session().await {
            Ok(session) => session,
            Err(e) => {
                self.failed("connect", batch.len(), &describe(&e), false);
                return batch;
            }
        };
        let Batch {
            done,
            retry,
            release,
            dead,
        } = batch;
        let client = &session.client;
        let me: &str = &self.me;
        let mut wake = false;
        if !done.is_empty() {
            let (ids, _) = claims(&done);
            let result = client.execute(&session.done, &[&ids]).await;
            // Fewer rows than ids: a duplicate delivered elsewhere was settled first.
            wake |= self.settled("settle", done, result.map(|_| None), &mut failed) && self.ordered;
        }
        if !retry.is_empty() {
            let (ids, attempts) = claims(&retry);
            let delays: Vec<f64> = retry
                .iter()
                .map(|op| match op.what {
                    What::Retry(delay) => delay.as_secs_f64() * 1000.0,
                    _ => 0.0,
                })
                .collect();
            let result = client
                .execute(&session.retry, &[&ids, &attempts, &delays, &me])
                .await;
            wake |= self.settled("retry", retry, result.map(Some), &mut failed);
        }
        if !release.is_empty() {
            let (ids, attempts) = claims(&release);
            let result = client
                .execute(&session.release, &[&ids, &attempts, &me])
                .await;
            wake |= self.settled("release", release, result.map(Some), &mut failed);
        }
        if !dead.is_empty() {
            let result = self.dead_letter(&session, &dead).await;
            let moved = self.settled("dead_letter", dead, result.map(|_| None), &mut failed);
            if moved {
                self.ctx.set_error(None);
            }
            wake |= moved && self.ordered;
        }
        if failed.len() > 0 {
            // A statement that failed for another reason than a lost connection (a
            // table changed under a prepared statement) is prepared again.
            self.conn.drop_session().await;
        }
        if wake {
            self.wake.notify_one();
        }
        failed
    }

    /// Moves dead letters to the dead-letter table (or deletes them when dropped), in
    /// one statement, and counts those that landed.
    async fn dead_letter(
        &self,
        session: &crate::conn::Session,
        ops: &[Op],
    ) -> Result<u64, tokio_postgres::Error> {
        let (ids, attempts) = claims(ops);
        let (made, (reasons, statuses)): (Vec<i32>, (Vec<String>, Vec<String>)) = ops
            .iter()
            .map(|op| match &op.what {
                What::DeadLetter(why) => (
                    i32::try_from(why.attempts).unwrap_or(i32::MAX),
                    (reason(why), why.last_status()),
                ),
                _ => (0, (String::new(), String::new())),
            })
            .unzip();
        let me: &str = &self.me;
        let route: &str = &self.ctx.route;
        let rows = match &self.dead_letter_table {
            Some(_) => {
                session
                    .client
                    .query(
                        &session.dead_letter,
                        &[&ids, &attempts, &made, &reasons, &statuses, &me, &route],
                    )
                    .await
            }
            None => {
                session
                    .client
                    .query(
                        &session.dead_letter,
                        &[&ids, &attempts, &made, &reasons, &statuses, &me],
                    )
                    .await
            }
        }?;
        let landed: HashSet<i64> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        for op in ops {
            let What::DeadLetter(why) = &op.what else {
                continue;
            };
            if !landed.contains(&op.claim.id) {
                debug!(route = %self.ctx.route, id = op.claim.id,
                    "dead letter not moved: the row was claimed again since (its lease lapsed)");
            } else if self.dead_letter_table.is_none() {
                warn!(route = %self.ctx.route, id = op.claim.id, reason = %why,
                    "dead letter dropped (dead_letters = \"drop\")");
            }
        }
        let n = landed.len() as u64;
        match self.dead_letter_table {
            Some(_) => self.ctx.counts.dead_lettered.inc_by(n),
            None => self.ctx.counts.dropped.inc_by(n),
        };
        Ok(n)
    }

    /// Ends what a statement settled, or keeps it for the next try when it failed;
    /// `applied` (rows the statement matched) fewer than it carried means the others
    /// were claimed again after their lease lapsed, and are another claim's now.
    /// Returns whether it went through.
    fn settled(
        &self,
        operation: &'static str,
        ops: Vec<Op>,
        result: Result<Option<u64>, tokio_postgres::Error>,
        failed: &mut Batch,
    ) -> bool {
        match result {
            Ok(applied) => {
                if let Some(stale) = applied.and_then(|n| (ops.len() as u64).checked_sub(n)) {
                    if stale > 0 {
                        debug!(route = %self.ctx.route, operation, rows = stale,
                            "rows claimed again since (their lease lapsed); left to that claim");
                    }
                }
                for op in &ops {
                    self.leases.release(op.key);
                }
                true
            }
            Err(e) => {
                self.failed(
                    operation,
                    ops.len(),
                    &describe(&e),
                    operation == "dead_letter",
                );
                ops.into_iter().for_each(|op| failed.push(op));
                false
            }
        }
    }

    /// Counts and logs a statement that failed; `show` puts it on `/routes` too (a dead
    /// letter that cannot be moved needs an operator).
    fn failed(&self, operation: &'static str, rows: usize, detail: &str, show: bool) {
        self.ctx.counts.broker_errors.count(operation, rows as u64);
        if self.failing.swap(true, Ordering::Relaxed) {
            debug!(route = %self.ctx.route, operation, rows, error = %detail, "settling failed again");
        } else {
            warn!(route = %self.ctx.route, operation, rows, error = %detail,
                "settling failed; the rows stay claimed and it is tried again with backoff");
        }
        if show {
            let table = self.dead_letter_table.as_deref().unwrap_or("the table");
            self.ctx.set_error(Some(format!(
                "dead letters cannot be moved to {table}: {detail}"
            )));
        }
    }
}

/// The reason a dead letter keeps: the status, attempts and the endpoint's answer or the
/// engine's reason, cut to 1 KB.
fn reason(why: &DeadLetter) -> String {
    let mut text = why.to_string();
    if text.len() > 1024 {
        let mut end = 1024;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let why = DeadLetter {
            reason: "é".repeat(1000),
            status: Some(422),
            last_class: "4xx",
            attempts: 1,
        };
        let text = reason(&why);
        assert!(text.len() <= 1024 && text.starts_with("status 422 after 1 attempt(s): é"));
    }
}

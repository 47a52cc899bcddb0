//! The receive loop: claim as many rows as the engine has room for, one statement each
//! time; when the table has no more, sleep until a notification, a settled row, the next
//! retry's time or the fallback poll, whichever comes first.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::{AckHandle, Backoff, Delivery, SourceContext};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::conn::{describe, Conn};
use crate::convert::claimed;
use crate::settle::{Claim, Leases, Op, PgAck};

pub(crate) struct Receiver {
    /// The connection that claims and `LISTEN`s.
    pub(crate) conn: Conn,
    pub(crate) leases: Arc<Leases>,
    pub(crate) settle: mpsc::UnboundedSender<Op>,
    /// Woken by notifications, by the settler, and by the loss of the connection.
    pub(crate) wake: Arc<Notify>,
    pub(crate) table: Arc<str>,
    pub(crate) me: Arc<str>,
    pub(crate) batch_size: usize,
    pub(crate) lease: Duration,
    pub(crate) poll_interval: Duration,
}

/// Receives until shutdown or until the engine closes its end.
pub(crate) async fn run(r: Receiver, out: mpsc::Sender<Delivery>, ctx: SourceContext) {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failures = 0u32;
    let mut down = false;
    loop {
        // Claim only what the engine has room for: at least one, at most a batch.
        let first = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            p = out.reserve() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while permits.len() < r.batch_size {
            match out.try_reserve() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let asked = Instant::now();
        // Not cut short by shutdown: what a claim took is handed over, or released by
        // its dropped handle, instead of waiting out its lease.
        match r.claim(permits.len()).await {
            Ok(rows) => {
                failures = 0;
                ctx.set_connected(true);
                if down {
                    info!(route = %ctx.route, table = %r.table, "claiming again");
                    down = false;
                }
                let full = rows.len() == permits.len();
                let mut permits = permits.into_iter();
                for row in rows {
                    let claimed = match claimed(&row, &r.table) {
                        Ok(c) => c,
                        Err(e) => {
                            // Its lease ends and it is claimed again later.
                            warn!(route = %ctx.route, table = %r.table, error = %describe(&e),
                                "a claimed row could not be read; it returns when its lease ends");
                            continue;
                        }
                    };
                    let claim = Claim {
                        id: claimed.id,
                        attempts: claimed.attempts,
                    };
                    let ack = AckHandle::new(PgAck {
                        key: r.leases.hold(claim, asked),
                        claim,
                        leases: r.leases.clone(),
                        settle: r.settle.clone(),
                    });
                    let delivery = Delivery {
                        message: claimed.message,
                        ack,
                    };
                    // As many rows as permits were asked for.
                    if let Some(permit) = permits.next() {
                        permit.send(delivery);
                    }
                }
                if full {
                    continue;
                }
                // The table had no more: wait for a reason to look again.
                let wait = r.next_due().await.min(r.poll_interval);
                tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => return,
                    _ = r.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                drop(permits);
                failures += 1;
                ctx.set_connected(false);
                ctx.counts.broker_errors.count("claim", 1);
                r.conn.drop_session().await;
                if !down {
                    warn!(route = %ctx.route, table = %r.table, error = %describe(&e),
                        "cannot claim rows; retrying with backoff");
                    down = true;
                }
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.ceiling(failures)) => {}
                }
            }
        }
    }
}

impl Receiver {
    /// Claims up to `n` ready rows, oldest first.
    async fn claim(&self, n: usize) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let session = self.conn.session().await?;
        let limit = n as i64;
        let lease_ms = self.lease.as_secs_f64() * 1000.0;
        let me: &str = &self.me;
        let mut rows = session
            .client
            .query(&session.claim, &[&limit, &lease_ms, &me])
            .await?;
        // `UPDATE ... RETURNING` keeps no order.
        rows.sort_by_key(|row| row.try_get::<_, i64>(0).unwrap_or(i64::MAX));
        Ok(rows)
    }

    /// How long until the next row waiting for a retry is due; the poll interval when
    /// none waits or the database does not say.
    async fn next_due(&self) -> Duration {
        let due = async {
            let session = self.conn.session().await.ok()?;
            let row = session
                .client
                .query_one(&session.next_due, &[])
                .await
                .ok()?;
            row.try_get::<_, Option<f64>>(0).ok().flatten()
        };
        match due.await {
            // A millisecond late rather than early: claimed the moment it is due.
            Some(secs) => Duration::from_secs_f64(secs.max(0.0)) + Duration::from_millis(1),
            None => self.poll_interval,
        }
    }
}

/// Keeps `ferry_source_backlog` at the count of rows ready now.
pub(crate) async fn poll_backlog(conn: Arc<Conn>, ctx: SourceContext) {
    loop {
        if let Ok(session) = conn.session().await {
            if let Ok(row) = session.client.query_one(&session.backlog, &[]).await {
                if let Ok(n) = row.try_get::<_, i64>(0) {
                    ctx.backlog.set(n);
                }
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

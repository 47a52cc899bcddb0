//! Leases: the core lease service, renewed with one `UPDATE` for every due row.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::lease::Renew;
use ferry_core::BrokerErrors;
use tracing::warn;

use crate::conn::{describe, Conn};
use crate::settle::Claim;

/// Extends `locked_until` of this process's claims.
pub(crate) struct Renewal {
    pub(crate) conn: Arc<Conn>,
    pub(crate) me: Arc<str>,
    pub(crate) route: Arc<str>,
    pub(crate) errors: BrokerErrors,
}

impl Renew<Claim> for Renewal {
    /// A row the statement did not extend is one claimed again since (its lease had
    /// lapsed in the database): it stays unrenewed, so its lease lapses here too. A
    /// failed statement is counted (`renew`) and tried again at the next check.
    async fn renew(&self, due: Vec<Claim>, length: Duration) -> Vec<bool> {
        let ids: Vec<i64> = due.iter().map(|c| c.id).collect();
        let attempts: Vec<i32> = due.iter().map(|c| c.attempts).collect();
        let lease_ms = length.as_secs_f64() * 1000.0;
        let me: &str = &self.me;
        let result = match self.conn.session().await {
            Ok(session) => session
                .client
                .query(&session.renew, &[&ids, &attempts, &lease_ms, &me])
                .await
                .map_err(|e| describe(&e)),
            Err(e) => Err(describe(&e)),
        };
        match result {
            Ok(rows) => {
                let extended: HashSet<i64> =
                    rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
                due.iter().map(|c| extended.contains(&c.id)).collect()
            }
            Err(detail) => {
                self.conn.drop_session().await;
                self.errors.count("renew", due.len() as u64);
                warn!(route = %self.route, rows = due.len(), error = %detail,
                    "lease renewal failed; trying again");
                vec![false; due.len()]
            }
        }
    }
}

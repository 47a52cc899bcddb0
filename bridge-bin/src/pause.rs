//! Pausing and resuming routes: in this process, or for every replica at once through a
//! Redis hash (`[admin.state]`).
//!
//! The hash `<prefix>:paused` holds one field per paused route. An operator's call writes
//! it first and changes this replica only once Redis took it, so replicas never disagree
//! because one of them could not reach Redis; every replica reads the hash every
//! `poll_interval` and follows it. When Redis cannot be reached the routes keep the state
//! they have, and the replica says so once (and once more when it is back).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use ferry_core::SourceContext;
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::StatePlan;

/// How long one Redis call may take before the shared state counts as unreachable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a pause or resume was not applied.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// No route has that name.
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    /// The shared state could not be written; nothing changed.
    #[error("shared state unreachable, nothing changed: {0}")]
    Unreachable(String),
}

/// The pause switches of every route.
pub struct Switches {
    /// The running routes; a reload replaces them ([`Switches::replace`]).
    routes: RwLock<Vec<SourceContext>>,
    shared: Option<Shared>,
}

struct Shared {
    client: redis::Client,
    key: String,
    poll_interval: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    reachable: AtomicBool,
}

impl Switches {
    /// Switches for these routes; `state` shares them through Redis.
    pub fn new(routes: Vec<SourceContext>, state: Option<&StatePlan>) -> Result<Self, String> {
        let shared = match state {
            None => None,
            Some(plan) => Some(Shared {
                client: redis::Client::open(plan.redis_url.as_str())
                    .map_err(|e| format!("admin.state.redis_url: {e}"))?,
                key: plan.key.clone(),
                poll_interval: plan.poll_interval,
                conn: Mutex::new(None),
                reachable: AtomicBool::new(true),
            }),
        };
        Ok(Self {
            routes: RwLock::new(routes),
            shared,
        })
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Vec<SourceContext>> {
        self.routes.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pauses or resumes one route, for every replica when the state is shared.
    pub async fn set(&self, name: &str, paused: bool) -> Result<(), SwitchError> {
        let unknown = || SwitchError::UnknownRoute(name.to_owned());
        if !self.routes().iter().any(|ctx| &*ctx.route == name) {
            return Err(unknown());
        }
        if let Some(shared) = &self.shared {
            shared
                .write(name, paused)
                .await
                .map_err(SwitchError::Unreachable)?;
        }
        // Looked up again, under the lock a reload replaces routes with: a route restarted
        // meanwhile gets the switch, not the context it had before.
        let routes = self.routes();
        let ctx = routes
            .iter()
            .find(|ctx| &*ctx.route == name)
            .ok_or_else(unknown)?;
        ctx.set_paused(paused);
        Ok(())
    }

    /// After a reload: switches for this set of routes. A route that replaces one of the
    /// same name takes over its paused state, so an operator's pause survives the restart
    /// (call before the new routes receive).
    pub fn replace(&self, routes: Vec<SourceContext>) {
        let mut now = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        for ctx in &routes {
            if let Some(old) = now.iter().find(|old| old.route == ctx.route) {
                ctx.set_paused(old.is_paused());
            }
        }
        *now = routes;
    }

    /// Applies the shared state once; called at start, before the routes receive, so a
    /// replica that starts while its routes are paused delivers nothing first.
    pub async fn load(&self) {
        let Some(shared) = &self.shared else { return };
        if let Some(paused) = shared.read().await {
            for ctx in self.routes().iter() {
                ctx.set_paused(paused.contains_key(&*ctx.route));
            }
        }
    }

    /// Follows the shared state every `poll_interval` until shutdown.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(shared) = &self.shared else { return };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(shared.poll_interval) => self.load().await,
            }
        }
    }
}

impl Shared {
    async fn write(&self, route: &str, paused: bool) -> Result<(), String> {
        let key = self.key.clone();
        let route = route.to_owned();
        self.call(move |mut conn| async move {
            if paused {
                conn.hset::<_, _, _, ()>(&key, &route, 1).await
            } else {
                conn.hdel::<_, _, ()>(&key, &route).await
            }
        })
        .await
    }

    /// The paused routes, or `None` (said once) when Redis cannot be reached.
    async fn read(&self) -> Option<HashMap<String, String>> {
        let key = self.key.clone();
        self.call(move |mut conn| async move { conn.hgetall(&key).await })
            .await
            .ok()
    }

    /// One Redis call on the shared connection, reconnecting after a failure and reporting
    /// reachability changes once each.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = tokio::time::timeout(REDIS_TIMEOUT, async {
            let mut slot = self.conn.lock().await;
            let conn = match &*slot {
                Some(conn) => conn.clone(),
                None => {
                    let conn = self
                        .client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| e.to_string())?;
                    *slot = Some(conn.clone());
                    conn
                }
            };
            drop(slot);
            op(conn).await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REDIS_TIMEOUT:?}")));
        match &result {
            Ok(_) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    info!(key = %self.key, "shared state reachable again; following it");
                }
            }
            Err(e) => {
                *self.conn.lock().await = None;
                if self.reachable.swap(false, Ordering::Relaxed) {
                    warn!(key = %self.key, error = %e, "shared state unreachable; routes keep their current state");
                }
            }
        }
        result
    }
}

//! `rate_limit = { ..., shared = true }`: one limit for the whole fleet, kept in the
//! `[admin.state]` Redis, so that three replicas together send no more than the endpoint
//! takes.
//!
//! Each request reserves its turn with one atomic script (GCRA, the generic cell rate
//! algorithm: the key holds the theoretical arrival time of the next request, in Redis's
//! own clock, so the replicas' clocks do not matter) and waits until that turn. Every
//! replica also keeps a heartbeat in a sorted set, so it knows how many share the limit.
//! When Redis cannot be reached, each replica paces itself at `per_second / replicas`
//! (the last count it saw) and says so once, and once more when Redis is back.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_core::{RateLimit, SharedRate};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long one reservation may take before Redis counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// How late a reserved turn may be taken before it is given up for a new one.
const LATE: Duration = Duration::from_millis(15);
/// How often a replica says it is alive (and, while Redis is away, tries it again).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica not heard from for this long no longer counts.
const MEMBER_TTL: Duration = Duration::from_secs(10);

/// Reserves one request's turn: returns how many microseconds to wait for it.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tau - now
if wait < 0 then wait = 0 end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.floor((next_tat - now) / 1000) + 1000)
return wait
";

/// Keeps this replica's heartbeat and counts the live ones.
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 3)
return redis.call('ZCARD', KEYS[1])
";

/// The fleet's limit for one route.
pub struct RedisRate {
    route: Arc<str>,
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    key: String,
    members: String,
    instance: String,
    interval_us: u64,
    tau_us: u64,
    limit: RateLimit,
    gcra: redis::Script,
    heartbeat: redis::Script,
    /// Replicas last seen sharing the limit (at least 1).
    replicas: AtomicUsize,
    /// Redis is away: pace with `fallback`.
    away: AtomicBool,
    fallback: Mutex<(usize, Arc<DefaultDirectRateLimiter>)>,
}

impl RedisRate {
    /// The limit of `route`, kept under `<prefix>:rate:<route>`; `stop` ends its heartbeat.
    pub fn start(
        route: Arc<str>,
        redis_url: &str,
        prefix: &str,
        limit: RateLimit,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let client =
            redis::Client::open(redis_url).map_err(|e| format!("admin.state.redis_url: {e}"))?;
        let interval_us = 1_000_000 / u64::from(limit.per_second.get());
        let rate = Arc::new(Self {
            key: format!("{prefix}:rate:{route}"),
            members: format!("{prefix}:rate:{route}:replicas"),
            instance: instance_id(),
            interval_us,
            tau_us: interval_us * u64::from(limit.burst.get().saturating_sub(1)),
            limit,
            gcra: redis::Script::new(GCRA),
            heartbeat: redis::Script::new(HEARTBEAT_SCRIPT),
            replicas: AtomicUsize::new(1),
            away: AtomicBool::new(false),
            fallback: Mutex::new((1, Arc::new(local(limit, 1)))),
            client,
            conn: tokio::sync::Mutex::new(None),
            route,
        });
        tokio::spawn(rate.clone().beat(stop));
        Ok(rate)
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        let mut conn = self.conn.lock().await;
        if conn.is_none() {
            let connecting = ConnectionManager::new(self.client.clone());
            if let Ok(Ok(c)) = tokio::time::timeout(CALL_TIMEOUT * 4, connecting).await {
                *conn = Some(c);
            }
        }
        conn.clone()
    }

    /// Every `HEARTBEAT`: says this replica is alive, counts the others, and finds out
    /// whether Redis is (back) within reach.
    async fn beat(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let counted = match self.connection().await {
                Some(mut conn) => {
                    let mut invocation = self.heartbeat.key(&self.members);
                    invocation
                        .arg(&self.instance)
                        .arg(MEMBER_TTL.as_millis() as u64);
                    let call = invocation.invoke_async::<usize>(&mut conn);
                    tokio::time::timeout(CALL_TIMEOUT * 4, call)
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
                None => None,
            };
            match counted {
                Some(n) => {
                    self.replicas.store(n.max(1), Ordering::Relaxed);
                    self.reachable();
                }
                None => self.unreachable("heartbeat"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    fn reachable(&self) {
        if self.away.swap(false, Ordering::Relaxed) {
            info!(route = %self.route, "shared rate limit: Redis reachable again, pacing with the fleet");
        }
    }

    fn unreachable(&self, during: &str) {
        if !self.away.swap(true, Ordering::Relaxed) {
            let replicas = self.replicas.load(Ordering::Relaxed);
            warn!(route = %self.route, during, replicas,
                per_second = self.limit.per_second.get() as usize / replicas,
                "shared rate limit: Redis unreachable, pacing this replica at per_second / replicas");
        }
    }

    /// The local bucket for `per_second / replicas`, rebuilt when the count changed.
    fn fallback(&self) -> Arc<DefaultDirectRateLimiter> {
        let replicas = self.replicas.load(Ordering::Relaxed);
        let mut fallback = self.fallback.lock().unwrap_or_else(PoisonError::into_inner);
        if fallback.0 != replicas {
            *fallback = (replicas, Arc::new(local(self.limit, replicas)));
        }
        fallback.1.clone()
    }

    async fn reserve(&self) -> Option<Duration> {
        let mut conn = self.connection().await?;
        let mut invocation = self.gcra.key(&self.key);
        invocation.arg(self.interval_us).arg(self.tau_us);
        let call = invocation.invoke_async::<u64>(&mut conn);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(wait_us)) => Some(Duration::from_micros(wait_us)),
            _ => None,
        }
    }
}

impl SharedRate for RedisRate {
    fn turn(&self) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            // While Redis is away only the heartbeat tries it, so requests do not each
            // wait out a timeout.
            if !self.away.load(Ordering::Relaxed) {
                // A turn taken long after its time (this process was not scheduled) would
                // bunch with the turns after it: it is given up and one more is reserved.
                for retry in [true, false] {
                    let Some(wait) = self.reserve().await else {
                        self.unreachable("reservation");
                        break;
                    };
                    let due = tokio::time::Instant::now() + wait;
                    if !wait.is_zero() {
                        tokio::time::sleep_until(due).await;
                    }
                    if !retry || due.elapsed() <= LATE {
                        return;
                    }
                }
                if !self.away.load(Ordering::Relaxed) {
                    return;
                }
            }
            self.fallback().until_ready().await;
        })
    }
}

/// This replica's share of `limit` as a local token bucket.
fn local(limit: RateLimit, replicas: usize) -> DefaultDirectRateLimiter {
    let share = |n: NonZeroU32| {
        NonZeroU32::new(n.get() / u32::try_from(replicas).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN)
    };
    let burst = share(limit.burst);
    let bucket = RateLimiter::direct(Quota::per_second(share(limit.per_second)).allow_burst(burst));
    // It starts empty: it takes over from the fleet's limit mid-stream, not after a quiet
    // spell, and a full bucket in every replica at once would be a burst the fleet never
    // allowed.
    let _ = bucket.check_n(burst);
    bucket
}

/// A name for this process that no other replica has (heartbeat members).
fn instance_id() -> String {
    use rand::Rng;
    let n: u128 = rand::thread_rng().gen();
    format!("{n:032x}")
}

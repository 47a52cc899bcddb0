//! Redis Streams in the conformance suite, twice: through ferry's own backend
//! (`type = "redis"`, [`Redis`]) and through the `redis-streams-bridge` example, a backend
//! written outside ferry on `ferry-core` alone ([`Example`]). Also what the Redis tests
//! share: the local Redis, a stream's group counts, its dead letters. The bridge reaches
//! Redis through a [`Proxy`] so that the suite can cut it off mid-stream.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::AsyncCommands;

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::ferry::workspace_binary;
use crate::proxy::Proxy;

/// The group every Redis test reads with.
pub const GROUP: &str = "ferry";

/// How long an entry may look idle before a consumer takes it over, in the suite: far
/// longer than any of its deliveries.
const CLAIM_IDLE: Duration = Duration::from_secs(10);

/// The local Redis.
pub struct Redis {
    con: MultiplexedConnection,
}

impl Redis {
    /// Connects; panics with a clear message when Redis is not running.
    pub async fn connect() -> Self {
        let client = redis::Client::open("redis://127.0.0.1:6379/").expect("redis url");
        let con = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("Redis is not reachable at 127.0.0.1:6379 ({e}); start it with `redis-server --daemonize yes`"));
        Self { con }
    }

    /// A connection for a test's own commands.
    pub fn con(&self) -> MultiplexedConnection {
        self.con.clone()
    }
}

/// `pending` and `lag` of the group, from `XINFO GROUPS`; `None` while there is no group.
pub async fn group_counts(con: &MultiplexedConnection, stream: &str) -> Option<(u64, u64)> {
    let mut con = con.clone();
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    let int = |v: Option<&redis::Value>| match v {
        Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    groups
        .iter()
        .find(
            |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == GROUP.as_bytes()),
        )
        .map(|g| (int(g.get("pending")), int(g.get("lag"))))
}

/// Entries the group has not acknowledged: pending plus never read (all of the stream
/// while there is no group yet).
pub async fn unacked(con: &MultiplexedConnection, stream: &str) -> u64 {
    match group_counts(con, stream).await {
        Some((pending, lag)) => pending + lag,
        None => con.clone().xlen(stream).await.unwrap_or(0),
    }
}

/// Appends `messages` (field `body`, and `key` when they have one), in order.
pub async fn publish(con: &MultiplexedConnection, stream: &str, messages: &[Outgoing]) {
    let mut con = con.clone();
    let mut pipe = redis::pipe();
    for m in messages {
        let mut fields = vec![("body", m.body.clone())];
        if let Some(key) = &m.key {
            fields.push(("key", key.clone()));
        }
        pipe.xadd(stream, "*", &fields).ignore();
    }
    let _: () = pipe.query_async(&mut con).await.expect("XADD");
}

/// Takes (and deletes) every entry of a dead-letter stream, as field maps.
pub async fn take_all(con: &MultiplexedConnection, stream: &str) -> Vec<HashMap<String, String>> {
    let mut con = con.clone();
    let reply: StreamRangeReply = con.xrange_all(stream).await.expect("XRANGE");
    let ids: Vec<String> = reply.ids.iter().map(|e| e.id.clone()).collect();
    if !ids.is_empty() {
        let _: i64 = con.xdel(stream, &ids).await.expect("XDEL");
    }
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .keys()
                .map(|k| (k.clone(), e.get::<String>(k).unwrap_or_default()))
                .collect()
        })
        .collect()
}

/// Pending entries idle for `idle` or longer: those any consumer's `XAUTOCLAIM` takes now.
pub async fn claimable(con: &MultiplexedConnection, stream: &str, idle: Duration) -> u64 {
    let mut con = con.clone();
    let rows: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(GROUP)
        .arg("IDLE")
        .arg(idle.as_millis() as u64)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    rows.len() as u64
}

/// A `[routes.r.source]` body for `stream` with the group made by `declare`; `extra`
/// adds or overrides keys (`consumer`, `claim_idle`, where dead letters go).
pub fn source(url: &str, stream: &str, extra: &str) -> String {
    let dead_letters = if extra.contains("dead_letter") {
        String::new()
    } else {
        format!("dead_letter_stream = \"{stream}.dead-letter\"\n")
    };
    format!(
        "type = \"redis\"\nurl = \"{url}\"\nstream = \"{stream}\"\ngroup = \"{GROUP}\"\n\
         declare = true\nkey_field = \"key\"\n{dead_letters}{extra}\n"
    )
}

/// The local Redis, read by the `redis-streams-bridge` example.
pub struct Example(pub Redis);

impl Example {
    /// Connects; panics with a clear message when Redis is not running.
    pub async fn connect() -> Self {
        Self(Redis::connect().await)
    }
}

/// Which bridge reads a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// ferry, `type = "redis"`.
    Ferry,
    /// The example.
    Example,
}

/// A stream with its dead-letter stream.
pub struct RedisStream {
    con: MultiplexedConnection,
    stream: String,
    proxy: Proxy,
    reader: Reader,
}

impl Redis {
    async fn stream(&self, reader: Reader) -> RedisStream {
        RedisStream {
            con: self.con.clone(),
            stream: crate::unique("conf"),
            proxy: Proxy::start("127.0.0.1:6379").await,
            reader,
        }
    }
}

impl Backend for Redis {
    type Queue = RedisStream;
    /// Entries read again from the pending list carry Redis's delivery count.
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> RedisStream {
        self.stream(Reader::Ferry).await
    }
}

impl Backend for Example {
    type Queue = RedisStream;
    /// An entry read again from the pending list is labelled a second delivery at least.
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> RedisStream {
        self.0.stream(Reader::Example).await
    }
}

impl TestQueue for RedisStream {
    fn bridge(&self) -> Bridge {
        let url = format!("redis://{}/", self.proxy.addr());
        match self.reader {
            Reader::Ferry => Bridge::Ferry {
                source: source(
                    &url,
                    &self.stream,
                    &format!(
                        "consumer = \"conformance\"\nclaim_idle = \"{}s\"",
                        CLAIM_IDLE.as_secs()
                    ),
                ),
            },
            Reader::Example => Bridge::Program {
                path: workspace_binary("redis-streams-bridge"),
                args: vec![
                    "--redis-url".into(),
                    url,
                    "--stream".into(),
                    self.stream.clone(),
                    "--group".into(),
                    GROUP.into(),
                    "--consumer".into(),
                    "bridge-1".into(),
                ],
                ready_marker: "receiving".into(),
            },
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        publish(&self.con, &self.stream, messages).await;
    }

    /// Entries no consumer has read, and pending ones another consumer may take now. ferry
    /// sets the idle time of an entry it releases to `claim_idle`, so any consumer's
    /// `XAUTOCLAIM` takes it at once. The example leaves a released entry pending for its
    /// consumer name, whose next start reads it first: for the bridge that comes back,
    /// everything unacknowledged is ready at once.
    async fn ready(&self) -> u64 {
        if self.reader == Reader::Example {
            return unacked(&self.con, &self.stream).await;
        }
        let lag = group_counts(&self.con, &self.stream)
            .await
            .map_or(0, |(_, lag)| lag);
        lag + claimable(&self.con, &self.stream, CLAIM_IDLE).await
    }

    async fn remaining(&self) -> u64 {
        unacked(&self.con, &self.stream).await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        take_all(&self.con, &format!("{}.dead-letter", self.stream))
            .await
            .into_iter()
            .map(|f| {
                let field = |name: &str| f.get(name).cloned().unwrap_or_default();
                DeadLettered {
                    body: field("body"),
                    reason: match self.reader {
                        Reader::Ferry => {
                            format!(
                                "status {}: {}",
                                field("ferry_status"),
                                field("ferry_reason")
                            )
                        }
                        Reader::Example => field("reason"),
                    },
                }
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy.cut(down).await;
    }

    fn max_unacked(&self, settings: &Settings) -> usize {
        // In flight plus what waits: two read batches of 100 (ferry), one of 64 (the example).
        settings.concurrency
            + match self.reader {
                Reader::Ferry => 200,
                Reader::Example => 64,
            }
    }
}

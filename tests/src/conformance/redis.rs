//! Redis Streams in the conformance suite, bridged by the `redis-streams-bridge`
//! example (a backend written outside ferry, on `ferry-core` alone). The bridge reaches
//! Redis through a [`Proxy`] so that the suite can cut it off mid-stream.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::AsyncCommands;

use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::ferry::workspace_binary;
use crate::proxy::Proxy;

const GROUP: &str = "ferry";

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
}

/// A stream with its dead-letter stream.
pub struct RedisStream {
    con: MultiplexedConnection,
    stream: String,
    proxy: Proxy,
}

impl Backend for Redis {
    type Queue = RedisStream;
    /// Entries read again from the pending list carry Redis's delivery count.
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> RedisStream {
        RedisStream {
            con: self.con.clone(),
            stream: crate::unique("conf"),
            proxy: Proxy::start("127.0.0.1:6379").await,
        }
    }
}

impl RedisStream {
    fn dead_letter(&self) -> String {
        format!("{}.dead-letter", self.stream)
    }

    /// Pending (handed out, not acked) plus not yet handed out, for the group.
    async fn unacked(&self) -> u64 {
        let mut con = self.con.clone();
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        };
        match groups.iter().find(
            |g| matches!(g.get("name"), Some(redis::Value::BulkString(n)) if n == GROUP.as_bytes()),
        ) {
            Some(g) => int(g.get("pending")) + int(g.get("lag")),
            // No group yet: everything in the stream is still to be read.
            None => con.xlen(&self.stream).await.unwrap_or(0),
        }
    }
}

impl TestQueue for RedisStream {
    fn bridge(&self) -> Bridge {
        Bridge::Program {
            path: workspace_binary("redis-streams-bridge"),
            args: vec![
                "--redis-url".into(),
                format!("redis://{}/", self.proxy.addr()),
                "--stream".into(),
                self.stream.clone(),
                "--group".into(),
                GROUP.into(),
                "--consumer".into(),
                "bridge-1".into(),
            ],
            ready_marker: "receiving".into(),
        }
    }

    async fn publish(&self, messages: &[Outgoing]) {
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        for m in messages {
            let mut fields = vec![("body", m.body.clone())];
            if let Some(key) = &m.key {
                fields.push(("key", key.clone()));
            }
            pipe.xadd(&self.stream, "*", &fields).ignore();
        }
        let _: () = pipe.query_async(&mut con).await.expect("XADD");
    }

    async fn ready(&self) -> u64 {
        self.unacked().await
    }

    async fn remaining(&self) -> u64 {
        self.unacked().await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        let mut con = self.con.clone();
        let reply: StreamRangeReply = con.xrange_all(self.dead_letter()).await.expect("XRANGE");
        let ids: Vec<String> = reply.ids.iter().map(|e| e.id.clone()).collect();
        if !ids.is_empty() {
            let _: i64 = con.xdel(self.dead_letter(), &ids).await.expect("XDEL");
        }
        reply
            .ids
            .into_iter()
            .map(|e| DeadLettered {
                body: e.get("body").unwrap_or_default(),
                reason: e.get("reason").unwrap_or_default(),
            })
            .collect()
    }

    async fn disrupt(&self, down: Duration) {
        self.proxy.cut(down).await;
    }

    fn max_unacked(&self, settings: &Settings) -> usize {
        // In flight plus one read batch waiting.
        settings.concurrency + 64
    }
}

//! Redis Streams in the conformance suite through the `redis-streams-bridge` example (a
//! backend written outside ferry, on `ferry-core` alone). The bridge reaches Redis
//! through a [`Proxy`] so that the suite can cut it off mid-stream.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use super::redis::{publish, take_all, unacked, Redis, GROUP};
use super::{Backend, Bridge, DeadLettered, Outgoing, Settings, TestQueue};
use crate::ferry::workspace_binary;
use crate::proxy::Proxy;

/// The local Redis, read by the example.
pub struct Example(pub Redis);

impl Example {
    /// Connects; panics with a clear message when Redis is not running.
    pub async fn connect() -> Self {
        Self(Redis::connect().await)
    }
}

/// A stream with its dead-letter stream.
pub struct ExampleStream {
    con: MultiplexedConnection,
    stream: String,
    proxy: Proxy,
}

impl Backend for Example {
    type Queue = ExampleStream;
    /// An entry read again from the pending list is labelled a second delivery at least.
    const LABELS_REDELIVERIES: bool = true;
    const KEEPS_REASON: bool = true;

    async fn queue(&self, _ordered: bool) -> ExampleStream {
        ExampleStream {
            con: self.0.con(),
            stream: crate::unique("conf"),
            proxy: Proxy::start("127.0.0.1:6379").await,
        }
    }
}

impl TestQueue for ExampleStream {
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
        publish(&self.con, &self.stream, messages).await;
    }

    /// The example leaves a released entry pending for its consumer name, whose next
    /// start reads it first: for the bridge that comes back, everything unacknowledged is
    /// ready at once.
    async fn ready(&self) -> u64 {
        unacked(&self.con, &self.stream).await
    }

    async fn remaining(&self) -> u64 {
        unacked(&self.con, &self.stream).await
    }

    async fn dead_letters(&self) -> Vec<DeadLettered> {
        take_all(&self.con, &format!("{}.dead-letter", self.stream))
            .await
            .into_iter()
            .map(|f| DeadLettered {
                body: f.get("body").cloned().unwrap_or_default(),
                reason: f.get("reason").cloned().unwrap_or_default(),
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

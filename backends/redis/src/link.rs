//! One connection to Redis that is dialled again after it failed.
//!
//! A connection that broke, or went silent past its response timeout (a half-open TCP
//! connection after a network cut answers nothing and reports nothing), is dropped, so the
//! next call dials anew: a Redis restart or a network cut heals without a restart. Each
//! task of a route has its own link, so the reader's blocking `XREADGROUP` never holds up
//! an acknowledgement.

use std::future::Future;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisResult, ScriptInvocation, Value,
};

/// How long dialling may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Link {
    client: redis::Client,
    con: Option<MultiplexedConnection>,
    /// How long one call may wait for its answer.
    timeout: Duration,
}

impl Link {
    pub(crate) fn new(client: redis::Client, timeout: Duration) -> Self {
        Self {
            client,
            con: None,
            timeout,
        }
    }

    /// Runs `call` on the connection, dialling first if there is none; a failure of the
    /// connection itself (not an error answer) drops it.
    async fn on<T, F, Fut>(&mut self, call: F) -> RedisResult<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let con = match &self.con {
            Some(con) => con.clone(),
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(self.timeout);
                let con = self
                    .client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                self.con = Some(con.clone());
                con
            }
        };
        let result = call(con).await;
        if let Err(e) = &result {
            if broken(e) {
                self.con = None;
            }
        }
        result
    }

    /// One command.
    pub(crate) async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        self.on(|mut con| async move { cmd.query_async(&mut con).await })
            .await
    }

    /// Commands sent together (a `MULTI`/`EXEC` when the pipeline is atomic).
    pub(crate) async fn pipe<T: FromRedisValue>(&mut self, pipe: &Pipeline) -> RedisResult<T> {
        self.on(|mut con| async move { pipe.query_async(&mut con).await })
            .await
    }

    /// A Lua script (`EVALSHA`, loading it first where Redis does not know it yet).
    pub(crate) async fn invoke<T: FromRedisValue>(
        &mut self,
        script: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        self.on(|mut con| async move { script.invoke_async(&mut con).await })
            .await
    }

    /// A command or a script.
    pub(crate) async fn send(&mut self, request: &Request<'_>) -> RedisResult<Value> {
        match request {
            Request::Cmd(cmd) => self.query(cmd).await,
            Request::Script(script) => self.invoke(script).await,
        }
    }
}

/// A call that settles entries, sent again until it goes through.
pub(crate) enum Request<'a> {
    Cmd(Cmd),
    Script(ScriptInvocation<'a>),
}

/// True when the connection, not the command, failed: it is then dialled again.
pub(crate) fn broken(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

//! `ferry_source_backlog`: what the group has not finished, from `XINFO GROUPS`.
//!
//! The gauge is the group's `lag` (entries not yet read by any consumer) plus its
//! `pending` (read, not yet acknowledged: in flight, retrying in ferry, or left by a
//! consumer that died): everything the group still owes, as Kafka's committed lag is.
//! Where Redis cannot tell the lag (entries deleted from the middle of the stream), only
//! the pending entries are shown until it can again.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::SourceContext;
use redis::Value;

use crate::link::Link;
use crate::settle::State;

/// How often the gauge is refreshed.
const EVERY: Duration = Duration::from_secs(5);

pub(crate) async fn run(mut link: Link, state: Arc<State>, ctx: SourceContext) {
    loop {
        let groups: redis::RedisResult<Vec<Value>> = link
            .query(redis::cmd("XINFO").arg("GROUPS").arg(&state.config.stream))
            .await;
        if let Ok(groups) = groups {
            let ours = groups.iter().find(|g| {
                field(g, "name").is_some_and(|n| bytes(n) == Some(state.config.group.as_bytes()))
            });
            if let Some(group) = ours {
                let count = |name| field(group, name).and_then(int).unwrap_or(0);
                ctx.backlog.set(count("lag") + count("pending"));
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// The value of `name` in a reply of field-value pairs (RESP2 array or RESP3 map).
pub(crate) fn field<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    match reply {
        Value::Array(items) => items
            .chunks_exact(2)
            .find(|kv| bytes(&kv[0]) == Some(name.as_bytes()))
            .map(|kv| &kv[1]),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| bytes(k) == Some(name.as_bytes()))
            .map(|(_, v)| v),
        _ => None,
    }
}

pub(crate) fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => std::str::from_utf8(bytes(other)?).ok()?.parse().ok(),
    }
}

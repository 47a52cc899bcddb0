//! What is checked at start: Redis answers, the stream and the group exist (or are
//! created with `declare`), and the dead-letter key is a stream or nothing yet.

use ferry_core::redact;
use redis::Value;

use crate::link::Link;
use crate::{DeadLetters, RedisConfig, RedisError, CALL_TIMEOUT};

/// Checks everything a route needs; returns the client to connect with.
pub(crate) async fn check(config: &RedisConfig) -> Result<redis::Client, RedisError> {
    let client = redis::Client::open(config.url.as_str())
        .map_err(|e| RedisError::Url(format!("{}: {}", redact::url(&config.url), one_line(&e))))?;
    let mut link = Link::new(client.clone(), CALL_TIMEOUT);
    let fail = |e: redis::RedisError| failure(config, e);
    let kind = key_type(&mut link, &config.stream).await.map_err(fail)?;
    match (kind.as_str(), config.declare) {
        ("stream", _) | ("none", true) => {}
        ("none", false) => {
            return Err(RedisError::Setup {
                key: "stream",
                detail: format!(
                    "no stream {:?}; create it with its group (XGROUP CREATE {} {} $ MKSTREAM) or set declare = true",
                    config.stream, config.stream, config.group
                ),
            })
        }
        (other, _) => return Err(wrong_type("stream", &config.stream, other)),
    }
    if config.declare {
        match link.query::<()>(&create_group(config)).await {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(fail(e)),
        }
    } else if !has_group(&mut link, config).await.map_err(fail)? {
        return Err(RedisError::Setup {
            key: "group",
            detail: format!(
                "no consumer group {:?} on stream {:?}; create it (XGROUP CREATE {} {} $) or set declare = true",
                config.group, config.stream, config.stream, config.group
            ),
        });
    }
    if let DeadLetters::Stream { stream, .. } = &config.dead_letters {
        match key_type(&mut link, stream).await.map_err(fail)?.as_str() {
            "stream" | "none" => {}
            other => return Err(wrong_type("dead_letter_stream", stream, other)),
        }
    }
    Ok(client)
}

/// `XGROUP CREATE` of the group at `start`, with the stream if it is missing.
pub(crate) fn create_group(config: &RedisConfig) -> redis::Cmd {
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE")
        .arg(&config.stream)
        .arg(&config.group)
        .arg(config.start.id())
        .arg("MKSTREAM");
    cmd
}

async fn key_type(link: &mut Link, key: &str) -> redis::RedisResult<String> {
    link.query(redis::cmd("TYPE").arg(key)).await
}

async fn has_group(link: &mut Link, config: &RedisConfig) -> redis::RedisResult<bool> {
    let groups: Vec<Value> = link
        .query(redis::cmd("XINFO").arg("GROUPS").arg(&config.stream))
        .await?;
    Ok(groups.iter().any(|g| {
        crate::backlog::field(g, "name")
            .and_then(crate::backlog::bytes)
            .is_some_and(|n| n == config.group.as_bytes())
    }))
}

fn wrong_type(key: &'static str, name: &str, kind: &str) -> RedisError {
    RedisError::Setup {
        key,
        detail: format!("key {name:?} holds a {kind}, not a stream"),
    }
}

/// A failed start call: refused (a login, a permission: configuration), or unreachable.
fn failure(config: &RedisConfig, e: redis::RedisError) -> RedisError {
    let url = redact::url(&config.url);
    let detail = one_line(&e);
    let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
    if refused {
        RedisError::Refused { url, detail }
    } else if crate::link::broken(&e) {
        RedisError::Unreachable { url, detail }
    } else {
        RedisError::Setup {
            key: "stream",
            detail: format!("{:?}: {detail}", config.stream),
        }
    }
}

pub(crate) fn one_line(e: &redis::RedisError) -> String {
    ferry_core::error_chain(e)
}

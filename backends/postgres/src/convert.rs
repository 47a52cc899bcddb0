//! From a claimed row to a ferry [`Message`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use ferry_core::message::plausible_time;
use ferry_core::Message;
use tokio_postgres::Row;
use tracing::warn;

/// A claimed row: its id and the attempt its claim counted, and the message.
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) attempts: i32,
    pub(crate) message: Message,
}

/// Builds the message of a row the claim returned (id, payload, headers, key,
/// created_at, attempts).
pub(crate) fn claimed(row: &Row, table: &Arc<str>) -> Result<Claimed, tokio_postgres::Error> {
    let id: i64 = row.try_get(0)?;
    let payload: Vec<u8> = row.try_get(1)?;
    let headers: Option<String> = row.try_get(2)?;
    let key: Option<String> = row.try_get(3)?;
    let created_at: Option<SystemTime> = row.try_get(4)?;
    let attempts: i32 = row.try_get(5)?;
    // The id stays the same however often the row is delivered: the endpoint's
    // `Idempotency-Key`.
    let mut message = Message::new(format!("{table}-{id}"), payload, table.clone());
    if let Some(at) = created_at.and_then(plausible_time) {
        message.timestamp = at;
    }
    if let Some(headers) = headers {
        match attributes(&headers) {
            Some(attributes) => message.attributes = attributes,
            None => warn!(table = %table, id,
                "headers is not a JSON object; the row is delivered without attributes"),
        }
    }
    message.traceparent = message.attributes.get("traceparent").cloned();
    message.group = key;
    message.attempt = u32::try_from(attempts).unwrap_or(0).max(1);
    Ok(Claimed {
        id,
        attempts,
        message,
    })
}

/// A JSON object's members as attributes: strings as they are, numbers and booleans as
/// written, nested values as JSON text, nulls left out. `None` when it is no object.
fn attributes(json: &str) -> Option<BTreeMap<String, String>> {
    let serde_json::Value::Object(members) = serde_json::from_str(json).ok()? else {
        return None;
    };
    Some(
        members
            .into_iter()
            .filter_map(|(name, value)| {
                let text = match value {
                    serde_json::Value::Null => return None,
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                Some((name, text))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_members_become_attributes() {
        let got = attributes(r#"{"tenant":"t1","n":3,"ok":true,"gone":null,"deep":{"a":[1]}}"#)
            .expect("an object");
        let want: BTreeMap<String, String> = [
            ("deep", r#"{"a":[1]}"#),
            ("n", "3"),
            ("ok", "true"),
            ("tenant", "t1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(got, want);
        assert_eq!(attributes("{}"), Some(BTreeMap::new()));
        assert_eq!(attributes("[1]"), None);
        assert_eq!(attributes("\"text\""), None);
    }
}

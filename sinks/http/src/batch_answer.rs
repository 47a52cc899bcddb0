//! Reading the answer to a batch: a 2xx acks every message it does not name as failed, so
//! it only counts once its body has been read to the end and says something ferry
//! understands. A cut, over-long or garbled answer retries the whole batch: acking on it
//! would lose every message the endpoint meant to report as failed.

use ferry_core::{Action, BatchResponse, SinkResponse};
use hyper::header::CONTENT_TYPE;
use serde_json::Value;

use crate::client::{Answer, BodyEnd};
use crate::response::{self, DRAIN_LIMIT};

/// A batch's answer: the response, and the ids a 2xx body reports as failed
/// (`{"failed": ["<id>", ...]}`). An empty body, plain text or any other JSON read in full
/// means every message succeeded.
pub(crate) fn read(answer: &Answer) -> BatchResponse {
    let response = response::read(answer);
    let SinkResponse::Status {
        status,
        retry_after,
        action: None | Some(Action::Ack),
        ..
    } = &response
    else {
        return whole(response);
    };
    if !(200..300).contains(status) {
        return whole(response);
    }
    let refused = |why: String| {
        // The endpoint is up and answered: a retry the response table makes and
        // `max_attempts` counts, not a connection error an outage would excuse.
        whole(SinkResponse::Status {
            status: *status,
            retry_after: *retry_after,
            action: Some(Action::Retry),
            detail: format!("batch answer not understood: {why}"),
        })
    };
    match &answer.end {
        BodyEnd::Complete => {}
        // The connection broke before the answer ended: like a request that got none.
        BodyEnd::Cut(line) => return whole(SinkResponse::Error(format!("batch {line}"))),
        BodyEnd::TooLong => return refused(format!("longer than {} KiB", DRAIN_LIMIT / 1024)),
    }
    let json = answer
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    match failed_ids(&answer.body, json) {
        Ok(failed) => BatchResponse { response, failed },
        Err(why) => refused(why.to_owned()),
    }
}

fn whole(response: SinkResponse) -> BatchResponse {
    BatchResponse {
        response,
        failed: Vec::new(),
    }
}

/// The ids a fully read 2xx body names as failed. A body that is JSON (by its content type
/// or its first character) must parse, and its `failed`, if present, must be a list of
/// strings; a plain-text body ("OK") names none.
fn failed_ids(body: &[u8], json: bool) -> Result<Vec<String>, &'static str> {
    let text = body.trim_ascii();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let looks_json = json || matches!(text.first(), Some(b'{' | b'['));
    let value: Value = match serde_json::from_slice(text) {
        Ok(value) => value,
        Err(_) if looks_json => return Err("not valid JSON"),
        Err(_) => return Ok(Vec::new()),
    };
    match value.get("failed") {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|id| {
                id.as_str()
                    .map(str::to_owned)
                    .ok_or("\"failed\" must list message ids as strings")
            })
            .collect(),
        Some(_) => Err("\"failed\" must be a list of message ids"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_shape_and_what_else_counts() {
        let ids = |body: &str| failed_ids(body.as_bytes(), false);
        assert_eq!(
            ids(r#"{"failed": ["a", "b"]}"#),
            Ok(vec!["a".into(), "b".into()])
        );
        assert_eq!(ids(r#"{"failed": []}"#), Ok(vec![]));
        assert_eq!(ids(""), Ok(vec![]));
        assert_eq!(ids("  \n"), Ok(vec![]));
        assert_eq!(ids("OK"), Ok(vec![]));
        assert_eq!(ids(r#"{"status": "accepted"}"#), Ok(vec![]));
        assert_eq!(ids("[1, 2]"), Ok(vec![]));
        assert!(ids(r#"{"failed": [1, 2]}"#).is_err());
        assert!(ids(r#"{"failed": "a"}"#).is_err());
        assert!(ids(r#"{"failed": null}"#).is_err());
        assert!(ids(r#"{"failed": ["a", "#).is_err(), "cut JSON");
        assert!(
            failed_ids(b"OK", true).is_err(),
            "a JSON content type must parse"
        );
    }
}

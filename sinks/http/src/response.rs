//! Turning an HTTP response into a [`SinkResponse`].

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use ferry_core::{Action, BatchResponse, SinkResponse};

/// The part of a response body kept as a dead-letter reason.
const DETAIL_LIMIT: usize = 1024;
/// Read at most this much of a body, so the connection can go back to the pool.
const DRAIN_LIMIT: usize = 64 * 1024;

pub(crate) async fn read(resp: reqwest::Response) -> SinkResponse {
    read_keeping(resp, DETAIL_LIMIT).await.0
}

/// A batch's answer: the response, and the ids a 2xx body reports as failed
/// (`{"failed": ["<id>", ...]}`); any other 2xx body means every message succeeded.
pub(crate) async fn read_batch(resp: reqwest::Response) -> BatchResponse {
    let (response, body) = read_keeping(resp, DRAIN_LIMIT).await;
    #[derive(serde::Deserialize)]
    struct Partial {
        failed: Vec<String>,
    }
    let failed = match &response {
        SinkResponse::Status { status, .. } if (200..300).contains(status) => {
            serde_json::from_slice::<Partial>(&body)
                .map(|p| p.failed)
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    BatchResponse { response, failed }
}

/// Reads the status, the headers that steer ferry and up to `keep` bytes of the body.
async fn read_keeping(mut resp: reqwest::Response, keep: usize) -> (SinkResponse, Vec<u8>) {
    let status = resp.status().as_u16();
    let headers = resp.headers();
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let action = headers
        .get("ferry-action")
        .and_then(|v| v.to_str().ok())
        .and_then(Action::parse);
    let mut body = Vec::new();
    let mut seen = 0usize;
    while seen < DRAIN_LIMIT {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                seen += chunk.len();
                let room = keep.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            // The status is what counts; a body cut short does not change it.
            Ok(None) | Err(_) => break,
        }
    }
    let ok = (200..300).contains(&status) && action != Some(Action::DeadLetter);
    let detail = if ok {
        String::new()
    } else {
        let cut = &body[..body.len().min(DETAIL_LIMIT)];
        String::from_utf8_lossy(cut).trim().to_owned()
    };
    let response = SinkResponse::Status {
        status,
        retry_after,
        action,
        detail,
    };
    (response, body)
}

/// `Retry-After` as seconds or an HTTP date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A one-line description of a transport error, without the URL (it may carry secrets).
pub(crate) fn describe_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_body() || e.is_request() {
        "request failed".to_owned()
    } else {
        "transport error".to_owned()
    };
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("soon"), None);
        let later = SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).expect("date");
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120));
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(50));
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
    }
}

//! Turning an HTTP response into a [`SinkResponse`].

use std::time::{Duration, SystemTime};

use ferry_core::{Action, SinkResponse};
use hyper::header::RETRY_AFTER;

use crate::client::Answer;

/// The part of a response body kept as a dead-letter reason.
pub(crate) const DETAIL_LIMIT: usize = 1024;
/// Read at most this much of a body; a longer answer's connection is closed, not reused.
pub(crate) const DRAIN_LIMIT: usize = 64 * 1024;

pub(crate) fn read(answer: &Answer) -> SinkResponse {
    let status = answer.status.as_u16();
    let headers = &answer.headers;
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let action = headers
        .get("ferry-action")
        .and_then(|v| v.to_str().ok())
        .and_then(Action::parse);
    let ok = (200..300).contains(&status) && action != Some(Action::DeadLetter);
    let detail = if ok {
        String::new()
    } else {
        let cut = &answer.body[..answer.body.len().min(DETAIL_LIMIT)];
        String::from_utf8_lossy(cut).trim().to_owned()
    };
    SinkResponse::Status {
        status,
        retry_after,
        action,
        detail,
    }
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

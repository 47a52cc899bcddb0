//! The response table: what an endpoint's answer means for the message.

use std::time::Duration;

use crate::sink::SinkResponse;

/// The endpoint's explicit decision for one message (`Ferry-Action` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Treat as delivered whatever the status.
    Ack,
    /// Deliver again later (after `Retry-After` when given).
    Retry,
    /// Dead-letter at once; the response body becomes the reason.
    DeadLetter,
}

impl Action {
    /// Parses a `Ferry-Action` header value (case-insensitive); unknown values are ignored.
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.trim();
        if v.eq_ignore_ascii_case("ack") {
            Some(Action::Ack)
        } else if v.eq_ignore_ascii_case("retry") {
            Some(Action::Retry)
        } else if v.eq_ignore_ascii_case("dead-letter") || v.eq_ignore_ascii_case("dead_letter") {
            Some(Action::DeadLetter)
        } else {
            None
        }
    }
}

/// What to do with a message after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered: settle as acked.
    Ack,
    /// Try again; `after` is the endpoint's requested delay, if it gave one.
    Retry {
        /// The endpoint's `Retry-After`.
        after: Option<Duration>,
    },
    /// The message itself is bad: dead-letter with this reason.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// Which statuses mean "this message is bad"; everything else that is not 2xx is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePolicy {
    /// Statuses that dead-letter at once (default 400, 413, 415, 422).
    pub dead_letter_statuses: Vec<u16>,
}

impl Default for ResponsePolicy {
    fn default() -> Self {
        Self {
            dead_letter_statuses: vec![400, 413, 415, 422],
        }
    }
}

impl ResponsePolicy {
    /// Applies the table of DESIGN section 2; `Ferry-Action` wins over the status.
    pub fn classify(&self, response: &SinkResponse) -> Verdict {
        match response {
            SinkResponse::Status {
                status,
                retry_after,
                action,
                detail,
            } => match action {
                Some(Action::Ack) => Verdict::Ack,
                Some(Action::Retry) => Verdict::Retry {
                    after: *retry_after,
                },
                Some(Action::DeadLetter) => Verdict::DeadLetter {
                    reason: non_empty(detail, "endpoint asked for dead-letter"),
                },
                None if (200..300).contains(status) => Verdict::Ack,
                None if self.dead_letter_statuses.contains(status) => Verdict::DeadLetter {
                    reason: non_empty(detail, "endpoint refused the message"),
                },
                None => Verdict::Retry {
                    after: *retry_after,
                },
            },
            SinkResponse::Timeout | SinkResponse::Error(_) | SinkResponse::Unreachable(_) => {
                Verdict::Retry { after: None }
            }
        }
    }
}

fn non_empty(detail: &str, fallback: &str) -> String {
    if detail.trim().is_empty() {
        fallback.to_owned()
    } else {
        detail.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, action: Option<Action>) -> SinkResponse {
        SinkResponse::Status {
            status,
            retry_after: Some(Duration::from_secs(3)),
            action,
            detail: String::new(),
        }
    }

    #[test]
    fn table_of_the_contract() {
        let p = ResponsePolicy::default();
        assert_eq!(p.classify(&status(200, None)), Verdict::Ack);
        assert_eq!(p.classify(&status(204, None)), Verdict::Ack);
        for s in [400, 413, 415, 422] {
            assert!(matches!(
                p.classify(&status(s, None)),
                Verdict::DeadLetter { .. }
            ));
        }
        for s in [401, 404, 408, 425, 429, 500, 503, 302] {
            assert_eq!(
                p.classify(&status(s, None)),
                Verdict::Retry {
                    after: Some(Duration::from_secs(3))
                },
                "status {s}"
            );
        }
        assert_eq!(
            p.classify(&SinkResponse::Timeout),
            Verdict::Retry { after: None }
        );
        assert_eq!(
            p.classify(&SinkResponse::Error("refused".into())),
            Verdict::Retry { after: None }
        );
    }

    #[test]
    fn ferry_action_wins_over_status() {
        let p = ResponsePolicy::default();
        assert_eq!(p.classify(&status(500, Some(Action::Ack))), Verdict::Ack);
        assert!(matches!(
            p.classify(&status(200, Some(Action::DeadLetter))),
            Verdict::DeadLetter { .. }
        ));
        assert!(matches!(
            p.classify(&status(200, Some(Action::Retry))),
            Verdict::Retry { .. }
        ));
        assert_eq!(Action::parse(" Dead-Letter "), Some(Action::DeadLetter));
        assert_eq!(Action::parse("maybe"), None);
    }
}

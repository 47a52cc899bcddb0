//! Dead letters: published to the dead-letter subject through JetStream (the stream that
//! captures it confirms with its publish ack), with the original headers and payload plus
//! why, and only then acknowledged on the route's stream. A publish that fails is tried
//! again with backoff while the message stays leased, so a dead letter is never lost; a
//! crash between the two leaves a duplicate dead letter, never none.

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use ferry_core::{DeadLetter, SourceContext};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::settle::{self, Held, Original, State};
use crate::DeadLetters;

/// The headers ferry adds to a dead letter, besides the original ones.
pub const DEAD_LETTER_HEADERS: [&str; 7] = [
    "Ferry-Reason",
    "Ferry-Status",
    "Ferry-Attempts",
    "Ferry-Route",
    "Ferry-Stream",
    "Ferry-Subject",
    "Ferry-Sequence",
];

/// A dead letter to publish.
pub(crate) struct Op {
    pub(crate) held: Held,
    pub(crate) original: Box<Original>,
    pub(crate) why: DeadLetter,
}

/// A header value on one line (NATS headers cannot hold a line break), at most 1 KB.
fn header_value(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 1024 {
        let mut cut = 1024;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

/// The original headers with ferry's added.
fn headers(state: &State, ctx: &SourceContext, op: &Op) -> HeaderMap {
    let mut headers = op.original.headers.clone().unwrap_or_default();
    let values = [
        header_value(&op.why.reason),
        op.why.last_status(),
        op.why.attempts.to_string(),
        ctx.route.to_string(),
        state.config.stream.clone(),
        op.original.subject.to_string(),
        op.original.stream_sequence.to_string(),
    ];
    for (name, value) in DEAD_LETTER_HEADERS.iter().zip(values) {
        headers.insert(*name, value);
    }
    // The dead letter is a message of its own: a publish id copied from the original
    // would be dropped as a duplicate by the dead-letter stream's window.
    if headers.get("Nats-Msg-Id").is_some() {
        let id = headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        headers.insert("Ferry-Original-Msg-Id", id);
        headers.insert(
            "Nats-Msg-Id",
            format!(
                "{}:{}:dead",
                state.config.stream, op.original.stream_sequence
            ),
        );
    }
    headers
}

/// Publishes dead letters until every handle is gone.
pub(crate) async fn run(
    state: Arc<State>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ctx: SourceContext,
) {
    let DeadLetters::Subject(subject) = state.config.dead_letters.clone() else {
        return;
    };
    let js = async_nats::jetstream::new(state.client.clone());
    while let Some(op) = rx.recv().await {
        let headers = headers(&state, &ctx, &op);
        let payload: Bytes = op.original.payload.clone();
        let mut failures = 0u32;
        let landed = loop {
            let sent = async {
                js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await
                    .map_err(|e| crate::setup::one_line(&e))?
                    .await
                    .map_err(|e| crate::setup::one_line(&e))
            }
            .await;
            match sent {
                Ok(_) => {
                    if failures > 0 {
                        ctx.set_error(None);
                        info!(route = %ctx.route, subject = %subject, "dead letters are published again");
                    }
                    break true;
                }
                Err(error) => {
                    failures += 1;
                    ctx.counts.broker_errors.count("dead_letter", 1);
                    if failures == 1 {
                        warn!(route = %ctx.route, subject = %subject, %error,
                            "publishing a dead letter failed; retrying with backoff");
                        ctx.set_error(Some(format!("dead_letter: {error}")));
                    }
                    if ctx.shutdown.is_cancelled() && failures >= 3 {
                        warn!(route = %ctx.route, subject = %subject,
                            "shutting down: giving up; the message stays unacknowledged and comes back");
                        break false;
                    }
                    tokio::time::sleep(crate::backoff(failures)).await;
                }
            }
        };
        if landed {
            let ack = vec![(op.held.reply.clone(), Bytes::from_static(b"+ACK"))];
            settle::confirm(&state, &ctx, "ack", ack).await;
            ctx.counts.dead_lettered.inc();
        }
        state.forget(&op.held);
    }
}

#[cfg(test)]
mod tests {
    use super::header_value;

    #[test]
    fn reasons_fit_on_one_header_line() {
        assert_eq!(header_value("bad\r\nbody"), "bad  body");
        let long = "é".repeat(1000);
        let cut = header_value(&long);
        assert!(cut.len() <= 1024 && cut.chars().all(|c| c == 'é'));
    }
}

//! `ack_wait` leases. The server redelivers a message that is not acknowledged within the
//! consumer's `ack_wait`, so while a slow request is in flight ferry tells it that work is
//! in progress (`+WPI`, which restarts the message's `ack_wait`): core's lease service
//! says when, every half `ack_wait`, and this is the renewing call.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use ferry_core::lease::Renew;
use ferry_core::SourceContext;

use crate::settle::{self, State};

/// Renews held messages with `+WPI` on their ack subjects.
pub(crate) struct InProgress {
    state: Arc<State>,
    ctx: SourceContext,
}

impl InProgress {
    pub(crate) fn new(state: Arc<State>, ctx: SourceContext) -> Self {
        Self { state, ctx }
    }
}

impl Renew<Subject> for InProgress {
    /// A renewal counts once the flush says it reached the server; a failed flush leaves
    /// them all due, tried again at the next check.
    async fn renew(&self, due: Vec<Subject>, _length: Duration) -> Vec<bool> {
        for reply in &due {
            settle::publish(
                &self.state,
                &self.ctx,
                reply.clone(),
                Bytes::from_static(b"+WPI"),
            )
            .await;
        }
        let ok = settle::flush(&self.state, &self.ctx, "renew").await;
        vec![ok; due.len()]
    }
}

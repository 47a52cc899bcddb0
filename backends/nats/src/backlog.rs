//! `ferry_source_backlog` (the consumer's `num_pending`: messages of the stream it has not
//! handed out yet) and the route's connection state, both looked at every few seconds.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State as Connection;
use async_nats::jetstream::consumer::PullConsumer;
use ferry_core::SourceContext;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::settle::State;

/// How often the gauge is refreshed.
const EVERY: Duration = Duration::from_secs(5);
/// How often the connection state is looked at.
const LOOK: Duration = Duration::from_millis(250);

/// Keeps the gauge and the connection state current until `stop`.
pub(crate) async fn run(
    consumer: PullConsumer,
    state: Arc<State>,
    ctx: SourceContext,
    stop: CancellationToken,
) {
    let mut next_gauge = tokio::time::Instant::now();
    let mut was_up = true;
    loop {
        let up = state.client.connection_state() == Connection::Connected;
        if up != was_up {
            if up {
                info!(route = %ctx.route, "connected to NATS again");
            } else {
                warn!(route = %ctx.route, "lost the connection to NATS; reconnecting with backoff");
            }
            was_up = up;
        }
        if !up {
            ctx.set_connected(false);
        }
        if up && tokio::time::Instant::now() >= next_gauge {
            next_gauge = tokio::time::Instant::now() + EVERY;
            match tokio::time::timeout(EVERY, consumer.get_info()).await {
                Ok(Ok(info)) => {
                    ctx.backlog
                        .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                }
                Ok(Err(_)) | Err(_) => ctx.counts.broker_errors.count("backlog", 1),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LOOK) => {}
        }
    }
}

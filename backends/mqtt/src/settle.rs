//! The handle the engine settles each message with.

use std::sync::Arc;

use ferry_core::{DeadLetter, Settle, Settlement};
use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::mpsc;
use tracing::warn;

use crate::connection::Shared;
use crate::table::Ticket;

/// The settlement of one message; a QoS 0 message has no ticket (nothing to
/// acknowledge, nothing the broker would send again).
pub(crate) struct MessageAck {
    pub(crate) ticket: Option<Ticket>,
    pub(crate) shared: Arc<Shared>,
    /// The message, kept only when dead letters go to a topic.
    pub(crate) original: Option<Box<Publish>>,
    /// Held while the handle lives, so the route's end waits for every settlement.
    pub(crate) _alive: mpsc::UnboundedSender<()>,
}

impl Settle for MessageAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        let this = *self;
        match settlement {
            Settlement::Ack => {
                if let Some(t) = this.ticket {
                    this.shared.table.ack(t);
                }
            }
            Settlement::DeadLetter(why) => match (&this.shared.dead, this.original) {
                (Some(dead), Some(original)) => {
                    let _ = dead.send(crate::dead_letter::Op {
                        ticket: this.ticket,
                        original,
                        why,
                        _alive: this._alive,
                    });
                }
                _ => {
                    dropped(&this.shared, &why);
                    this.shared.ctx.counts.dropped.inc();
                    if let Some(t) = this.ticket {
                        this.shared.table.ack(t);
                    }
                }
            },
            // Never sent (retries wait in ferry); if it were, releasing is right.
            Settlement::Retry { .. } | Settlement::Release => {
                let Some(t) = this.ticket else { return };
                // A stale ticket's message is the broker's no longer: nothing to bring back.
                if !this.shared.table.release(t) {
                    return;
                }
                // The broker sends it again only at the next connection: make one now,
                // unless the route is stopping (then the next start gets it).
                if !this.shared.ctx.shutdown.is_cancelled() {
                    this.shared.cycle.notify_one();
                }
            }
        }
    }

    fn is_current(&self) -> bool {
        self.ticket.is_none_or(|t| self.shared.table.is_current(t))
    }

    fn counts_dead_letters(&self) -> bool {
        self.shared.dead.is_some()
    }
}

fn dropped(shared: &Shared, why: &DeadLetter) {
    warn!(route = %shared.ctx.route, reason = %why, "dead letter dropped (dead_letters = \"drop\")");
}

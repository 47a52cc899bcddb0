//! Redrive: moving messages from a dead-letter queue back to the route's queue once the
//! cause is fixed (`ferry redrive`).
//!
//! AMQP does not say where a queue's own dead-letter exchange leads, so the caller names
//! the queue to move from (with `declare = true` and a `dead_letter_exchange`, ferry's
//! `<queue>.dead-letter`). Each message is
//! published to the route's queue and acked on the dead-letter queue only after the broker
//! confirmed the publish: an interruption leaves a copy in both, never none.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::Channel;

use crate::{one_line, AmqpError, AmqpSource};

/// Headers the broker or ferry add when they dead-letter a message; a redriven message
/// goes back without them, as it was first published.
fn is_death_header(name: &str) -> bool {
    name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || crate::DEAD_LETTER_HEADERS.contains(&name)
}

impl AmqpSource {
    async fn redrive_channel(&self) -> Result<Channel, AmqpError> {
        let Some((connection, _)) = &self.connection else {
            return Err(AmqpError::Connect {
                uri: crate::redact(&self.config.uri),
                detail: "not connected".into(),
                refused: false,
            });
        };
        let unavailable = |e: lapin::Error| AmqpError::Connect {
            uri: crate::redact(&self.config.uri),
            detail: one_line(&e),
            refused: false,
        };
        let channel = connection.create_channel().await.map_err(unavailable)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        Ok(channel)
    }

    /// Ready messages in `queue` (it must exist).
    pub async fn depth_of(&self, queue: &str) -> Result<u64, AmqpError> {
        let channel = self.redrive_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::Queue {
                queue: queue.to_owned(),
                detail: one_line(&e),
            })?;
        Ok(u64::from(declared.message_count()))
    }

    /// Moves up to `max` messages from `from` to the route's queue, calling `progress`
    /// with the number moved so far; stops when `from` is empty. Returns how many moved.
    pub async fn redrive(
        &self,
        from: &str,
        max: u64,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, AmqpError> {
        // Checks that `from` exists, with a clear error if not.
        self.depth_of(from).await?;
        let channel = self.redrive_channel().await?;
        let failed = |e: lapin::Error| AmqpError::Queue {
            queue: from.to_owned(),
            detail: one_line(&e),
        };
        let mut moved = 0u64;
        while moved < max {
            let Some(got) = channel
                .basic_get(from.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(failed)?
            else {
                break;
            };
            let delivery = got.delivery;
            let mut properties = delivery.properties.clone();
            if let Some(headers) = properties.headers().as_ref() {
                let mut kept = FieldTable::default();
                for (name, value) in headers.inner() {
                    if !is_death_header(name.as_str()) {
                        kept.insert(name.clone(), value.clone());
                    }
                }
                properties = properties.with_headers(kept);
            }
            let confirm = channel
                .basic_publish(
                    "".into(),
                    self.config.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await
                .map_err(failed)?
                .await
                .map_err(failed)?;
            if !confirm.is_ack() {
                return Err(AmqpError::Queue {
                    queue: self.config.queue.clone(),
                    detail:
                        "the broker refused the publish; the message stays in the dead-letter queue"
                            .into(),
                });
            }
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(failed)?;
            moved += 1;
            progress(moved);
        }
        Ok(moved)
    }
}

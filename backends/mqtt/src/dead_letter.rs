//! Dead letters published (QoS 1) to the dead-letter topic, one at a time: the original is
//! acknowledged only once the broker has acknowledged its dead letter.
//!
//! The dead letter keeps the payload and the original properties, with ferry's reason
//! added as user properties. A broker that answers "no matching subscribers" has
//! discarded it (MQTT keeps nothing for a topic no one subscribes to), so that counts as a
//! failure: the dead letter is tried again with backoff, the original held
//! unacknowledged meanwhile and the problem shown on `/routes`, until something
//! subscribes to the topic. At shutdown it gives up after a few tries; the original stays
//! unacknowledged and comes back at the next start.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_core::DeadLetter;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::connection::Shared;
use crate::table::Ticket;

/// The user properties ferry adds to a dead letter: why (the endpoint's answer or the
/// engine's reason, cut to 1 KB), the last HTTP status (or `timeout`, `error`, ... when
/// there was none), the attempts made, the route and the topic the message came from.
/// Original properties of these names (a message dead-lettered before) are replaced.
pub const DEAD_LETTER_PROPERTIES: [&str; 5] = [
    "ferry_reason",
    "ferry_status",
    "ferry_attempts",
    "ferry_route",
    "ferry_topic",
];

/// How long the broker may take to acknowledge a dead letter.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One dead letter to publish.
pub(crate) struct Op {
    pub(crate) ticket: Option<Ticket>,
    pub(crate) original: Box<Publish>,
    pub(crate) why: DeadLetter,
    pub(crate) _alive: mpsc::UnboundedSender<()>,
}

/// The dead letter being published: the connection task fills in its packet identifier
/// and reports the broker's answer.
pub(crate) struct Waiting {
    pub(crate) conn: u64,
    pub(crate) pkid: Option<u16>,
    pub(crate) done: oneshot::Sender<Result<(), String>>,
}

/// Publishes dead letters until every handle is gone.
pub(crate) async fn run(shared: Arc<Shared>, topic: String, mut rx: mpsc::UnboundedReceiver<Op>) {
    while let Some(op) = rx.recv().await {
        let (payload, properties) = letter(&op, &shared.ctx.route);
        let mut failures = 0u32;
        loop {
            match publish(&shared, &topic, payload.clone(), properties.clone()).await {
                Ok(()) => {
                    if failures > 0 {
                        shared.ctx.set_error(None);
                        info!(route = %shared.ctx.route, topic, "dead letters are published again");
                    }
                    shared.ctx.counts.dead_lettered.inc();
                    if let Some(t) = op.ticket {
                        shared.table.ack(t);
                    }
                    break;
                }
                Err(error) => {
                    failures += 1;
                    shared.ctx.counts.broker_errors.count("dead_letter", 1);
                    if failures == 1 {
                        warn!(route = %shared.ctx.route, topic, %error,
                            "publishing a dead letter failed; retrying with backoff, the message held");
                    }
                    shared
                        .ctx
                        .set_error(Some(format!("dead_letter_topic {topic}: {error}")));
                    if shared.ctx.shutdown.is_cancelled() && failures >= 3 {
                        warn!(route = %shared.ctx.route, topic,
                            "shutting down: giving up; the message stays unacknowledged and comes back at the next start");
                        if let Some(t) = op.ticket {
                            shared.table.release(t);
                        }
                        break;
                    }
                    tokio::time::sleep(crate::backoff(failures)).await;
                }
            }
        }
    }
}

/// Publishes once on the current connection and waits for the broker's `PUBACK`.
async fn publish(
    shared: &Shared,
    topic: &str,
    payload: Bytes,
    properties: PublishProperties,
) -> Result<(), String> {
    let Some((conn, client)) = shared.table.client() else {
        return Err("not connected".to_owned());
    };
    let (done, answer) = oneshot::channel();
    *shared.lock_waiting() = Some(Waiting {
        conn,
        pkid: None,
        done,
    });
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
        .await
        .map_err(|e| format!("not sent: {e}"))?;
    match tokio::time::timeout(ACK_TIMEOUT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the connection went away before the broker answered".to_owned()),
        Err(_) => {
            shared.lock_waiting().take();
            Err(format!("no PUBACK within {ACK_TIMEOUT:?}"))
        }
    }
}

/// What the broker's `PUBACK` of a dead letter means.
pub(crate) fn outcome(reason: PubAckReason) -> Result<(), String> {
    match reason {
        PubAckReason::Success => Ok(()),
        PubAckReason::NoMatchingSubscribers => Err(
            "no subscriber: the broker discarded the dead letter (subscribe to the topic with a persistent session)"
                .to_owned(),
        ),
        other => Err(format!("refused by the broker: {other:?}")),
    }
}

/// The dead letter's payload and properties.
fn letter(op: &Op, route: &str) -> (Bytes, PublishProperties) {
    let mut props = op.original.properties.clone().unwrap_or_default();
    // Aliases and subscription ids belong to the original's connection and subscription.
    props.topic_alias = None;
    props.subscription_identifiers.clear();
    props
        .user_properties
        .retain(|(k, _)| !DEAD_LETTER_PROPERTIES.contains(&k.as_str()));
    let [reason, status, attempts, route_key, topic] = DEAD_LETTER_PROPERTIES;
    props.user_properties.extend([
        (reason.to_owned(), op.why.reason.clone()),
        (status.to_owned(), op.why.last_status()),
        (attempts.to_owned(), op.why.attempts.to_string()),
        (route_key.to_owned(), route.to_owned()),
        (
            topic.to_owned(),
            String::from_utf8_lossy(&op.original.topic).into_owned(),
        ),
    ]);
    (op.original.payload.clone(), props)
}

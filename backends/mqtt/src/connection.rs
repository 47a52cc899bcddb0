//! The connection to the broker: one client and event loop per connection, dialled again
//! with backoff after a loss, always into the same session.
//!
//! A fresh client for every connection, rather than one client polled again after an
//! error, is what keeps a `PUBACK` on its connection: the client would otherwise send,
//! on the next connection, requests still queued on the lost one (see [`crate::table`]).
//! The event loop is polled without pause (a blocked loop misses its pings); messages go
//! to the engine through a queue that the broker's receive window bounds.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ferry_core::{AckHandle, Delivery, SourceContext};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::convert::{self, Reading};
use crate::dead_letter::{self, Waiting};
use crate::settle::MessageAck;
use crate::table::{Arrival, Table};
use crate::{DeadLetters, MqttConfig, MqttError};

/// What the tasks of a route share.
pub(crate) struct Shared {
    pub(crate) config: Arc<MqttConfig>,
    pub(crate) ctx: SourceContext,
    pub(crate) table: Table,
    /// Set when dead letters go to a topic.
    pub(crate) dead: Option<mpsc::UnboundedSender<dead_letter::Op>>,
    /// Asks for a new connection (so the broker sends released messages again).
    pub(crate) cycle: Notify,
    waiting: Mutex<Option<Waiting>>,
    /// Cloned into every handle, taken away at shutdown: the route's end waits until the
    /// last clone is gone.
    alive: Mutex<Option<mpsc::UnboundedSender<()>>>,
}

impl Shared {
    fn alive(&self) -> Option<mpsc::UnboundedSender<()>> {
        self.alive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn lock_waiting(&self) -> MutexGuard<'_, Option<Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reports the broker's answer to the dead letter being published, if it is the one.
    fn answer(&self, conn: u64, pkid: Option<u16>, result: Result<(), String>) {
        let mut waiting = self.lock_waiting();
        let ours = waiting
            .as_ref()
            .is_some_and(|w| w.conn == conn && (pkid.is_none() || w.pkid == pkid));
        if ours {
            if let Some(w) = waiting.take() {
                let _ = w.done.send(result);
            }
        }
    }
}

/// Requests a client may queue: a `PUBACK` per message the broker may have out, a dead
/// letter per message, and a few more; so `try_ack` never finds the queue full.
fn capacity(config: &MqttConfig) -> usize {
    2 * usize::from(config.receive_maximum) + 64
}

fn subscriptions(config: &MqttConfig) -> Vec<Filter> {
    config
        .filters()
        .into_iter()
        .map(|f| {
            let mut filter = Filter::new(f, QoS::AtLeastOnce);
            // Retained messages once, when the subscription is made, not at every reconnect.
            filter.retain_forward_rule =
                rumqttc::v5::mqttbytes::v5::RetainForwardRule::OnNewSubscribe;
            filter
        })
        .collect()
}

/// A refusal of the broker, named by the setting at fault.
fn refused(code: ConnectReturnCode) -> MqttError {
    let key = match code {
        ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => "client_id",
        ConnectReturnCode::ServiceUnavailable
        | ConnectReturnCode::ServerUnavailable
        | ConnectReturnCode::ServerBusy => "url",
        _ => "url",
    };
    MqttError::Refused {
        key,
        detail: format!("the broker refused the connection: {code:?}"),
    }
}

/// How long the start check may wait for each answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects once with the route's session, subscribes and disconnects (keeping the
/// session), so that every wrong setting shows at start.
pub(crate) async fn check(config: &MqttConfig, options: &MqttOptions) -> Result<(), MqttError> {
    let url = ferry_core::redact::url(&config.url);
    let unreachable = |detail: String| MqttError::Unreachable {
        url: url.clone(),
        detail,
    };
    // The check resumes the session, and the broker starts sending what it holds: with a
    // window of one, one message at most comes back to the real connection flagged as
    // sent before (and labelled a second attempt), not a whole window of them.
    let mut options = options.clone();
    let mut props = options.connect_properties().unwrap_or_default();
    props.receive_maximum = Some(1);
    options.set_connect_properties(props);
    let (client, mut events) = AsyncClient::new(options, capacity(config));
    let mut subscribed = false;
    loop {
        let event = tokio::time::timeout(CHECK_TIMEOUT, events.poll())
            .await
            .map_err(|_| unreachable(format!("no answer within {CHECK_TIMEOUT:?}")))?;
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .try_subscribe_many(subscriptions(config))
                    .map_err(|e| unreachable(e.to_string()))?;
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed = true;
                client
                    .try_disconnect()
                    .map_err(|e| unreachable(e.to_string()))?;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if subscribed => return Ok(()),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => return Err(refused(code)),
            Err(ConnectionError::MqttState(StateError::SubFail { reason })) => {
                return Err(MqttError::Refused {
                    key: "topics",
                    detail: format!(
                        "the broker refused the subscription to {}: {}",
                        config.filters().join(", "),
                        sub_reason(reason)
                    ),
                })
            }
            Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                reason_string,
            })) => {
                return Err(MqttError::Refused {
                    key: if subscribed { "url" } else { "topics" },
                    detail: format!(
                        "the broker closed the connection: {reason_code:?}{}",
                        reason_string.map(|s| format!(" ({s})")).unwrap_or_default()
                    ),
                })
            }
            Err(e) => return Err(unreachable(one_line(&e))),
        }
    }
}

fn sub_reason(reason: SubscribeReasonCode) -> String {
    match reason {
        SubscribeReasonCode::SharedSubscriptionsNotSupported => {
            "shared subscriptions are not supported (leave out shared_group)".to_owned()
        }
        SubscribeReasonCode::NotAuthorized => "not authorized".to_owned(),
        SubscribeReasonCode::TopicFilterInvalid => "invalid topic filter".to_owned(),
        other => format!("{other:?}"),
    }
}

/// A connection error on one line, without the client's nesting.
pub(crate) fn one_line(e: &ConnectionError) -> String {
    e.to_string().replace('\n', " ")
}

/// Receives until shutdown, then lets every handle settle, then disconnects.
pub(crate) async fn run(
    config: Arc<MqttConfig>,
    options: MqttOptions,
    out: mpsc::Sender<Delivery>,
    ctx: SourceContext,
) {
    let (dead_tx, dead_rx) = mpsc::unbounded_channel();
    let (alive_tx, mut alive_rx) = mpsc::unbounded_channel::<()>();
    let topic = match &config.dead_letters {
        DeadLetters::Topic(t) => Some(t.clone()),
        DeadLetters::Drop => None,
    };
    let shared = Arc::new(Shared {
        dead: topic.is_some().then_some(dead_tx),
        config: config.clone(),
        ctx: ctx.clone(),
        table: Table::default(),
        cycle: Notify::new(),
        waiting: Mutex::new(None),
        alive: Mutex::new(Some(alive_tx)),
    });
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<Delivery>();
    let stop = CancellationToken::new();
    let conn = tokio::spawn(connect_loop(
        shared.clone(),
        options,
        queue_tx,
        stop.clone(),
    ));
    let dead = topic.map(|t| tokio::spawn(dead_letter::run(shared.clone(), t, dead_rx)));
    let gauge = tokio::spawn(gauge(shared.clone()));
    // Hands messages to the engine as it makes room, until shutdown.
    loop {
        let delivery = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            d = queue_rx.recv() => match d { Some(d) => d, None => break },
        };
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            sent = out.send(delivery) => if sent.is_err() { break },
        }
    }
    // What was not handed over stays unacknowledged on the broker (the next start gets
    // it); then every handle the engine holds settles, in flight ones within the grace.
    shared
        .alive
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    drop(queue_rx);
    drop(out);
    let _ = alive_rx.recv().await;
    if let Some(dead) = dead {
        // Its queue closes once the last handle is gone.
        dead.abort();
    }
    stop.cancel();
    let _ = conn.await;
    gauge.abort();
    ctx.set_connected(false);
}

/// Keeps `ferry_source_backlog` at what this replica holds unacknowledged: MQTT has no
/// count of what waits on the broker.
async fn gauge(shared: Arc<Shared>) {
    loop {
        shared
            .ctx
            .backlog
            .set(i64::try_from(shared.table.held()).unwrap_or(i64::MAX));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Connects, receives, reconnects, until `stop`; then disconnects cleanly (the session
/// stays on the broker).
async fn connect_loop(
    shared: Arc<Shared>,
    options: MqttOptions,
    queue: mpsc::UnboundedSender<Delivery>,
    stop: CancellationToken,
) {
    let ctx = shared.ctx.clone();
    let config = shared.config.clone();
    let reading_id = config.id_property.clone();
    let reading_key = config.key_property.clone();
    let mut conn = 0u64;
    let mut failures = 0u32;
    let mut receiving = false;
    'connections: loop {
        conn += 1;
        let (client, mut events) = AsyncClient::new(options.clone(), capacity(&config));
        let mut disconnecting = false;
        let error = loop {
            let event = tokio::select! {
                biased;
                _ = stop.cancelled(), if !disconnecting => {
                    disconnecting = true;
                    if shared.table.client().is_none() || client.try_disconnect().is_err() {
                        break 'connections;
                    }
                    continue;
                }
                _ = shared.cycle.notified(), if !disconnecting => {
                    debug!(route = %ctx.route, "reconnecting so that the broker sends released messages again");
                    break None;
                }
                // Once disconnecting, the broker gets a few seconds to take the rest.
                e = tokio::time::timeout(
                    if disconnecting { Duration::from_secs(5) } else { Duration::MAX },
                    events.poll(),
                ) => match e {
                    Ok(e) => e,
                    Err(_) => break 'connections,
                },
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    debug!(route = %ctx.route, conn, session_present = ack.session_present,
                        held = shared.table.held(), "connected");
                    shared
                        .table
                        .connected(conn, client.clone(), ack.session_present);
                    if !ack.session_present && conn > 1 {
                        warn!(route = %ctx.route, client_id = %config.client_id,
                            "the broker had no session for this client any more: the messages held are its no longer");
                    }
                    if let Err(e) = client.try_subscribe_many(subscriptions(&config)) {
                        break Some(e.to_string());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    ctx.set_connected(true);
                    if failures > 0 {
                        info!(route = %ctx.route, "connected to the broker again");
                        ctx.set_error(None);
                    }
                    failures = 0;
                    if !receiving {
                        receiving = true;
                        info!(route = %ctx.route, topics = %config.filters().join(", "),
                            client_id = %config.client_id, "receiving");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // After shutdown no more handles: the rest stays unacknowledged
                    // for the next start.
                    let Some(alive) = shared.alive() else {
                        continue;
                    };
                    let reading = Reading {
                        id_property: &reading_id,
                        key_property: reading_key.as_deref(),
                    };
                    if let Some(d) = arrived(&shared, conn, p, &reading, &alive) {
                        let _ = queue.send(d);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut waiting = shared.lock_waiting();
                    if let Some(w) = waiting
                        .as_mut()
                        .filter(|w| w.conn == conn && w.pkid.is_none())
                    {
                        w.pkid = Some(pkid);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    shared.answer(conn, Some(ack.pkid), dead_letter::outcome(ack.reason));
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if disconnecting => break 'connections,
                Ok(_) => {}
                Err(ConnectionError::MqttState(StateError::PubAckFail { reason })) => {
                    shared.answer(conn, None, dead_letter::outcome(reason));
                    break Some(format!("the broker refused a dead letter: {reason:?}"));
                }
                Err(e) => break Some(one_line(&e)),
            }
        };
        shared.table.lost();
        shared.answer(conn, None, Err("the connection was lost".to_owned()));
        if disconnecting || stop.is_cancelled() {
            break;
        }
        let Some(error) = error else { continue };
        failures += 1;
        ctx.counts.broker_errors.count("receive", 1);
        if failures == 1 {
            warn!(route = %ctx.route, %error, "lost the connection to the broker; reconnecting with backoff");
        }
        ctx.set_connected(false);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(crate::backoff(failures)) => {}
        }
    }
    shared.table.lost();
}

/// The delivery of an arriving message, unless it is the broker's copy of one ferry
/// holds already.
fn arrived(
    shared: &Arc<Shared>,
    conn: u64,
    p: Publish,
    reading: &Reading<'_>,
    alive: &mpsc::UnboundedSender<()>,
) -> Option<Delivery> {
    let ticket = match p.qos {
        QoS::AtMostOnce => None,
        _ => match shared.table.arrived(conn, p.pkid, p.dup) {
            Arrival::New(t) => {
                if p.dup {
                    debug!(route = %shared.ctx.route, conn, pkid = p.pkid, "sent again by the broker, not held: delivering");
                }
                Some(t)
            }
            other => {
                debug!(route = %shared.ctx.route, conn, pkid = p.pkid, ?other, "sent again by the broker: held already");
                return None;
            }
        },
    };
    let message = convert::message(&p, reading);
    let keep = shared.dead.is_some();
    Some(Delivery {
        message,
        ack: AckHandle::new(MessageAck {
            ticket,
            shared: shared.clone(),
            original: keep.then(|| Box::new(p)),
            _alive: alive.clone(),
        }),
    })
}

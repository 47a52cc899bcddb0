//! The messages ferry holds unacknowledged, by packet identifier, and the rules that keep
//! a `PUBACK` from ever acknowledging the wrong message.
//!
//! A QoS 1 message is known to the broker only by its packet identifier, which the broker
//! gives to another message once it has the `PUBACK`. So:
//! - a `PUBACK` goes out only on the connection that received the message (or that
//!   received the broker's copy sent again on reconnect, the DUP flag set). A settlement
//!   made while that connection is gone is kept, not queued for a later connection, where
//!   the identifier might already name another message.
//! - when the broker sends again, on a new connection of the same session, the copy of a
//!   message ferry still holds (DUP flag, same identifier), the copy is that message (the
//!   broker never had its `PUBACK`, so cannot have reused the identifier): it is not
//!   delivered a second time; the held message is bound to the new connection, and when
//!   it was settled meanwhile its `PUBACK` goes out at once.
//! - a message that arrives without the DUP flag under an identifier ferry holds from an
//!   earlier connection means the broker counts the held one as done: the held one is
//!   forgotten (its settlement is moot) and the new one held.
//! - on the same connection a broker must not reuse an identifier before its `PUBACK`,
//!   but Mosquitto 2.0 does once a session has queued more than 65,535 messages (it numbers
//!   them as it queues them). Both messages are then held under the identifier, each
//!   settled on its own and each taking one `PUBACK`: Mosquitto removes one message per
//!   `PUBACK` (the oldest of that identifier), so both are delivered and neither is lost.
//!   Forgetting the older one, as above, would let the newer one's `PUBACK` remove the
//!   older from the broker, never delivered.
//! - a connection that found no session (the broker lost or expired it) makes everything
//!   held moot: the broker will not take those `PUBACK`s.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tracing::debug;

/// One message held, as its handle knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) pkid: u16,
    token: u64,
}

#[derive(Debug)]
struct Entry {
    token: u64,
    /// The connection whose `PUBACK` it takes.
    conn: u64,
    /// The engine settled it (acknowledge), but its connection went away first.
    settled: bool,
}

#[derive(Default)]
struct Inner {
    /// The number of the current (or last) connection.
    conn: u64,
    /// The current connection's client, while it is up.
    client: Option<AsyncClient>,
    /// By identifier, oldest first; more than one only where the broker reused it.
    entries: HashMap<u16, Vec<Entry>>,
    next_token: u64,
}

/// What became of an arriving message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// A message to deliver, held under this ticket.
    New(Ticket),
    /// The broker's copy of a message ferry holds: not delivered again.
    Held,
    /// The copy of a message ferry had settled: acknowledged now, not delivered again.
    AckedAgain,
}

#[derive(Default)]
pub(crate) struct Table {
    inner: Mutex<Inner>,
}

/// A stand-in for the message, enough for the client to write its `PUBACK`.
fn ack_of(pkid: u16) -> Publish {
    Publish {
        qos: QoS::AtLeastOnce,
        pkid,
        ..Publish::default()
    }
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connection `conn` is up; `session_present` is the broker's word in its CONNACK.
    pub(crate) fn connected(&self, conn: u64, client: AsyncClient, session_present: bool) {
        let mut inner = self.lock();
        inner.conn = conn;
        inner.client = Some(client);
        if !session_present {
            inner.entries.clear();
        }
    }

    /// The current connection is gone.
    pub(crate) fn lost(&self) {
        self.lock().client = None;
    }

    /// The current connection's client and number, while it is up.
    pub(crate) fn client(&self) -> Option<(u64, AsyncClient)> {
        let inner = self.lock();
        inner.client.clone().map(|c| (inner.conn, c))
    }

    /// A QoS 1 message arrived on connection `conn`.
    pub(crate) fn arrived(&self, conn: u64, pkid: u16, dup: bool) -> Arrival {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let held = inner.entries.entry(pkid).or_default();
        // The broker's copy of a message held from an earlier connection.
        if let Some(i) = held.iter().position(|e| dup && e.conn != conn) {
            held[i].conn = conn;
            if !held[i].settled {
                return Arrival::Held;
            }
            let sent = inner
                .client
                .as_ref()
                .is_some_and(|c| c.try_ack(&ack_of(pkid)).is_ok());
            if sent {
                held.remove(i);
                if held.is_empty() {
                    inner.entries.remove(&pkid);
                }
            }
            return Arrival::AckedAgain;
        }
        if !dup {
            // Held from an earlier connection: the broker is done with those.
            held.retain(|e| e.conn == conn);
        }
        if !held.is_empty() {
            debug!(pkid, held = held.len(), "the broker sent a message under an identifier ferry holds unacknowledged; both are held");
        }
        inner.next_token += 1;
        let token = inner.next_token;
        held.push(Entry {
            token,
            conn,
            settled: false,
        });
        Arrival::New(Ticket { pkid, token })
    }

    /// The engine acknowledges: `PUBACK` now when the message's connection is up, else
    /// once the broker sends the message again (see the module documentation).
    pub(crate) fn ack(&self, t: Ticket) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(held) = inner.entries.get_mut(&t.pkid) else {
            return;
        };
        let Some(i) = held.iter().position(|e| e.token == t.token) else {
            return;
        };
        let sent = held[i].conn == inner.conn
            && inner
                .client
                .as_ref()
                .is_some_and(|c| c.try_ack(&ack_of(t.pkid)).is_ok());
        if sent {
            held.remove(i);
            if held.is_empty() {
                inner.entries.remove(&t.pkid);
            }
        } else {
            held[i].settled = true;
        }
    }

    /// The engine gives the message back: it stays unacknowledged on the broker, which
    /// sends it again at the next connection. False when the ticket was stale already (the
    /// broker is done with that message: nothing will come back).
    pub(crate) fn release(&self, t: Ticket) -> bool {
        let mut inner = self.lock();
        let Some(held) = inner.entries.get_mut(&t.pkid) else {
            return false;
        };
        let Some(i) = held.iter().position(|e| e.token == t.token) else {
            return false;
        };
        held.remove(i);
        if held.is_empty() {
            inner.entries.remove(&t.pkid);
        }
        true
    }

    /// Whether the ticket still names a message the broker will take the `PUBACK` of.
    pub(crate) fn is_current(&self, t: Ticket) -> bool {
        self.lock()
            .entries
            .get(&t.pkid)
            .is_some_and(|held| held.iter().any(|e| e.token == t.token && !e.settled))
    }

    /// Messages held unacknowledged.
    pub(crate) fn held(&self) -> usize {
        self.lock().entries.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::MqttOptions;

    fn client() -> (AsyncClient, rumqttc::v5::EventLoop) {
        AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 16)
    }

    #[test]
    fn a_settlement_never_crosses_to_a_later_connection() {
        let table = Table::default();
        let (c1, _l1) = client();
        table.connected(1, c1, false);
        let Arrival::New(a) = table.arrived(1, 5, false) else {
            panic!("new")
        };
        table.lost();
        // Settled while the connection is down: kept, not sent anywhere.
        table.ack(a);
        assert_eq!(table.held(), 1);
        let (c2, l2) = client();
        table.connected(2, c2, true);
        // The broker's copy on the new connection is acknowledged at once.
        assert_eq!(table.arrived(2, 5, true), Arrival::AckedAgain);
        assert_eq!(table.held(), 0);
        drop(l2);
    }

    #[test]
    fn a_held_message_sent_again_is_not_delivered_twice() {
        let table = Table::default();
        let (c1, _l1) = client();
        table.connected(1, c1, false);
        let Arrival::New(a) = table.arrived(1, 7, false) else {
            panic!("new")
        };
        table.lost();
        let (c2, _l2) = client();
        table.connected(2, c2, true);
        assert_eq!(table.arrived(2, 7, true), Arrival::Held);
        assert!(table.is_current(a));
        table.ack(a);
        assert_eq!(table.held(), 0, "acknowledged on the new connection");
    }

    #[test]
    fn a_new_message_under_an_identifier_held_from_an_earlier_connection_makes_that_one_moot() {
        let table = Table::default();
        let (c1, _l1) = client();
        table.connected(1, c1, false);
        let Arrival::New(a) = table.arrived(1, 9, false) else {
            panic!("new")
        };
        table.lost();
        let (c2, _l2) = client();
        table.connected(2, c2, true);
        let Arrival::New(b) = table.arrived(2, 9, false) else {
            panic!("new")
        };
        assert!(!table.is_current(a));
        assert!(!table.release(a), "a stale release brings nothing back");
        table.ack(a);
        assert!(
            table.is_current(b),
            "the stale ack did not touch the new one"
        );
        assert_eq!(table.held(), 1);
    }

    #[test]
    fn an_identifier_the_broker_reuses_on_the_same_connection_holds_both_messages() {
        // Mosquitto with more than 65,535 messages queued for the session.
        let table = Table::default();
        let (c1, _l1) = client();
        table.connected(1, c1, false);
        let Arrival::New(a) = table.arrived(1, 9, false) else {
            panic!("new")
        };
        let Arrival::New(b) = table.arrived(1, 9, false) else {
            panic!("new")
        };
        assert!(table.is_current(a) && table.is_current(b));
        assert_eq!(table.held(), 2);
        // Each acknowledgement is one PUBACK, sent (queued on the connection) or kept.
        table.ack(b);
        assert!(table.is_current(a), "one PUBACK each");
        assert_eq!(table.held(), 1);
        table.ack(a);
        assert_eq!(table.held(), 0);
    }

    #[test]
    fn the_copies_of_two_messages_held_under_one_identifier_bind_one_each() {
        let table = Table::default();
        let (c1, _l1) = client();
        table.connected(1, c1, false);
        let Arrival::New(a) = table.arrived(1, 4, false) else {
            panic!("new")
        };
        let Arrival::New(b) = table.arrived(1, 4, false) else {
            panic!("new")
        };
        table.lost();
        table.ack(a);
        table.ack(b);
        assert_eq!(
            table.held(),
            2,
            "settled while the connection is down: kept"
        );
        let (c2, _l2) = client();
        table.connected(2, c2, true);
        // The broker sends both again under the one identifier: each copy takes a PUBACK.
        assert_eq!(table.arrived(2, 4, true), Arrival::AckedAgain);
        assert_eq!(table.held(), 1);
        assert_eq!(table.arrived(2, 4, true), Arrival::AckedAgain);
        assert_eq!(table.held(), 0);
    }

    #[test]
    fn a_lost_session_makes_everything_held_moot() {
        let table = Table::default();
        let (c1, _l1) = client();
        table.connected(1, c1, false);
        let Arrival::New(a) = table.arrived(1, 3, false) else {
            panic!("new")
        };
        let (c2, _l2) = client();
        table.connected(2, c2, false);
        assert!(!table.is_current(a));
        assert_eq!(table.held(), 0);
    }
}

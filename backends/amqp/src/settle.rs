//! Settling deliveries on their channel, with acks coalesced into `multiple` acks.
//!
//! Deliveries finish out of order. An ack with `multiple` settles every delivery up to its
//! tag, so it may only be sent once every lower tag is settled; acks above a delivery still
//! in flight wait a moment for it and are then sent one by one, so a slow message never
//! holds the prefetch window hostage.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_core::{Settle, Settlement};
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Channel;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long an ack may wait for the deliveries below it before it is sent on its own.
const HOLD: Duration = Duration::from_millis(20);

/// How long settlements are gathered before the acks they allow are sent. Sending at once
/// cost an ack frame, and a wake-up of lapin's I/O thread, for nearly every message when
/// the endpoint answers a few per millisecond; a crash in this window only means a few
/// more messages delivered again.
const GATHER: Duration = Duration::from_millis(5);

/// One delivery settled: its tag and the engine's word.
pub(crate) type Op = (u64, Settlement);

/// The settlement of one AMQP delivery.
pub(crate) struct AmqpAck {
    pub(crate) tag: u64,
    pub(crate) settle: mpsc::UnboundedSender<Op>,
    /// The channel it came on: once that is gone, the broker has put the message back.
    pub(crate) channel: std::sync::Arc<Channel>,
}

impl Settle for AmqpAck {
    fn settle(self: Box<Self>, settlement: Settlement) {
        // If the channel's settler is gone the channel is gone too, and the broker has
        // already put the message back.
        let _ = self.settle.send((self.tag, settlement));
    }

    fn is_current(&self) -> bool {
        self.channel.status().connected()
    }
}

/// What to send for a set of settled tags; pure so it can be tested without a broker.
///
/// A channel numbers its deliveries 1, 2, 3, ... and every one of them reaches the engine
/// in that order, so the lowest delivery not yet settled is known without being told of
/// each arrival: it is the first gap in the settled tags.
pub(crate) struct AckWindow {
    /// Every tag below this one is settled.
    floor: u64,
    /// Settled tags above `floor` (it moves up once the gap below them closes).
    settled: BTreeSet<u64>,
    /// Acked by the engine, not yet sent, with when.
    acked: BTreeMap<u64, Instant>,
}

impl Default for AckWindow {
    fn default() -> Self {
        Self {
            floor: 1,
            settled: BTreeSet::new(),
            acked: BTreeMap::new(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `basic.ack` with `multiple` as given.
    Ack(u64, bool),
    /// `basic.reject`, requeue = false: the queue's dead-letter exchange takes it.
    Reject(u64),
    /// `basic.nack`, requeue = true: back to the queue at once.
    Requeue(u64),
}

impl AckWindow {
    /// Records a settlement; returns frames that must go out now.
    pub(crate) fn settle(
        &mut self,
        tag: u64,
        settlement: &Settlement,
        now: Instant,
    ) -> Option<Frame> {
        if tag < self.floor || !self.settled.insert(tag) {
            return None;
        }
        while self.settled.first() == Some(&self.floor) {
            self.settled.pop_first();
            self.floor += 1;
        }
        match settlement {
            Settlement::Ack => {
                self.acked.insert(tag, now);
                None
            }
            Settlement::DeadLetter(_) => Some(Frame::Reject(tag)),
            Settlement::Retry { .. } | Settlement::Release => Some(Frame::Requeue(tag)),
        }
    }

    /// Acks that can go now: one `multiple` ack for every acked tag below the lowest open
    /// one, and single acks for those that waited longer than `HOLD`.
    pub(crate) fn flush(&mut self, now: Instant, force: bool) -> Vec<Frame> {
        let mut frames = Vec::new();
        let below: Vec<u64> = self.acked.range(..self.floor).map(|(t, _)| *t).collect();
        if let Some(&top) = below.last() {
            for t in &below {
                self.acked.remove(t);
            }
            frames.push(Frame::Ack(top, below.len() > 1));
        }
        let due: Vec<u64> = self
            .acked
            .iter()
            .filter(|(_, at)| force || now.duration_since(**at) >= HOLD)
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            self.acked.remove(&t);
            frames.push(Frame::Ack(t, false));
        }
        frames
    }

    pub(crate) fn has_waiting_acks(&self) -> bool {
        !self.acked.is_empty()
    }
}

/// Runs one channel's settlements until every handle and the consume loop are gone.
pub(crate) async fn run(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Op>,
    route: std::sync::Arc<str>,
) {
    let mut window = AckWindow::default();
    let mut failed = false;
    loop {
        let op = if window.has_waiting_acks() {
            match tokio::time::timeout(HOLD / 2, rx.recv()).await {
                Ok(op) => op,
                Err(_) => {
                    send(
                        &channel,
                        window.flush(Instant::now(), false),
                        &route,
                        &mut failed,
                    )
                    .await;
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(op) = op else { break };
        let now = Instant::now();
        let mut frames = Vec::new();
        let mut apply = |(tag, s): Op, window: &mut AckWindow| {
            frames.extend(window.settle(tag, &s, now));
        };
        apply(op, &mut window);
        // Gather what else settles meanwhile, so that one `multiple` ack covers it.
        let gather = tokio::time::sleep(GATHER);
        tokio::pin!(gather);
        let mut closed = false;
        loop {
            tokio::select! {
                biased;
                _ = &mut gather => break,
                op = rx.recv() => match op {
                    Some(op) => apply(op, &mut window),
                    None => {
                        closed = true;
                        break;
                    }
                },
            }
        }
        frames.extend(window.flush(Instant::now(), false));
        send(&channel, frames, &route, &mut failed).await;
        if closed {
            break;
        }
    }
    send(
        &channel,
        window.flush(Instant::now(), true),
        &route,
        &mut failed,
    )
    .await;
}

/// Sends one batch of frames.
///
/// Rejects and requeues go first, one after another: a `multiple` ack that reached the
/// broker before them would settle their deliveries as acked. The acks of one batch never
/// overlap (one `multiple` ack below the lowest open delivery, single acks above it), so
/// they are handed to lapin together and leave in one write, instead of one round trip
/// through its I/O thread each — many single acks come at once when a slow delivery
/// has held the acks above it past `HOLD`.
async fn send(channel: &Channel, frames: Vec<Frame>, route: &str, failed: &mut bool) {
    let (acks, others): (Vec<Frame>, Vec<Frame>) = frames
        .into_iter()
        .partition(|f| matches!(f, Frame::Ack(..)));
    for frame in others {
        report(one(channel, frame).await, route, failed);
    }
    for result in futures::future::join_all(acks.into_iter().map(|f| one(channel, f))).await {
        report(result, route, failed);
    }
}

async fn one(channel: &Channel, frame: Frame) -> lapin::Result<()> {
    match frame {
        Frame::Ack(tag, multiple) => channel.basic_ack(tag, BasicAckOptions { multiple }).await,
        Frame::Reject(tag) => {
            channel
                .basic_reject(tag, BasicRejectOptions { requeue: false })
                .await
        }
        Frame::Requeue(tag) => {
            channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
        }
    }
}

fn report(result: lapin::Result<()>, route: &str, failed: &mut bool) {
    if let Err(e) = result {
        // The channel is gone: the broker requeues everything unacked on it, so the
        // messages come back (duplicates, never losses). Say so once per channel.
        if !*failed {
            warn!(route = %route, error = %e, "settling on a closed channel; its unacked messages return to the queue");
            *failed = true;
        } else {
            debug!(route = %route, error = %e, "settle failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::DeadLetter;

    #[tokio::test(start_paused = true)]
    async fn in_order_acks_coalesce_into_one_multiple_ack() {
        let mut w = AckWindow::default();
        let now = Instant::now();
        for t in [3, 1, 2, 5] {
            assert_eq!(w.settle(t, &Settlement::Ack, now), None);
        }
        // 4 is still open: 1..=3 go as one multiple ack, 5 waits.
        assert_eq!(w.flush(now, false), vec![Frame::Ack(3, true)]);
        assert_eq!(w.settle(4, &Settlement::Ack, now), None);
        assert_eq!(w.flush(now, false), vec![Frame::Ack(5, true)]);
        assert!(!w.has_waiting_acks());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_delivery_does_not_hold_later_acks_for_long() {
        let mut w = AckWindow::default();
        let now = Instant::now();
        w.settle(2, &Settlement::Ack, now);
        assert_eq!(w.flush(now, false), vec![]);
        assert_eq!(w.flush(now + HOLD, false), vec![Frame::Ack(2, false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn reject_and_requeue_go_out_at_once_and_unblock_acks() {
        let mut w = AckWindow::default();
        let now = Instant::now();
        w.settle(2, &Settlement::Ack, now);
        w.settle(3, &Settlement::Ack, now);
        let dl = Settlement::DeadLetter(DeadLetter {
            reason: "bad".into(),
            status: Some(422),
            last_class: "4xx",
            attempts: 1,
        });
        assert_eq!(w.settle(1, &dl, now), Some(Frame::Reject(1)));
        assert_eq!(w.flush(now, false), vec![Frame::Ack(3, true)]);
        assert_eq!(
            w.settle(4, &Settlement::Release, now),
            Some(Frame::Requeue(4))
        );
        // Settling twice sends nothing.
        assert_eq!(w.settle(4, &Settlement::Ack, now), None);
    }
}

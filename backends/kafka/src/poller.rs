//! The receive thread. The group drops a member that has not polled librdkafka for
//! `max.poll.interval.ms`, and the rebalance callbacks (which commit synchronously) run
//! inside the poll: so a thread of its own polls without pause, whether or not the route has
//! room. When the route has had none for a moment (saturated or paused), the assigned
//! partitions are paused in librdkafka instead: fetching stops, the member stays in its
//! group, and on resume fetching restarts right after the last record taken from
//! librdkafka.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{AckHandle, Delivery};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::context::FerryContext;
use crate::convert::{self, KeyFrom};
use crate::offsets::{Mark, Offsets};
use crate::settle::{DeadOp, KafkaAck, Original};

/// The longest a poll waits; also how soon shutdown and room in the route are noticed.
const POLL_WAIT: Duration = Duration::from_millis(100);

/// How long a record waits for room before fetching is paused (well below any
/// `max.poll.interval.ms`; rebalances wait that long at most).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// What the receive thread needs.
pub(crate) struct Poller {
    pub(crate) consumer: Arc<BaseConsumer<FerryContext>>,
    pub(crate) offsets: Arc<Offsets>,
    pub(crate) source: Arc<str>,
    pub(crate) key_from: KeyFrom,
    /// Whether dead letters need the original key and headers.
    pub(crate) keep_original: bool,
    /// The route's shutdown: hand nothing more over.
    pub(crate) shutdown: CancellationToken,
    /// Cancelled here once nothing more is handed over (this thread's handles are gone).
    pub(crate) handed_over: CancellationToken,
    /// Cancelled once the final commit is made: polling, and serving rebalances, may end.
    pub(crate) stop: CancellationToken,
    /// For waiting on room in `out` from this thread.
    pub(crate) runtime: tokio::runtime::Handle,
}

/// Where records go while this thread hands them over.
struct Handing {
    out: mpsc::Sender<Delivery>,
    dead: mpsc::UnboundedSender<DeadOp>,
    /// Received but not handed over yet, oldest first (their offsets stay uncommitted).
    held: VecDeque<(Mark, Delivery)>,
}

impl Poller {
    /// Polls until `stop`, handing records to `out` with handles that queue dead letters
    /// on `dead`; see the module documentation.
    pub(crate) fn run(self, out: mpsc::Sender<Delivery>, dead: mpsc::UnboundedSender<DeadOp>) {
        // However this thread ends, the source must not wait for it to hand over more.
        let _handed_over = self.handed_over.clone().drop_guard();
        let consumer = &*self.consumer;
        // Room for half the buffer before fetching again, so a saturated route does not
        // pause and resume the partitions for every record.
        let resume_at = (out.max_capacity() / 2).max(1);
        let mut handing = Some(Handing {
            out,
            dead,
            held: VecDeque::new(),
        });
        let mut paused = false;
        let mut generation = self.offsets.generation();
        let mut failures = 0u32;
        while !self.stop.is_cancelled() {
            let mut wait = POLL_WAIT;
            if let Some(h) = &mut handing {
                if self.shutdown.is_cancelled() || h.out.is_closed() {
                    // The route delivers what it is handed within the grace: what does not
                    // fit goes back unsent (uncommitted). The partitions stay paused while
                    // in-flight deliveries finish and the last commit is made.
                    self.hand_over(h);
                    handing = None;
                    self.handed_over.cancel();
                    if !paused {
                        paused = true;
                        set_paused(consumer, true);
                    }
                }
            }
            if let Some(h) = &mut handing {
                self.hand_over(h);
                let out = &h.out;
                if !h.held.is_empty() {
                    // Waits here rather than in the poll, to notice room at once. A
                    // saturated route has room again within moments: the partitions are
                    // paused only when it does not, as each pause costs a fetch round.
                    let limit = if paused { POLL_WAIT } else { PAUSE_AFTER };
                    let room = self
                        .runtime
                        .block_on(async { tokio::time::timeout(limit, out.reserve()).await });
                    if let Ok(Ok(permit)) = room {
                        while let Some((mark, delivery)) = h.held.pop_front() {
                            if self.offsets.is_current(&mark) {
                                permit.send(delivery);
                                break;
                            }
                        }
                    } else if !paused {
                        paused = true;
                        set_paused(consumer, true);
                    }
                    wait = Duration::ZERO;
                } else if paused {
                    let room = self.runtime.block_on(async {
                        tokio::time::timeout(POLL_WAIT, out.reserve_many(resume_at)).await
                    });
                    if let Ok(Ok(permits)) = room {
                        drop(permits);
                        paused = false;
                        set_paused(consumer, false);
                    }
                    wait = Duration::ZERO;
                }
            }
            // Partitions assigned since the last pass start unpaused: align them.
            let now = self.offsets.generation();
            if now != generation {
                generation = now;
                set_paused(consumer, paused);
            }
            let record = match consumer.poll(wait) {
                None => continue,
                Some(Ok(record)) => record,
                Some(Err(e)) => {
                    failures += 1;
                    self.failed(&e, failures);
                    continue;
                }
            };
            failures = 0;
            consumer.context().reached();
            // Fetched before a pause took effect while shutting down: not registered, so
            // it is read again.
            let Some(h) = &mut handing else { continue };
            let Some(mark) =
                self.offsets
                    .receive(record.topic(), record.partition(), record.offset())
            else {
                // Fetched across a rebalance for a partition this member no longer owns.
                continue;
            };
            let delivery = self.delivery(&record, mark.clone(), &h.dead);
            h.held.push_back((mark, delivery));
            self.hand_over(h);
        }
    }

    /// Hands over what is held, oldest first, while the route has room; drops what
    /// belongs to a partition taken away meanwhile (its new owner reads it).
    fn hand_over(&self, h: &mut Handing) {
        while let Some((mark, _)) = h.held.front() {
            if !self.offsets.is_current(mark) {
                h.held.pop_front();
                continue;
            }
            let Ok(permit) = h.out.try_reserve() else {
                return;
            };
            if let Some((_, delivery)) = h.held.pop_front() {
                permit.send(delivery);
            }
        }
    }

    fn failed(&self, e: &KafkaError, failures: u32) {
        let route = &self.consumer.context().source.route;
        if failures == 1 {
            warn!(route = %route, error = %crate::one_line(e), "receive failed; retrying");
        }
        // librdkafka queues its reports of broker trouble among the records and
        // reconnects by itself. Waiting after each report left the queue behind them,
        // rebalances included, unserved for minutes after an outage; only a fatal error
        // (the consumer cannot go on) waits.
        if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
            let until =
                std::time::Instant::now() + Duration::from_millis(100u64 << failures.min(6));
            while std::time::Instant::now() < until && !self.stop.is_cancelled() {
                std::thread::sleep(POLL_WAIT);
            }
        }
    }

    fn delivery(
        &self,
        record: &BorrowedMessage<'_>,
        mark: Mark,
        dead: &mpsc::UnboundedSender<DeadOp>,
    ) -> Delivery {
        let message = convert::convert(record, &self.source, self.key_from);
        let original = self.keep_original.then(|| Original {
            key: record.key().map(bytes::Bytes::copy_from_slice),
            payload: message.payload.clone(),
            headers: record
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(bytes::Bytes::copy_from_slice)))
                        .collect()
                })
                .unwrap_or_default(),
        });
        Delivery {
            message,
            ack: AckHandle::new(KafkaAck {
                mark,
                offsets: self.offsets.clone(),
                dead: dead.clone(),
                original,
            }),
        }
    }
}

/// Pauses or resumes fetching of every assigned partition.
fn set_paused(consumer: &BaseConsumer<FerryContext>, paused: bool) {
    let route = &consumer.context().source.route;
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            warn!(route = %route, error = %crate::one_line(&e), "cannot read the assignment to pause or resume it");
            return;
        }
    };
    if assignment.count() == 0 {
        return;
    }
    let done = if paused {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    match done {
        Ok(()) => debug!(route = %route, paused, partitions = assignment.count(),
            "fetching paused or resumed for the route's room"),
        Err(e) => warn!(route = %route, paused, error = %crate::one_line(&e),
            "cannot pause or resume fetching"),
    }
}

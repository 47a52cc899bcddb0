//! Per-key lanes for `ordering = "key"`: messages that share an ordering key are
//! delivered one after another in the order the source handed them over, while
//! different keys proceed in parallel up to the route's concurrency.
//!
//! A message whose key is busy waits here without a concurrency slot, so a key that
//! fails and backs off holds back only its own messages: the other keys keep every slot.
//! What waits is bounded instead by `room`: once that many messages wait behind busy
//! keys, the route takes nothing more from the source until one of them moves on, so a
//! stuck key cannot pull the whole backlog into memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

use crate::source::Delivery;

/// The keys with a delivery under way, each with the deliveries queued behind it.
pub(super) struct Lanes {
    inner: Mutex<Inner>,
    /// How many may wait behind busy keys at most.
    room: usize,
    moved: Notify,
}

#[derive(Default)]
struct Inner {
    busy: HashMap<String, VecDeque<Delivery>>,
    waiting: usize,
}

impl Lanes {
    pub(super) fn new(room: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            room: room.max(1),
            moved: Notify::new(),
        }
    }

    /// Queues `next` behind its key if the key is busy and returns `None`; otherwise
    /// marks the key busy and hands `next` back to be started now.
    pub(super) fn enter(&self, key: &str, next: Delivery) -> Option<Delivery> {
        let mut inner = self.lock();
        if let Some(queue) = inner.busy.get_mut(key) {
            queue.push_back(next);
            inner.waiting += 1;
            return None;
        }
        inner.busy.insert(key.to_owned(), VecDeque::new());
        Some(next)
    }

    /// Called when the key's current delivery is over: the next one in line, or `None`
    /// (and the key is free again).
    pub(super) fn next(&self, key: &str) -> Option<Delivery> {
        let mut inner = self.lock();
        let queue = inner.busy.get_mut(key)?;
        match queue.pop_front() {
            Some(next) => {
                inner.waiting -= 1;
                drop(inner);
                self.moved.notify_waiters();
                Some(next)
            }
            None => {
                inner.busy.remove(key);
                None
            }
        }
    }

    /// Waits until fewer than `room` deliveries wait behind busy keys.
    pub(super) async fn has_room(&self) {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.lock().waiting < self.room {
                return;
            }
            moved.await;
        }
    }

    /// Every queued delivery, for release at shutdown.
    pub(super) fn take_all(&self) -> Vec<Delivery> {
        let mut inner = self.lock();
        inner.waiting = 0;
        let taken = inner
            .busy
            .drain()
            .flat_map(|(_, queue)| queue.into_iter())
            .collect();
        drop(inner);
        self.moved.notify_waiters();
        taken
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::AckHandle;
    use crate::message::Message;
    use crate::Settle;
    use std::time::Duration;

    struct Nothing;
    impl Settle for Nothing {
        fn settle(self: Box<Self>, _: crate::Settlement) {}
    }

    fn delivery(id: &str) -> Delivery {
        Delivery {
            message: Message::new(id, "x", "q".into()),
            ack: AckHandle::new(Nothing),
        }
    }

    #[tokio::test]
    async fn waiting_is_bounded_and_moves_in_order() {
        let lanes = Lanes::new(2);
        assert!(lanes.enter("a", delivery("1")).is_some());
        assert!(lanes.enter("a", delivery("2")).is_none());
        lanes.has_room().await;
        assert!(lanes.enter("a", delivery("3")).is_none());
        let full = tokio::time::timeout(Duration::from_millis(50), lanes.has_room()).await;
        assert!(full.is_err(), "two wait: no room for a third");
        assert!(
            lanes.enter("b", delivery("4")).is_some(),
            "a free key starts"
        );
        assert_eq!(lanes.next("a").map(|d| d.message.id), Some("2".into()));
        lanes.has_room().await;
        assert_eq!(lanes.next("a").map(|d| d.message.id), Some("3".into()));
        assert!(lanes.next("a").is_none());
        assert!(
            lanes.enter("a", delivery("5")).is_some(),
            "the key is free again"
        );
    }
}

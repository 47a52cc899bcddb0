//! Per-key lanes for `ordering = "key"`: messages that share an ordering key are
//! delivered one after another in the order the source handed them over, while
//! different keys proceed in parallel up to the route's concurrency.
//!
//! A message whose key is busy waits here holding its concurrency permit, so waiting
//! messages and requests in flight together never exceed `concurrency`: the source is
//! not asked for more than the route can hold.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use super::Slot;
use crate::source::Delivery;

/// A delivery and the permit it holds while it waits for its key.
pub(super) type Waiting = (Delivery, Slot);

/// The keys with a delivery under way, each with the deliveries queued behind it.
#[derive(Default)]
pub(super) struct Lanes {
    busy: Mutex<HashMap<String, VecDeque<Waiting>>>,
}

impl Lanes {
    /// Queues `next` behind its key if the key is busy and returns `None`; otherwise
    /// marks the key busy and hands `next` back to be started now.
    pub(super) fn enter(&self, key: &str, next: Waiting) -> Option<Waiting> {
        let mut busy = self.lock();
        if let Some(queue) = busy.get_mut(key) {
            queue.push_back(next);
            return None;
        }
        busy.insert(key.to_owned(), VecDeque::new());
        Some(next)
    }

    /// Called when the key's current delivery is over: the next one in line, or `None`
    /// (and the key is free again).
    pub(super) fn next(&self, key: &str) -> Option<Waiting> {
        let mut busy = self.lock();
        let queue = busy.get_mut(key)?;
        match queue.pop_front() {
            Some(next) => Some(next),
            None => {
                busy.remove(key);
                None
            }
        }
    }

    /// Every queued delivery, for release at shutdown.
    pub(super) fn take_all(&self) -> Vec<Waiting> {
        self.lock()
            .drain()
            .flat_map(|(_, queue)| queue.into_iter())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Waiting>>> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

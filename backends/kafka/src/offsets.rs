//! Which offsets may be committed. Deliveries finish out of order, so a partition's commit
//! position is its lowest offset still unfinished (or one past the highest received when
//! none is): a crash or rebalance then replays only what was not yet delivered, never
//! skips it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A topic and partition.
pub(crate) type Tp = (String, i32);

/// Where one received message sits, for settling it later.
#[derive(Debug, Clone)]
pub(crate) struct Mark {
    pub(crate) tp: Tp,
    pub(crate) offset: i64,
    /// The assignment the message was received under; a settlement from an earlier
    /// assignment of the same partition is stale and ignored.
    pub(crate) generation: u64,
}

#[derive(Debug)]
struct Partition {
    generation: u64,
    unfinished: BTreeSet<i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The last position handed to a commit.
    committed: Option<i64>,
}

impl Partition {
    fn position(&self) -> Option<i64> {
        self.unfinished.first().copied().or(self.next)
    }
}

/// Offsets of every partition this consumer holds.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    partitions: HashMap<Tp, Partition>,
    /// Positions of partitions taken away whose final commit failed (the broker was
    /// unreachable): the messages below them were delivered, so if the next assignment
    /// hands the same partition back, they are committed then instead of read again.
    unsaved: HashMap<Tp, i64>,
}

impl Offsets {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The partitions were assigned to this consumer: they start afresh. Returns the
    /// unsaved positions (see [`Offsets::unsaved`]) of the partitions handed back; the
    /// others are forgotten, as another consumer may have moved past them since.
    pub(crate) fn assign(&self, tps: impl IntoIterator<Item = Tp>) -> Vec<(Tp, i64)> {
        let mut state = self.lock();
        state.generation += 1;
        let generation = state.generation;
        let unsaved = std::mem::take(&mut state.unsaved);
        let mut carried = Vec::new();
        for tp in tps {
            if let Some(position) = unsaved.get(&tp) {
                carried.push((tp.clone(), *position));
            }
            state.partitions.insert(
                tp,
                Partition {
                    generation,
                    unfinished: BTreeSet::new(),
                    next: None,
                    committed: None,
                },
            );
        }
        carried
    }

    /// Counts assignments: it changes with every rebalance that assigns partitions.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The partitions were taken away: returns their commit positions (to commit before
    /// letting go, even when a periodic commit of the same position may still be under
    /// way) and forgets them, so late settlements cannot move them.
    pub(crate) fn revoke(&self, tps: impl IntoIterator<Item = Tp>) -> Vec<(Tp, i64)> {
        let mut state = self.lock();
        tps.into_iter()
            .filter_map(|tp| {
                let position = state.partitions.remove(&tp)?.position()?;
                Some((tp, position))
            })
            .collect()
    }

    /// The commit of these revoked positions failed: keep them for the next assignment.
    pub(crate) fn unsaved(&self, positions: &[(Tp, i64)]) {
        self.lock().unsaved.extend(positions.iter().cloned());
    }

    /// Records a message just received; `None` when its partition is not assigned (a
    /// message fetched across a rebalance), which must then not be delivered.
    pub(crate) fn receive(&self, topic: &str, partition: i32, offset: i64) -> Option<Mark> {
        let mut state = self.lock();
        let tp = (topic.to_owned(), partition);
        let p = state.partitions.get_mut(&tp)?;
        p.unfinished.insert(offset);
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(Mark {
            generation: p.generation,
            tp,
            offset,
        })
    }

    /// The message was delivered or dead-lettered.
    pub(crate) fn finish(&self, mark: &Mark) {
        let mut state = self.lock();
        if let Some(p) = state.partitions.get_mut(&mark.tp) {
            if p.generation == mark.generation {
                p.unfinished.remove(&mark.offset);
            }
        }
    }

    /// Whether the message's partition is still held under the assignment it came with.
    pub(crate) fn is_current(&self, mark: &Mark) -> bool {
        self.lock()
            .partitions
            .get(&mark.tp)
            .is_some_and(|p| p.generation == mark.generation)
    }

    /// Commit positions that moved since the last call, marked as committed.
    pub(crate) fn due(&self) -> Vec<(Tp, i64)> {
        let mut state = self.lock();
        state
            .partitions
            .iter_mut()
            .filter_map(|(tp, p)| {
                let position = p.position()?;
                if p.committed == Some(position) {
                    return None;
                }
                p.committed = Some(position);
                Some((tp.clone(), position))
            })
            .collect()
    }

    /// A commit of these positions failed: try them again next time.
    pub(crate) fn uncommit(&self, positions: &[(Tp, i64)]) {
        let mut state = self.lock();
        for (tp, position) in positions {
            if let Some(p) = state.partitions.get_mut(tp) {
                if p.committed == Some(*position) {
                    p.committed = None;
                }
            }
        }
    }

    /// Every assigned partition with the position a restart would resume from.
    pub(crate) fn positions(&self) -> Vec<(Tp, Option<i64>)> {
        let state = self.lock();
        state
            .partitions
            .iter()
            .map(|(tp, p)| (tp.clone(), p.position()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".to_owned(), p)
    }

    #[test]
    fn commit_stops_below_the_lowest_unfinished_offset() {
        let offsets = Offsets::default();
        offsets.assign([tp(0)]);
        let marks: Vec<Mark> = (10..15)
            .map(|o| offsets.receive("t", 0, o).expect("assigned"))
            .collect();
        assert_eq!(offsets.due(), vec![(tp(0), 10)]);
        offsets.finish(&marks[1]);
        offsets.finish(&marks[2]);
        assert!(offsets.due().is_empty(), "10 is still in flight");
        offsets.finish(&marks[0]);
        assert_eq!(offsets.due(), vec![(tp(0), 13)]);
        offsets.finish(&marks[4]);
        offsets.finish(&marks[3]);
        assert_eq!(offsets.due(), vec![(tp(0), 15)]);
        assert!(offsets.due().is_empty());
    }

    #[test]
    fn unassigned_partitions_receive_nothing_and_stale_settlements_are_ignored() {
        let offsets = Offsets::default();
        assert!(offsets.receive("t", 0, 1).is_none());
        offsets.assign([tp(0), tp(1)]);
        let old = offsets.receive("t", 0, 5).expect("assigned");
        let kept = offsets.receive("t", 1, 7).expect("assigned");
        assert_eq!(
            offsets.revoke([tp(0)]),
            vec![(tp(0), 5)],
            "revoke commits only below the unfinished message"
        );
        assert!(
            offsets.assign([tp(0)]).is_empty(),
            "its revoke commit did not fail"
        );
        let new = offsets.receive("t", 0, 5).expect("assigned again");
        assert!(!offsets.is_current(&old) && offsets.is_current(&new));
        offsets.finish(&old);
        let mut due = offsets.due();
        due.sort();
        assert_eq!(
            due,
            vec![(tp(0), 5), (tp(1), 7)],
            "the stale finish moved nothing"
        );
        offsets.finish(&new);
        offsets.finish(&kept);
        let mut due = offsets.due();
        due.sort();
        assert_eq!(due, vec![(tp(0), 6), (tp(1), 8)]);
    }

    #[test]
    fn failed_commits_are_retried() {
        let offsets = Offsets::default();
        offsets.assign([tp(0)]);
        let m = offsets.receive("t", 0, 0).expect("assigned");
        offsets.finish(&m);
        let due = offsets.due();
        assert_eq!(due, vec![(tp(0), 1)]);
        offsets.uncommit(&due);
        assert_eq!(offsets.due(), vec![(tp(0), 1)]);
    }

    #[test]
    fn positions_whose_revoke_commit_failed_return_with_the_same_partition_only() {
        let offsets = Offsets::default();
        offsets.assign([tp(0), tp(1)]);
        for p in 0..2 {
            let m = offsets.receive("t", p, 9).expect("assigned");
            offsets.finish(&m);
        }
        let revoked = offsets.revoke([tp(0), tp(1)]);
        offsets.unsaved(&revoked);
        assert_eq!(offsets.assign([tp(1)]), vec![(tp(1), 10)]);
        offsets.revoke([tp(1)]);
        assert!(
            offsets.assign([tp(0), tp(1)]).is_empty(),
            "forgotten once an assignment went by without it"
        );
    }
}

//! Collapses the changes to one key within a batch to the one write that has the same effect.
//!
//! Insert then update is an upsert of the last state; update then delete is a delete; delete
//! then insert is an upsert. Insert then delete is nothing — but only when the insert is known
//! never to have reached the target. Delivery is at least once: after a crash the sink replays
//! from its durable cursor, and the process that crashed may already have written that insert.
//! Offsets at or below the *replay horizon* (the log head when this sink started; every offset
//! of a sink's Kafka buffer, where another member may have written any change before a
//! rebalance) may have been written before, so there an insert then delete still deletes.
//! Above the horizon nothing can have been sent, and the pair disappears.

use std::collections::HashMap;
use std::hash::Hash;

/// A change to one key, as the coalescer sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<F> {
    /// The row did not exist in the source before this change.
    Insert(F),
    /// The row exists with these values (an update, or a snapshot read).
    Upsert(F),
    Delete,
}

/// The write a key's changes come to.
#[derive(Debug, Clone, PartialEq)]
pub enum Write<F> {
    Upsert(F),
    Delete,
}

/// One key's pending write, with what its last change was.
#[derive(Debug, Clone)]
pub struct Pending<K, F, M> {
    pub key: K,
    pub write: Write<F>,
    /// The last change's metadata (its offset, event ...): where the write comes from.
    pub last: M,
    /// Changes folded into this write.
    pub changes: u64,
}

struct Slot<K, F, M> {
    pending: Pending<K, F, M>,
    /// The key's first change in the batch is an insert that no earlier run can have sent.
    fresh: bool,
}

/// Coalesces one batch; keys come out in the order they were first seen.
pub struct Coalescer<K, F, M> {
    horizon: u64,
    index: HashMap<K, usize>,
    slots: Vec<Option<Slot<K, F, M>>>,
    changes: u64,
}

impl<K: Hash + Eq + Clone, F, M> Coalescer<K, F, M> {
    /// `horizon`: offsets at or below it may already have been written to the target.
    pub fn new(horizon: u64) -> Self {
        Self { horizon, index: HashMap::new(), slots: Vec::new(), changes: 0 }
    }

    /// Changes pushed since the last drain.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Keys with a pending write.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Adds the change at log `offset`.
    pub fn push(&mut self, key: K, change: Change<F>, offset: u64, meta: M) {
        self.changes += 1;
        let fresh_insert = matches!(change, Change::Insert(_)) && offset > self.horizon;
        let write = match change {
            Change::Insert(f) | Change::Upsert(f) => Write::Upsert(f),
            Change::Delete => Write::Delete,
        };
        let Some(&i) = self.index.get(&key) else {
            self.index.insert(key.clone(), self.slots.len());
            let pending = Pending { key, write, last: meta, changes: 1 };
            self.slots.push(Some(Slot { pending, fresh: fresh_insert }));
            return;
        };
        let slot = self.slots[i].as_mut().expect("indexed slots are occupied");
        if slot.fresh && matches!(write, Write::Delete) {
            // Created and removed within the batch, and never sent: nothing to write.
            self.slots[i] = None;
            self.index.remove(&key);
            return;
        }
        slot.pending.write = write;
        slot.pending.last = meta;
        slot.pending.changes += 1;
    }

    /// The pending writes, in first-seen order of their keys.
    pub fn pending(&self) -> impl Iterator<Item = &Pending<K, F, M>> {
        self.slots.iter().flatten().map(|s| &s.pending)
    }

    /// Takes the pending writes, leaving the coalescer empty.
    pub fn drain(&mut self) -> Vec<Pending<K, F, M>> {
        self.index.clear();
        self.changes = 0;
        self.slots.drain(..).flatten().map(|s| s.pending).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Target = BTreeMap<u8, u32>;

    fn apply(target: &mut Target, key: u8, write: &Write<u32>) {
        match write {
            Write::Upsert(v) => {
                target.insert(key, *v);
            }
            Write::Delete => {
                target.remove(&key);
            }
        }
    }

    /// A source history: each step changes a random key as a database would (an insert only
    /// of an absent key, updates and deletes only of present ones).
    fn history() -> impl Strategy<Value = Vec<(u8, Change<u32>)>> {
        prop::collection::vec((0u8..6, 0u8..3, any::<u32>()), 0..60).prop_map(|steps| {
            let mut present = std::collections::BTreeSet::new();
            let mut out = Vec::new();
            for (key, kind, value) in steps {
                let change = match (present.contains(&key), kind) {
                    (false, _) => Change::Insert(value),
                    (true, 0) => Change::Delete,
                    (true, _) => Change::Upsert(value),
                };
                match change {
                    Change::Insert(_) => present.insert(key),
                    Change::Delete => present.remove(&key),
                    Change::Upsert(_) => true,
                };
                out.push((key, change));
            }
            out
        })
    }

    proptest! {
        /// The law: applying the coalesced writes equals applying the changes one by one, from
        /// any state a crashed earlier run can have left. The batch starts at the durable
        /// cursor; the earlier run may have written any prefix of it up to the horizon.
        #[test]
        fn coalescing_equals_applying_in_order(
            history in history(),
            cut in any::<prop::sample::Index>(),
            horizon in any::<prop::sample::Index>(),
            written in any::<prop::sample::Index>(),
        ) {
            let cursor = cut.index(history.len() + 1);
            let batch = &history[cursor..];
            let horizon = cursor + horizon.index(batch.len() + 1);
            let mut durable = Target::new();
            for (key, change) in &history[..cursor] {
                let write = match change { Change::Insert(v) | Change::Upsert(v) => Write::Upsert(*v), Change::Delete => Write::Delete };
                apply(&mut durable, *key, &write);
            }
            // The crashed run got some writes of the batch, up to the horizon, into the target.
            let mut start = durable.clone();
            for (key, change) in &batch[..written.index(horizon - cursor + 1)] {
                let write = match change { Change::Insert(v) | Change::Upsert(v) => Write::Upsert(*v), Change::Delete => Write::Delete };
                apply(&mut start, *key, &write);
            }
            let mut one_by_one = start.clone();
            let mut coalescer = Coalescer::new(horizon as u64);
            for (i, (key, change)) in batch.iter().enumerate() {
                let write = match change { Change::Insert(v) | Change::Upsert(v) => Write::Upsert(*v), Change::Delete => Write::Delete };
                apply(&mut one_by_one, *key, &write);
                coalescer.push(*key, change.clone(), (cursor + i + 1) as u64, i);
            }
            let mut coalesced = start;
            let pending = coalescer.drain();
            let keys: std::collections::BTreeSet<u8> = pending.iter().map(|p| p.key).collect();
            prop_assert_eq!(keys.len(), pending.len(), "one write per key");
            for p in &pending {
                apply(&mut coalesced, p.key, &p.write);
            }
            prop_assert_eq!(coalesced, one_by_one);
        }
    }

    #[test]
    fn the_rules_of_the_issue() {
        let mut c = Coalescer::new(0);
        c.push("a", Change::Insert(1), 1, ());
        c.push("a", Change::Upsert(2), 2, ());
        c.push("b", Change::Insert(1), 3, ());
        c.push("b", Change::Delete, 4, ());
        c.push("c", Change::Upsert(1), 5, ());
        c.push("c", Change::Delete, 6, ());
        c.push("d", Change::Delete, 7, ());
        c.push("d", Change::Insert(9), 8, ());
        assert_eq!(c.changes(), 8);
        let out: Vec<(&str, Write<i32>, u64)> = c.drain().into_iter().map(|p| (p.key, p.write, p.changes)).collect();
        assert_eq!(
            out,
            vec![("a", Write::Upsert(2), 2), ("c", Write::Delete, 2), ("d", Write::Upsert(9), 2)],
            "insert+update is an upsert, insert+delete nothing, update+delete a delete"
        );
    }

    #[test]
    fn below_the_replay_horizon_insert_then_delete_still_deletes() {
        let mut c = Coalescer::new(10);
        c.push("a", Change::Insert(1), 9, ());
        c.push("a", Change::Delete, 11, ());
        let out: Vec<Write<i32>> = c.drain().into_iter().map(|p| p.write).collect();
        assert_eq!(out, vec![Write::Delete]);
    }
}

//! Which rows of a backfill chunk may land, decided by transaction visibility.
//!
//! A chunk is read inside one snapshot `S` and lands in the log where its "high watermark"
//! message commits in the stream (`H`). A row read under `S` is the key's state at `H` unless a
//! transaction that `S` does not see, and that committed before `H`, touched the key: then the
//! stream already holds a newer change of the key before `H`, and the row is dropped. Every
//! transaction `S` sees committed before `S` was taken, so before `H`; nothing else can make the
//! row stale. The check is by transaction id against `S`'s `xmin:xmax:xip` rather than by a low
//! watermark message, because a transaction's commit record can reach the stream before the
//! transaction becomes visible to new snapshots (for as long as a synchronous standby takes):
//! a low watermark would then count it on the wrong side.
//!
//! The fence records, for the tables being backfilled, which keys each transaction touched;
//! once every outstanding chunk's snapshot sees a transaction, no chunk can be made stale by
//! it and its record is pruned.

use crate::event::TableId;
use std::collections::{HashMap, HashSet};

/// A transaction snapshot as `pg_current_snapshot()` prints it: `xmin:xmax:xip,...` with
/// 64-bit (epoch-extended) transaction ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxSnapshot {
    xmin: u64,
    xmax: u64,
    /// In progress when the snapshot was taken; sorted.
    xip: Vec<u64>,
}

impl TxSnapshot {
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let mut xip = match parts.next()? {
            "" => Vec::new(),
            list => list.split(',').map(|x| x.parse().ok()).collect::<Option<Vec<u64>>>()?,
        };
        xip.sort_unstable();
        (parts.next().is_none() && xmin <= xmax).then_some(Self { xmin, xmax, xip })
    }

    /// Widens a 32-bit id (as pgoutput sends it) to the 64-bit id nearest this snapshot's
    /// `xmax`: ids in use are never 2^31 apart.
    fn widen(&self, xid: u32) -> u64 {
        const HALF: u64 = 1 << 31;
        let candidate = (self.xmax & !0xFFFF_FFFF) | xid as u64;
        if candidate > self.xmax.saturating_add(HALF) && candidate >= 1 << 32 {
            candidate - (1 << 32)
        } else if candidate.saturating_add(HALF) < self.xmax {
            candidate + (1 << 32)
        } else {
            candidate
        }
    }

    /// The snapshot sees the committed transaction `xid`.
    pub fn sees(&self, xid: u32) -> bool {
        let x = self.widen(xid);
        x < self.xmin || (x < self.xmax && self.xip.binary_search(&x).is_err())
    }
}

/// What a transaction did to the tables being backfilled.
#[derive(Debug, Default, Clone)]
struct Touches {
    /// Encoded keys, per table.
    keys: HashMap<TableId, HashSet<Vec<u8>>>,
    /// Truncated tables: every row of them is touched.
    truncated: HashSet<TableId>,
    /// Tables whose changes by this transaction were partly streamed before tracking began,
    /// so which keys it touched is unknown.
    blind: HashSet<TableId>,
}

impl Touches {
    fn merge(&mut self, other: Touches) {
        for (table, keys) in other.keys {
            self.keys.entry(table).or_default().extend(keys);
        }
        self.truncated.extend(other.truncated);
        self.blind.extend(other.blind);
    }
}

/// What becomes of a piece of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Land the rows whose keys are not in `stale` (all of them are stale with `everything`).
    Land { stale: HashSet<Vec<u8>>, everything: bool },
    /// A transaction the snapshot does not see touched the table in unknown ways: read the
    /// chunk again under a newer snapshot.
    Redo,
}

/// Key-level records of the transactions that may make a chunk stale.
#[derive(Debug, Default)]
pub struct Fence {
    tracked: HashSet<TableId>,
    /// Transactions being received, by (top-level id, subtransaction id).
    open: HashMap<(u32, u32), Touches>,
    /// Committed transactions not yet seen by every outstanding snapshot.
    committed: Vec<(u32, Touches)>,
}

impl Fence {
    /// Starts recording changes of `table`. `streaming` are the streamed transactions in
    /// progress: their earlier changes went by unrecorded.
    pub fn track(&mut self, table: &TableId, streaming: impl IntoIterator<Item = u32>) {
        if self.tracked.insert(table.clone()) {
            for xid in streaming {
                self.open.entry((xid, xid)).or_default().blind.insert(table.clone());
            }
        }
    }

    /// Stops recording the tables `keep` refuses (their backfills ended).
    pub fn retain(&mut self, keep: impl Fn(&TableId) -> bool) {
        self.tracked.retain(|t| keep(t));
    }

    pub fn tracks(&self, table: &TableId) -> bool {
        self.tracked.contains(table)
    }

    /// Nothing is tracked: changes need no recording.
    pub fn idle(&self) -> bool {
        self.tracked.is_empty()
    }

    /// Records that transaction `(top, sub)` changed `key` of `table`.
    pub fn touch(&mut self, top: u32, sub: u32, table: &TableId, key: Vec<u8>) {
        self.open.entry((top, sub)).or_default().keys.entry(table.clone()).or_default().insert(key);
    }

    /// Records that transaction `(top, sub)` truncated `table`.
    pub fn truncate(&mut self, top: u32, sub: u32, table: &TableId) {
        self.open.entry((top, sub)).or_default().truncated.insert(table.clone());
    }

    /// The transaction `top` committed (with all its subtransactions).
    pub fn commit(&mut self, top: u32) {
        let parts: Vec<(u32, u32)> = self.open.keys().filter(|(t, _)| *t == top).copied().collect();
        let mut all = Touches::default();
        for part in parts {
            all.merge(self.open.remove(&part).expect("listed above"));
        }
        if !all.keys.is_empty() || !all.truncated.is_empty() || !all.blind.is_empty() {
            self.committed.push((top, all));
        }
    }

    /// A streamed transaction (`sub == top`) or one of its subtransactions rolled back.
    pub fn abort(&mut self, top: u32, sub: u32) {
        if top == sub {
            self.open.retain(|(t, _), _| *t != top);
        } else {
            self.open.remove(&(top, sub));
        }
    }

    /// Which rows of `table` read under `snapshot` may land now.
    pub fn judge(&self, table: &TableId, snapshot: &TxSnapshot) -> Verdict {
        let mut stale = HashSet::new();
        let mut everything = false;
        for (xid, touches) in &self.committed {
            if snapshot.sees(*xid) {
                continue;
            }
            if touches.blind.contains(table) {
                return Verdict::Redo;
            }
            everything |= touches.truncated.contains(table);
            if let Some(keys) = touches.keys.get(table) {
                stale.extend(keys.iter().cloned());
            }
        }
        Verdict::Land { stale, everything }
    }

    /// Forgets the transactions every snapshot of `outstanding` sees: snapshots taken later
    /// see them too.
    pub fn prune<'a>(&mut self, outstanding: impl IntoIterator<Item = &'a TxSnapshot> + Clone) {
        self.committed.retain(|(xid, _)| !outstanding.clone().into_iter().all(|s| s.sees(*xid)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> TableId {
        TableId::new("public", "orders")
    }

    #[test]
    fn snapshot_text_parses_and_decides_visibility() {
        let s = TxSnapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99) && s.sees(100) && s.sees(102) && s.sees(104));
        assert!(!s.sees(101) && !s.sees(103) && !s.sees(105) && !s.sees(200));
        assert_eq!(TxSnapshot::parse("7:7:").unwrap(), TxSnapshot { xmin: 7, xmax: 7, xip: vec![] });
        assert!(TxSnapshot::parse("9:7:").is_none() && TxSnapshot::parse("x").is_none());
    }

    #[test]
    fn ids_widen_across_the_32_bit_wrap() {
        // Epoch 1: xmax is 2^32 + 10; a 32-bit id just below the wrap belongs to epoch 0.
        let s = TxSnapshot::parse(&format!("{}:{}:", (1u64 << 32) - 5, (1u64 << 32) + 10)).unwrap();
        assert!(s.sees(u32::MAX - 10) && s.sees(u32::MAX - 2) && s.sees(9));
        // 11 is 2^32 + 11 in epoch 1: at or above xmax, not seen.
        assert!(!s.sees(10) && !s.sees(11));
    }

    #[test]
    fn unseen_transactions_make_their_keys_stale_and_seen_ones_are_pruned() {
        let mut f = Fence::default();
        f.track(&t(), []);
        f.touch(101, 101, &t(), b"k1".to_vec());
        f.commit(101);
        f.touch(110, 110, &t(), b"k2".to_vec());
        f.touch(110, 111, &t(), b"k3".to_vec());
        f.abort(110, 111);
        f.commit(110);
        let s = TxSnapshot::parse("101:105:101").unwrap();
        let Verdict::Land { stale, everything } = f.judge(&t(), &s) else { panic!() };
        assert!(!everything);
        assert_eq!(stale, [b"k1".to_vec(), b"k2".to_vec()].into_iter().collect());
        // A later snapshot sees 101 but not 110.
        let later = TxSnapshot::parse("110:111:110").unwrap();
        f.prune([&later]);
        assert_eq!(f.committed.len(), 1);
        let Verdict::Land { stale, .. } = f.judge(&t(), &later) else { panic!() };
        assert_eq!(stale, [b"k2".to_vec()].into_iter().collect());
    }

    #[test]
    fn a_truncate_stales_everything_and_a_blind_stream_asks_for_a_redo() {
        let mut f = Fence::default();
        f.truncate(50, 50, &t());
        f.commit(50);
        let s = TxSnapshot::parse("50:51:50").unwrap();
        assert!(matches!(f.judge(&t(), &s), Verdict::Land { everything: true, .. }));
        let mut f = Fence::default();
        f.track(&t(), [60]);
        f.commit(60);
        assert_eq!(f.judge(&t(), &TxSnapshot::parse("60:61:60").unwrap()), Verdict::Redo);
        assert!(matches!(f.judge(&t(), &TxSnapshot::parse("61:61:").unwrap()), Verdict::Land { .. }));
    }

    fn snapshot(xmin: u64, xmax: u64, xip: &[u64]) -> TxSnapshot {
        let mut xip: Vec<u64> = xip.iter().copied().filter(|x| *x >= xmin && *x < xmax).collect();
        xip.sort_unstable();
        xip.dedup();
        TxSnapshot { xmin, xmax, xip }
    }

    proptest::proptest! {
        /// Pruning by the outstanding snapshots never changes what they (or any snapshot taken
        /// later, which sees at least as much) decide.
        #[test]
        fn pruning_keeps_every_outstanding_verdict(
            txs in proptest::collection::vec((100u32..140, 0u8..20), 0..40),
            snaps in proptest::collection::vec((100u64..140, 0u64..10, proptest::collection::vec(100u64..150, 0..5)), 1..4),
        ) {
            let mut f = Fence::default();
            f.track(&t(), []);
            for (xid, key) in &txs {
                f.touch(*xid, *xid, &t(), vec![*key]);
                f.commit(*xid);
            }
            let outstanding: Vec<TxSnapshot> =
                snaps.iter().map(|(xmin, span, xip)| snapshot(*xmin, xmin + span, xip)).collect();
            let later = snapshot(150, 150, &[]);
            let before: Vec<Verdict> = outstanding.iter().chain([&later]).map(|s| f.judge(&t(), s)).collect();
            f.prune(outstanding.iter());
            let after: Vec<Verdict> = outstanding.iter().chain([&later]).map(|s| f.judge(&t(), s)).collect();
            proptest::prop_assert_eq!(before, after);
        }
    }
}

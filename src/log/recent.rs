//! The newest committed events, kept in memory so a sink that keeps up with the source reads
//! them without a disk read and a decode. A sink that falls further behind than this window
//! reads from the log file as before; the window only ever holds events already durable.

use super::LogRecord;
use std::collections::VecDeque;

/// A bounded, contiguous window of the log's newest records.
pub(super) struct RecentEvents {
    /// Records in offset order, each with its approximate memory size.
    records: VecDeque<(LogRecord, usize)>,
    bytes: usize,
    limit: usize,
    /// The newest offset handed to a reader, from the window or from disk.
    read_upto: u64,
    /// A reader position that a writer stopped waiting for; not waited for again until it moves.
    stalled_at: Option<u64>,
}

impl RecentEvents {
    /// A window holding about `limit` bytes of events.
    pub fn new(limit: usize) -> Self {
        Self { records: VecDeque::new(), bytes: 0, limit, read_upto: 0, stalled_at: None }
    }

    /// Records that a reader has been given everything up to `offset`.
    pub fn note_read(&mut self, offset: u64) {
        self.read_upto = self.read_upto.max(offset);
    }

    /// Whether a writer about to add `events` should first wait for readers: it should when the
    /// addition would push records nobody has read out of the window (they would then be read
    /// from disk), unless the reader stopped moving. Returns the reader position to wait on.
    pub fn should_wait(&self, events: usize) -> Option<u64> {
        let (first, last) = (self.records.front()?.0.offset, self.records.back()?.0.offset);
        let per_event = self.bytes / self.records.len();
        let unread = last.saturating_sub(self.read_upto.max(first - 1)) as usize;
        let fits = (unread + events) * per_event <= self.limit;
        (!fits && self.stalled_at != Some(self.read_upto)).then_some(self.read_upto)
    }

    /// The reader did not move from `at` while a writer waited: stop waiting for it.
    pub fn reader_stalled(&mut self, at: u64) {
        self.stalled_at = Some(at);
    }

    /// Adds records that were just committed and drops the oldest beyond the limit, returning
    /// them so the caller can free them after releasing the window's lock.
    pub fn extend(&mut self, committed: Vec<LogRecord>) -> Vec<LogRecord> {
        for record in committed {
            // The window must stay contiguous for offset arithmetic; a gap (which commits do not
            // produce) would only cost a disk read, so start over rather than guess.
            if self.records.back().is_some_and(|(last, _)| last.offset + 1 != record.offset) {
                self.records.clear();
                self.bytes = 0;
            }
            let size = memory_size(&record);
            self.bytes += size;
            self.records.push_back((record, size));
        }
        let mut evicted = Vec::new();
        while self.bytes > self.limit {
            let Some((record, size)) = self.records.pop_front() else { break };
            self.bytes -= size;
            evicted.push(record);
        }
        evicted
    }

    /// Records from `from` on, up to `max_events` or about `max_bytes` of encoded size; `None`
    /// when `from` is outside the window.
    pub fn read(&self, from: u64, max_events: usize, max_bytes: usize) -> Option<Vec<LogRecord>> {
        let first = self.records.front()?.0.offset;
        let last = self.records.back()?.0.offset;
        if from < first || from > last {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for (record, _) in self.records.range((from - first) as usize..) {
            bytes += record.bytes;
            out.push(record.clone());
            if out.len() >= max_events || bytes >= max_bytes {
                break;
            }
        }
        Some(out)
    }
}

/// About what a record holds in memory, from its encoded size (which counts every string and
/// byte of its values) plus the in-memory value slots, without walking the values.
fn memory_size(record: &LogRecord) -> usize {
    let e = &record.event;
    let slots = e.key.len() + e.before.as_ref().map_or(0, Vec::len) + e.after.as_ref().map_or(0, Vec::len);
    record.bytes + std::mem::size_of::<crate::event::ChangeEvent>() + slots * std::mem::size_of::<crate::event::Value>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ChangeEvent, Op, Position, TableId, Value};
    use std::sync::Arc;

    fn record(offset: u64) -> LogRecord {
        let event = ChangeEvent {
            table: TableId::new("public", "t"),
            schema_id: 1,
            op: Op::Insert,
            key: vec![Value::Int(offset as i64)],
            before: None,
            after: Some(vec![Value::Int(offset as i64)]),
            position: Position::change(offset, 0),
            commit_ts_us: 0,
            tx_id: None,
            toast_fetched: false,
            snapshot_last: false,
            origin: None,
        };
        LogRecord { offset, event: Arc::new(event), bytes: 10 }
    }

    fn offsets(records: &[LogRecord]) -> Vec<u64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn serves_only_offsets_inside_the_window() {
        let mut w = RecentEvents::new(usize::MAX);
        w.extend((5..=9).map(record).collect());
        assert!(w.read(4, 100, usize::MAX).is_none());
        assert!(w.read(10, 100, usize::MAX).is_none());
        assert_eq!(offsets(&w.read(7, 100, usize::MAX).unwrap()), vec![7, 8, 9]);
        assert_eq!(offsets(&w.read(5, 2, usize::MAX).unwrap()), vec![5, 6]);
        assert_eq!(offsets(&w.read(5, 100, 25).unwrap()), vec![5, 6, 7]);
    }

    #[test]
    fn writers_wait_only_for_readers_that_would_lose_the_window_and_still_move() {
        let one = memory_size(&record(1));
        let mut w = RecentEvents::new(10 * one);
        assert_eq!(w.should_wait(100), None, "an empty window has room");
        w.extend((1..=6).map(record).collect());
        // Nothing read: 6 unread + 4 fit, 6 + 5 do not.
        assert_eq!(w.should_wait(4), None);
        assert_eq!(w.should_wait(5), Some(0));
        w.note_read(3);
        assert_eq!(w.should_wait(7), None);
        assert_eq!(w.should_wait(8), Some(3));
        // A reader that did not move while a writer waited is not waited for again...
        w.reader_stalled(3);
        assert_eq!(w.should_wait(8), None);
        // ...until it moves.
        w.note_read(4);
        assert_eq!(w.should_wait(9), Some(4));
    }

    #[test]
    fn drops_the_oldest_beyond_the_limit_and_restarts_after_a_gap() {
        let one = memory_size(&record(1));
        let mut w = RecentEvents::new(3 * one);
        assert_eq!(offsets(&w.extend((1..=5).map(record).collect())), vec![1, 2]);
        assert!(w.read(2, 100, usize::MAX).is_none());
        assert_eq!(offsets(&w.read(3, 100, usize::MAX).unwrap()), vec![3, 4, 5]);
        w.extend(vec![record(9)]);
        assert!(w.read(5, 100, usize::MAX).is_none());
        assert_eq!(offsets(&w.read(9, 100, usize::MAX).unwrap()), vec![9]);
    }
}

//! One atomic, durable write to the embedded log.

use super::toast::{toast_key, toast_table_prefix, ToastEntry};
use super::{LogRecord, EVENTS, META, SCHEMAS, STAGING, TOAST};
use crate::error::Result;
use crate::event::{ChangeEvent, Op, Phase, Position, TableSchema};
use redb::{Database, Durability, ReadableTable};
use std::collections::HashMap;
use std::sync::Arc;

/// Room every batch keeps beyond its events for the metadata a source adds when it flushes
/// (checkpoint, backfill book, snapshot progress): one push past a full capacity would regrow,
/// copy and page in a large batch again (in a profile of a backfill, 2% of sluice's samples were
/// page faults of that regrowth alone).
const FLUSH_STEPS: usize = 4;

/// Meta key of the newest change position appended.
pub(super) const LAST_CHANGE: &str = "last_change";

/// Everything one source step wants made durable together, in order.
#[derive(Default)]
pub struct WriteBatch {
    steps: Vec<Step>,
    /// Schemas of the tables in this batch, to keep TOAST state for their toastable columns.
    schemas: HashMap<u32, Arc<TableSchema>>,
    events: usize,
    /// Approximate memory held by the batch's events.
    bytes: usize,
    /// Appends every event, even one at or below the last change position (see
    /// [`WriteBatch::unguarded`]).
    unguarded: bool,
}

enum Step {
    Append(ChangeEvent),
    /// A change of a transaction that has not committed yet (protocol v2 streaming).
    Stage {
        top_xid: u32,
        sub_xid: u32,
        seq: u64,
        event: ChangeEvent,
    },
    /// The streamed transaction committed: move its staged changes into the log.
    Promote {
        top_xid: u32,
        commit_lsn: u64,
        commit_ts_us: i64,
    },
    /// The streamed (sub)transaction aborted: drop its staged changes.
    Abort {
        top_xid: u32,
        sub_xid: u32,
    },
    Meta(String, Vec<u8>),
    Schema(u32, TableSchema),
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch with room for `steps` appends and metadata writes, so a large snapshot chunk
    /// does not regrow (and copy) its step list.
    pub fn with_capacity(steps: usize) -> Self {
        Self { steps: Vec::with_capacity(steps + FLUSH_STEPS), ..Self::default() }
    }

    /// A batch that keeps changes at or below the last appended position. A sink's buffer fed
    /// from Kafka needs it: partitions interleave, so positions do not rise across keys, and
    /// consumer offsets (not positions) say what was seen before.
    pub fn unguarded() -> Self {
        Self { unguarded: true, ..Self::default() }
    }

    /// Makes room for `steps` more appends (a backfill piece lands many rows at once).
    pub fn reserve(&mut self, steps: usize) {
        self.steps.reserve(steps + FLUSH_STEPS);
    }

    /// Number of events appended or staged so far.
    pub fn len(&self) -> usize {
        self.events
    }

    /// Approximate bytes held by the batch's events, to bound memory as well as count.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Declares the schema of events in this batch (needed for TOAST state).
    pub fn uses_schema(&mut self, id: u32, schema: &Arc<TableSchema>) {
        self.schemas.entry(id).or_insert_with(|| schema.clone());
    }

    pub fn append(&mut self, event: ChangeEvent) {
        self.events += 1;
        self.bytes += event.approx_size();
        self.steps.push(Step::Append(event));
    }

    pub fn stage(&mut self, top_xid: u32, sub_xid: u32, seq: u64, event: ChangeEvent) {
        self.events += 1;
        self.bytes += event.approx_size();
        self.steps.push(Step::Stage { top_xid, sub_xid, seq, event });
    }

    pub fn promote(&mut self, top_xid: u32, commit_lsn: u64, commit_ts_us: i64) {
        self.steps.push(Step::Promote { top_xid, commit_lsn, commit_ts_us });
    }

    pub fn abort(&mut self, top_xid: u32, sub_xid: u32) {
        self.steps.push(Step::Abort { top_xid, sub_xid });
    }

    pub fn put_meta(&mut self, key: impl Into<String>, value: Vec<u8>) {
        self.steps.push(Step::Meta(key.into(), value));
    }

    pub fn register_schema(&mut self, id: u32, schema: TableSchema) {
        self.steps.push(Step::Schema(id, schema));
    }

    /// Writes the batch in one transaction of `durability`; returns the new head offset and the
    /// records appended, in order.
    pub(super) fn apply(self, db: &Database, mut head: u64, durability: Durability) -> Result<(u64, Vec<LogRecord>)> {
        let WriteBatch { steps, schemas: batch_schemas, events: expected, unguarded, .. } = self;
        // Per schema, once: the columns whose values TOAST state keeps, if any.
        let toastable: HashMap<u32, (Arc<TableSchema>, Vec<usize>)> = batch_schemas
            .into_iter()
            .filter(|(_, schema)| schema.toast_target != 0)
            .map(|(id, schema)| {
                let columns: Vec<usize> = (0..schema.columns.len()).filter(|&i| schema.columns[i].toastable).collect();
                (id, (schema, columns))
            })
            .filter(|(_, (_, columns))| !columns.is_empty())
            .collect();
        let mut appended = Vec::with_capacity(expected);
        let mut tx = db.begin_write()?;
        tx.set_durability(durability)?;
        {
            let mut events = tx.open_table(EVENTS)?;
            let mut staging = tx.open_table(STAGING)?;
            let mut toast = tx.open_table(TOAST)?;
            let mut meta = tx.open_table(META)?;
            let mut schemas = tx.open_table(SCHEMAS)?;
            // A source that resumes before a partly written transaction resends it; changes at
            // or below the last appended position are already in the log.
            let mut last_change: Option<Position> = match meta.get(LAST_CHANGE)? {
                Some(v) => Some(postcard::from_bytes(v.value())?),
                None => None,
            };
            let mut segment = Segment::default();
            let mut staged_segment = StagedSegment::default();
            let mut append = |event: ChangeEvent, toast: &mut redb::Table<&[u8], &[u8]>| -> Result<()> {
                if event.position.phase == Phase::Change && !unguarded {
                    if last_change.is_some_and(|last| event.position <= last) {
                        return Ok(());
                    }
                    last_change = Some(event.position);
                }
                head += 1;
                let bytes = segment.push(head, &event)?;
                if segment.full() {
                    segment.flush(&mut events)?;
                }
                if let Some((schema, columns)) = toastable.get(&event.schema_id) {
                    keep_toast_state(toast, schema, columns, &event)?;
                }
                appended.push(LogRecord { offset: head, event: Arc::new(event), bytes });
                Ok(())
            };
            for step in steps {
                if !matches!(step, Step::Stage { .. }) {
                    // Everything else may read the staging table: it sees every change staged.
                    staged_segment.flush(&mut staging)?;
                }
                match step {
                    Step::Append(event) => append(event, &mut toast)?,
                    Step::Stage { top_xid, sub_xid, seq, event } => {
                        if !staged_segment.continues(top_xid) {
                            staged_segment.flush(&mut staging)?;
                        }
                        staged_segment.push(top_xid, seq, sub_xid, &event)?;
                    }
                    Step::Promote { top_xid, commit_lsn, commit_ts_us } => {
                        let mut staged = Vec::new();
                        for entry in staging.range((top_xid, 0)..=(top_xid, u64::MAX))? {
                            let (_, v) = entry?;
                            staged.extend(decode_staged(v.value())?.into_iter().map(|(_, event)| event));
                        }
                        for (ordinal, mut event) in staged.into_iter().enumerate() {
                            event.position = Position::change(commit_lsn, ordinal as u64);
                            event.commit_ts_us = commit_ts_us;
                            append(event, &mut toast)?;
                        }
                        staging.retain_in((top_xid, 0)..=(top_xid, u64::MAX), |_, _| false)?;
                    }
                    Step::Abort { top_xid, sub_xid } if top_xid == sub_xid => {
                        staging.retain_in((top_xid, 0)..=(top_xid, u64::MAX), |_, _| false)?;
                    }
                    Step::Abort { top_xid, sub_xid } => {
                        // A segment holding changes of the aborted subtransaction keeps the rest.
                        let mut rewrites = Vec::new();
                        for entry in staging.range((top_xid, 0)..=(top_xid, u64::MAX))? {
                            let (k, v) = entry?;
                            let changes = decode_staged(v.value())?;
                            if changes.iter().any(|(s, _)| *s == sub_xid) {
                                let mut kept = Vec::new();
                                for change in changes.iter().filter(|(s, _)| *s != sub_xid) {
                                    kept = postcard::to_extend(change, kept)?;
                                }
                                rewrites.push((k.value(), kept));
                            }
                        }
                        for (k, kept) in rewrites {
                            match kept.is_empty() {
                                true => staging.remove(k)?,
                                false => staging.insert(k, kept.as_slice())?,
                            };
                        }
                    }
                    Step::Meta(key, value) => {
                        meta.insert(key.as_str(), value.as_slice())?;
                    }
                    Step::Schema(id, schema) => {
                        schemas.insert(id, postcard::to_allocvec(&schema)?.as_slice())?;
                    }
                }
            }
            segment.flush(&mut events)?;
            staged_segment.flush(&mut staging)?;
            if let Some(last) = last_change {
                meta.insert(LAST_CHANGE, postcard::to_allocvec(&last)?.as_slice())?;
            }
            meta.insert("head", head.to_le_bytes().as_slice())?;
        }
        tx.commit()?;
        Ok((head, appended))
    }
}

/// Events are stored in segments of up to this many events or bytes: one B-tree entry per
/// segment instead of per event.
const SEGMENT_EVENTS: usize = 1024;
const SEGMENT_BYTES: usize = 1024 * 1024;

/// Events being packed into one log entry: the first offset (8 bytes, little-endian), then the
/// postcard encodings of the events back to back. The entry's key is its last offset.
#[derive(Default)]
struct Segment {
    buf: Vec<u8>,
    count: usize,
    last: u64,
}

impl Segment {
    /// Appends one event; returns its encoded size.
    fn push(&mut self, offset: u64, event: &ChangeEvent) -> Result<usize> {
        if self.count == 0 {
            self.buf.clear();
            self.buf.extend_from_slice(&offset.to_le_bytes());
        }
        let before = self.buf.len();
        self.buf = postcard::to_extend(event, std::mem::take(&mut self.buf))?;
        self.count += 1;
        self.last = offset;
        Ok(self.buf.len() - before)
    }

    fn full(&self) -> bool {
        self.count >= SEGMENT_EVENTS || self.buf.len() >= SEGMENT_BYTES
    }

    fn flush(&mut self, events: &mut redb::Table<u64, &[u8]>) -> Result<()> {
        if self.count > 0 {
            events.insert(self.last, self.buf.as_slice())?;
            self.count = 0;
        }
        Ok(())
    }
}

/// Changes of one streamed transaction being packed into one staging entry, keyed by the
/// transaction and its first change's sequence number: the postcard encodings of
/// `(subtransaction, event)` back to back (an entry of one change is the form of releases that
/// staged each change on its own).
#[derive(Default)]
struct StagedSegment {
    buf: Vec<u8>,
    count: usize,
    key: (u32, u64),
}

impl StagedSegment {
    /// Whether a change of `top_xid` can join this segment.
    fn continues(&self, top_xid: u32) -> bool {
        self.count == 0 || (self.key.0 == top_xid && self.count < SEGMENT_EVENTS && self.buf.len() < SEGMENT_BYTES)
    }

    fn push(&mut self, top_xid: u32, seq: u64, sub_xid: u32, event: &ChangeEvent) -> Result<()> {
        if self.count == 0 {
            self.buf.clear();
            self.key = (top_xid, seq);
        }
        self.buf = postcard::to_extend(&(sub_xid, event), std::mem::take(&mut self.buf))?;
        self.count += 1;
        Ok(())
    }

    fn flush(&mut self, staging: &mut redb::Table<(u32, u64), &[u8]>) -> Result<()> {
        if self.count > 0 {
            staging.insert(self.key, self.buf.as_slice())?;
            self.count = 0;
        }
        Ok(())
    }
}

/// Decodes a staging entry into its `(subtransaction, event)` changes, in order.
fn decode_staged(mut raw: &[u8]) -> Result<Vec<(u32, ChangeEvent)>> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let (change, rest) = postcard::take_from_bytes::<(u32, ChangeEvent)>(raw)?;
        out.push(change);
        raw = rest;
    }
    Ok(out)
}

/// Decodes a segment into `(offset, event, encoded bytes)`.
pub(super) fn decode_segment(raw: &[u8]) -> Result<Vec<(u64, ChangeEvent, usize)>> {
    let first = segment_first(raw);
    let mut rest = &raw[8.min(raw.len())..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (event, tail) = postcard::take_from_bytes::<ChangeEvent>(rest)?;
        out.push((first + out.len() as u64, event, rest.len() - tail.len()));
        rest = tail;
    }
    Ok(out)
}

/// The first offset of a segment.
pub(super) fn segment_first(raw: &[u8]) -> u64 {
    raw.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Keeps the last seen value of every toastable column per key, so a later update that leaves a
/// TOASTed value out can be given the value that was current at that change. `toastable` holds
/// the schema's toastable columns (never empty).
fn keep_toast_state(
    toast: &mut redb::Table<&[u8], &[u8]>,
    schema: &TableSchema,
    toastable: &[usize],
    event: &ChangeEvent,
) -> Result<()> {
    match event.op {
        Op::Insert | Op::Update | Op::Read => {
            let Some(after) = &event.after else { return Ok(()) };
            if !schema.may_toast(after) {
                // Nothing of this version is out of line, so no later update can omit it. A
                // read or insert never had an entry; an update may leave an older one behind.
                if event.op == Op::Update {
                    toast.remove(toast_key(&event.table, &event.key).as_slice())?;
                }
                return Ok(());
            }
            let entry = ToastEntry {
                position: event.position,
                values: toastable
                    .iter()
                    .filter_map(|&i| after.get(i).map(|v| (schema.columns[i].name.clone(), v.clone())))
                    .collect(),
            };
            toast.insert(toast_key(&event.table, &event.key).as_slice(), postcard::to_allocvec(&entry)?.as_slice())?;
        }
        Op::Delete => {
            toast.remove(toast_key(&event.table, &event.key).as_slice())?;
        }
        Op::Truncate => {
            let prefix = toast_table_prefix(&event.table);
            let mut end = prefix.clone();
            end.push(0xFF);
            toast.retain_in(prefix.as_slice()..end.as_slice(), |_, _| false)?;
        }
    }
    Ok(())
}

//! The embedded durable log: the default transport between the source and the sinks.
//!
//! One redb database holds everything that must change atomically with the log: the events,
//! each sink's cursor and state, the schema registry, the source's checkpoint, snapshot progress,
//! TOAST state and the staging area of transactions still in progress. A batch commits with
//! fsync before the source acknowledges anything to PostgreSQL, unless commits are deferred
//! (see [`EmbeddedLog::open_deferred`]): then a periodic checkpoint fsyncs them, and only what
//! a checkpoint made durable is acknowledged. Events below every sink's
//! cursor are deleted; redb reuses their pages, so the file stays as large as the peak backlog.

mod batch;
mod recent;
mod registry;
mod toast;

pub use batch::WriteBatch;
pub use registry::SchemaRegistry;

use batch::{decode_segment, segment_first};
use recent::RecentEvents;
pub use toast::{toast_key, ToastEntry};

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, TableSchema};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// redb's page cache. Its default (1 GiB) would let the cache alone exceed sluice's memory
/// budget; the log is read mostly once, front to back, so a small cache loses little.
const CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Memory for the newest events, which sinks that keep up read without touching the disk:
/// a few snapshot chunks (a backfill holds at most three pieces of about 6 MiB in flight).
const RECENT_BYTES: usize = 32 * 1024 * 1024;

/// Segments of events, keyed by the offset of their last event (see `batch::Segment`).
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("sink_cursors");
const SINK_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("sink_state");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const SCHEMAS: TableDefinition<u32, &[u8]> = TableDefinition::new("schemas");
const TOAST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("toast");
/// (top-level xid, sequence) -> (subtransaction xid, encoded event).
const STAGING: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("staging");

/// A handle to the embedded log; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedLog {
    db: Arc<Database>,
    path: PathBuf,
    /// The offset of the newest committed event (0 when the log has never held one).
    head: watch::Sender<u64>,
    /// The offset up to which events are durable: the head, unless commits are deferred.
    durable: watch::Sender<u64>,
    /// Commits skip fsync; [`EmbeddedLog::checkpoint`] makes them durable.
    deferred: bool,
    /// A deferred commit happened since the last checkpoint began.
    undurable: Arc<AtomicBool>,
    recent: Arc<Mutex<RecentEvents>>,
    /// Woken whenever a reader is handed records, for writers pacing themselves to readers.
    reads: Arc<Notify>,
    /// Any event may be a replay of one a target already has, not only those from before
    /// this process (a sink's Kafka buffer: another member may have written it).
    replays_anywhere: bool,
}

/// One event read back from the log.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub offset: u64,
    /// Shared with the in-memory window of recent events and with other sinks.
    pub event: Arc<ChangeEvent>,
    /// Encoded size, for byte-bounded batches.
    pub bytes: usize,
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false, false)
    }

    /// Opens a sink's Kafka buffer: every event may be a replay (see
    /// [`EmbeddedLog::replay_horizon`]), and commits are deferred (see
    /// [`EmbeddedLog::open_deferred`]): a crash reverts the buffer, its sink's cursor and state
    /// together, and Kafka, whose offsets move only past what the sink made durable in its
    /// target, still holds everything after that.
    pub fn open_replaying(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true, true)
    }

    /// Opens a log whose commits do not wait for fsync: readers see a commit at once, and
    /// [`EmbeddedLog::checkpoint`] makes every earlier commit durable. A crash reverts the log
    /// to its last checkpoint, cursors and state included, so it is for a log whose readers
    /// hand everything on (the Kafka publisher) and whose writer acknowledges its source only
    /// up to [`EmbeddedLog::durable_head`]: what a crash reverts is captured again.
    pub fn open_deferred(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false, true)
    }

    fn open_with(dir: &Path, replays_anywhere: bool, deferred: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let file = dir.join("log.redb");
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(&file).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::config(format!(
                "{} is in use by another sluice process; run one process per pipeline data directory",
                file.display()
            )),
            other => Error::Storage(format!("cannot open {}: {other}", file.display())),
        })?;
        let tx = db.begin_write()?;
        {
            tx.open_table(EVENTS)?;
            tx.open_table(CURSORS)?;
            tx.open_table(SINK_STATE)?;
            tx.open_table(META)?;
            tx.open_table(SCHEMAS)?;
            tx.open_table(TOAST)?;
            tx.open_table(STAGING)?;
        }
        tx.commit()?;
        let head = {
            let rx = db.begin_read()?;
            let events = rx.open_table(EVENTS)?;
            let last = events.last()?.map(|(k, _)| k.value());
            let meta = rx.open_table(META)?;
            let recorded = meta.get("head")?.map(|v| decode_u64(v.value()));
            last.unwrap_or(0).max(recorded.unwrap_or(0))
        };
        let (durable, _) = watch::channel(head);
        let (head, _) = watch::channel(head);
        let recent = Arc::new(Mutex::new(RecentEvents::new(RECENT_BYTES)));
        Ok(Self {
            db: Arc::new(db),
            path: dir.to_path_buf(),
            head,
            durable,
            deferred,
            undurable: Arc::new(AtomicBool::new(false)),
            recent,
            reads: Arc::new(Notify::new()),
            replays_anywhere,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The offset of the newest committed event.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The offset up to which events are durable, as it rises.
    pub fn durable_head(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Whether commits wait for a checkpoint to be durable (see [`EmbeddedLog::open_deferred`]).
    pub fn deferred(&self) -> bool {
        self.deferred
    }

    /// Whether a commit since the last checkpoint still waits for one.
    pub fn needs_checkpoint(&self) -> bool {
        self.undurable.load(Ordering::Acquire)
    }

    /// Makes every commit so far durable with one fsync; returns the durable head.
    pub async fn checkpoint(&self) -> Result<u64> {
        // Every commit that moved the head here has returned, so the transaction below,
        // which waits for the writer lock, persists it.
        let head = self.head();
        self.undurable.store(false, Ordering::Release);
        let db = self.db.clone();
        let started = std::time::Instant::now();
        blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            tx.commit()?;
            Ok(())
        })
        .await?;
        metrics::histogram!("sluice_log_checkpoint_seconds").record(started.elapsed().as_secs_f64());
        self.durable.send_if_modified(|d| {
            let moved = head > *d;
            *d = (*d).max(head);
            moved
        });
        Ok(head)
    }

    /// The durability of a commit: fsynced now, or by the next checkpoint.
    fn durability(&self) -> Durability {
        match self.deferred {
            true => Durability::None,
            false => Durability::Immediate,
        }
    }

    /// Notes a commit that has returned; a deferred one waits for the next checkpoint. (Noted
    /// after it returns: a checkpoint that began earlier may not have persisted it.)
    fn committed(&self) {
        if self.deferred {
            self.undurable.store(true, Ordering::Release);
        }
    }

    /// Offsets at or below this may hold changes a target already has: the head when a sink
    /// starts (an earlier run may have written up to it), or every offset of a log that
    /// replays anywhere.
    pub fn replay_horizon(&self) -> u64 {
        if self.replays_anywhere {
            u64::MAX
        } else {
            self.head()
        }
    }

    /// Notifies on every commit that adds events.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Commits a batch durably (fsync; deferred to the next checkpoint in a deferred log) and
    /// returns the new head offset.
    pub async fn commit(&self, batch: WriteBatch) -> Result<u64> {
        let db = self.db.clone();
        let start = self.head();
        let recent = self.recent.clone();
        let durability = self.durability();
        let new_head = tokio::task::spawn_blocking(move || {
            let (head, appended) = batch.apply(&db, start, durability)?;
            // Committed now, so readers may see it; filled before the head moves past it.
            let evicted = recent.lock().expect("recent events lock").extend(appended);
            // Freed outside the lock, which readers take.
            drop(evicted);
            Ok::<_, Error>(head)
        })
        .await
        .map_err(|e| Error::Storage(format!("log writer panicked: {e}")))??;
        self.committed();
        if new_head != start {
            self.head.send_replace(new_head);
            if !self.deferred {
                self.durable.send_replace(new_head);
            }
        }
        Ok(new_head)
    }

    /// Waits, while readers keep up, until `events` more would not push unread events out of
    /// the in-memory window (a bulk writer that outruns its readers would otherwise leave them
    /// reading from disk). A reader that does not move within `patience` is not waited for.
    pub async fn make_room(&self, events: usize, patience: Duration) {
        loop {
            let read = self.reads.notified();
            tokio::pin!(read);
            read.as_mut().enable();
            let Some(at) = self.recent.lock().expect("recent events lock").should_wait(events) else { return };
            if tokio::time::timeout(patience, read).await.is_err() {
                self.recent.lock().expect("recent events lock").reader_stalled(at);
                return;
            }
        }
    }

    /// Reads up to `max_events` events (or about `max_bytes`) starting at `from`.
    pub async fn read(&self, from: u64, max_events: usize, max_bytes: usize) -> Result<Vec<LogRecord>> {
        let records = self.read_records(from, max_events, max_bytes).await?;
        if let Some(last) = records.last() {
            self.recent.lock().expect("recent events lock").note_read(last.offset);
            self.reads.notify_waiters();
        }
        Ok(records)
    }

    async fn read_records(&self, from: u64, max_events: usize, max_bytes: usize) -> Result<Vec<LogRecord>> {
        if let Some(records) = self.recent.lock().expect("recent events lock").read(from, max_events, max_bytes) {
            return Ok(records);
        }
        let db = self.db.clone();
        blocking(move || {
            let rx = db.begin_read()?;
            let events = rx.open_table(EVENTS)?;
            let mut out = Vec::new();
            let mut bytes = 0;
            // The first segment whose last offset is at or after `from` holds `from`.
            for entry in events.range(from..)? {
                let (_, v) = entry?;
                for (offset, event, size) in decode_segment(v.value())? {
                    if offset < from {
                        continue;
                    }
                    bytes += size;
                    out.push(LogRecord { offset, event: Arc::new(event), bytes: size });
                    if out.len() >= max_events || bytes >= max_bytes {
                        return Ok(out);
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The sink's cursor: every event at or below it is durable in the sink.
    pub async fn cursor(&self, sink: &str) -> Result<u64> {
        let db = self.db.clone();
        let sink = sink.to_string();
        blocking(move || Ok(db.begin_read()?.open_table(CURSORS)?.get(sink.as_str())?.map(|v| v.value()).unwrap_or(0)))
            .await
    }

    pub async fn sink_state(&self, sink: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db.clone();
        let sink = sink.to_string();
        blocking(move || Ok(db.begin_read()?.open_table(SINK_STATE)?.get(sink.as_str())?.map(|v| v.value().to_vec())))
            .await
    }

    /// Records a sink's progress and state together. The cursor never moves backward: a lower
    /// value is ignored and the stored one returned.
    pub async fn commit_sink(&self, sink: &str, cursor: u64, state: Vec<u8>) -> Result<u64> {
        let db = self.db.clone();
        let sink = sink.to_string();
        let durability = self.durability();
        let stored = blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)?;
            let stored = {
                let mut cursors = tx.open_table(CURSORS)?;
                let old = cursors.get(sink.as_str())?.map(|v| v.value()).unwrap_or(0);
                let new = old.max(cursor);
                cursors.insert(sink.as_str(), new)?;
                tx.open_table(SINK_STATE)?.insert(sink.as_str(), state.as_slice())?;
                new
            };
            tx.commit()?;
            Ok(stored)
        })
        .await;
        self.committed();
        stored
    }

    /// Deletes segments whose events every listed sink has made durable; returns how many
    /// segments were deleted. Deletes at most `limit` per call so one call never holds the
    /// writer for long.
    pub async fn release(&self, sinks: &[String], limit: usize) -> Result<u64> {
        let db = self.db.clone();
        let sinks = sinks.to_vec();
        let durability = self.durability();
        let removed = blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)?;
            let removed = {
                let cursors = tx.open_table(CURSORS)?;
                let mut floor = u64::MAX;
                for s in &sinks {
                    floor = floor.min(cursors.get(s.as_str())?.map(|v| v.value()).unwrap_or(0));
                }
                let mut events = tx.open_table(EVENTS)?;
                let mut removed = 0u64;
                events.retain_in(..=floor, |_, _| {
                    removed += 1;
                    removed > limit as u64
                })?;
                removed.min(limit as u64)
            };
            tx.commit()?;
            Ok(removed)
        })
        .await;
        self.committed();
        removed
    }

    /// The offset of the oldest event still held, if any.
    pub async fn tail(&self) -> Result<Option<u64>> {
        let db = self.db.clone();
        blocking(move || Ok(db.begin_read()?.open_table(EVENTS)?.first()?.map(|(_, v)| segment_first(v.value())))).await
    }

    pub async fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db.clone();
        let key = key.to_string();
        blocking(move || Ok(db.begin_read()?.open_table(META)?.get(key.as_str())?.map(|v| v.value().to_vec()))).await
    }

    pub async fn schema(&self, id: u32) -> Result<Option<TableSchema>> {
        let db = self.db.clone();
        blocking(move || {
            let rx = db.begin_read()?;
            let table = rx.open_table(SCHEMAS)?;
            let found = table.get(id)?;
            Ok(match found {
                Some(v) => Some(postcard::from_bytes(v.value())?),
                None => None,
            })
        })
        .await
    }

    /// All registered schemas, for registering the next one.
    pub async fn schemas(&self) -> Result<Vec<(u32, TableSchema)>> {
        let db = self.db.clone();
        blocking(move || {
            let rx = db.begin_read()?;
            let mut out = Vec::new();
            for entry in rx.open_table(SCHEMAS)?.iter()? {
                let (k, v) = entry?;
                out.push((k.value(), postcard::from_bytes(v.value())?));
            }
            Ok(out)
        })
        .await
    }

    /// Looks up TOAST entries by key (see [`toast_key`]).
    pub async fn toast_get(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<ToastEntry>>> {
        let db = self.db.clone();
        blocking(move || {
            let rx = db.begin_read()?;
            let table = rx.open_table(TOAST)?;
            keys.iter()
                .map(|k| match table.get(k.as_slice())? {
                    Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
                    None => Ok(None),
                })
                .collect()
        })
        .await
    }

    /// Gives up every event `reader` has not taken yet, so the source can capture them again:
    /// the reader's cursor moves to the head, the replay guard and the `forget` metadata keys
    /// are cleared. The Kafka transport uses it at start, where what was not yet delivered may
    /// by now have been captured and delivered by another member, and sending the old copy
    /// after the newer changes would reorder them.
    pub async fn give_up_unread(&self, reader: &str, forget: &[&str]) -> Result<u64> {
        let db = self.db.clone();
        let head = self.head();
        let reader = reader.to_string();
        let forget: Vec<String> = forget.iter().map(|k| k.to_string()).collect();
        blocking(move || {
            let tx = db.begin_write()?;
            let given_up = {
                let mut cursors = tx.open_table(CURSORS)?;
                let old = cursors.get(reader.as_str())?.map(|v| v.value()).unwrap_or(0);
                cursors.insert(reader.as_str(), head.max(old))?;
                let mut meta = tx.open_table(META)?;
                meta.remove(batch::LAST_CHANGE)?;
                for key in &forget {
                    meta.remove(key.as_str())?;
                }
                head.saturating_sub(old)
            };
            tx.commit()?;
            Ok(given_up)
        })
        .await
    }

    /// Drops every staged event (used at start: the server resends unfinished transactions).
    pub async fn clear_staging(&self) -> Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write()?;
            tx.open_table(STAGING)?.retain(|_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Storage(format!("log reader panicked: {e}")))?
}

fn decode_u64(raw: &[u8]) -> u64 {
    raw.try_into().map(u64::from_le_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, Position, TableId, Value};

    fn event(pos: Position, id: i64, pad: usize) -> ChangeEvent {
        ChangeEvent {
            table: TableId::new("public", "t"),
            schema_id: 1,
            op: Op::Insert,
            key: vec![Value::Int(id)],
            before: None,
            after: Some(vec![Value::Int(id), Value::Text("x".repeat(pad))]),
            position: pos,
            commit_ts_us: 0,
            tx_id: Some(1),
            toast_fetched: false,
            snapshot_last: false,
            origin: None,
        }
    }

    async fn append(log: &EmbeddedLog, lsn: u64, n: u64, pad: usize) -> u64 {
        let mut batch = WriteBatch::new();
        for i in 0..n {
            batch.append(event(Position::change(lsn, i), i as i64, pad));
        }
        log.commit(batch).await.unwrap()
    }

    #[tokio::test]
    async fn reads_start_mid_segment_and_resent_changes_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(append(&log, 10, 3000, 10).await, 3000);
        // The same transaction resent after a reconnect adds nothing.
        assert_eq!(append(&log, 10, 3000, 10).await, 3000);
        assert_eq!(append(&log, 11, 5, 10).await, 3005);
        let read = log.read(1500, 10, usize::MAX).await.unwrap();
        let offsets: Vec<u64> = read.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (1500..1510).collect::<Vec<_>>());
        assert_eq!(read[0].event.position, Position::change(10, 1499));
        let tail = log.read(3001, 100, usize::MAX).await.unwrap();
        assert_eq!(
            tail.iter().map(|r| r.event.position).collect::<Vec<_>>(),
            (0..5).map(|i| Position::change(11, i)).collect::<Vec<_>>()
        );
        drop(log);
        // Reopened, the head is where it was.
        assert_eq!(EmbeddedLog::open(dir.path()).unwrap().head(), 3005);
    }

    #[tokio::test]
    async fn a_streamed_transaction_lands_in_order_without_its_aborted_subtransaction() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        // Transaction 7 streams 2,500 changes over two batches (segments of 1,024 fill and
        // split); every third change belongs to subtransaction 8, which aborts. Transaction 9
        // interleaves and aborts whole.
        let mut seq = 0u64;
        for _ in 0..2 {
            let mut batch = WriteBatch::new();
            for _ in 0..1250 {
                let sub = if seq % 3 == 2 { 8 } else { 7 };
                batch.stage(7, sub, seq, event(Position::change(0, 0), seq as i64, 4));
                batch.stage(9, 9, seq, event(Position::change(0, 0), -1, 4));
                seq += 1;
            }
            log.commit(batch).await.unwrap();
        }
        let mut batch = WriteBatch::new();
        batch.abort(7, 8);
        batch.abort(9, 9);
        batch.promote(7, 500, 42);
        let head = log.commit(batch).await.unwrap();
        let kept: Vec<i64> = (0..2500).filter(|i| i % 3 != 2).collect();
        assert_eq!(head, kept.len() as u64);
        let read = log.read(1, usize::MAX, usize::MAX).await.unwrap();
        let ids: Vec<i64> = read
            .iter()
            .map(|r| match r.event.key[0] {
                Value::Int(i) => i,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ids, kept);
        assert!(read
            .iter()
            .enumerate()
            .all(|(i, r)| r.event.position == Position::change(500, i as u64) && r.event.commit_ts_us == 42));
        // Nothing is left staged: a later promote of either transaction lands nothing.
        let mut batch = WriteBatch::new();
        batch.promote(9, 600, 0);
        batch.promote(7, 700, 0);
        assert_eq!(log.commit(batch).await.unwrap(), head);
    }

    #[tokio::test]
    async fn sink_cursors_never_move_backward() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        assert_eq!(log.commit_sink("s", 50, vec![1]).await.unwrap(), 50);
        assert_eq!(log.commit_sink("s", 20, vec![2]).await.unwrap(), 50);
        assert_eq!(log.cursor("s").await.unwrap(), 50);
        assert_eq!(log.sink_state("s").await.unwrap(), Some(vec![2]));
    }

    #[tokio::test]
    async fn space_is_released_and_reused_once_every_sink_is_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path()).unwrap();
        let sinks = vec!["a".to_string(), "b".to_string()];
        let mut sizes = Vec::new();
        for round in 0..8u64 {
            let head = append(&log, 100 + round, 4000, 200).await;
            // Only a slow sink holds data back; once both are past it, it goes.
            log.commit_sink("a", head, vec![]).await.unwrap();
            assert_eq!(log.release(&sinks, usize::MAX).await.unwrap(), 0, "sink b still needs it");
            log.commit_sink("b", head, vec![]).await.unwrap();
            assert!(log.release(&sinks, usize::MAX).await.unwrap() > 0);
            assert_eq!(log.tail().await.unwrap(), None);
            sizes.push(std::fs::metadata(dir.path().join("log.redb")).unwrap().len());
        }
        // Eight times the data went through; the file stays the size of one round's backlog.
        assert!(sizes[7] <= sizes[1] * 2, "file grew: {sizes:?}");
    }

    #[tokio::test]
    async fn a_deferred_log_keeps_what_a_checkpoint_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open_deferred(dir.path()).unwrap();
        let durable = log.durable_head();
        assert_eq!(append(&log, 10, 5, 10).await, 5);
        log.commit_sink("kafka", 3, vec![]).await.unwrap();
        // Readers see the commit at once; it is not durable yet.
        assert_eq!(log.read(1, 10, usize::MAX).await.unwrap().len(), 5);
        assert_eq!(*durable.borrow(), 0);
        assert!(log.needs_checkpoint());
        assert_eq!(log.checkpoint().await.unwrap(), 5);
        assert_eq!(*durable.borrow(), 5);
        assert!(!log.needs_checkpoint());
        assert_eq!(append(&log, 11, 2, 10).await, 7);
        // The file as a crash would leave it now (a clean close would persist the last
        // commit): the log reopens at its checkpoint.
        let crashed = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("log.redb"), crashed.path().join("log.redb")).unwrap();
        let reopened = EmbeddedLog::open(crashed.path()).unwrap();
        assert_eq!(reopened.head(), 5);
        assert_eq!(reopened.cursor("kafka").await.unwrap(), 3);
        assert_eq!(reopened.read(1, 10, usize::MAX).await.unwrap().len(), 5);
        drop(log);
    }
}

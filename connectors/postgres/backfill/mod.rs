//! Backfills while the pipeline streams: tables read again in chunks, each chunk merged into
//! the stream by transaction visibility (see [`fence`]) so no row read by a backfill overwrites
//! a newer change.
//!
//! A request travels as a transactional logical message (`sluice.backfill`), so the running
//! source sees it in commit order wherever `sluice backfill` ran, and it waits in the slot if
//! the pipeline is down. Chunk workers read heap-block ranges (as the initial snapshot does),
//! leave the rows here, and commit a "high watermark" message; the source lands the rows where
//! that message sits in the stream, with the chunk's progress in the same log commit.

pub mod book;
pub mod fence;
pub mod request;
mod worker;

pub use book::{BackfillRequest, Book, JobState, BOOK_KEY};
pub use worker::manage;

use crate::event::{Row, TableId, TableSchema};
use crate::runtime::progress::now_ms;
use fence::TxSnapshot;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, Notify};

/// The prefix of backfill messages in the WAL.
pub const PREFIX: &str = "sluice.backfill";

/// A backfill message's content.
#[derive(Debug, PartialEq)]
pub enum Message {
    Request(Box<BackfillRequest>),
    /// A piece's rows may land here.
    High(String),
}

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Request(r) => format!("request {}", serde_json::to_string(r).expect("a request serializes")),
            Message::High(id) => format!("high {id}"),
        }
    }

    pub fn decode(content: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(content).ok()?;
        let (kind, rest) = text.split_once(' ')?;
        match kind {
            "request" => serde_json::from_str(rest).ok().map(|r| Message::Request(Box::new(r))),
            "high" => Some(Message::High(rest.to_string())),
            _ => None,
        }
    }
}

/// Rows of one piece of a chunk, waiting for their high watermark.
pub struct Deposit {
    pub job: String,
    pub table: usize,
    pub chunk: usize,
    /// The chunk's last piece: landing it finishes the chunk.
    pub last: bool,
    pub snapshot: TxSnapshot,
    pub schema: Arc<TableSchema>,
    pub rows: Vec<Row>,
    pub reply: oneshot::Sender<Outcome>,
    /// The job's allowance of pieces in memory, returned when the rows land (or are dropped).
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

/// What became of a deposited piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Landed,
    Redo,
}

/// Progress of one job, for `sluice status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackfillStatus {
    pub id: String,
    pub name: String,
    pub tables: Vec<String>,
    /// running, done, or failed: reason.
    pub state: String,
    pub rows: u64,
    pub blocks_done: u64,
    pub blocks_total: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
}

/// Backfill state shared by the source's decoder (which lands pieces and owns the durable
/// book) and the chunk workers.
pub struct Backfills {
    inner: Mutex<Inner>,
    /// Wakes the manager when a job is added or fails.
    pub changed: Notify,
    /// The stored book has been read (schedules wait for it).
    loaded: tokio::sync::watch::Sender<bool>,
}

impl Default for Backfills {
    fn default() -> Self {
        Self { inner: Mutex::default(), changed: Notify::new(), loaded: tokio::sync::watch::Sender::new(false) }
    }
}

#[derive(Default)]
struct Inner {
    book: Book,
    /// The book changed since it was last stored.
    dirty: bool,
    deposits: HashMap<String, Deposit>,
    /// Chunks being read, with their snapshot once taken.
    outstanding: HashMap<u64, Option<TxSnapshot>>,
    next_ticket: u64,
}

impl Backfills {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("backfill state lock")
    }

    /// Starts over from the stored book (a new source session): pieces of the last session
    /// are gone, and their chunks will be read again.
    pub fn reload(&self, book: Book) {
        let mut inner = self.lock();
        *inner = Inner { book, next_ticket: inner.next_ticket, ..Inner::default() };
        drop(inner);
        self.loaded.send_replace(true);
        self.changed.notify_one();
    }

    /// Waits until the source has read the stored book.
    pub async fn loaded(&self) {
        let _ = self.loaded.subscribe().wait_for(|l| *l).await;
    }

    /// Adds a job; false if the request was seen before.
    pub fn add(&self, request: BackfillRequest) -> bool {
        let mut inner = self.lock();
        let added = inner.book.add(request, now_ms());
        inner.dirty |= added;
        drop(inner);
        if added {
            self.changed.notify_one();
        }
        added
    }

    /// The book, encoded, if it changed since the last call.
    pub fn take_dirty(&self) -> Option<Vec<u8>> {
        let mut inner = self.lock();
        if !std::mem::take(&mut inner.dirty) {
            return None;
        }
        Some(postcard::to_allocvec(&inner.book).expect("the book serializes"))
    }

    /// Reads or changes the book; a change is stored with the next log commit.
    pub fn with_book<T>(&self, change: impl FnOnce(&mut Book) -> T) -> T {
        let mut inner = self.lock();
        inner.dirty = true;
        change(&mut inner.book)
    }

    pub fn book(&self) -> Book {
        self.lock().book.clone()
    }

    /// Landing the last piece of `chunk` ends the backfill of the job's `table`.
    pub fn ends_table(&self, job: &str, table: usize, chunk: usize) -> bool {
        self.lock().book.ends_table(job, table, chunk)
    }

    /// Tables of running jobs.
    pub fn running_tables(&self) -> Vec<TableId> {
        let inner = self.lock();
        let mut tables: Vec<TableId> = inner.book.running().flat_map(|j| j.request.tables.clone()).collect();
        tables.sort();
        tables.dedup();
        tables
    }

    /// A job of the schedule `name` is running.
    pub fn is_running(&self, name: &str) -> bool {
        self.lock().book.running().any(|j| j.request.name == name)
    }

    pub fn fail(&self, id: &str, reason: String) {
        self.with_book(|b| {
            if let Some(job) = b.job_mut(id) {
                job.state = JobState::Failed(reason);
                job.finished_ms = Some(now_ms());
            }
        });
        self.changed.notify_one();
    }

    /// Registers a chunk about to take its snapshot; until it reports it, no transaction
    /// record is pruned.
    pub fn begin_chunk(&self) -> u64 {
        let mut inner = self.lock();
        inner.next_ticket += 1;
        let ticket = inner.next_ticket;
        inner.outstanding.insert(ticket, None);
        ticket
    }

    pub fn snapshot_taken(&self, ticket: u64, snapshot: TxSnapshot) {
        self.lock().outstanding.insert(ticket, Some(snapshot));
    }

    pub fn end_chunk(&self, ticket: u64) {
        self.lock().outstanding.remove(&ticket);
    }

    /// Every outstanding chunk's snapshot, or `None` while one is still being taken.
    pub fn outstanding_snapshots(&self) -> Option<Vec<TxSnapshot>> {
        self.lock().outstanding.values().cloned().collect()
    }

    pub fn deposit(&self, piece: String, deposit: Deposit) {
        self.lock().deposits.insert(piece, deposit);
    }

    pub fn take_deposit(&self, piece: &str) -> Option<Deposit> {
        self.lock().deposits.remove(piece)
    }

    /// Progress of every job in the book.
    pub fn status(&self) -> Vec<BackfillStatus> {
        let inner = self.lock();
        inner
            .book
            .jobs
            .iter()
            .map(|j| BackfillStatus {
                id: j.request.id.clone(),
                name: j.request.name.clone(),
                tables: j.request.tables.iter().map(|t| t.to_string()).collect(),
                state: match &j.state {
                    JobState::Running => "running".into(),
                    JobState::Done => "done".into(),
                    JobState::Failed(why) => format!("failed: {why}"),
                },
                rows: j.tables.iter().map(|t| t.rows).sum(),
                blocks_done: j.tables.iter().filter_map(|t| t.plan.as_ref()).map(|p| p.blocks_done()).sum(),
                blocks_total: j.tables.iter().filter_map(|t| t.plan.as_ref()).map(|p| p.blocks as u64).sum(),
                started_ms: j.started_ms,
                finished_ms: j.finished_ms,
            })
            .collect()
    }
}

/// A key as the fence records it.
pub fn key_bytes(key: &Row) -> Vec<u8> {
    postcard::to_allocvec(key).expect("a key serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let high = Message::High("job/0/3/1".into());
        assert_eq!(Message::decode(high.encode().as_bytes()), Some(high));
        assert_eq!(Message::decode(b"bogus"), None);
    }
}

//! The durable record of backfills: requested jobs, each table's chunk plan and which chunks
//! have landed, and what each schedule last ran. It is stored in the log's metadata in the
//! same commit as the rows it accounts for, so a crash redoes at most the chunks in flight.

use crate::event::TableId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The log metadata key of the [`Book`].
pub const BOOK_KEY: &str = "pg.backfills";

/// Finished jobs kept for `sluice status`.
const FINISHED_KEPT: usize = 20;

/// One backfill as asked for by `sluice backfill` or a schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackfillRequest {
    /// Unique per request: a request seen twice (a redelivered message) starts one job.
    pub id: String,
    pub pipeline: String,
    /// The schedule's name, or `adhoc`.
    pub name: String,
    pub tables: Vec<TableId>,
    /// A boolean SQL expression over the table's columns (the `where` and any key range).
    pub filter: Option<String>,
    /// Incremental runs: the cursor column and, per table, the value the last run reached.
    pub cursor: Option<String>,
    pub cursor_after: BTreeMap<String, String>,
    /// The schedule slot this run is for (ms since the epoch).
    pub slot_ms: Option<i64>,
    pub parallelism: u32,
    pub chunk_rows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    Done,
    Failed(String),
}

/// A job and its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub request: BackfillRequest,
    pub state: JobState,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub tables: Vec<TableRun>,
}

/// One table of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRun {
    pub table: TableId,
    /// Made when the job starts; `None` until then.
    pub plan: Option<Plan>,
    pub rows: u64,
    /// Incremental runs: the highest cursor value when the run started; the run covers
    /// values above the last run's and up to this one.
    pub cursor_upto: Option<String>,
}

/// A table cut into chunks of heap blocks: chunk `i` is blocks
/// `i * chunk_blocks .. (i + 1) * chunk_blocks`, the last one ending at `blocks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The storage file the block numbers refer to; a rewritten table is planned again.
    pub filenode: u32,
    pub blocks: u32,
    pub chunk_blocks: u32,
    pub done: Vec<bool>,
}

impl Plan {
    pub fn new(filenode: u32, blocks: u32, chunk_blocks: u32) -> Self {
        let chunk_blocks = chunk_blocks.max(1);
        let chunks = blocks.div_ceil(chunk_blocks) as usize;
        Self { filenode, blocks, chunk_blocks, done: vec![false; chunks] }
    }

    /// Blocks `start..end` of chunk `i`.
    pub fn range(&self, i: usize) -> (u32, u32) {
        let start = i as u32 * self.chunk_blocks;
        (start, (start + self.chunk_blocks).min(self.blocks))
    }

    pub fn remaining(&self) -> impl Iterator<Item = usize> + '_ {
        self.done.iter().enumerate().filter(|(_, d)| !**d).map(|(i, _)| i)
    }

    pub fn blocks_done(&self) -> u64 {
        (0..self.done.len()).filter(|&i| self.done[i]).map(|i| (self.range(i).1 - self.range(i).0) as u64).sum()
    }
}

/// What a schedule last ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    /// The newest slot a run was started for.
    pub slot_ms: Option<i64>,
    /// Incremental schedules: the cursor value each table's last finished run reached.
    pub cursors: BTreeMap<String, String>,
}

/// Every job and schedule mark of a pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Book {
    pub jobs: Vec<Job>,
    pub marks: BTreeMap<String, Mark>,
}

impl Book {
    /// Adds a job for `request` unless it is known; returns whether it was added.
    pub fn add(&mut self, request: BackfillRequest, now_ms: u64) -> bool {
        if self.jobs.iter().any(|j| j.request.id == request.id) {
            return false;
        }
        if let (Some(slot), false) = (request.slot_ms, request.name == "adhoc") {
            let mark = self.marks.entry(request.name.clone()).or_default();
            mark.slot_ms = Some(mark.slot_ms.map_or(slot, |s| s.max(slot)));
        }
        let tables = request
            .tables
            .iter()
            .map(|t| TableRun { table: t.clone(), plan: None, rows: 0, cursor_upto: None })
            .collect();
        self.jobs.push(Job { request, state: JobState::Running, started_ms: now_ms, finished_ms: None, tables });
        self.forget_old();
        true
    }

    pub fn job_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.request.id == id)
    }

    /// Records that a piece of chunk `chunk` of table `table` of job `id` landed with `rows`
    /// rows (`last`: the chunk's last piece); returns whether that finished the job.
    pub fn piece_landed(&mut self, id: &str, table: usize, chunk: usize, rows: u64, last: bool, now_ms: u64) -> bool {
        let Some(job) = self.job_mut(id) else { return false };
        let run = &mut job.tables[table];
        run.rows += rows;
        match run.plan.as_mut().and_then(|p| p.done.get_mut(chunk)) {
            Some(done) if last => *done = true,
            _ => return false,
        }
        self.finish_if_done(id, now_ms)
    }

    /// Every chunk of table `table` of job `id` but `chunk` has landed: landing `chunk` ends
    /// the table's backfill.
    pub fn ends_table(&self, id: &str, table: usize, chunk: usize) -> bool {
        let Some(job) = self.jobs.iter().find(|j| j.request.id == id) else { return false };
        let plan = job.tables.get(table).and_then(|t| t.plan.as_ref());
        plan.is_some_and(|p| p.done.iter().enumerate().all(|(i, d)| *d || i == chunk))
    }

    /// Marks the job done if every table's every chunk landed; an incremental job's cursor
    /// positions become its schedule's.
    pub fn finish_if_done(&mut self, id: &str, now_ms: u64) -> bool {
        let Some(job) = self.job_mut(id) else { return false };
        let all = job.tables.iter().all(|t| t.plan.as_ref().is_some_and(|p| p.done.iter().all(|d| *d)));
        if !all || job.state != JobState::Running {
            return false;
        }
        job.state = JobState::Done;
        job.finished_ms = Some(now_ms);
        let (name, cursors): (String, Vec<(String, String)>) = (
            job.request.name.clone(),
            job.tables.iter().filter_map(|t| Some((t.table.to_string(), t.cursor_upto.clone()?))).collect(),
        );
        if job.request.cursor.is_some() {
            self.marks.entry(name).or_default().cursors.extend(cursors);
        }
        true
    }

    /// Jobs still running.
    pub fn running(&self) -> impl Iterator<Item = &Job> {
        self.jobs.iter().filter(|j| j.state == JobState::Running)
    }

    fn forget_old(&mut self) {
        let finished = self.jobs.iter().filter(|j| j.state != JobState::Running).count();
        let mut drop = finished.saturating_sub(FINISHED_KEPT);
        self.jobs.retain(|j| {
            let old = j.state != JobState::Running && drop > 0;
            drop -= old as usize;
            !old
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, name: &str, slot: Option<i64>) -> BackfillRequest {
        BackfillRequest {
            id: id.into(),
            pipeline: "p".into(),
            name: name.into(),
            tables: vec![TableId::new("public", "t")],
            filter: None,
            cursor: Some("updated_at".into()),
            cursor_after: BTreeMap::new(),
            slot_ms: slot,
            parallelism: 2,
            chunk_rows: 100,
        }
    }

    #[test]
    fn a_job_finishes_when_every_chunk_landed_and_passes_its_cursor_to_the_schedule() {
        let mut book = Book::default();
        assert!(book.add(request("a", "nightly", Some(5)), 1));
        assert!(!book.add(request("a", "nightly", Some(5)), 1), "a redelivered request is one job");
        assert_eq!(book.marks["nightly"].slot_ms, Some(5));
        let run = &mut book.job_mut("a").unwrap().tables[0];
        run.plan = Some(Plan::new(9, 10, 4));
        run.cursor_upto = Some("2026-11-26".into());
        assert_eq!(run.plan.as_ref().unwrap().range(2), (8, 10));
        assert!(!book.piece_landed("a", 0, 0, 3, true, 2));
        assert!(!book.piece_landed("a", 0, 2, 1, true, 2));
        assert_eq!(book.jobs[0].tables[0].plan.as_ref().unwrap().blocks_done(), 6);
        assert!(!book.piece_landed("a", 0, 1, 1, false, 2), "a chunk lands with its last piece");
        assert!(book.ends_table("a", 0, 1) && !book.ends_table("a", 0, 0), "chunk 1 is the one left");
        assert!(book.piece_landed("a", 0, 1, 1, true, 3));
        assert_eq!(book.jobs[0].state, JobState::Done);
        assert_eq!(book.jobs[0].tables[0].rows, 6);
        assert_eq!(book.marks["nightly"].cursors["public.t"], "2026-11-26");
    }
}

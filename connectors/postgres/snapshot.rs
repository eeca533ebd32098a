//! The initial snapshot: each table read in chunks inside one exported snapshot. Every chunk
//! commits to the log together with the table's progress, so a crash redoes at most the chunk in
//! flight.
//!
//! A table is read in ranges of heap blocks (a TID range scan, as cheap for the server as a
//! sequential scan: no index, no sort), in binary COPY format. Each row comes with its `ctid`,
//! so a chunk denser than planned (a bloated table's live rows packed after dead ones) is cut
//! into pieces that commit separately, each recording the exact tuple to resume after: memory
//! stays flat whatever the table's density.
//!
//! Rows are positioned at the snapshot's LSN: a row read at LSN L reflects every change that
//! committed before L and none after, so ordering changes by position and applying them in
//! that order gives the table's state. A resumed snapshot uses a new exported snapshot at a
//! later LSN for the remaining chunks; its rows sort after the changes they already include.
//! A row that moved between chunks while sluice was down (an update writes a new row version
//! elsewhere) is either read again, harmlessly, or was changed after the first snapshot, and
//! that change is in the stream. A table rewritten meanwhile (VACUUM FULL, CLUSTER) has all
//! its rows in new places, so its snapshot starts over.

use super::client::{qualified, query_error, quote_ident, quote_literal, repeatable_read};
use super::copy_binary::{self, reads_binary, BinaryRows, Next};
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, Position, TableId, TableSchema, Value};
use crate::log::{EmbeddedLog, WriteBatch};
use crate::runtime::Shutdown;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_postgres::{Client, Transaction};

pub const PROGRESS_KEY: &str = "pg.snapshot";

/// Durable snapshot progress, stored in the log's metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SnapshotProgress {
    pub tables: Vec<TableProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TableProgress {
    pub table: TableId,
    pub done: bool,
    /// Where the next chunk starts.
    pub next: ChunkStart,
    pub rows: u64,
    /// Time stamped on the table's snapshot rows (microseconds since the epoch); fixed when
    /// the table's first chunk is read, so a replay writes the same partitions.
    pub started_us: Option<i64>,
}

/// The start of a table's next chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum ChunkStart {
    /// Nothing read yet.
    Beginning,
    /// The next heap block, valid only while the table keeps its storage file.
    Block { filenode: u32, block: u32 },
    /// Inside a block: the tuples of `block` after `offset`, then the blocks after it.
    Tuple { filenode: u32, block: u32, offset: u16 },
}

impl SnapshotProgress {
    /// Matches the progress to the configured tables: a table added to the pipeline since the
    /// last run is read too (returned), one removed is forgotten.
    pub fn configure(&mut self, tables: &[TableId]) -> Vec<TableId> {
        self.tables.retain(|p| tables.contains(&p.table));
        let added: Vec<TableId> =
            tables.iter().filter(|t| !self.tables.iter().any(|p| &p.table == *t)).cloned().collect();
        self.tables.extend(added.iter().map(|t| TableProgress {
            table: t.clone(),
            done: false,
            next: ChunkStart::Beginning,
            rows: 0,
            started_us: None,
        }));
        added
    }

    pub fn done(&self) -> bool {
        self.tables.iter().all(|t| t.done)
    }
}

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A table to read: its schema and the schema's id in the log.
pub struct SnapshotTable {
    pub schema: Arc<TableSchema>,
    pub schema_id: u32,
    pub oid: u32,
}

/// A snapshot exported by a replication slot, and the LSN it was taken at.
pub struct ExportedSnapshot {
    pub name: String,
    pub lsn: u64,
}

/// Reads every unfinished table inside an exported snapshot.
pub async fn run(
    client: &mut Client,
    snapshot: &ExportedSnapshot,
    tables: &[SnapshotTable],
    progress: &mut SnapshotProgress,
    log: &EmbeddedLog,
    chunk_rows: u64,
    shutdown: &Shutdown,
) -> Result<()> {
    let lsn = snapshot.lsn;
    let tx = repeatable_read(client, "snapshot").await?;
    tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", quote_literal(&snapshot.name)))
        .await
        .map_err(|e| query_error("snapshot: import exported snapshot", e))?;
    let mut in_flight: Option<tokio::task::JoinHandle<Result<u64>>> = None;
    for t in tables {
        let idx = progress.tables.iter().position(|p| p.table == t.schema.table).expect("progress lists every table");
        if progress.tables[idx].done {
            continue;
        }
        let started_us = *progress.tables[idx].started_us.get_or_insert_with(now_us);
        let mut planner = ChunkPlanner::new(&tx, t, chunk_rows, &mut progress.tables[idx]).await?;
        let key_idx = t.schema.key_indexes();
        while !progress.tables[idx].done {
            let plan = planner.next(&progress.tables[idx].next);
            let mut reader = ChunkReader::open(&tx, &t.schema, &plan, None).await?;
            let (mut chunk_rows_read, mut chunk_bytes) = (0, 0);
            loop {
                if shutdown.is_requested() {
                    // Drain: the piece being committed is durable before the source stops.
                    return finish_commit(&mut in_flight).await;
                }
                let piece = reader.next_piece(chunk_rows as usize).await?;
                chunk_rows_read += piece.rows.len() as u64;
                chunk_bytes += piece.bytes;
                let p = &mut progress.tables[idx];
                let n = piece.rows.len() as u64;
                let last = (plan.last && piece.complete).then(|| piece.rows.len().wrapping_sub(1));
                let mut batch = WriteBatch::with_capacity(piece.rows.len());
                batch.uses_schema(t.schema_id, &t.schema);
                for (i, row) in piece.rows.into_iter().enumerate() {
                    let key = key_idx.iter().map(|&k| row[k].clone()).collect();
                    batch.append(ChangeEvent {
                        table: t.schema.table.clone(),
                        schema_id: t.schema_id,
                        op: Op::Read,
                        key,
                        before: None,
                        after: Some(row),
                        position: Position::snapshot(lsn, p.rows + i as u64),
                        commit_ts_us: started_us,
                        tx_id: None,
                        toast_fetched: false,
                        snapshot_last: last == Some(i),
                        origin: None,
                    });
                }
                p.rows += n;
                p.done = last.is_some();
                p.next = match piece.resume_after {
                    Some((block, offset)) if !piece.complete => {
                        ChunkStart::Tuple { filenode: plan.filenode, block, offset }
                    }
                    _ => ChunkStart::Block { filenode: plan.filenode, block: plan.end },
                };
                metrics::counter!("sluice_snapshot_rows_total", "table" => t.schema.table.to_string()).increment(n);
                metrics::counter!("sluice_events_in_total").increment(n);
                batch.put_meta(PROGRESS_KEY, postcard::to_allocvec(&*progress)?);
                // The slot cannot advance before the snapshot ends anyway, so the snapshot may
                // wait for sinks that keep up: they then read it from memory instead of disk.
                log.make_room(n as usize, READER_PATIENCE).await;
                // One commit in flight while the next piece is read; commits stay in order,
                // and each carries the progress that matches its rows.
                finish_commit(&mut in_flight).await?;
                let log = log.clone();
                in_flight = Some(tokio::spawn(async move { log.commit(batch).await }));
                if piece.complete {
                    break;
                }
            }
            planner.observe(&plan, chunk_rows_read, chunk_bytes);
        }
        finish_commit(&mut in_flight).await?;
        tracing::info!(table = %t.schema.table, rows = progress.tables[idx].rows, "snapshot of table complete");
    }
    tx.commit().await.map_err(|e| query_error("snapshot", e))?;
    Ok(())
}

/// Waits for the chunk commit in flight, if any.
async fn finish_commit(in_flight: &mut Option<tokio::task::JoinHandle<Result<u64>>>) -> Result<()> {
    if let Some(previous) = in_flight.take() {
        previous.await.map_err(|e| Error::Storage(format!("snapshot commit: {e}")))??;
    }
    Ok(())
}

/// COPY bytes one piece may hold: a piece is committed as one batch, so memory stays flat
/// however wide the rows or dense the chunk.
const PIECE_BYTES: usize = 8 * 1024 * 1024;
/// How long a piece waits for a sink that has not moved before going ahead without it.
const READER_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);
/// Blocks in a table's first chunk, before its row density is known.
const FIRST_CHUNK_BLOCKS: u32 = 32;

/// One chunk: heap blocks `start..end` of a table whose storage file is `filenode`.
pub(super) struct ChunkPlan {
    pub filenode: u32,
    pub start: u32,
    /// Resuming inside `start`: only its tuples after this offset.
    pub after: Option<u16>,
    pub end: u32,
    /// `end` is the table's size in blocks: this is its last chunk.
    pub last: bool,
}

impl ChunkPlan {
    /// Types without a simple binary form are selected as text and decoded like the stream's;
    /// `ctid` comes last, to record where a piece ends. `filter` (a backfill's) narrows the rows.
    fn sql(&self, schema: &TableSchema, filter: Option<&str>) -> String {
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| match reads_binary(&c.ty) {
                true => quote_ident(&c.name),
                false => format!("{}::text", quote_ident(&c.name)),
            })
            .collect();
        let from = match self.after {
            Some(offset) => format!("ctid > '({},{offset})'::tid", self.start),
            None => format!("ctid >= '({},0)'::tid", self.start),
        };
        let filter = filter.map(|f| format!(" AND ({f})")).unwrap_or_default();
        format!(
            "COPY (SELECT {}, ctid FROM {} WHERE {from} AND ctid < '({},0)'::tid{filter}) TO STDOUT (FORMAT binary)",
            cols.join(", "),
            qualified(&schema.table),
            self.end
        )
    }
}

/// Sizes chunks from what earlier chunks of the table held: about `chunk_rows` rows and at most
/// [`PIECE_BYTES`] of COPY data, so a chunk is usually one piece.
struct ChunkPlanner {
    chunk_rows: u64,
    /// The table's storage file, and its size in blocks when this run's snapshot began.
    filenode: u32,
    size: u32,
    rows_seen: u64,
    bytes_seen: u64,
    blocks_seen: u64,
}

impl ChunkPlanner {
    /// Reads the table's storage file and size inside the snapshot; a table rewritten since
    /// an interrupted snapshot is read again from its first block.
    async fn new(
        tx: &Transaction<'_>,
        table: &SnapshotTable,
        chunk_rows: u64,
        progress: &mut TableProgress,
    ) -> Result<Self> {
        // The size is read after the snapshot was taken, so it covers every row the snapshot
        // can see (rows it cannot see are skipped by the scan).
        let row = tx
            .query_one(
                "SELECT pg_relation_filenode($1::oid)::oid, \
                 (pg_relation_size($1::oid) / current_setting('block_size')::int8)::int8",
                &[&table.oid],
            )
            .await
            .map_err(|e| query_error("snapshot: table size", e))?;
        let filenode: u32 = row.get(0);
        let size = u32::try_from(row.get::<_, i64>(1))
            .map_err(|_| Error::permanent("snapshot", format!("{} has too many blocks", table.schema.table)))?;
        let stored = match progress.next {
            ChunkStart::Beginning => None,
            ChunkStart::Block { filenode, .. } | ChunkStart::Tuple { filenode, .. } => Some(filenode),
        };
        if stored.is_some_and(|before| before != filenode) {
            tracing::warn!(table = %table.schema.table, "table was rewritten since the interrupted snapshot; reading it again from the start");
            progress.next = ChunkStart::Beginning;
        }
        Ok(Self { chunk_rows, filenode, size, rows_seen: 0, bytes_seen: 0, blocks_seen: 0 })
    }

    fn next(&self, from: &ChunkStart) -> ChunkPlan {
        let (start, after) = match *from {
            ChunkStart::Beginning => (0, None),
            ChunkStart::Block { block, .. } => (block, None),
            ChunkStart::Tuple { block, offset, .. } => (block, Some(offset)),
        };
        let count = match self.bytes_seen.checked_div(self.rows_seen) {
            None if self.blocks_seen == 0 => FIRST_CHUNK_BLOCKS as u64,
            // Only empty blocks so far: widen quickly over them.
            None => (self.blocks_seen * 2).min(1 << 20),
            Some(avg_row_bytes) => {
                let rows = self.chunk_rows.min(PIECE_BYTES as u64 / avg_row_bytes.max(1)).max(1);
                let rows_per_block = self.rows_seen as f64 / self.blocks_seen as f64;
                ((rows as f64 / rows_per_block) as u64).max(1)
            }
        };
        // A resumed block is read in full (from its offset) whatever the estimate.
        let end = (start as u64 + count.max(1)).min(self.size as u64).max(start as u64 + 1) as u32;
        ChunkPlan { filenode: self.filenode, start, after, end, last: end >= self.size }
    }

    fn observe(&mut self, plan: &ChunkPlan, rows: u64, bytes: usize) {
        self.rows_seen += rows;
        self.bytes_seen += bytes as u64;
        self.blocks_seen += (plan.end - plan.start) as u64;
    }
}

/// Rows of a chunk committed together.
pub(super) struct Piece {
    pub rows: Vec<Vec<Value>>,
    /// COPY bytes read for these rows.
    bytes: usize,
    /// The `ctid` (block, offset) of the piece's last row.
    resume_after: Option<(u32, u16)>,
    /// The chunk's COPY ended with this piece.
    pub complete: bool,
}

/// A chunk's COPY stream, decoded and cut into pieces.
pub(super) struct ChunkReader<'a> {
    stream: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    schema: &'a TableSchema,
    /// Received bytes not yet parsed start at `pending[start..]`.
    pending: Vec<u8>,
    start: usize,
    parser: BinaryRows,
    fields: Vec<Option<std::ops::Range<usize>>>,
}

impl<'a> ChunkReader<'a> {
    pub async fn open(
        tx: &Transaction<'_>,
        schema: &'a TableSchema,
        plan: &ChunkPlan,
        filter: Option<&str>,
    ) -> Result<Self> {
        let stream = tx.copy_out(&plan.sql(schema, filter)).await.map_err(|e| query_error("snapshot COPY", e))?;
        Ok(Self {
            stream: Box::pin(stream),
            schema,
            pending: Vec::new(),
            start: 0,
            parser: BinaryRows::default(),
            fields: Vec::with_capacity(schema.columns.len() + 1),
        })
    }

    fn bad(&self, m: String) -> Error {
        Error::permanent(format!("snapshot of {}", self.schema.table), m)
    }

    /// Reads rows until `max_rows` or [`PIECE_BYTES`] are reached or the chunk ends. Always
    /// returns a piece (empty only for a chunk without rows), so the chunk's end is committed
    /// as progress.
    pub async fn next_piece(&mut self, max_rows: usize) -> Result<Piece> {
        let mut piece = Piece { rows: Vec::new(), bytes: 0, resume_after: None, complete: false };
        loop {
            let full = piece.rows.len() >= max_rows.max(1) || piece.bytes >= PIECE_BYTES;
            match self.parser.next_row(&self.pending[self.start..], &mut self.fields).map_err(|e| self.bad(e))? {
                Next::End => {
                    piece.complete = true;
                    return Ok(piece);
                }
                // Cut only once the next row is here: a piece that ends the chunk says so, and
                // its last row can carry the snapshot's end.
                Next::Row { .. } if full => return Ok(piece),
                Next::Row { consumed } => {
                    let (row, tid) = self.decode_row()?;
                    piece.rows.push(row);
                    piece.resume_after = Some(tid);
                    piece.bytes += consumed;
                    self.start += consumed;
                }
                Next::NeedMore => {
                    self.pending.drain(..self.start);
                    self.start = 0;
                    match self.stream.next().await {
                        Some(chunk) => {
                            self.pending.extend_from_slice(&chunk.map_err(|e| query_error("snapshot COPY", e))?)
                        }
                        None => return Err(self.bad("the COPY stream ended inside a row".into())),
                    }
                }
            }
        }
    }

    /// Decodes the row whose fields the parser just found: the table's columns, then `ctid`.
    fn decode_row(&self) -> Result<(Vec<Value>, (u32, u16))> {
        let columns = &self.schema.columns;
        if self.fields.len() != columns.len() + 1 {
            return Err(self.bad(format!("expected {} fields, got {}", columns.len() + 1, self.fields.len())));
        }
        let base = &self.pending[self.start..];
        // A plain loop: collecting `Result`s moves every value through the error's larger
        // layout, which costs a snapshot several percent of its CPU.
        let mut row = Vec::with_capacity(columns.len());
        for (f, c) in self.fields[..columns.len()].iter().zip(columns) {
            row.push(match f {
                None => Value::Null,
                Some(r) => match copy_binary::decode(&c.ty, &base[r.clone()]) {
                    Ok(value) => value,
                    Err(e) => return Err(self.bad(format!("column {}: {e}", c.name))),
                },
            });
        }
        let tid = match &self.fields[columns.len()] {
            Some(r) => copy_binary::tid(&base[r.clone()]).map_err(|e| self.bad(format!("ctid: {e}")))?,
            None => return Err(self.bad("ctid is NULL".into())),
        };
        Ok((row, tid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, ColumnType};

    fn planner(size: u32) -> ChunkPlanner {
        ChunkPlanner { chunk_rows: 1000, filenode: 7, size, rows_seen: 0, bytes_seen: 0, blocks_seen: 0 }
    }

    #[test]
    fn a_piece_boundary_resumes_after_its_tuple_and_reads_the_rest_of_its_block() {
        let mut p = planner(100);
        // 50 rows of 100 bytes per block: 1000 rows are 20 blocks.
        p.observe(&ChunkPlan { filenode: 7, start: 0, after: None, end: 32, last: false }, 1600, 160_000);
        let plan = p.next(&ChunkStart::Tuple { filenode: 7, block: 40, offset: 12 });
        assert_eq!((plan.start, plan.after, plan.end, plan.last), (40, Some(12), 60, false));
        let schema = TableSchema {
            table: TableId::new("public", "t"),
            columns: vec![
                Column { name: "id".into(), ty: ColumnType::Int32, key: true, toastable: false },
                Column { name: "v".into(), ty: ColumnType::Interval, key: false, toastable: false },
            ],
            toast_target: 0,
        };
        assert_eq!(
            plan.sql(&schema, None),
            "COPY (SELECT \"id\", \"v\"::text, ctid FROM \"public\".\"t\" \
             WHERE ctid > '(40,12)'::tid AND ctid < '(60,0)'::tid) TO STDOUT (FORMAT binary)"
        );
        let plan = p.next(&ChunkStart::Block { filenode: 7, block: 90 });
        assert_eq!((plan.start, plan.after, plan.end, plan.last), (90, None, 100, true));
        assert!(plan
            .sql(&schema, Some("v > '1 day'"))
            .ends_with("AND ctid < '(100,0)'::tid AND (v > '1 day')) TO STDOUT (FORMAT binary)"));
        assert!(plan.sql(&schema, None).contains("WHERE ctid >= '(90,0)'::tid AND ctid < '(100,0)'::tid"));
    }

    #[test]
    fn empty_blocks_widen_the_next_chunk_and_the_last_block_still_reads() {
        let mut p = planner(1 << 20);
        assert_eq!(p.next(&ChunkStart::Beginning).end, FIRST_CHUNK_BLOCKS);
        p.observe(&ChunkPlan { filenode: 7, start: 0, after: None, end: 32, last: false }, 0, 0);
        assert_eq!(p.next(&ChunkStart::Block { filenode: 7, block: 32 }).end, 32 + 64);
        // Resuming inside the table's last block reads it, and is the table's last chunk.
        let plan = planner(10).next(&ChunkStart::Tuple { filenode: 7, block: 9, offset: 3 });
        assert_eq!((plan.start, plan.after, plan.end, plan.last), (9, Some(3), 10, true));
    }
}

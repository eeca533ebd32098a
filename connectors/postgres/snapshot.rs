//! The initial snapshot: each table read in chunks inside one exported snapshot. Every chunk
//! commits to the log together with the table's progress, so a crash redoes at most the chunk in
//! flight.
//!
//! A table is read in ranges of heap blocks (a TID range scan, as cheap for the server as a
//! sequential scan: no index, no sort), in binary COPY format.
//!
//! Rows are positioned at the snapshot's LSN: a row read at LSN L reflects every change that
//! committed before L and none after, so ordering changes by position and applying them in
//! that order gives the table's state. A resumed snapshot uses a new exported snapshot at a
//! later LSN for the remaining chunks; its rows sort after the changes they already include.
//! A row that moved between chunks while sluice was down (an update writes a new row version
//! elsewhere) is either read again, harmlessly, or was changed after the first snapshot, and
//! that change is in the stream. A table rewritten meanwhile (VACUUM FULL, CLUSTER) has all
//! its rows in new places, so its snapshot starts over.

use super::client::{qualified, query_error, quote_ident, quote_literal};
use super::copy_binary::{self, reads_binary, BinaryRows, Next};
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, Position, TableId, TableSchema, Value};
use crate::log::{EmbeddedLog, WriteBatch};
use crate::runtime::Shutdown;
use bytes::Bytes;
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
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| query_error("snapshot", e))?;
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
            if shutdown.is_requested() {
                // Drain: the chunk being committed is durable before the source stops.
                return finish_commit(&mut in_flight).await;
            }
            let p = &mut progress.tables[idx];
            let plan = planner.next(&p.next);
            let chunk = read_chunk(&tx, &t.schema, &plan).await?;
            planner.observe(&plan, &chunk);
            let mut batch = WriteBatch::with_capacity(chunk.rows.len() + 1);
            batch.uses_schema(t.schema_id, &t.schema);
            let n = chunk.rows.len() as u64;
            let last = plan.last.then(|| chunk.rows.len().wrapping_sub(1));
            for (i, row) in chunk.rows.into_iter().enumerate() {
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
                });
            }
            p.rows += n;
            p.done = last.is_some();
            p.next = ChunkStart::Block { filenode: plan.filenode, block: plan.end };
            metrics::counter!("sluice_snapshot_rows_total", "table" => t.schema.table.to_string()).increment(n);
            metrics::counter!("sluice_events_in_total").increment(n);
            batch.put_meta(PROGRESS_KEY, postcard::to_allocvec(&*progress)?);
            // The slot cannot advance before the snapshot ends anyway, so the snapshot may wait
            // for sinks that keep up: they then read it from memory instead of from disk.
            log.make_room(n as usize, READER_PATIENCE).await;
            // One commit in flight while the next chunk is read; commits stay in order, and
            // each carries the progress that matches its rows.
            finish_commit(&mut in_flight).await?;
            let log = log.clone();
            in_flight = Some(tokio::spawn(async move { log.commit(batch).await }));
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

/// Bytes of COPY data one chunk may hold, so memory stays flat however wide the rows.
const CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// How long a chunk waits for a sink that has not moved before going ahead without it.
const READER_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);
/// Blocks in a table's first chunk, before its row density is known.
const FIRST_CHUNK_BLOCKS: u32 = 32;

/// One chunk: heap blocks `start..end` of a table whose storage file is `filenode`.
struct ChunkPlan {
    filenode: u32,
    start: u32,
    end: u32,
    /// `end` is the table's size in blocks: this is its last chunk.
    last: bool,
}

impl ChunkPlan {
    /// Types without a simple binary form are selected as text and decoded like the stream's.
    fn sql(&self, schema: &TableSchema) -> String {
        let cols: Vec<String> = schema
            .columns
            .iter()
            .map(|c| match reads_binary(&c.ty) {
                true => quote_ident(&c.name),
                false => format!("{}::text", quote_ident(&c.name)),
            })
            .collect();
        format!(
            "COPY (SELECT {} FROM {} WHERE ctid >= '({},0)'::tid AND ctid < '({},0)'::tid) TO STDOUT (FORMAT binary)",
            cols.join(", "),
            qualified(&schema.table),
            self.start,
            self.end
        )
    }
}

/// Sizes chunks from what earlier chunks of the table held: about `chunk_rows` rows and at most
/// [`CHUNK_BYTES`] of COPY data.
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
        if let ChunkStart::Block { filenode: before, .. } = progress.next {
            if before != filenode {
                tracing::warn!(table = %table.schema.table, "table was rewritten since the interrupted snapshot; reading it again from the start");
                progress.next = ChunkStart::Beginning;
            }
        }
        Ok(Self { chunk_rows, filenode, size, rows_seen: 0, bytes_seen: 0, blocks_seen: 0 })
    }

    fn next(&self, from: &ChunkStart) -> ChunkPlan {
        let start = match from {
            ChunkStart::Block { block, .. } => *block,
            ChunkStart::Beginning => 0,
        };
        let count = match self.bytes_seen.checked_div(self.rows_seen) {
            None if self.blocks_seen == 0 => FIRST_CHUNK_BLOCKS as u64,
            // Only empty blocks so far: widen quickly over them.
            None => (self.blocks_seen * 2).min(1 << 20),
            Some(avg_row_bytes) => {
                let rows = self.chunk_rows.min(CHUNK_BYTES as u64 / avg_row_bytes.max(1)).max(1);
                let rows_per_block = self.rows_seen as f64 / self.blocks_seen as f64;
                ((rows as f64 / rows_per_block) as u64).max(1)
            }
        };
        let end = (start as u64 + count).min(self.size as u64) as u32;
        ChunkPlan { filenode: self.filenode, start, end, last: end >= self.size }
    }

    fn observe(&mut self, plan: &ChunkPlan, chunk: &Chunk) {
        self.rows_seen += chunk.rows.len() as u64;
        self.bytes_seen += chunk.bytes as u64;
        self.blocks_seen += (plan.end - plan.start) as u64;
    }
}

struct Chunk {
    rows: Vec<Vec<Value>>,
    /// COPY bytes read.
    bytes: usize,
}

async fn read_chunk(tx: &Transaction<'_>, schema: &TableSchema, plan: &ChunkPlan) -> Result<Chunk> {
    let stream = tx.copy_out(&plan.sql(schema)).await.map_err(|e| query_error("snapshot COPY", e))?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut parser = BinaryRows::default();
    let mut fields = Vec::with_capacity(schema.columns.len());
    let bad = |m: String| Error::permanent(format!("snapshot of {}", schema.table), m);
    let mut ended = false;
    while let Some(chunk) = stream.next().await {
        let chunk: Bytes = chunk.map_err(|e| query_error("snapshot COPY", e))?;
        bytes += chunk.len();
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        loop {
            match parser.next_row(&pending[start..], &mut fields).map_err(bad)? {
                Next::Row { consumed } => {
                    if fields.len() != schema.columns.len() {
                        return Err(bad(format!("expected {} fields, got {}", schema.columns.len(), fields.len())));
                    }
                    let base = &pending[start..];
                    let row = fields
                        .iter()
                        .zip(&schema.columns)
                        .map(|(f, c)| match f {
                            None => Ok(Value::Null),
                            Some(r) => copy_binary::decode(&c.ty, &base[r.clone()])
                                .map_err(|e| bad(format!("column {}: {e}", c.name))),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    rows.push(row);
                    start += consumed;
                }
                Next::NeedMore => break,
                Next::End => {
                    ended = true;
                    break;
                }
            }
        }
        pending.drain(..start);
    }
    if !ended {
        return Err(bad("the COPY stream ended inside a row".into()));
    }
    Ok(Chunk { rows, bytes })
}

//! The initial snapshot: each table read in primary-key order, in chunks, inside one exported
//! snapshot. Every chunk commits to the log together with the table's progress, so a crash
//! redoes at most the chunk in flight.
//!
//! Rows are positioned at the snapshot's LSN: a row read at LSN L reflects every change that
//! committed before L and none after, so ordering changes by position and applying them in
//! that order gives the table's state. A resumed snapshot uses a new exported snapshot at a
//! later LSN for the remaining chunks; its rows sort after the changes they already include.

use super::client::{qualified, query_error, quote_ident, quote_literal};
use super::values::decode;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, Position, TableId, TableSchema, Value};
use crate::log::{EmbeddedLog, WriteBatch};
use crate::runtime::Shutdown;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_postgres::Client;

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
    /// Text of the last key read, per key column.
    pub last_key: Option<Vec<String>>,
    pub rows: u64,
    /// Time stamped on the table's snapshot rows (microseconds since the epoch); fixed when
    /// the table's first chunk is read, so a replay writes the same partitions.
    pub started_us: Option<i64>,
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
            last_key: None,
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
        // Unknown until the first chunk, which is therefore small.
        let mut avg_row_bytes: Option<usize> = None;
        let idx = progress.tables.iter().position(|p| p.table == t.schema.table).expect("progress lists every table");
        let started_us = *progress.tables[idx].started_us.get_or_insert_with(now_us);
        let key_idx = t.schema.key_indexes();
        while !progress.tables[idx].done {
            if shutdown.is_requested() {
                // Drain: the chunk being committed is durable before the source stops.
                if let Some(previous) = in_flight.take() {
                    previous.await.map_err(|e| Error::Storage(format!("snapshot commit: {e}")))??;
                }
                return Ok(());
            }
            let limit = chunk_limit(chunk_rows, avg_row_bytes);
            let chunk = read_chunk(&tx, &t.schema, progress.tables[idx].last_key.as_deref(), limit).await?;
            let p = &mut progress.tables[idx];
            let mut batch = WriteBatch::new();
            batch.uses_schema(t.schema_id, &t.schema);
            let n = chunk.rows.len() as u64;
            if n > 0 {
                avg_row_bytes = Some(chunk.bytes / n as usize);
            }
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
                });
            }
            p.rows += n;
            p.done = n < limit;
            if chunk.last_key.is_some() {
                p.last_key = chunk.last_key;
            }
            metrics::counter!("sluice_snapshot_rows_total", "table" => t.schema.table.to_string()).increment(n);
            metrics::counter!("sluice_events_in_total").increment(n);
            batch.put_meta(PROGRESS_KEY, postcard::to_allocvec(&*progress)?);
            // One commit in flight while the next chunk is read; commits stay in order, and
            // each carries the progress that matches its rows.
            if let Some(previous) = in_flight.take() {
                previous.await.map_err(|e| Error::Storage(format!("snapshot commit: {e}")))??;
            }
            let log = log.clone();
            in_flight = Some(tokio::spawn(async move { log.commit(batch).await }));
        }
        if let Some(previous) = in_flight.take() {
            previous.await.map_err(|e| Error::Storage(format!("snapshot commit: {e}")))??;
        }
        tracing::info!(table = %t.schema.table, rows = progress.tables[idx].rows, "snapshot of table complete");
    }
    tx.commit().await.map_err(|e| query_error("snapshot", e))?;
    Ok(())
}

/// Bytes of COPY text one chunk may hold, so memory stays flat however wide the rows.
const CHUNK_BYTES: usize = 32 * 1024 * 1024;

/// Rows in the next chunk: at most `configured`, and about [`CHUNK_BYTES`] of text.
fn chunk_limit(configured: u64, avg_row_bytes: Option<usize>) -> u64 {
    match avg_row_bytes {
        None => configured.min(1000),
        Some(avg) => configured.min((CHUNK_BYTES / avg.max(1)) as u64).max(1),
    }
}

struct Chunk {
    rows: Vec<Vec<Value>>,
    last_key: Option<Vec<String>>,
    /// COPY text bytes read.
    bytes: usize,
}

async fn read_chunk(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &TableSchema,
    after: Option<&[String]>,
    limit: u64,
) -> Result<Chunk> {
    let cols: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let keys: Vec<String> = schema.key_indexes().iter().map(|&i| quote_ident(&schema.columns[i].name)).collect();
    let filter = match after {
        Some(last) => {
            let lits: Vec<String> = last.iter().map(|s| quote_literal(s)).collect();
            format!("WHERE ({}) > ({})", keys.join(", "), lits.join(", "))
        }
        None => String::new(),
    };
    let sql = format!(
        "COPY (SELECT {} FROM {} {filter} ORDER BY {} LIMIT {limit}) TO STDOUT",
        cols.join(", "),
        qualified(&schema.table),
        keys.join(", ")
    );
    let stream = tx.copy_out(&sql).await.map_err(|e| query_error("snapshot COPY", e))?;
    futures::pin_mut!(stream);
    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut pending: Vec<u8> = Vec::new();
    // The next chunk starts after the key of the last line; keep that line, not every key.
    let mut last_line: Vec<u8> = Vec::new();
    let mut handle_line = |line: &[u8], rows: &mut Vec<Vec<Value>>| -> Result<()> {
        let fields = split_copy_line(line)?;
        if fields.len() != schema.columns.len() {
            return Err(Error::permanent(
                "snapshot COPY",
                format!("expected {} fields, got {}", schema.columns.len(), fields.len()),
            ));
        }
        last_line.clear();
        last_line.extend_from_slice(line);
        let row = fields
            .into_iter()
            .zip(&schema.columns)
            .map(|(f, c)| match f {
                None => Ok(Value::Null),
                Some(text) => decode(&c.ty, &text)
                    .map_err(|e| Error::permanent(format!("snapshot of {} column {}", schema.table, c.name), e)),
            })
            .collect::<Result<Vec<_>>>()?;
        rows.push(row);
        Ok(())
    };
    while let Some(chunk) = stream.next().await {
        let chunk: Bytes = chunk.map_err(|e| query_error("snapshot COPY", e))?;
        bytes += chunk.len();
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
            handle_line(&pending[start..start + nl], &mut rows)?;
            start += nl + 1;
        }
        pending.drain(..start);
    }
    if !pending.is_empty() {
        handle_line(&pending, &mut rows)?;
    }
    let last_key = if rows.is_empty() {
        None
    } else {
        let fields = split_copy_line(&last_line)?;
        Some(schema.key_indexes().iter().map(|&k| fields[k].clone().unwrap_or_default()).collect())
    };
    Ok(Chunk { rows, last_key, bytes })
}

/// Splits one line of COPY text format into fields (`None` for `\N`), undoing its escapes.
fn split_copy_line(line: &[u8]) -> Result<Vec<Option<String>>> {
    let mut fields = Vec::new();
    for raw in line.split(|&b| b == b'\t') {
        if raw == b"\\N" {
            fields.push(None);
            continue;
        }
        // Most fields have no escapes: one copy, straight into the String.
        if !raw.contains(&b'\\') {
            let text = std::str::from_utf8(raw).map_err(|_| Error::permanent("snapshot COPY", "field is not UTF-8"))?;
            fields.push(Some(text.to_owned()));
            continue;
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            if raw[i] != b'\\' || i + 1 == raw.len() {
                out.push(raw[i]);
                i += 1;
                continue;
            }
            let c = raw[i + 1];
            i += 2;
            match c {
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut v = (c - b'0') as u32;
                    let mut n = 1;
                    while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                        v = v * 8 + (raw[i] - b'0') as u32;
                        i += 1;
                        n += 1;
                    }
                    out.push(v as u8);
                }
                b'x' => {
                    let mut v = 0u32;
                    let mut n = 0;
                    while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                        v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                        i += 1;
                        n += 1;
                    }
                    out.push(v as u8);
                }
                other => out.push(other),
            }
        }
        fields.push(Some(String::from_utf8(out).map_err(|_| Error::permanent("snapshot COPY", "field is not UTF-8"))?));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::split_copy_line;
    use proptest::prelude::*;

    /// COPY text format escaping, as the server writes it.
    fn escape(s: &str) -> String {
        let mut out = String::new();
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\u{b}' => out.push_str("\\v"),
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        /// Splitting a COPY line undoes the server's escaping, field by field.
        #[test]
        fn copy_fields_round_trip(fields in proptest::collection::vec(proptest::option::of(any::<String>()), 1..6)) {
            let line: Vec<String> = fields.iter().map(|f| f.as_deref().map(escape).unwrap_or_else(|| "\\N".into())).collect();
            prop_assert_eq!(split_copy_line(line.join("\t").as_bytes()).unwrap(), fields);
        }
    }

    #[test]
    fn copy_text_escapes_and_nulls() {
        let fields = split_copy_line(b"a\\tb\t\\N\tline\\nbreak\t\\\\x\t\\101").unwrap();
        assert_eq!(
            fields,
            vec![Some("a\tb".into()), None, Some("line\nbreak".into()), Some("\\x".into()), Some("A".into())]
        );
    }
}

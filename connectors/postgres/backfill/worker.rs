//! Runs backfill jobs: plans each table into chunks of heap blocks, then reads chunks in
//! parallel, each inside its own snapshot, and hands the rows to the source to land.

use super::book::{BackfillRequest, Plan, TableRun};
use super::fence::TxSnapshot;
use super::request::{all_of, check_conditions};
use super::{Backfills, Deposit, Message, Outcome, PREFIX};
use crate::config::PgConnection;
use crate::connectors::postgres::client::{self, qualified, query_error, quote_ident, quote_literal};
use crate::connectors::postgres::snapshot::{ChunkPlan, ChunkReader};
use crate::connectors::postgres::Catalog;
use crate::error::{Error, Result};
use crate::event::TableSchema;
use crate::log::EmbeddedLog;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// Rows a piece holds at most: one log commit each, as the initial snapshot's default chunk.
const MAX_PIECE_ROWS: u64 = 20_000;
/// Pieces a job holds in memory at most, whatever its parallelism: reading is CPU-bound on
/// small machines, and each piece is up to 20,000 decoded rows.
const MAX_PIECES_HELD: usize = 3;
/// How long a piece waits for a sink that has not moved before going ahead without it.
const READER_PATIENCE: Duration = Duration::from_millis(200);

/// Tells pieces of this process apart from a previous one's still in the stream.
static PIECES: AtomicU64 = AtomicU64::new(0);

/// Starts a task per running job and keeps them going until `cancel`.
pub async fn manage(backfills: Arc<Backfills>, conn: PgConnection, log: EmbeddedLog, cancel: CancellationToken) {
    let mut jobs: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        jobs.retain(|_, task| !task.is_finished());
        for job in backfills.book().running() {
            let id = job.request.id.clone();
            if let std::collections::hash_map::Entry::Vacant(slot) = jobs.entry(id.clone()) {
                let run = JobRun {
                    backfills: backfills.clone(),
                    conn: conn.clone(),
                    log: log.clone(),
                    id,
                    cancel: cancel.clone(),
                };
                slot.insert(tokio::spawn(run.run()));
            }
        }
        tokio::select! {
            _ = backfills.changed.notified() => {}
            _ = cancel.cancelled() => break,
        }
    }
    for (_, task) in jobs {
        let _ = task.await;
    }
}

/// A table of a job, ready to read.
struct TableWork {
    schema: Arc<TableSchema>,
    oid: u32,
    filter: Option<String>,
    plan: Plan,
}

struct JobRun {
    backfills: Arc<Backfills>,
    conn: PgConnection,
    /// Waited on before a piece is handed over, while sinks keep up (see [`EmbeddedLog::make_room`]).
    log: EmbeddedLog,
    id: String,
    cancel: CancellationToken,
}

impl JobRun {
    async fn run(self) {
        let mut delay = Duration::from_millis(200);
        loop {
            let outcome = tokio::select! {
                r = self.attempt() => r,
                _ = self.cancel.cancelled() => return,
            };
            match outcome {
                Ok(()) => return,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(job = %self.id, error = %e, retry_in = ?delay, "backfill interrupted; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    tracing::error!(job = %self.id, error = %e, "backfill failed");
                    self.backfills.fail(&self.id, e.to_string());
                    return;
                }
            }
        }
    }

    /// Plans what is not planned yet, then reads every chunk not landed yet.
    async fn attempt(&self) -> Result<()> {
        let mut catalog = Catalog::new(client::connect(&self.conn, "sluice backfill").await?);
        let Some(job) = self.backfills.book().jobs.into_iter().find(|j| j.request.id == self.id) else { return Ok(()) };
        let req = &job.request;
        let mut tables = Vec::new();
        for (i, run) in job.tables.iter().enumerate() {
            tables.push(self.prepare(&mut catalog, req, i, run).await?);
        }
        settle(catalog.client()).await?;
        let queue: VecDeque<(usize, usize)> =
            tables.iter().enumerate().flat_map(|(t, w)| w.plan.remaining().map(move |c| (t, c))).collect();
        if queue.is_empty() {
            return Ok(());
        }
        tracing::info!(job = %self.id, name = %req.name, chunks = queue.len(), parallelism = req.parallelism, "backfill reading");
        let queue = Arc::new(Mutex::new(queue));
        let tables = Arc::new(tables);
        let control = Arc::new(client::connect(&self.conn, "sluice backfill watermarks").await?);
        let pieces = Arc::new(Semaphore::new((req.parallelism as usize + 1).min(MAX_PIECES_HELD)));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..req.parallelism.max(1) {
            let worker = ChunkWorker {
                backfills: self.backfills.clone(),
                job: self.id.clone(),
                tables: tables.clone(),
                control: control.clone(),
                log: self.log.clone(),
                pieces: pieces.clone(),
                piece_rows: req.chunk_rows.clamp(1, MAX_PIECE_ROWS) as usize,
            };
            let (queue, conn) = (queue.clone(), self.conn.clone());
            workers.spawn(async move { worker.drain(&conn, &queue).await });
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| Error::permanent("backfill worker", e))??;
        }
        Ok(())
    }

    /// Makes table `i` of the job ready to read: checked, bounded (incremental runs) and
    /// planned once, in the book; later attempts reuse the stored plan and bound.
    async fn prepare(
        &self,
        catalog: &mut Catalog,
        req: &BackfillRequest,
        i: usize,
        run: &TableRun,
    ) -> Result<TableWork> {
        let info = catalog.table(&run.table).await?;
        let client = catalog.client();
        let cursor = req.cursor.as_deref().map(quote_ident);
        let mut conditions: Vec<String> = req.filter.iter().cloned().collect();
        if let (Some(column), Some(after)) = (&cursor, req.cursor_after.get(&run.table.to_string())) {
            conditions.push(format!("{column} > {}", quote_literal(after)));
        }
        let (upto, plan) = match &run.plan {
            Some(plan) => (run.cursor_upto.clone(), plan.clone()),
            None => {
                check_conditions(client, &req.name, &run.table, req.filter.as_slice()).await?;
                let upto = match &cursor {
                    Some(column) => highest(client, &qualified(&run.table), column, all_of(&conditions)).await?,
                    None => None,
                };
                // An incremental run with nothing new has nothing to read.
                let plan = match (&cursor, &upto) {
                    (Some(_), None) => Plan::new(0, 0, 1),
                    _ => plan_table(client, info.oid, req.chunk_rows).await?,
                };
                self.backfills.with_book(|b| {
                    if let Some(job) = b.job_mut(&self.id) {
                        job.tables[i].plan = Some(plan.clone());
                        job.tables[i].cursor_upto = upto.clone();
                    }
                    b.finish_if_done(&self.id, crate::runtime::progress::now_ms());
                });
                (upto, plan)
            }
        };
        if let (Some(column), Some(upto)) = (&cursor, &upto) {
            conditions.push(format!("{column} <= {}", quote_literal(upto)));
        }
        Ok(TableWork { schema: Arc::new(info.schema), oid: info.oid, filter: all_of(&conditions), plan })
    }
}

/// The highest value of `column` (quoted) among the rows `filter` selects, as text.
async fn highest(client: &Client, qualified: &str, column: &str, filter: Option<String>) -> Result<Option<String>> {
    let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
    let row = client
        .query_one(&format!("SELECT max({column})::text FROM {qualified}{filter}"), &[])
        .await
        .map_err(|e| query_error("backfill cursor", e))?;
    Ok(row.get(0))
}

/// Cuts a table into chunks of about `chunk_rows` rows by its current size and density.
async fn plan_table(client: &Client, oid: u32, chunk_rows: u64) -> Result<Plan> {
    let row = client
        .query_one(
            "SELECT pg_relation_filenode(c.oid)::oid, \
             (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8, \
             c.reltuples::float8, c.relpages::int8 FROM pg_class c WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(|e| query_error("backfill plan", e))?;
    let (filenode, blocks, tuples, pages): (u32, i64, f64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    // Never analyzed: assume a narrow table; chunks stay bounded in bytes by pieces anyway.
    let per_block = if tuples > 0.0 && pages > 0 { tuples / pages as f64 } else { 100.0 };
    let chunk_blocks = ((chunk_rows as f64 / per_block).ceil() as u32).max(1);
    Ok(Plan::new(filenode, u32::try_from(blocks).unwrap_or(u32::MAX), chunk_blocks))
}

/// Waits until no transaction that has committed is still invisible to new snapshots. Such a
/// transaction (waiting for a synchronous standby, say) can be in the stream already, before
/// the fence began recording; once it is visible, every chunk snapshot sees it.
async fn settle(client: &Client) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot()) x \
                 WHERE pg_xact_status(x) = 'committed'",
                &[],
            )
            .await
            .map_err(|e| query_error("backfill settle", e))?;
        if row.get::<_, i64>(0) == 0 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(5) {
            tracing::warn!("backfill waits for committed transactions to become visible (a synchronous standby?)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads chunks from a job's queue, one at a time.
struct ChunkWorker {
    backfills: Arc<Backfills>,
    job: String,
    tables: Arc<Vec<TableWork>>,
    /// Commits the high watermark messages (the chunk's own connection is inside its COPY).
    control: Arc<Client>,
    log: EmbeddedLog,
    /// Pieces the job's workers may hold (being read or waiting to land) at once.
    pieces: Arc<Semaphore>,
    piece_rows: usize,
}

impl ChunkWorker {
    async fn drain(&self, conn: &PgConnection, queue: &Mutex<VecDeque<(usize, usize)>>) -> Result<()> {
        let mut client = client::connect(conn, "sluice backfill chunk").await?;
        loop {
            let Some((table, chunk)) = queue.lock().expect("queue lock").pop_front() else { return Ok(()) };
            let ticket = self.backfills.begin_chunk();
            let outcome = self.chunk(&mut client, ticket, table, chunk).await;
            self.backfills.end_chunk(ticket);
            match outcome? {
                Outcome::Landed => {}
                Outcome::Redo => {
                    tracing::debug!(job = %self.job, table, chunk, "chunk overtaken by a streamed transaction; reading it again");
                    queue.lock().expect("queue lock").push_back((table, chunk));
                }
            }
        }
    }

    /// Reads one chunk in its own snapshot and waits until the source landed all of it.
    async fn chunk(&self, client: &mut Client, ticket: u64, table: usize, chunk: usize) -> Result<Outcome> {
        let work = &self.tables[table];
        let tx = client::repeatable_read(client, "backfill chunk").await?;
        // The first query takes the transaction's snapshot: the one the chunk is read in.
        let row = tx
            .query_one("SELECT pg_current_snapshot()::text, pg_relation_filenode($1::oid)::oid", &[&work.oid])
            .await
            .map_err(|e| query_error("backfill chunk", e))?;
        let text: String = row.get(0);
        let snapshot = TxSnapshot::parse(&text)
            .ok_or_else(|| Error::permanent("backfill chunk", format!("unreadable snapshot {text}")))?;
        self.backfills.snapshot_taken(ticket, snapshot.clone());
        if row.get::<_, u32>(1) != work.plan.filenode {
            return Err(Error::permanent(
                "backfill",
                format!(
                    "{} was rewritten (VACUUM FULL, CLUSTER or a table-rewriting ALTER) during the backfill, \
                     so its planned chunks no longer hold its rows; run the backfill again",
                    work.schema.table
                ),
            ));
        }
        let (start, end) = work.plan.range(chunk);
        let plan = ChunkPlan { filenode: work.plan.filenode, start, after: None, end, last: false };
        let mut reader = ChunkReader::open(&tx, &work.schema, &plan, work.filter.as_deref()).await?;
        let mut waiting: Option<tokio::sync::oneshot::Receiver<Outcome>> = None;
        loop {
            // Held until the piece lands (the source drops it with the rows).
            let permit = self.pieces.clone().acquire_owned().await.expect("the semaphore is never closed");
            let piece = reader.next_piece(self.piece_rows).await?;
            // At most one piece waits to land while the next is read: memory stays flat.
            if let Some(previous) = waiting.take() {
                if landed(previous).await? == Outcome::Redo {
                    return Ok(Outcome::Redo);
                }
            }
            // Sinks that keep up then read the rows from memory instead of from disk.
            self.log.make_room(piece.rows.len(), READER_PATIENCE).await;
            let (reply, receive) = tokio::sync::oneshot::channel();
            let id = format!(
                "{}/{table}/{chunk}/{}-{}",
                self.job,
                std::process::id(),
                PIECES.fetch_add(1, Ordering::Relaxed)
            );
            let complete = piece.complete;
            self.backfills.deposit(
                id.clone(),
                Deposit {
                    job: self.job.clone(),
                    table,
                    chunk,
                    last: complete,
                    snapshot: snapshot.clone(),
                    schema: work.schema.clone(),
                    rows: piece.rows,
                    reply,
                    permit,
                },
            );
            let content = Message::High(id.clone()).encode();
            if let Err(e) =
                self.control.execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&PREFIX, &content]).await
            {
                self.backfills.take_deposit(&id);
                return Err(query_error("backfill watermark", e));
            }
            waiting = Some(receive);
            if complete {
                break;
            }
        }
        drop(reader);
        tx.commit().await.map_err(|e| query_error("backfill chunk", e))?;
        landed(waiting.expect("a chunk has at least one piece")).await
    }
}

async fn landed(receive: tokio::sync::oneshot::Receiver<Outcome>) -> Result<Outcome> {
    receive.await.map_err(|_| Error::retryable("backfill", "the source stopped before the piece landed"))
}

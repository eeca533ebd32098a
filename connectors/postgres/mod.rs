//! PostgreSQL source: logical replication with pgoutput, an initial snapshot from the slot's
//! exported snapshot, and acknowledgement only of what is durable in the log.

pub mod backfill;
mod catalog;
pub mod client;
pub mod copy_binary;
mod decoder;
mod replication;
pub mod snapshot;
mod toast;
pub mod values;

pub use catalog::Catalog;

use crate::config::{PostgresSourceConfig, SnapshotMode};
use crate::connectors::kafka::AckGate;
use crate::error::{Error, Result};
use crate::event::format_lsn;
use crate::log::{EmbeddedLog, WriteBatch};
use crate::runtime::progress::{now_ms, SourceProgress};
use crate::runtime::Shutdown;
use backfill::Backfills;
use decoder::Decoder;
use pg_walstream::LogicalReplicationMessage;
use replication::ReplicationStream;
use snapshot::{ExportedSnapshot, SnapshotProgress, SnapshotTable, PROGRESS_KEY};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A log commit is due after this many events or bytes (or 20 ms), whichever comes first.
const MAX_BATCH_EVENTS: usize = 20_000;
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// How long a clean stop waits for the Kafka publisher to deliver what the source committed,
/// so the slot's last acknowledgement covers it.
const FINAL_DELIVERY_WAIT: Duration = Duration::from_secs(10);

/// The meta key of the last acknowledged (durable) LSN.
pub const ACK_KEY: &str = "pg.ack";

/// A running PostgreSQL source.
pub struct PostgresSource {
    cfg: PostgresSourceConfig,
    pipeline: String,
    log: EmbeddedLog,
    progress: Arc<SourceProgress>,
    /// Backfill jobs, shared with their workers and the status report.
    backfills: Arc<Backfills>,
    shutdown: Shutdown,
    /// With the Kafka transport: positions are acknowledged only once delivered to Kafka.
    gate: Option<AckGate>,
}

impl PostgresSource {
    pub fn new(
        cfg: PostgresSourceConfig,
        pipeline: &str,
        log: EmbeddedLog,
        progress: Arc<SourceProgress>,
        backfills: Arc<Backfills>,
        shutdown: Shutdown,
    ) -> Self {
        Self { cfg, pipeline: pipeline.to_string(), log, progress, backfills, shutdown, gate: None }
    }

    /// Acknowledges positions to the server only as `gate` releases them (the Kafka transport's
    /// delivery watermark) instead of as soon as they are durable in the local log.
    pub fn with_ack_gate(mut self, gate: AckGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Checks the tables and prepares the publication: configuration errors surface here,
    /// before anything is streamed.
    pub async fn prepare(&self) -> Result<Catalog> {
        let client = client::connect(&self.cfg.conn, &format!("sluice {}", self.pipeline)).await?;
        let mut catalog = Catalog::new(client);
        let level: String = catalog
            .client()
            .query_one("SHOW wal_level", &[])
            .await
            .map_err(|e| client::query_error("wal_level", e))?
            .get(0);
        if level != "logical" {
            return Err(Error::config(format!(
                "{} has wal_level={level}; logical replication needs wal_level=logical (set it and restart PostgreSQL)",
                self.cfg.conn.display_target()
            )));
        }
        for t in &self.cfg.tables {
            catalog.table(t).await?;
        }
        catalog.ensure_publication(&self.cfg.publication, &self.cfg.tables).await?;
        Ok(catalog)
    }

    /// Runs until shutdown, reconnecting after transient failures; `catalog` is what
    /// [`PostgresSource::prepare`] returned.
    pub async fn run(self, mut catalog: Catalog) -> Result<()> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.run_once(&mut catalog).await {
                Ok(()) => return Ok(()),
                // Another process streams from the slot: stand by, and take over once it lets go
                // (a second member of a Kafka-transport pipeline).
                Err(e) if e.is_retryable() && e.to_string().contains("is active for PID") => {
                    tracing::info!(slot = %self.cfg.slot, "the slot is held by another process; standing by");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = self.shutdown.requested() => return Ok(()),
                    }
                }
                Err(e) if e.is_retryable() && !self.shutdown.is_requested() => {
                    metrics::counter!("sluice_retries_total", "stage" => "source").increment(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "source interrupted; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.requested() => return Ok(()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                    catalog = match self.prepare().await {
                        Ok(c) => c,
                        Err(e) if e.is_retryable() || matches!(e, Error::Config(_)) => {
                            tracing::warn!(error = %e, "reconnect failed");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_once(&self, catalog: &mut Catalog) -> Result<()> {
        let slot_lsn = catalog.slot_position(&self.cfg.slot).await?;
        let stored_ack = self.log.meta(ACK_KEY).await?.map(|v| postcard::from_bytes::<u64>(&v)).transpose()?;
        let mut progress: Option<SnapshotProgress> =
            self.log.meta(PROGRESS_KEY).await?.map(|v| postcard::from_bytes(&v)).transpose()?;
        if slot_lsn.is_none() && (stored_ack.is_some() || progress.is_some()) {
            return Err(Error::config(format!(
                "replication slot {} is gone but {} holds this pipeline's progress: changes made since may be lost. \
                 Remove the data directory to start over with a new snapshot",
                self.cfg.slot,
                self.log.dir().display()
            )));
        }
        self.log.clear_staging().await?;
        let cancel = self.shutdown.token().child_token();
        let mut stream =
            ReplicationStream::connect(&self.cfg.conn, &self.cfg.slot, &self.cfg.publication, false, cancel.clone())
                .await?;
        let exported = if slot_lsn.is_none() {
            let name = stream.create_slot().await?;
            tracing::info!(slot = %self.cfg.slot, "created replication slot");
            name
        } else {
            None
        };
        // With Kafka, a member with no local state that finds the slot adopts it: another
        // member captured before it, and the slot's position covers only what reached Kafka.
        let adopted = self.gate.is_some() && slot_lsn.is_some() && stored_ack.is_none() && progress.is_none();
        if adopted {
            tracing::debug!(slot = %self.cfg.slot, "adopting the slot of another member; streaming from its position");
        }
        if self.cfg.snapshot == SnapshotMode::Initial && !adopted {
            let p = progress.get_or_insert_with(SnapshotProgress::default);
            let added = p.configure(&self.cfg.tables);
            if slot_lsn.is_some() && !added.is_empty() {
                let names: Vec<String> = added.iter().map(|t| t.to_string()).collect();
                tracing::info!(tables = %names.join(", "), "tables added to the pipeline; reading them at a new snapshot");
            }
        }
        if self.cfg.snapshot == SnapshotMode::Initial && progress.as_ref().is_some_and(|p| !p.done()) {
            let p = progress.as_mut().expect("checked above");
            let mut client = client::connect(&self.cfg.conn, "sluice snapshot").await?;
            match exported {
                Some(name) => {
                    let lsn = catalog.slot_position(&self.cfg.slot).await?.unwrap_or(0);
                    tracing::info!(at = %format_lsn(lsn), "initial snapshot");
                    self.snapshot(catalog, &mut client, &ExportedSnapshot { name, lsn }, p).await?;
                }
                None => {
                    // Resuming: the original exported snapshot died with its session. A
                    // temporary slot exports a new one; its rows sit at its own LSN.
                    let tmp_slot = format!("{}_resume_{}", self.cfg.slot, std::process::id());
                    let mut tmp = ReplicationStream::connect(
                        &self.cfg.conn,
                        &tmp_slot,
                        &self.cfg.publication,
                        true,
                        CancellationToken::new(),
                    )
                    .await?;
                    let name = tmp
                        .create_slot()
                        .await?
                        .ok_or_else(|| Error::permanent("snapshot resume", "no snapshot exported"))?;
                    let lsn = catalog.slot_position(&tmp_slot).await?.unwrap_or(0);
                    tracing::info!(at = %format_lsn(lsn), "resuming snapshot");
                    self.snapshot(catalog, &mut client, &ExportedSnapshot { name, lsn }, p).await?;
                    drop(tmp);
                }
            }
            if self.shutdown.is_requested() {
                return Ok(());
            }
        } else if let Some(name) = exported {
            tracing::debug!(snapshot = %name, "snapshot: never; exported snapshot unused");
        }
        if !self.progress.snapshot_done.swap(true, Ordering::AcqRel) {
            self.progress.last_data_ms.store(now_ms(), Ordering::Release);
        }
        let book = self.log.meta(backfill::BOOK_KEY).await?.map(|v| postcard::from_bytes(&v)).transpose()?;
        self.backfills.reload(book.unwrap_or_default());
        stream.start(stored_ack.unwrap_or(0)).await?;
        let acked = stored_ack.or(slot_lsn).unwrap_or(0);
        self.progress.acked_lsn.fetch_max(acked, Ordering::AcqRel);
        tracing::info!(slot = %self.cfg.slot, from = %format_lsn(acked), "streaming changes");
        self.stream(catalog, stream, cancel).await
    }

    async fn snapshot(
        &self,
        catalog: &mut Catalog,
        client: &mut tokio_postgres::Client,
        exported: &ExportedSnapshot,
        progress: &mut SnapshotProgress,
    ) -> Result<()> {
        let mut registry = crate::log::SchemaRegistry::load(&self.log).await?;
        let mut tables = Vec::new();
        for t in &self.cfg.tables {
            let info = catalog.table(t).await?;
            let mut batch = WriteBatch::new();
            let (id, schema) = registry.intern(info.schema, &mut batch);
            if !batch.is_empty() {
                self.log.commit(batch).await?;
            }
            tables.push(SnapshotTable { schema, schema_id: id, oid: info.oid });
        }
        snapshot::run(client, exported, &tables, progress, &self.log, self.cfg.snapshot_chunk_rows, &self.shutdown)
            .await
    }

    /// Decodes the stream into the log until shutdown.
    async fn stream(
        &self,
        catalog: &mut Catalog,
        mut stream: ReplicationStream,
        cancel: CancellationToken,
    ) -> Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let feedback = stream.feedback();
        // The reader owns the connection; dropping its future mid-read would corrupt the stream,
        // so it stops only through the cancellation token.
        // The last status update waits until the final acknowledgement is known (with Kafka,
        // once the publisher has delivered what was committed).
        let (final_ack, final_ack_known) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                }
            }
            drop(tx);
            let _ = final_ack_known.await;
            let _ = stream.flush_feedback().await;
        });
        let heartbeat = tokio::spawn(heartbeat(
            self.cfg.conn.clone(),
            self.pipeline.clone(),
            self.cfg.heartbeat,
            self.progress.clone(),
            cancel.clone(),
        ));
        let backfills = tokio::spawn(backfill::manage(
            self.backfills.clone(),
            self.cfg.conn.clone(),
            self.log.clone(),
            cancel.clone(),
        ));
        let forwarder = self
            .gate
            .clone()
            .map(|gate| tokio::spawn(forward_acks(gate, feedback.clone(), self.progress.clone(), cancel.clone())));
        let mut decoder = Decoder::new(
            &self.pipeline,
            &self.cfg.tables,
            crate::log::SchemaRegistry::load(&self.log).await?,
            self.backfills.clone(),
        );
        let result = async {
            let mut batch = WriteBatch::new();
            let mut batch_deadline: Option<tokio::time::Instant> = None;
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    _ = sleep_until(batch_deadline) => {
                        self.flush(&mut decoder, &mut batch, &feedback).await?;
                        batch_deadline = None;
                        continue;
                    }
                };
                let Some(msg) = msg else { break };
                let msg = msg?;
                let ends_transaction = matches!(
                    msg.message,
                    LogicalReplicationMessage::Commit { .. } | LogicalReplicationMessage::StreamCommit { .. }
                );
                decoder.handle(msg, &mut batch, catalog, &self.log, &self.progress).await?;
                // A log that defers fsync commits in well under a millisecond: a transaction
                // goes on as soon as nothing else is queued behind it. (Behind, the queue is
                // never empty and batches grow up to their bounds.)
                let caught_up = ends_transaction && self.log.deferred() && rx.is_empty();
                if caught_up || batch.len() >= MAX_BATCH_EVENTS || batch.bytes() >= MAX_BATCH_BYTES {
                    self.flush(&mut decoder, &mut batch, &feedback).await?;
                    batch_deadline = None;
                } else if batch_deadline.is_none() && (!batch.is_empty() || decoder.ack_pending()) {
                    batch_deadline = Some(tokio::time::Instant::now() + Duration::from_millis(20));
                }
            }
            self.flush(&mut decoder, &mut batch, &feedback).await
        }
        .await;
        cancel.cancel();
        if let (Ok(()), Some(gate)) = (&result, &self.gate) {
            // The periodic checkpoints have stopped; this one lets the last commits through.
            match self.log.checkpoint().await {
                Ok(durable) => gate.durable(durable),
                Err(e) => tracing::warn!(error = %e, "final log checkpoint failed; the slot keeps the last changes"),
            }
            let lsn = gate.settled(FINAL_DELIVERY_WAIT).await;
            if lsn > 0 {
                acknowledge(&feedback, &self.progress, lsn);
            }
        }
        let _ = final_ack.send(());
        let _ = reader.await;
        if let Some(f) = forwarder {
            let _ = f.await;
        }
        let _ = heartbeat.await;
        let _ = backfills.await;
        result
    }

    async fn flush(
        &self,
        decoder: &mut Decoder,
        batch: &mut WriteBatch,
        feedback: &replication::Feedback,
    ) -> Result<()> {
        let ack = decoder.take_ack();
        let book = self.backfills.take_dirty();
        if batch.is_empty() && ack.is_none() && book.is_none() {
            return Ok(());
        }
        let mut full = std::mem::take(batch);
        if let Some(book) = book {
            full.put_meta(backfill::BOOK_KEY, book);
        }
        if let Some(lsn) = ack {
            full.put_meta(ACK_KEY, postcard::to_allocvec(&lsn)?);
        }
        let started = std::time::Instant::now();
        let events = full.len();
        let head = self.log.commit(full).await?;
        metrics::histogram!("sluice_log_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("sluice_events_in_total").increment(events as u64);
        decoder.batch_committed();
        match (ack, &self.gate) {
            (Some(lsn), Some(gate)) => gate.committed(head, lsn),
            (Some(lsn), None) => acknowledge(feedback, &self.progress, lsn),
            (None, _) => {}
        }
        Ok(())
    }
}

/// Tells the server (with the next status update) and the status report that `lsn` is durable.
fn acknowledge(feedback: &replication::Feedback, progress: &SourceProgress, lsn: u64) {
    feedback.acknowledge(lsn);
    progress.acked_lsn.fetch_max(lsn, Ordering::AcqRel);
}

/// Acknowledges what the gate releases, until cancelled.
async fn forward_acks(
    gate: AckGate,
    feedback: replication::Feedback,
    progress: Arc<SourceProgress>,
    cancel: CancellationToken,
) {
    let mut released = gate.subscribe();
    loop {
        let lsn = *released.borrow_and_update();
        if lsn > 0 {
            acknowledge(&feedback, &progress, lsn);
        }
        tokio::select! {
            changed = released.changed() => if changed.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The prefix of heartbeat messages written into the WAL.
pub const HEARTBEAT_PREFIX: &str = "sluice.heartbeat";

/// Writes a non-transactional logical message every `every`, so the stream delivers a
/// position to acknowledge even when no captured table changes, and measures slot lag.
async fn heartbeat(
    conn: crate::config::PgConnection,
    pipeline: String,
    every: Duration,
    progress: Arc<SourceProgress>,
    cancel: CancellationToken,
) {
    let mut client = None;
    // The first tick is immediate: a caught-up stream is known at once (`--until-idle` after a
    // snapshot need not wait a whole interval).
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = progress.heartbeat_now.notified() => {}
            _ = cancel.cancelled() => return,
        }
        if client.is_none() {
            client = client::connect(&conn, "sluice heartbeat").await.ok();
        }
        let Some(c) = &client else { continue };
        let content = format!("{pipeline}:{}", now_ms());
        let sql = "SELECT pg_logical_emit_message(false, $1, $2::text)::text, pg_current_wal_lsn()::text";
        match c.query_one(sql, &[&HEARTBEAT_PREFIX, &content]).await {
            Ok(row) => {
                if let Some(lsn) = crate::event::parse_lsn(row.get(1)) {
                    progress.server_lsn.store(lsn, Ordering::Release);
                    let lag = lsn.saturating_sub(progress.acked_lsn.load(Ordering::Acquire));
                    metrics::gauge!("sluice_source_lag_bytes").set(lag as f64);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat failed; reconnecting");
                client = None;
            }
        }
    }
}

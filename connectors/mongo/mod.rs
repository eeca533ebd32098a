//! MongoDB source: one change stream per collection, a snapshot that starts after the stream's
//! resume point is recorded, and resume tokens committed in the same log commit as the changes
//! they follow, so a crash at any point resumes exactly after the last landed change.
//!
//! One stream per collection rather than one for the database: it works on servers without
//! database-level streams, and a collection whose resume point is lost can be read again alone.

mod change;
pub mod document;
mod snapshot;
mod state;
mod stream;

use crate::config::{MongoSourceConfig, SnapshotMode};
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, TableId, TableSchema};
use crate::log::{EmbeddedLog, SchemaRegistry, WriteBatch};
use crate::runtime::progress::{now_ms, SourceProgress};
use crate::runtime::Shutdown;
use change::{Change, ChangeKind};
use document::JsonWriter;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::ErrorKind;
use state::{state_key, time_value, CollectionState, PositionClock, SnapshotState, CLOCK_KEY};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stream::{Item, StreamOptions};

/// A log commit is due after this many events (or 20 ms), whichever comes first.
const MAX_BATCH_EVENTS: usize = 10_000;
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// How long the source waits for a server at start before it says it cannot reach one.
const SERVER_SELECTION: Duration = Duration::from_secs(10);
/// Resume tokens that moved while no change came are stored at most this often.
const IDLE_TOKEN_EVERY: Duration = Duration::from_secs(10);

/// A collection being captured, with the schema its events follow.
pub struct Captured {
    pub name: String,
    pub table: TableId,
    pub schema_id: u32,
    pub schema: Arc<TableSchema>,
}

/// What [`MongoSource::prepare`] found: a connected client and the collections to capture.
pub struct Prepared {
    client: mongodb::Client,
    collections: Vec<String>,
}

/// A running MongoDB source.
pub struct MongoSource {
    cfg: MongoSourceConfig,
    log: EmbeddedLog,
    progress: Arc<SourceProgress>,
    shutdown: Shutdown,
}

impl MongoSource {
    pub fn new(cfg: MongoSourceConfig, log: EmbeddedLog, progress: Arc<SourceProgress>, shutdown: Shutdown) -> Self {
        Self { cfg, log, progress, shutdown }
    }

    /// Connects and resolves the collections: an unreachable server or a missing collection
    /// stops the run here, before anything is read.
    pub async fn prepare(&self) -> Result<Prepared> {
        let mut options = mongodb::options::ClientOptions::parse(self.cfg.url.expose())
            .await
            .map_err(|e| Error::config(format!("source.url: {}", redacted(&e, &self.cfg.url))))?;
        options.server_selection_timeout = Some(SERVER_SELECTION);
        options.app_name = Some("sluice".into());
        let client = mongodb::Client::with_options(options).map_err(|e| classify("connect", &self.cfg.display, e))?;
        let db = client.database(&self.cfg.database);
        // At start an unreachable server is a setup problem (exit 2), as for PostgreSQL; later,
        // network trouble is retried.
        db.run_command(doc! { "ping": 1 }).await.map_err(|e| match classify("connect", &self.cfg.display, e) {
            Error::Config(m) => Error::Config(m),
            other => Error::config(format!(
                "cannot connect to {}: {other} (is the server running and reachable?)",
                self.cfg.display
            )),
        })?;
        let mut present =
            db.list_collection_names().await.map_err(|e| classify("list collections", &self.cfg.display, e))?;
        present.retain(|n| !n.starts_with("system."));
        present.sort();
        let collections = match &self.cfg.collections {
            Some(wanted) => {
                for w in wanted {
                    if !present.contains(w) {
                        return Err(Error::config(format!(
                            "collection {}.{w} does not exist on {} (it has: {}); create it or fix the name",
                            self.cfg.database,
                            self.cfg.display,
                            present.join(", ")
                        )));
                    }
                }
                wanted.clone()
            }
            None if present.is_empty() => {
                return Err(Error::config(format!(
                    "database {} on {} has no collections to capture; create them or list `collections`",
                    self.cfg.database, self.cfg.display
                )))
            }
            None => present,
        };
        Ok(Prepared { client, collections })
    }

    /// Runs until shutdown, reconnecting after transient failures.
    pub async fn run(self, prepared: Prepared) -> Result<()> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.run_once(&prepared).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && !self.shutdown.is_requested() => {
                    metrics::counter!("sluice_retries_total", "stage" => "source").increment(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "source interrupted; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.requested() => return Ok(()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run_once(&self, prepared: &Prepared) -> Result<()> {
        let db = prepared.client.database(&self.cfg.database);
        let json = JsonWriter(self.cfg.json);
        let mut registry = SchemaRegistry::load(&self.log).await?;
        let mut batch = WriteBatch::new();
        let mut captured = Vec::new();
        let mut states = Vec::new();
        for name in &prepared.collections {
            let table = TableId::new(&self.cfg.database, name);
            let (schema_id, schema) = registry.intern(document::collection_schema(table.clone()), &mut batch);
            captured.push(Captured { name: name.clone(), table, schema_id, schema });
            let stored = self.log.meta(&state_key(name)).await?;
            states.push(stored.map(|b| CollectionState::decode(&b)).transpose()?.unwrap_or_default());
        }
        if !batch.is_empty() {
            self.log.commit(batch).await?;
        }
        let clock: PositionClock =
            self.log.meta(CLOCK_KEY).await?.map(|b| postcard::from_bytes(&b)).transpose()?.unwrap_or_default();
        let options = StreamOptions::new(&self.cfg);
        for (c, state) in captured.iter().zip(states.iter_mut()) {
            let coll = db.collection::<Document>(&c.name);
            if state.token.is_none() {
                // The stream's resume point is recorded before the scan starts, so every change
                // made during the scan is streamed afterwards.
                let at = server_time(&db).await?.max(clock.snapshot_floor());
                let token = stream::current_token(&coll, &options).await?;
                state.set_token(&token, false)?;
                if self.cfg.snapshot == SnapshotMode::Initial {
                    state.snapshot = Some(SnapshotState { at, after: None, rows: 0 });
                }
                let mut batch = WriteBatch::new();
                batch.put_meta(state_key(&c.name), state.encode()?);
                self.log.commit(batch).await?;
            }
            if state.snapshot.is_some() {
                let chunk = self.cfg.snapshot_chunk_docs;
                snapshot::run(&coll, c, state, chunk, json, &self.log, &self.shutdown).await?;
                if self.shutdown.is_requested() {
                    return Ok(());
                }
            }
        }
        if !self.progress.snapshot_done.swap(true, Ordering::AcqRel) {
            self.progress.last_data_ms.store(now_ms(), Ordering::Release);
        }
        self.stream(&db, &captured, states, clock, json, options).await
    }

    /// Lands every collection's changes until shutdown.
    async fn stream(
        &self,
        db: &mongodb::Database,
        captured: &[Captured],
        mut states: Vec<CollectionState>,
        mut clock: PositionClock,
        json: JsonWriter,
        options: StreamOptions,
    ) -> Result<()> {
        let cancel = self.shutdown.token().child_token();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
        let mut readers = tokio::task::JoinSet::new();
        for (i, (c, state)) in captured.iter().zip(&states).enumerate() {
            let start = state.token()?.map(|t| (t, state.after_invalidate));
            let coll = db.collection::<Document>(&c.name);
            readers.spawn(stream::watch(coll, i, start, options.clone(), tx.clone(), cancel.clone()));
        }
        drop(tx);
        tracing::info!(database = %self.cfg.database, collections = captured.len(), "streaming changes");
        let result = async {
            let mut batch = WriteBatch::new();
            let mut touched = HashSet::new();
            let mut idle = HashSet::new();
            let mut token_moved = false;
            let mut tokens_stored = Instant::now();
            let mut deadline: Option<tokio::time::Instant> = None;
            loop {
                let item = tokio::select! {
                    item = rx.recv() => item,
                    _ = sleep_until(deadline) => {
                        self.flush(&mut batch, &mut touched, captured, &states, &clock).await?;
                        deadline = None;
                        continue;
                    }
                };
                let Some(item) = item else { break };
                match item? {
                    Item::Change(i, change) => {
                        idle.clear();
                        self.apply(*change, &captured[i], &mut states[i], &mut clock, json, &mut batch)?;
                        touched.insert(i);
                    }
                    Item::Idle(i, token) => {
                        if let Some(t) = token {
                            if states[i].token()?.as_ref() != Some(&t) {
                                states[i].set_token(&t, false)?;
                                token_moved = true;
                            }
                        }
                        idle.insert(i);
                        if idle.len() == captured.len() {
                            // Every stream has come back empty since the last change: caught up.
                            self.progress.heartbeat_seen_ms.store(now_ms(), Ordering::Release);
                        }
                        if token_moved && tokens_stored.elapsed() >= IDLE_TOKEN_EVERY {
                            touched.extend(0..captured.len());
                            token_moved = false;
                            tokens_stored = Instant::now();
                            self.flush(&mut batch, &mut touched, captured, &states, &clock).await?;
                        }
                    }
                    Item::HistoryLost(i, message) => {
                        self.flush(&mut batch, &mut touched, captured, &states, &clock).await?;
                        return self.history_lost(&captured[i], &mut states[i], message).await;
                    }
                }
                if batch.len() >= MAX_BATCH_EVENTS || batch.bytes() >= MAX_BATCH_BYTES {
                    self.flush(&mut batch, &mut touched, captured, &states, &clock).await?;
                    deadline = None;
                } else if deadline.is_none() && !touched.is_empty() {
                    deadline = Some(tokio::time::Instant::now() + Duration::from_millis(20));
                }
            }
            self.flush(&mut batch, &mut touched, captured, &states, &clock).await
        }
        .await;
        cancel.cancel();
        while readers.join_next().await.is_some() {}
        result
    }

    /// Turns one change into log events in `batch`, moving the collection's resume token.
    fn apply(
        &self,
        change: Change,
        captured: &Captured,
        state: &mut CollectionState,
        clock: &mut PositionClock,
        json: JsonWriter,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        state.set_token(&change.token, change.kind == ChangeKind::Invalidate)?;
        let time = change.cluster_time.map(time_value).unwrap_or_else(|| clock.last.map(|(t, _)| t).unwrap_or(0));
        let commit_ts_us = match change.wall_ms {
            Some(ms) => ms * 1000,
            None => ((time >> 32) as i64) * 1_000_000,
        };
        let (op, key, before, after) = match change.kind {
            ChangeKind::Document { op, id, after, before, update } => {
                let after = (op != Op::Delete).then(|| json.row(&id, after, update));
                let before = before.map(|b| json.row(&id, Some(b), None));
                (op, vec![json.key(id)], before, after)
            }
            ChangeKind::Dropped => (Op::Truncate, Vec::new(), None, None),
            ChangeKind::Renamed { to } => {
                tracing::warn!(collection = %captured.table, to = %to, "collection renamed; its documents left the captured name");
                (Op::Truncate, Vec::new(), None, None)
            }
            ChangeKind::Invalidate | ChangeKind::Other(_) => return Ok(()),
        };
        batch.uses_schema(captured.schema_id, &captured.schema);
        batch.append(ChangeEvent {
            table: captured.table.clone(),
            schema_id: captured.schema_id,
            op,
            key,
            before,
            after,
            position: clock.next_position(time),
            commit_ts_us,
            tx_id: change.txn.map(|n| n as u64),
            toast_fetched: false,
            snapshot_last: false,
            origin: None,
        });
        self.progress.last_data_ms.store(now_ms(), Ordering::Release);
        self.progress.last_commit_us.store(commit_ts_us.max(0) as u64, Ordering::Release);
        self.progress.events.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Commits the batch with the resume tokens and positions of the collections it touched.
    async fn flush(
        &self,
        batch: &mut WriteBatch,
        touched: &mut HashSet<usize>,
        captured: &[Captured],
        states: &[CollectionState],
        clock: &PositionClock,
    ) -> Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        let mut full = std::mem::take(batch);
        for i in touched.drain() {
            full.put_meta(state_key(&captured[i].name), states[i].encode()?);
        }
        full.put_meta(CLOCK_KEY, postcard::to_allocvec(clock)?);
        let started = Instant::now();
        let events = full.len();
        self.log.commit(full).await?;
        metrics::histogram!("sluice_log_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("sluice_events_in_total").increment(events as u64);
        if let Some((t, _)) = clock.last {
            self.progress.acked_lsn.fetch_max(t, Ordering::AcqRel);
            let lag = (now_ms() as f64 / 1000.0) - (t >> 32) as f64;
            metrics::gauge!("sluice_source_lag_seconds").set(lag.max(0.0));
        }
        Ok(())
    }

    /// The stored resume point left the oplog: stop, or read the collection again.
    async fn history_lost(&self, captured: &Captured, state: &mut CollectionState, message: String) -> Result<()> {
        match self.cfg.on_history_lost {
            crate::config::HistoryLost::Fail => Err(Error::config(format!(
                "collection {}: the stored resume point is no longer in the oplog ({message}); changes made \
                 since are lost to the stream. Set `on_history_lost: resnapshot` to read the collection again, \
                 or grow the oplog so a stopped pipeline can catch up",
                captured.table
            ))),
            crate::config::HistoryLost::Resnapshot => {
                tracing::warn!(collection = %captured.table, reason = %message, "resume point lost; reading the collection again");
                *state = CollectionState::default();
                let mut batch = WriteBatch::new();
                batch.put_meta(state_key(&captured.name), state.encode()?);
                self.log.commit(batch).await?;
                Err(Error::retryable("source", format!("{}: resume point lost; re-reading", captured.table)))
            }
        }
    }
}

/// The server's time now, as an ordered cluster-time value: the operation time a replica set
/// reports, else the server's clock (servers without cluster times).
async fn server_time(db: &mongodb::Database) -> Result<u64> {
    let reply = db.run_command(doc! { "hello": 1 }).await.map_err(|e| classify("hello", db.name(), e))?;
    if let Ok(t) = reply.get_timestamp("operationTime") {
        return Ok(time_value(t));
    }
    if let Some(Bson::Timestamp(t)) = reply.get_document("$clusterTime").ok().and_then(|c| c.get("clusterTime")) {
        return Ok(time_value(*t));
    }
    let ms = reply.get_datetime("localTime").map(|d| d.timestamp_millis()).unwrap_or(now_ms() as i64);
    Ok(((ms / 1000) as u64) << 32)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Codes of `ChangeStreamHistoryLost` and of the older "resume point may no longer be in the
/// oplog" failure.
const HISTORY_LOST: [i32; 2] = [286, 280];
/// Codes the server gives for wrong credentials or missing privileges.
const NOT_ALLOWED: [i32; 3] = [13, 18, 8000];

/// Whether the server says the resume point is gone from the oplog.
fn is_history_lost(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Command(c) if HISTORY_LOST.contains(&c.code))
}

/// A driver error with its retry class: network trouble is retried, refusals are not.
fn classify(what: &str, target: &str, e: mongodb::error::Error) -> Error {
    match &*e.kind {
        ErrorKind::Authentication { message, .. } => Error::config(format!(
            "{what} {target}: authentication failed: {message}; check the URL's user and password"
        )),
        ErrorKind::Command(c) if NOT_ALLOWED.contains(&c.code) => Error::config(format!(
            "{what} {target}: {} ({}): the user lacks the privilege (changeStream and find on the collections)",
            c.message, c.code_name
        )),
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. } => {
            Error::retryable(format!("{what} {target}"), &e)
        }
        _ if e.contains_label("ResumableChangeStreamError") || e.contains_label("RetryableWriteError") => {
            Error::retryable(format!("{what} {target}"), &e)
        }
        _ => Error::permanent(format!("{what} {target}"), &e),
    }
}

/// A driver error for a collection.
pub(crate) fn error(what: &str, table: &TableId, e: mongodb::error::Error) -> Error {
    classify(what, &table.to_string(), e)
}

/// A URL parse error without the URL's password in it.
fn redacted(e: &mongodb::error::Error, url: &crate::config::Secret) -> String {
    let text = e.to_string();
    match url.expose().split_once("://").and_then(|(_, rest)| rest.split_once('@')).map(|(cred, _)| cred) {
        Some(cred) if !cred.is_empty() => text.replace(cred, "***"),
        _ => text,
    }
}

/// How many rows a stored collection state's running snapshot has landed (`None`: none
/// running), for tests and tools that read a stopped pipeline's log.
pub fn snapshot_rows(stored: &[u8]) -> Option<u64> {
    CollectionState::decode(stored).ok()?.snapshot.map(|s| s.rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::error::CommandError;

    fn command_error(code: i32, name: &str) -> mongodb::error::Error {
        let e: CommandError =
            mongodb::bson::from_document(doc! { "code": code, "codeName": name, "errmsg": "server says" }).unwrap();
        mongodb::error::Error::from(ErrorKind::Command(e))
    }

    #[test]
    fn a_lost_resume_point_is_recognised_by_its_codes() {
        assert!(is_history_lost(&command_error(286, "ChangeStreamHistoryLost")));
        assert!(is_history_lost(&command_error(280, "ChangeStreamFatalError")));
        assert!(!is_history_lost(&command_error(11600, "InterruptedAtShutdown")));
    }

    #[test]
    fn refusals_are_config_errors_and_network_trouble_is_retried() {
        let denied = classify("watch", "shop.orders", command_error(13, "Unauthorized"));
        assert!(matches!(&denied, Error::Config(m) if m.contains("lacks the privilege")), "{denied}");
        let io = mongodb::error::Error::from(ErrorKind::Io(Arc::new(std::io::Error::other("reset"))));
        assert!(classify("watch", "shop.orders", io).is_retryable());
        assert!(!classify("watch", "shop.orders", command_error(2, "BadValue")).is_retryable());
    }

    #[tokio::test]
    async fn a_url_error_never_shows_the_password() {
        let url = crate::config::Secret::new("mongodb://sync:hunter2@h:notaport/");
        let e = mongodb::options::ClientOptions::parse(url.expose()).await.unwrap_err();
        let shown = redacted(&e, &url);
        assert!(!shown.is_empty() && !shown.contains("hunter2"), "{shown}");
    }
}

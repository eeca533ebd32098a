//! Connects the schedules of a pipeline to its source: checks their `where` clauses before
//! anything starts, and turns each due slot into a backfill request.

use super::schedule::{self, Fire, WallClock};
use super::Shutdown;
use crate::config::{BackfillSchedule, PostgresSourceConfig};
use crate::connectors::postgres::backfill::{request, BackfillRequest, Backfills};
use crate::connectors::postgres::client;
use crate::error::{Error, Result};
use crate::log::{EmbeddedLog, WriteBatch};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres::Client;

/// The log metadata key of when each schedule was first armed: a slot after it that was
/// missed while the process was down still runs.
const ARMED_KEY: &str = "backfill.armed";

/// Checks every schedule's `where` clause on every table against the database.
pub async fn check(file: &Path, schedules: &[BackfillSchedule], client: &Client) -> Result<()> {
    for s in schedules {
        let Some(filter) = &s.filter else { continue };
        for table in &s.tables {
            match request::check_conditions(client, &s.name, table, std::slice::from_ref(filter)).await {
                Ok(()) => {}
                Err(Error::Config(m)) => {
                    let at = s.filter_at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default();
                    return Err(Error::config(format!("{}{at}: {m}", file.display())));
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Runs the schedules until `shutdown`: each due slot becomes a request the source sees in
/// its stream.
pub async fn run(
    pipeline: String,
    schedules: Vec<BackfillSchedule>,
    source: PostgresSourceConfig,
    log: EmbeddedLog,
    backfills: Arc<Backfills>,
    shutdown: Shutdown,
) -> Result<()> {
    tokio::select! {
        _ = backfills.loaded() => {}
        _ = shutdown.requested() => return Ok(()),
    }
    let now = Utc::now();
    let mut armed: BTreeMap<String, i64> =
        log.meta(ARMED_KEY).await?.map(|v| postcard::from_bytes(&v)).transpose()?.unwrap_or_default();
    if schedules.iter().any(|s| !armed.contains_key(&s.name)) {
        for s in &schedules {
            armed.entry(s.name.clone()).or_insert(now.timestamp_millis());
        }
        let mut batch = WriteBatch::new();
        batch.put_meta(ARMED_KEY, postcard::to_allocvec(&armed)?);
        log.commit(batch).await?;
    }
    let book = backfills.book();
    let since: HashMap<String, DateTime<Utc>> = schedules
        .iter()
        .map(|s| {
            let ran = book.marks.get(&s.name).and_then(|m| m.slot_ms);
            let ms = ran.unwrap_or(0).max(armed[&s.name]);
            (s.name.clone(), Utc.timestamp_millis_opt(ms).single().unwrap_or(now))
        })
        .collect();
    let (fire, mut fires) = tokio::sync::mpsc::channel(16);
    let watching = backfills.clone();
    let scheduler = tokio::spawn(schedule::run(
        schedules.clone(),
        since,
        WallClock::system(),
        move |name| watching.is_running(name),
        fire,
        shutdown.clone(),
    ));
    while let Some(Fire { name, slot }) = fires.recv().await {
        let Some(s) = schedules.iter().find(|s| s.name == name) else { continue };
        let request = BackfillRequest {
            id: uuid::Uuid::new_v4().to_string(),
            pipeline: pipeline.clone(),
            name: name.clone(),
            tables: s.tables.clone(),
            filter: s.filter.clone(),
            cursor: s.cursor.clone(),
            cursor_after: backfills.book().marks.get(&name).map(|m| m.cursors.clone()).unwrap_or_default(),
            slot_ms: Some(slot.timestamp_millis()),
            parallelism: s.parallelism,
            chunk_rows: s.chunk_rows,
        };
        let sent = async {
            let client = client::connect(&source.conn, "sluice backfill schedule").await?;
            request::emit(&client, &request).await
        };
        // Not stored as run: the next start makes the slot up.
        if let Err(e) = sent.await {
            tracing::error!(backfill = %name, slot = %slot, error = %e, "cannot start the scheduled backfill");
        }
    }
    let _ = scheduler.await;
    Ok(())
}

//! The status file the running process keeps current, and what `sluice status` reads.

use super::progress::{now_ms, SinkStatus, SourceProgress, StatusReport};
use super::Shutdown;
use crate::connectors::postgres::backfill::{BackfillStatus, Backfills};
use crate::event::format_lsn;
use crate::log::EmbeddedLog;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const STATUS_FILE: &str = "status.json";

pub struct Reporter {
    pipeline: String,
    log: EmbeddedLog,
    source: Arc<SourceProgress>,
    sinks: Vec<Arc<Mutex<SinkStatus>>>,
    backfills: Arc<Backfills>,
}

/// How often a running backfill's progress is logged.
const BACKFILL_LOG_EVERY: Duration = Duration::from_secs(5);

impl Reporter {
    pub fn new(
        pipeline: String,
        log: EmbeddedLog,
        source: Arc<SourceProgress>,
        sinks: Vec<Arc<Mutex<SinkStatus>>>,
        backfills: Arc<Backfills>,
    ) -> Self {
        Self { pipeline, log, source, sinks, backfills }
    }

    /// Rewrites the status file every second, and once more at shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        let mut last = (now_ms(), self.source.events.load(Ordering::Relaxed));
        let mut logged = std::time::Instant::now();
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                _ = shutdown.requested() => true,
            };
            let report = self.report(&mut last).await;
            if logged.elapsed() >= BACKFILL_LOG_EVERY {
                logged = std::time::Instant::now();
                log_backfills(&report.backfills);
            }
            if let Err(e) = write_status(self.log.dir(), &report) {
                tracing::debug!(error = %e, "cannot write status file");
            }
            if stop {
                return;
            }
        }
    }

    async fn report(&self, last: &mut (u64, u64)) -> StatusReport {
        let s = &self.source;
        let now = now_ms();
        let events = s.events.load(Ordering::Relaxed);
        let rate = (events - last.1) as f64 / ((now - last.0).max(1) as f64 / 1000.0);
        *last = (now, events);
        let acked = s.acked_lsn.load(Ordering::Acquire);
        let server = s.server_lsn.load(Ordering::Acquire);
        let quiet = s.heartbeat_seen_ms.load(Ordering::Acquire) > s.last_data_ms.load(Ordering::Acquire);
        let last_commit_us = s.last_commit_us.load(Ordering::Acquire);
        let lag_seconds = if quiet || last_commit_us == 0 {
            0.0
        } else {
            (now as f64 / 1000.0 - last_commit_us as f64 / 1e6).max(0.0)
        };
        metrics::gauge!("sluice_source_lag_seconds").set(lag_seconds);
        metrics::gauge!("sluice_log_head").set(self.log.head() as f64);
        StatusReport {
            pipeline: self.pipeline.clone(),
            pid: std::process::id(),
            updated_ms: now,
            acked_lsn: format_lsn(acked),
            server_lsn: format_lsn(server),
            slot_lag_bytes: server.saturating_sub(acked),
            lag_seconds,
            events_total: events,
            events_per_second: rate,
            last_data_ms: s.last_data_ms.load(Ordering::Acquire),
            snapshot_done: s.snapshot_done.load(Ordering::Acquire),
            toast_fetched: s.toast_fetched.load(Ordering::Relaxed),
            log_head: self.log.head(),
            log_tail: self.log.tail().await.ok().flatten(),
            sinks: self.sinks.iter().map(|x| x.lock().expect("status lock").clone()).collect(),
            backfills: self.backfill_metrics(),
        }
    }

    fn backfill_metrics(&self) -> Vec<BackfillStatus> {
        let jobs = self.backfills.status();
        for j in &jobs {
            let labels = [("job", j.id.clone()), ("name", j.name.clone())];
            metrics::gauge!("sluice_backfill_rows", &labels).set(j.rows as f64);
            metrics::gauge!("sluice_backfill_blocks_done", &labels).set(j.blocks_done as f64);
            metrics::gauge!("sluice_backfill_blocks_total", &labels).set(j.blocks_total as f64);
            metrics::gauge!("sluice_backfill_running", &labels).set(f64::from(u8::from(j.state == "running")));
        }
        jobs
    }
}

/// One structured progress event per running backfill.
fn log_backfills(jobs: &[BackfillStatus]) {
    let now = now_ms();
    for j in jobs.iter().filter(|j| j.state == "running") {
        let secs = now.saturating_sub(j.started_ms) as f64 / 1000.0;
        let done = j.blocks_done as f64 / j.blocks_total.max(1) as f64;
        let eta_s = (done > 0.0).then(|| secs * (1.0 - done) / done).map(|s| s.round() as u64);
        tracing::info!(
            job = %j.id,
            name = %j.name,
            rows = j.rows,
            rows_per_s = (j.rows as f64 / secs.max(0.001)).round() as u64,
            percent = (done * 1000.0).round() / 10.0,
            eta_s,
            "backfill progress"
        );
    }
}

fn write_status(dir: &Path, report: &StatusReport) -> std::io::Result<()> {
    let tmp = dir.join(".status.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, dir.join(STATUS_FILE))
}

/// The last status the pipeline's process wrote, if it ever ran.
pub fn read_status(dir: &Path) -> Option<StatusReport> {
    let raw = std::fs::read(dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&raw).ok()
}

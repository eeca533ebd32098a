//! Live progress shared between the source, the sinks, the status file and `--until-idle`.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Counters the source updates as it goes.
#[derive(Default)]
pub struct SourceProgress {
    /// Highest LSN acknowledged to the server (everything below is durable in the log).
    pub acked_lsn: AtomicU64,
    /// Server's WAL position at the last lag check.
    pub server_lsn: AtomicU64,
    /// Commit time (µs) of the newest change appended.
    pub last_commit_us: AtomicU64,
    /// When the newest data change was appended (ms).
    pub last_data_ms: AtomicU64,
    /// Emission time (ms) of the newest own heartbeat seen in the stream: everything the
    /// server had before that moment has been received.
    pub heartbeat_seen_ms: AtomicU64,
    pub events: AtomicU64,
    pub snapshot_done: AtomicBool,
    pub toast_fetched: AtomicU64,
    /// Asks the heartbeat task for a heartbeat now, rather than at its next interval.
    pub heartbeat_now: tokio::sync::Notify,
}

impl SourceProgress {
    /// Caught up and quiet: no data for `idle_ms`, and a heartbeat emitted after the last
    /// data came back through the stream.
    pub fn idle_for(&self, idle_ms: u64) -> bool {
        let last = self.last_data_ms.load(Ordering::Acquire);
        let seen = self.heartbeat_seen_ms.load(Ordering::Acquire);
        self.snapshot_done.load(Ordering::Acquire) && seen > last && now_ms().saturating_sub(last) >= idle_ms
    }

    /// No data for `idle_ms`, but no heartbeat emitted since the last data has come back yet:
    /// one is needed to prove the stream caught up.
    pub fn needs_heartbeat(&self, idle_ms: u64) -> bool {
        let last = self.last_data_ms.load(Ordering::Acquire);
        let seen = self.heartbeat_seen_ms.load(Ordering::Acquire);
        self.snapshot_done.load(Ordering::Acquire) && seen <= last && now_ms().saturating_sub(last) >= idle_ms
    }
}

/// What `sluice status` shows; written by the running process to `status.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub pipeline: String,
    pub pid: u32,
    pub updated_ms: u64,
    pub acked_lsn: String,
    pub server_lsn: String,
    pub slot_lag_bytes: u64,
    pub lag_seconds: f64,
    pub events_total: u64,
    pub events_per_second: f64,
    /// When the newest data change was appended to the log (ms since the epoch).
    pub last_data_ms: u64,
    pub snapshot_done: bool,
    pub toast_fetched: u64,
    pub log_head: u64,
    pub log_tail: Option<u64>,
    pub sinks: Vec<SinkStatus>,
    /// Backfill jobs, running and recently finished.
    #[serde(default)]
    pub backfills: Vec<crate::connectors::postgres::backfill::BackfillStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SinkStatus {
    pub name: String,
    pub cursor: u64,
    pub behind_events: u64,
    pub files_written: u64,
    pub rows_written: u64,
}

//! A destination account's daily request allocation, as the API reports it (Salesforce's
//! `Sforce-Limit-Info`, HubSpot's `X-HubSpot-RateLimit-Daily*`), and the sink's parking when
//! it is exhausted: instead of failing, the sink stops calling the API until the window frees
//! up, and says so in a file `sluice status` reads. The park survives a restart, so a restarted
//! process does not spend the first minutes of a new window hammering a closed one. Sinks
//! writing to one account share its state, so one sink's park holds the others too.

use crate::error::{Error, Result};
use crate::runtime::progress::now_ms;
use crate::runtime::Shutdown;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the account's allocation looked like at the last call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaState {
    /// Requests used in the current window, and the window's allocation.
    pub used: u64,
    pub max: u64,
    /// When the usage was read (ms since the epoch), and an earlier reading to rate it by.
    pub updated_ms: u64,
    pub earlier: Option<(u64, u64)>,
    /// No call before this time (ms since the epoch): the allocation is exhausted.
    pub parked_until_ms: Option<u64>,
    pub parked_reason: Option<String>,
}

impl QuotaState {
    /// When the allocation runs out at the rate of the last readings (ms since the epoch).
    pub fn runs_out_ms(&self) -> Option<u64> {
        let (t0, used0) = self.earlier?;
        let (dt, du) = (self.updated_ms.checked_sub(t0)?, self.used.checked_sub(used0)?);
        if dt == 0 || du == 0 {
            return None;
        }
        let left = self.max.saturating_sub(self.used);
        Some(self.updated_ms + (left as f64 * dt as f64 / du as f64) as u64)
    }
}

/// The state of every account this process writes to.
static ACCOUNTS: LazyLock<DashMap<String, Arc<Mutex<QuotaState>>>> = LazyLock::new(DashMap::new);

/// One sink's view of its account's allocation.
pub struct DailyQuota {
    /// This sink's copy of the state, for `sluice status`.
    file: PathBuf,
    state: Arc<Mutex<QuotaState>>,
    /// A stop ends a wait for the park.
    shutdown: Shutdown,
}

/// Readings closer together than this are not written to the file (the API reports one per call).
const WRITE_EVERY_MS: u64 = 1_000;
/// An `earlier` reading older than this is replaced, so the rate follows recent use.
const RATE_WINDOW_MS: u64 = 60_000;

impl DailyQuota {
    /// The quota of sink `sink` of the pipeline whose data lives in `dir`, writing to `account`
    /// (shared with the account's other sinks), with the park its file holds, if any.
    pub fn open(dir: &Path, sink: &str, account: &str, shutdown: Shutdown) -> Self {
        let file = Self::path(dir, sink);
        let saved = Self::read(dir, sink).unwrap_or_default();
        let state =
            ACCOUNTS.entry(account.to_string()).or_insert_with(|| Arc::new(Mutex::new(QuotaState::default()))).clone();
        {
            // A park written by an earlier run (of this sink) still holds.
            let mut s = state.lock().expect("quota lock");
            if saved.parked_until_ms > s.parked_until_ms {
                (s.parked_until_ms, s.parked_reason) = (saved.parked_until_ms, saved.parked_reason);
            }
        }
        Self { file, state, shutdown }
    }

    fn path(dir: &Path, sink: &str) -> PathBuf {
        dir.join("quota").join(format!("{sink}.json"))
    }

    /// The state last written for `sink`, for `sluice status`.
    pub fn read(dir: &Path, sink: &str) -> Option<QuotaState> {
        serde_json::from_slice(&std::fs::read(Self::path(dir, sink)).ok()?).ok()
    }

    /// Records a usage reading from a response's headers.
    pub fn observe(&self, used: u64, max: u64) -> Result<()> {
        let now = now_ms();
        let snapshot = {
            let mut s = self.state.lock().expect("quota lock");
            // Rate the use over the last minute or so: a new base is the previous reading.
            if s.earlier.is_none_or(|(t, u)| now.saturating_sub(t) > RATE_WINDOW_MS || used < u) {
                s.earlier =
                    (s.updated_ms > 0 && s.used <= used).then_some((s.updated_ms, s.used)).or(Some((now, used)));
            }
            let due = now.saturating_sub(s.updated_ms) >= WRITE_EVERY_MS;
            (s.used, s.max, s.updated_ms) = (used, max, now);
            due.then(|| s.clone())
        };
        match snapshot {
            Some(s) => self.write(&s, false),
            None => Ok(()),
        }
    }

    /// Stops calls until `until` because the allocation is exhausted; durable before it returns.
    pub fn park(&self, until: SystemTime, reason: &str) -> Result<()> {
        let until_ms = until.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let snapshot = {
            let mut s = self.state.lock().expect("quota lock");
            s.parked_until_ms = Some(until_ms);
            s.parked_reason = Some(reason.to_string());
            s.clone()
        };
        tracing::warn!(
            reason,
            resume_in_s = until_ms.saturating_sub(now_ms()) / 1000,
            "daily API allocation exhausted; sink parked"
        );
        self.write(&snapshot, true)
    }

    /// Waits out a park, if any; the park is lifted when it has passed.
    pub async fn ready(&self) -> Result<()> {
        let until = self.state.lock().expect("quota lock").parked_until_ms;
        let Some(until) = until else { return Ok(()) };
        let wait = until.saturating_sub(now_ms());
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = self.shutdown.requested() => return Err(Error::Parked("stopping".into())),
            }
        }
        let snapshot = {
            let mut s = self.state.lock().expect("quota lock");
            if s.parked_until_ms != Some(until) {
                return Ok(());
            }
            s.parked_until_ms = None;
            s.parked_reason = None;
            s.clone()
        };
        tracing::info!("park over; trying the API again");
        self.write(&snapshot, true)
    }

    fn write(&self, state: &QuotaState, durable: bool) -> Result<()> {
        let io = |e: std::io::Error| Error::Storage(format!("quota file {}: {e}", self.file.display()));
        let dir = self.file.parent().expect("quota files live in a directory");
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = self.file.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| Error::Storage(e.to_string()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            if durable {
                f.sync_all().map_err(io)?;
            }
        }
        std::fs::rename(&tmp, &self.file).map_err(io)?;
        if durable {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_of_one_account_share_a_park() {
        let dir = tempfile::tempdir().unwrap();
        let a = DailyQuota::open(dir.path(), "a", "test-account-shared", Shutdown::new());
        let b = DailyQuota::open(dir.path(), "b", "test-account-shared", Shutdown::new());
        let other = DailyQuota::open(dir.path(), "c", "test-account-other", Shutdown::new());
        a.park(SystemTime::now() + Duration::from_secs(60), "spent").unwrap();
        assert!(b.state.lock().unwrap().parked_until_ms.is_some());
        assert!(other.state.lock().unwrap().parked_until_ms.is_none());
    }

    #[test]
    fn runs_out_at_the_recent_rate() {
        let s =
            QuotaState { used: 600, max: 1000, updated_ms: 70_000, earlier: Some((10_000, 0)), ..Default::default() };
        // 600 requests in 60 s: the 400 left last 40 s more.
        assert_eq!(s.runs_out_ms(), Some(110_000));
        assert_eq!(QuotaState { earlier: None, ..s.clone() }.runs_out_ms(), None);
    }

    #[tokio::test]
    async fn a_park_survives_a_restart_and_lifts_when_over() {
        let dir = tempfile::tempdir().unwrap();
        let q = DailyQuota::open(dir.path(), "crm", "test-account-restart", Shutdown::new());
        let until = SystemTime::now() + Duration::from_millis(300);
        q.park(until, "test").unwrap();
        // A new process: the account's state starts empty, the file holds the park.
        ACCOUNTS.remove("test-account-restart");
        let reopened = DailyQuota::open(dir.path(), "crm", "test-account-restart", Shutdown::new());
        assert!(DailyQuota::read(dir.path(), "crm").unwrap().parked_until_ms.is_some());
        reopened.ready().await.unwrap();
        // The park is stored in whole milliseconds.
        assert!(SystemTime::now() + Duration::from_millis(1) >= until, "the park was honoured after reopening");
        assert_eq!(DailyQuota::read(dir.path(), "crm").unwrap().parked_until_ms, None);
    }
}

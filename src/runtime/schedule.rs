//! Scheduled backfills: each cron slot, in the schedule's time zone, starts one run.
//!
//! Slots missed while the process was down collapse into one run at start (the newest missed
//! slot), and a slot that comes while the schedule's previous run is still going is skipped:
//! two runs of one backfill never overlap. What a schedule last ran is stored with the jobs
//! (in the log, when the source sees the run's request), so a run whose request never reached
//! the source is made up at the next start.

use super::Shutdown;
use crate::config::BackfillSchedule;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Wall-clock time that follows tokio's clock, so tests can pause and advance it.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    base: DateTime<Utc>,
    at: Instant,
}

impl WallClock {
    pub fn system() -> Self {
        Self::starting_at(Utc::now())
    }

    pub fn starting_at(base: DateTime<Utc>) -> Self {
        Self { base, at: Instant::now() }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.base + chrono::Duration::from_std(self.at.elapsed()).unwrap_or_default()
    }
}

/// The newest slot of `schedule` after `since` and at or before `now`.
pub fn due(schedule: &BackfillSchedule, since: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&schedule.time_zone);
    let slot = schedule.cron.find_previous_occurrence(&local, true).ok()?.with_timezone(&Utc);
    (slot > since).then_some(slot)
}

/// The first slot of `schedule` after `now`.
pub fn next(schedule: &BackfillSchedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&schedule.time_zone);
    Some(schedule.cron.find_next_occurrence(&local, false).ok()?.with_timezone(&Utc))
}

/// A slot whose run should start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fire {
    pub name: String,
    pub slot: DateTime<Utc>,
}

/// Fires the schedules' slots until `shutdown`. `since` holds, per schedule, the newest slot
/// already run (or when the schedule was first armed); `running` says whether a run of a
/// schedule is still going.
pub async fn run(
    schedules: Vec<BackfillSchedule>,
    mut since: HashMap<String, DateTime<Utc>>,
    clock: WallClock,
    running: impl Fn(&str) -> bool,
    fire: mpsc::Sender<Fire>,
    shutdown: Shutdown,
) {
    loop {
        let now = clock.now();
        for s in &schedules {
            let after = since.get(&s.name).copied().unwrap_or(now);
            let Some(slot) = due(s, after, now) else {
                since.entry(s.name.clone()).or_insert(now);
                continue;
            };
            since.insert(s.name.clone(), slot);
            if running(&s.name) {
                tracing::warn!(backfill = %s.name, slot = %slot, "previous run still going; this slot is skipped");
                continue;
            }
            tracing::info!(backfill = %s.name, slot = %slot, "scheduled backfill due");
            if fire.send(Fire { name: s.name.clone(), slot }).await.is_err() {
                return;
            }
        }
        let Some(wake) = schedules.iter().filter_map(|s| next(s, now)).min() else { return };
        let wait = (wake - clock.now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.requested() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn schedule(name: &str, cron: &str, tz: chrono_tz::Tz) -> BackfillSchedule {
        BackfillSchedule {
            name: name.into(),
            cron: cron.parse().unwrap(),
            time_zone: tz,
            tables: vec![],
            filter: None,
            filter_at: None,
            cursor: None,
            parallelism: 1,
            chunk_rows: 1,
        }
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn slots_missed_while_down_run_once_then_slots_fire_on_time_in_their_zone() {
        // 02:00 in Berlin (UTC+1 in November). Down since three days ago: one catch-up run.
        let nightly = schedule("nightly", "0 2 * * *", chrono_tz::Europe::Berlin);
        let clock = WallClock::starting_at(utc(2026, 11, 26, 12, 0));
        let (tx, mut rx) = mpsc::channel(8);
        let since = HashMap::from([("nightly".to_string(), utc(2026, 11, 23, 1, 0))]);
        let stop = Shutdown::new();
        let task = tokio::spawn(run(vec![nightly], since, clock, |_| false, tx, stop.clone()));
        let first = rx.recv().await.unwrap();
        assert_eq!(first.slot, utc(2026, 11, 26, 1, 0), "the newest missed slot, once");
        assert_eq!(clock.now(), utc(2026, 11, 26, 12, 0), "at start, without waiting");
        let second = rx.recv().await.unwrap();
        assert_eq!(second.slot, utc(2026, 11, 27, 1, 0));
        assert_eq!(clock.now(), utc(2026, 11, 27, 1, 0), "fired at the slot, not before");
        stop.request();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_schedule_waits_for_its_first_slot_and_a_running_one_skips_slots() {
        let every = schedule("quarterly", "*/15 * * * *", chrono_tz::UTC);
        let clock = WallClock::starting_at(utc(2026, 11, 26, 12, 7));
        let busy = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel(8);
        let stop = Shutdown::new();
        let flag = busy.clone();
        let task = tokio::spawn(run(
            vec![every],
            HashMap::new(),
            clock,
            move |_| flag.load(Ordering::SeqCst),
            tx,
            stop.clone(),
        ));
        assert_eq!(rx.recv().await.unwrap().slot, utc(2026, 11, 26, 12, 15), "no run at start for a new schedule");
        busy.store(true, Ordering::SeqCst);
        // 12:30 and 12:45 come while the 12:15 run is still going: skipped, not queued.
        tokio::time::sleep_until(Instant::now() + Duration::from_secs(40 * 60)).await;
        busy.store(false, Ordering::SeqCst);
        assert_eq!(rx.recv().await.unwrap().slot, utc(2026, 11, 26, 13, 0));
        assert!(rx.try_recv().is_err());
        stop.request();
        task.await.unwrap();
    }

    #[test]
    fn slots_follow_daylight_saving_time() {
        // Berlin moves to UTC+2 on 2027-03-28: 02:00 local is 00:00 UTC after it. That day has
        // no 02:00 at all (the clock jumps from 02:00 to 03:00).
        let s = schedule("n", "0 2 * * *", chrono_tz::Europe::Berlin);
        assert_eq!(next(&s, utc(2027, 3, 26, 12, 0)), Some(utc(2027, 3, 27, 1, 0)));
        let after = next(&s, utc(2027, 3, 28, 12, 0)).unwrap();
        assert_eq!(after, utc(2027, 3, 29, 0, 0));
    }
}

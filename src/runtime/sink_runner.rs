//! Feeds one sink from the log and stores its durable progress.

use super::progress::SinkStatus;
use super::sink::{Progress, Sink};
use super::Shutdown;
use crate::error::{Error, ErrorClass, Result};
use crate::log::{EmbeddedLog, LogRecord};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Records read from the log per step; with the byte bound this caps the sink's input memory.
const READ_EVENTS: usize = 10_000;
const READ_BYTES: usize = 16 * 1024 * 1024;
/// How often a busy sink checks for files due and commits progress.
const TICK: Duration = Duration::from_millis(500);

pub struct SinkRunner {
    pub name: String,
    pub sink: Box<dyn Sink>,
    /// The sink's durable cursor in the log when the run starts.
    pub cursor: u64,
    pub log: EmbeddedLog,
    pub all_sinks: Vec<String>,
    pub shutdown: Shutdown,
    /// Set when the pipeline should make everything durable now (`--until-idle`).
    pub drain: Arc<AtomicBool>,
    /// Set by a Kafka feed giving partitions away: make everything read durable now.
    pub flush_now: Arc<AtomicBool>,
    pub status: Arc<Mutex<SinkStatus>>,
}

impl SinkRunner {
    pub async fn run(mut self) -> Result<()> {
        let mut committed = self.cursor;
        let mut next = committed + 1;
        let mut head_rx = self.log.subscribe();
        let mut last_tick = Instant::now();
        let mut last_state: Option<Vec<u8>> = None;
        self.publish(committed);
        // The next read runs while the sink encodes the current one.
        let mut prefetch: Option<tokio::task::JoinHandle<Result<Vec<LogRecord>>>> = None;
        while !self.shutdown.is_requested() {
            let head = self.log.head();
            if next <= head || prefetch.is_some() {
                let started = Instant::now();
                let records = match prefetch.take() {
                    Some(read) => read.await.map_err(|e| Error::Storage(format!("log read: {e}")))??,
                    None => self.log.read(next, READ_EVENTS, READ_BYTES).await?,
                };
                next = records.last().map(|r| r.offset + 1).unwrap_or(next);
                if next <= self.log.head() {
                    let log = self.log.clone();
                    prefetch = Some(tokio::spawn(async move { log.read(next, READ_EVENTS, READ_BYTES).await }));
                }
                self.sink.write(records).await?;
                metrics::histogram!("sluice_sink_batch_seconds", "sink" => self.name.clone())
                    .record(started.elapsed().as_secs_f64());
                // A caught-up sink ticks at once, so what it just finished becomes durable now.
                if last_tick.elapsed() < TICK && next <= self.log.head() {
                    continue;
                }
            } else {
                tokio::select! {
                    _ = head_rx.changed() => {}
                    _ = tokio::time::sleep(TICK) => {}
                    _ = self.shutdown.requested() => break,
                }
            }
            let flush = (self.drain.load(Ordering::Acquire) || self.flush_now.load(Ordering::Acquire))
                && next > self.log.head();
            let Some(progress) = self.tick(flush).await? else { break };
            last_tick = Instant::now();
            self.commit(progress, &mut committed, &mut last_state).await?;
        }
        // Graceful stop: make everything accepted durable and record it.
        if let Some(progress) = self.tick(true).await? {
            self.commit(progress, &mut committed, &mut last_state).await?;
        }
        Ok(())
    }

    /// Ticks the sink, retrying transient failures with backoff; `None` if shut down meanwhile.
    async fn tick(&mut self, flush: bool) -> Result<Option<Progress>> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.sink.tick(flush).await {
                Ok(p) => return Ok(Some(p)),
                // Stopping while the destination's allocation is spent: what is not durable stays
                // in the log (the cursor is where it was) rather than the stop waiting for hours.
                Err(Error::Parked(why)) if self.shutdown.is_requested() => {
                    tracing::info!(sink = %self.name, why, "stopping while parked; unwritten changes stay in the log");
                    return Ok(None);
                }
                Err(e) if e.class() == ErrorClass::Retryable => {
                    metrics::counter!("sluice_retries_total", "stage" => self.name.clone()).increment(1);
                    tracing::warn!(sink = %self.name, error = %e, retry_in = ?delay, "sink write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.requested(), if !flush => return Ok(None),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn commit(
        &mut self,
        progress: Progress,
        committed: &mut u64,
        last_state: &mut Option<Vec<u8>>,
    ) -> Result<()> {
        if progress.cursor == *committed && last_state.as_ref() == Some(&progress.state) {
            return Ok(());
        }
        *committed = self.log.commit_sink(&self.name, progress.cursor, progress.state.clone()).await?;
        *last_state = Some(progress.state);
        self.publish(*committed);
        let released = self.log.release(&self.all_sinks, 100_000).await?;
        if released > 0 {
            metrics::counter!("sluice_log_released_total").increment(released);
        }
        Ok(())
    }

    fn publish(&self, cursor: u64) {
        let (files, rows) = self.sink.written();
        let mut s = self.status.lock().expect("status lock");
        s.cursor = cursor;
        s.files_written = files;
        s.rows_written = rows;
        s.behind_events = self.log.head().saturating_sub(cursor);
        metrics::gauge!("sluice_sink_behind_events", "sink" => self.name.clone()).set(s.behind_events as f64);
    }
}

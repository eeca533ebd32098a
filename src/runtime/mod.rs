//! Runs a validated pipeline: the source writes to the log, one runner per sink reads from it.

pub mod progress;
pub mod schedule;
mod scheduled;
pub mod shutdown;
pub mod sink;
mod sink_runner;
pub mod status;

pub use shutdown::Shutdown;

use crate::config::{Pipeline, SinkConfig, SourceConfig, TransportConfig};
use crate::connectors::mongo::MongoSource;
use crate::connectors::parquet::ParquetSink;
use crate::connectors::postgres::backfill::Backfills;
use crate::connectors::postgres::PostgresSource;
use crate::connectors::{hubspot, pgsink, salesforce};
use crate::error::{Error, Result};
use crate::log::EmbeddedLog;
use progress::{SinkStatus, SourceProgress};
use sink::Sink;
use sink_runner::SinkRunner;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Options of `sluice run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Exit once caught up, quiet for this long, and everything durable.
    pub until_idle: Option<Duration>,
}

/// Describes every metric and creates it at zero, so `/metrics` lists them from the start.
fn register_metrics(sinks: &[String]) {
    use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
    describe_counter!("sluice_events_in_total", "Change events made durable in the log");
    describe_counter!("sluice_events_out_total", "Change events made durable in a sink");
    describe_gauge!("sluice_source_lag_bytes", Unit::Bytes, "Server WAL position minus the acknowledged position");
    describe_gauge!("sluice_source_lag_seconds", Unit::Seconds, "Age of the newest change appended while changes flow");
    describe_histogram!("sluice_log_commit_seconds", Unit::Seconds, "Latency of one durable log commit");
    describe_histogram!("sluice_sink_batch_seconds", Unit::Seconds, "Latency of one sink batch");
    describe_counter!("sluice_retries_total", "Retries after transient errors, by stage");
    describe_gauge!("sluice_sink_behind_events", "Events in the log not yet durable in the sink");
    describe_counter!("sluice_snapshot_rows_total", "Rows read by the initial snapshot");
    describe_counter!("sluice_toast_fetched_total", "Changes whose unchanged TOAST value was read from the source");
    describe_counter!("sluice_sink_writes_total", "Upserts and deletes a mapped sink sent to its target");
    describe_counter!("sluice_dead_letters_total", "Records a mapped sink set aside in its dead-letter queue");
    describe_counter!("sluice_backfill_rows_total", "Rows landed by backfills, by table");
    describe_gauge!("sluice_backfill_rows", "Rows landed by a backfill job so far");
    describe_gauge!("sluice_backfill_blocks_done", "Heap blocks of a backfill job's tables read and landed");
    describe_gauge!("sluice_backfill_blocks_total", "Heap blocks of a backfill job's tables");
    describe_gauge!("sluice_backfill_running", "1 while a backfill job runs, by job and name");
    counter!("sluice_toast_fetched_total").increment(0);
    counter!("sluice_events_in_total").increment(0);
    counter!("sluice_retries_total", "stage" => "source").increment(0);
    gauge!("sluice_source_lag_bytes").set(0.0);
    gauge!("sluice_source_lag_seconds").set(0.0);
    for s in sinks {
        counter!("sluice_events_out_total", "sink" => s.clone()).increment(0);
        counter!("sluice_retries_total", "stage" => s.clone()).increment(0);
        gauge!("sluice_sink_behind_events", "sink" => s.clone()).set(0.0);
    }
}

/// Opens the pipeline's log.
pub fn open_log(pipeline: &Pipeline) -> Result<EmbeddedLog> {
    let TransportConfig::Embedded { path } = &pipeline.transport;
    EmbeddedLog::open(path)
}

/// Runs until `shutdown` (or idle, with `until_idle`); returns the first fatal error.
pub async fn run(pipeline: Pipeline, options: RunOptions, shutdown: Shutdown) -> Result<()> {
    let log = open_log(&pipeline)?;
    let source_progress = Arc::new(SourceProgress::default());
    // The idle window of `--until-idle` counts from the start, not from the epoch.
    source_progress.last_data_ms.store(progress::now_ms(), Ordering::Release);
    let backfills = Arc::new(Backfills::default());
    // Configuration problems (tables, keys, publication, backfill clauses, collections) stop
    // the run before anything starts.
    let source_task: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> = match &pipeline.source {
        SourceConfig::Postgres(pg) => {
            let source = PostgresSource::new(
                pg.clone(),
                &pipeline.name,
                log.clone(),
                source_progress.clone(),
                backfills.clone(),
                shutdown.clone(),
            );
            let catalog = source.prepare().await?;
            scheduled::check(&pipeline.file, &pipeline.backfills, catalog.client()).await?;
            Box::pin(source.run(catalog))
        }
        SourceConfig::Mongodb(m) => {
            let source = MongoSource::new(m.clone(), log.clone(), source_progress.clone(), shutdown.clone());
            let prepared = source.prepare().await?;
            Box::pin(source.run(prepared))
        }
    };

    let sink_names: Vec<String> = pipeline.sinks.iter().map(|s| s.name().to_string()).collect();
    register_metrics(&sink_names);
    let drain = Arc::new(AtomicBool::new(false));
    let mut statuses = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    // A sink new to this pipeline starts at the beginning of the log; if the log has already
    // released events, it would silently miss them.
    let released = match log.tail().await? {
        Some(first) => first > 1,
        None => log.head() > 0,
    };
    for cfg in &pipeline.sinks {
        let name = cfg.name().to_string();
        let cursor = log.cursor(&name).await?;
        let state = log.sink_state(&name).await?;
        if cursor == 0 && state.is_none() && released {
            return Err(Error::config(format!(
                "sink {name} is new to pipeline {}, but the log has already released the changes before it; \
                 it would miss them. Start the pipeline over with an empty transport path (a new slot name or \
                 after dropping the slot), or run the new sink as its own pipeline",
                pipeline.name
            )));
        }
        let built: Result<Box<dyn Sink>> = match cfg.clone() {
            SinkConfig::Parquet(p) => ParquetSink::build(p, log.clone(), cursor, state).await.map(|s| Box::new(s) as _),
            SinkConfig::Postgres(p) => {
                pgsink::build(p, &pipeline.name, log.clone(), cursor).await.map(|s| Box::new(s) as _)
            }
            SinkConfig::Hubspot(h) => {
                hubspot::build(h, log.clone(), cursor, shutdown.clone()).await.map(|s| Box::new(s) as _)
            }
            SinkConfig::Salesforce(c) => {
                salesforce::build(c, log.clone(), cursor, shutdown.clone()).await.map(|s| Box::new(s) as _)
            }
        };
        let sink = built.map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("sink {name}: {m}")),
            other => other,
        })?;
        let status = Arc::new(Mutex::new(SinkStatus { name: name.clone(), ..Default::default() }));
        statuses.push(status.clone());
        let runner = SinkRunner {
            name: name.clone(),
            sink,
            cursor,
            log: log.clone(),
            all_sinks: sink_names.clone(),
            shutdown: shutdown.clone(),
            drain: drain.clone(),
            status,
        };
        tasks.spawn(async move { runner.run().await.map_err(|e| (format!("sink {name}"), e)) });
    }
    tasks.spawn(async move { source_task.await.map_err(|e| ("source".to_string(), e)) });
    if let (Some(pg), false) = (pipeline.source.postgres(), pipeline.backfills.is_empty()) {
        let schedules = scheduled::run(
            pipeline.name.clone(),
            pipeline.backfills.clone(),
            pg.clone(),
            log.clone(),
            backfills.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = schedules.await {
                tracing::error!(error = %e, "backfill schedules stopped");
            }
        });
    }
    let reporter = status::Reporter::new(
        pipeline.name.clone(),
        log.clone(),
        source_progress.clone(),
        statuses.clone(),
        backfills.clone(),
    );
    // The reporter outlives the tasks so its last report shows the drained, final state.
    let finished = Shutdown::new();
    let reporter_task = tokio::spawn(reporter.run(finished.clone()));

    if let Some(idle) = options.until_idle {
        let (progress, log, statuses, shutdown, drain) =
            (source_progress.clone(), log.clone(), statuses.clone(), shutdown.clone(), drain.clone());
        let backfills = backfills.clone();
        tokio::spawn(async move {
            let idle_ms = idle.as_millis() as u64;
            let mut asked = Instant::now();
            while !shutdown.is_requested() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Quiet, but the last heartbeat came before the last data: ask for one now
                // instead of waiting out the heartbeat interval (at most every half second).
                if progress.needs_heartbeat(idle_ms) && asked.elapsed() >= Duration::from_millis(500) {
                    progress.heartbeat_now.notify_one();
                    asked = Instant::now();
                }
                let quiet = progress.idle_for(idle_ms);
                drain.store(quiet, Ordering::Release);
                let head = log.head();
                let durable = statuses.iter().all(|s| s.lock().expect("status lock").cursor >= head);
                // A running backfill is not idle, even between chunks.
                if quiet && durable && backfills.running_tables().is_empty() {
                    tracing::info!(head, "caught up and idle; stopping");
                    shutdown.request();
                }
            }
        });
    }

    let mut first_error: Option<Error> = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(|e| ("task".to_string(), Error::permanent("runtime", e)));
        if let Err((who, e)) = outcome.and_then(|r| r) {
            tracing::error!(task = %who, error = %e, "stopping pipeline");
            if first_error.is_none() {
                first_error = Some(match e {
                    Error::Config(m) => Error::Config(format!("{who}: {m}")),
                    other => other,
                });
            }
            shutdown.request();
        } else if !shutdown.is_requested() {
            // Tasks end only at shutdown; one that ends before it stops the rest, so no half of
            // a pipeline runs on alone.
            shutdown.request();
        }
    }
    finished.request();
    let _ = reporter_task.await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

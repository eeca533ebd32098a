//! Runs a validated pipeline: the source writes to the log, one runner per sink reads from it.

mod checkpoints;
pub mod progress;
pub mod schedule;
mod scheduled;
pub mod shutdown;
pub mod sink;
mod sink_runner;
pub mod status;

pub use shutdown::Shutdown;

use crate::config::{KafkaTransportConfig, Pipeline, SinkConfig, SourceConfig, TransportConfig};
use crate::connectors::kafka::envelope::{EnvelopeWriter, Flavor};
use crate::connectors::kafka::{self, AckGate, KafkaFeed, KafkaPublisher, Topics};
use crate::connectors::mongo::MongoSource;
use crate::connectors::parquet::ParquetSink;
use crate::connectors::postgres::backfill::Backfills;
use crate::connectors::postgres::{self, PostgresSource};
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
    describe_histogram!("sluice_log_commit_seconds", Unit::Seconds, "Latency of one log commit by the source");
    describe_histogram!(
        "sluice_log_checkpoint_seconds",
        Unit::Seconds,
        "Latency of one checkpoint (fsync) of a deferred log: Kafka transport staging and sink buffers"
    );
    describe_histogram!("sluice_sink_batch_seconds", Unit::Seconds, "Latency of one sink batch");
    describe_counter!("sluice_retries_total", "Retries after transient errors, by stage");
    describe_gauge!("sluice_sink_behind_events", "Events in the log not yet durable in the sink");
    describe_counter!("sluice_snapshot_rows_total", "Rows read by the initial snapshot");
    describe_counter!("sluice_toast_fetched_total", "Changes whose unchanged TOAST value was read from the source");
    describe_counter!("sluice_sink_writes_total", "Upserts and deletes a mapped sink sent to its target");
    describe_counter!("sluice_dead_letters_total", "Records a mapped sink set aside in its dead-letter queue");
    describe_counter!(
        "sluice_kafka_undecodable_total",
        "Records a sink's Kafka feed could not decode and set aside (sinks/SINK/undecodable/)"
    );
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
    EmbeddedLog::open(pipeline.transport.path())
}

/// Whether the pipeline's log only stages changes for the Kafka publisher, so its commits may
/// wait for a checkpoint (see `EmbeddedLog::open_deferred`).
fn stages_for_kafka(pipeline: &Pipeline) -> bool {
    matches!(pipeline.transport, TransportConfig::Kafka(_)) && !matches!(pipeline.source, SourceConfig::Kafka(_))
}

/// Runs until `shutdown` (or idle, with `until_idle`); returns the first fatal error.
pub async fn run(pipeline: Pipeline, options: RunOptions, shutdown: Shutdown) -> Result<()> {
    let log = match stages_for_kafka(&pipeline) {
        true => EmbeddedLog::open_deferred(pipeline.transport.path())?,
        false => open_log(&pipeline)?,
    };
    if let TransportConfig::Kafka(k) = &pipeline.transport {
        kafka::check_reachable(k).await?;
    }
    let ack_gate = AckGate::default();
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
            let source = match &pipeline.transport {
                TransportConfig::Kafka(_) => source.with_ack_gate(ack_gate.clone()),
                TransportConfig::Embedded { .. } => source,
            };
            let catalog = source.prepare().await?;
            scheduled::check(&pipeline.file, &pipeline.backfills, catalog.client()).await?;
            Box::pin(source.run(catalog))
        }
        SourceConfig::Mongodb(m) => {
            let source = MongoSource::new(m.clone(), log.clone(), source_progress.clone(), shutdown.clone());
            let prepared = source.prepare().await?;
            Box::pin(source.run(prepared))
        }
        // The topics are the source: the sinks' consumer groups read them directly.
        SourceConfig::Kafka(_) => {
            // Nothing to snapshot or catch up on here: whether the pipeline is idle is up to
            // the feeds (caught up with the topics, nothing new lately).
            source_progress.snapshot_done.store(true, Ordering::Release);
            let started = source_progress.last_data_ms.load(Ordering::Acquire);
            source_progress.heartbeat_seen_ms.store(started + 1, Ordering::Release);
            let shutdown = shutdown.clone();
            Box::pin(async move {
                shutdown.requested().await;
                Ok(())
            })
        }
    };

    let sink_names: Vec<String> = pipeline.sinks.iter().map(|s| s.name().to_string()).collect();
    register_metrics(&sink_names);
    let drain = Arc::new(AtomicBool::new(false));
    let mut statuses = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut feeds = Vec::new();
    let mut inputs = Vec::new();
    let mut make_runner = |name: String, sink: Box<dyn Sink>, cursor: u64, log: EmbeddedLog, flush_now| {
        let status = Arc::new(Mutex::new(SinkStatus { name: name.clone(), ..Default::default() }));
        statuses.push(status.clone());
        inputs.push(log.clone());
        SinkRunner {
            name: name.clone(),
            sink,
            cursor,
            all_sinks: vec![name],
            log,
            shutdown: shutdown.clone(),
            drain: drain.clone(),
            flush_now,
            status,
        }
    };
    let mut runners = Vec::new();
    match &pipeline.transport {
        TransportConfig::Embedded { .. } => {
            // A sink new to this pipeline starts at the beginning of the log; if the log has
            // already released events, it would silently miss them.
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
                        "sink {name} is new to pipeline {}, but the log has already released the changes before \
                         it; it would miss them. Start the pipeline over with an empty transport path (a new slot \
                         name or after dropping the slot), or run the new sink as its own pipeline",
                        pipeline.name
                    )));
                }
                let sink = build_sink(cfg, &pipeline.name, log.clone(), cursor, state, &shutdown).await?;
                let mut runner = make_runner(name, sink, cursor, log.clone(), Arc::default());
                runner.all_sinks = sink_names.clone();
                runners.push(runner);
            }
        }
        TransportConfig::Kafka(k) => {
            // What this member captured but never delivered may since have been captured and
            // delivered by another member; the slot still holds it (it is acknowledged only once
            // delivered), so capture it again rather than send a stale copy after newer changes.
            if pipeline.source.postgres().is_some() {
                let given_up = log.give_up_unread(kafka::PUBLISHER, &[postgres::ACK_KEY]).await?;
                if given_up > 0 {
                    tracing::info!(events = given_up, "undelivered changes will be captured again from the slot");
                }
            }
            let topics = match &pipeline.source {
                SourceConfig::Kafka(source) => source.topics.clone(),
                _ => {
                    let cursor = log.cursor(kafka::PUBLISHER).await?;
                    let envelope = envelope_writer(&pipeline, k);
                    let publisher = KafkaPublisher::build(k, envelope, log.clone(), cursor, ack_gate.clone()).await?;
                    runners.push(make_runner(
                        kafka::PUBLISHER.to_string(),
                        Box::new(publisher),
                        cursor,
                        log.clone(),
                        Arc::default(),
                    ));
                    sink_topics(&pipeline, k).await?
                }
            };
            for cfg in &pipeline.sinks {
                let name = cfg.name().to_string();
                // Another member may have written any buffered change before a rebalance.
                let buffer = EmbeddedLog::open_replaying(&pipeline.transport.sink_dir(&name))?;
                let cursor = buffer.cursor(&name).await?;
                let state = buffer.sink_state(&name).await?;
                let sink = build_sink(cfg, &pipeline.name, buffer.clone(), cursor, state, &shutdown).await?;
                let (feed, handle) =
                    KafkaFeed::start(k, &pipeline.name, &name, topics.clone(), buffer.clone(), shutdown.clone())
                        .await?;
                runners.push(make_runner(name.clone(), sink, cursor, buffer, handle.flush_now.clone()));
                feeds.push(handle);
                tasks.spawn(async move { feed.run().await.map_err(|e| (format!("sink {name} (kafka feed)"), e)) });
            }
        }
    }
    for runner in runners {
        let name = runner.name.clone();
        tasks.spawn(async move { runner.run().await.map_err(|e| (format!("sink {name}"), e)) });
    }
    tasks.spawn(async move { source_task.await.map_err(|e| ("source".to_string(), e)) });
    let mut deferred_logs: Vec<(EmbeddedLog, Option<AckGate>)> =
        inputs.iter().filter(|l| l.deferred() && l.dir() != log.dir()).map(|l| (l.clone(), None)).collect();
    if log.deferred() {
        deferred_logs.push((log.clone(), Some(ack_gate.clone())));
    }
    for (log, gate) in &deferred_logs {
        let checkpoints = checkpoints::run(log.clone(), gate.clone(), shutdown.clone());
        let dir = log.dir().display().to_string();
        tasks.spawn(async move { checkpoints.await.map_err(|e| (format!("log checkpoints of {dir}"), e)) });
    }
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
        let (progress, statuses, shutdown, drain) =
            (source_progress.clone(), statuses.clone(), shutdown.clone(), drain.clone());
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
                let durable = statuses
                    .iter()
                    .zip(&inputs)
                    .all(|(s, input)| s.lock().expect("status lock").cursor >= input.head());
                // Kafka consumers have read everything published, and nothing arrived lately.
                let consumed = feeds.iter().all(|f| {
                    f.caught_up.load(Ordering::Acquire)
                        && progress::now_ms().saturating_sub(f.last_message_ms.load(Ordering::Acquire) as u64)
                            >= idle_ms
                });
                // A running backfill is not idle, even between chunks.
                if quiet && durable && consumed && backfills.running_tables().is_empty() {
                    tracing::info!("caught up and idle; stopping");
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
    // What the sinks, their feeds and the publisher recorded while stopping becomes durable too.
    for (log, _) in deferred_logs.iter().filter(|(log, _)| log.needs_checkpoint()) {
        if let Err(e) = log.checkpoint().await {
            first_error.get_or_insert(e);
        }
    }
    finished.request();
    let _ = reporter_task.await;
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Builds one sink over the log it reads (the pipeline's, or its own Kafka buffer).
async fn build_sink(
    cfg: &SinkConfig,
    pipeline: &str,
    log: EmbeddedLog,
    cursor: u64,
    state: Option<Vec<u8>>,
    shutdown: &Shutdown,
) -> Result<Box<dyn Sink>> {
    let built: Result<Box<dyn Sink>> = match cfg.clone() {
        SinkConfig::Parquet(p) => ParquetSink::build(p, log, cursor, state).await.map(|s| Box::new(s) as _),
        SinkConfig::Postgres(p) => pgsink::build(p, pipeline, log, cursor).await.map(|s| Box::new(s) as _),
        SinkConfig::Hubspot(h) => hubspot::build(h, log, cursor, shutdown.clone()).await.map(|s| Box::new(s) as _),
        SinkConfig::Salesforce(c) => {
            salesforce::build(c, log, cursor, shutdown.clone()).await.map(|s| Box::new(s) as _)
        }
    };
    built.map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("sink {}: {m}", cfg.name())),
        other => other,
    })
}

/// The Debezium layout of the pipeline's source.
fn envelope_writer(pipeline: &Pipeline, k: &KafkaTransportConfig) -> EnvelopeWriter {
    let (flavor, db) = match &pipeline.source {
        SourceConfig::Postgres(pg) => (Flavor::Postgres, pg.conn.dbname.clone()),
        SourceConfig::Mongodb(m) => (Flavor::Mongo, m.database.clone()),
        SourceConfig::Kafka(_) => unreachable!("a kafka source publishes nothing"),
    };
    EnvelopeWriter { flavor, name: k.topic_prefix.clone(), db, schemas: k.schemas }
}

/// The topics sinks read: one per captured table, created now so consumers can subscribe;
/// a pattern when a MongoDB source captures whatever collections exist.
async fn sink_topics(pipeline: &Pipeline, k: &KafkaTransportConfig) -> Result<Vec<String>> {
    let tables = match &pipeline.source {
        SourceConfig::Postgres(pg) => pg.tables.clone(),
        SourceConfig::Mongodb(m) => match &m.collections {
            Some(names) => names.iter().map(|c| crate::event::TableId::new(&m.database, c)).collect(),
            None => {
                let stem = Topics::name_of(&k.topic_prefix, &crate::event::TableId::new(&m.database, "x"));
                let stem = stem.strip_suffix('x').unwrap_or(&stem).replace('.', "\\.");
                return Ok(vec![format!("^{stem}.*")]);
            }
        },
        SourceConfig::Kafka(source) => return Ok(source.topics.clone()),
    };
    let mut topics = Topics::new(k)?;
    let mut names = Vec::new();
    for t in &tables {
        names.push(topics.ensure(t).await?.0.to_string());
    }
    Ok(names)
}

//! The PostgreSQL sink: keeps a table in another database as a mapped mirror of a source table.
//!
//! Changes are mapped as they are accepted and coalesced per key into batches of
//! `batch.max_records` changes; a batch is written when full, when its first change is
//! `batch.max_age` old, or on flush. A truncate closes the batch before it and is written on
//! its own, so it never overtakes or is overtaken by the rows around it. The durable cursor
//! moves to a batch's last offset only after its transaction commits.

mod flight;
pub mod queue;
pub mod target;
pub mod writer;

use crate::config::PostgresSinkConfig;
use crate::connectors::postgres::client::connect;
use crate::deadletter::{Entry, EntryStore, Reason};
use crate::error::{Error, Result};
use crate::event::{Op, TableSchema};
use crate::log::{EmbeddedLog, LogRecord};
use crate::mapping::coalesce::{Change, Coalescer};
use crate::mapping::{Mapped, Mapper};
use crate::runtime::sink::{Progress, Sink};
use flight::{fly, Crew, Landed, Segment, Session};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use target::Target;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use writer::{Applied, Record, Writer};

type Key = Vec<Option<String>>;

/// Segments waiting beyond the one being filled, above which the sink waits for its flight:
/// bounds the memory of a sink whose target is slower than its source.
const MAX_WAITING: usize = 4;

pub struct PostgresSink {
    cfg: PostgresSinkConfig,
    pipeline: String,
    log: EmbeddedLog,
    /// The connection and writer, when no flight has them.
    crew: Option<Crew>,
    /// Segments being written in the background.
    flight: Option<JoinHandle<Landed>>,
    mapper: Mapper,
    schemas: HashMap<u32, Arc<TableSchema>>,
    segments: VecDeque<Segment>,
    /// Offsets at or below this may have been written by an earlier run (see `coalesce`).
    horizon: u64,
    /// Every offset at or below this is durable in the target (or set aside).
    durable: u64,
    /// The last offset accepted.
    accepted: u64,
    totals: Applied,
    dead: EntryStore,
    review: EntryStore,
}

impl PostgresSink {
    /// Connects and checks the target table; the mapping is checked against each source schema
    /// as it is first seen.
    pub async fn build(cfg: PostgresSinkConfig, pipeline: &str, log: EmbeddedLog, cursor: u64) -> Result<Self> {
        let dead = EntryStore::dead_letters(log.dir(), &cfg.name);
        let review = EntryStore::conflicts(log.dir(), &cfg.name);
        let mut sink = Self {
            mapper: Mapper::new(cfg.mapping.clone()),
            horizon: log.head(),
            cfg,
            pipeline: pipeline.to_string(),
            log,
            crew: None,
            flight: None,
            schemas: HashMap::new(),
            segments: VecDeque::new(),
            durable: cursor,
            accepted: cursor,
            totals: Applied::default(),
            dead,
            review,
        };
        // Resolve the mapping against the newest schema of the table, so a wrong column in the
        // mapping or the target stops the run now rather than at the first change.
        let latest = sink.log.schemas().await?.into_iter().filter(|(_, s)| s.table == sink.cfg.mapping.table).last();
        if let Some((id, schema)) = latest {
            sink.schema(id, Some(schema)).await?;
        }
        Ok(sink)
    }

    /// Totals so far: writes, deletes, kept, parked and rejected records.
    pub fn applied(&self) -> Applied {
        self.totals
    }

    async fn schema(&mut self, id: u32, known: Option<TableSchema>) -> Result<Arc<TableSchema>> {
        if let Some(s) = self.schemas.get(&id) {
            return Ok(s.clone());
        }
        let schema = match known {
            Some(s) => s,
            None => {
                self.log.schema(id).await?.ok_or_else(|| Error::Storage(format!("schema {id} is not registered")))?
            }
        };
        let schema = Arc::new(schema);
        self.mapper.prepare(id, schema.clone())?;
        self.schemas.insert(id, schema.clone());
        if schema.table == self.cfg.mapping.table && self.writer().is_none() {
            let (client, writer) = open(&self.cfg, &self.pipeline, &self.mapper, &self.dead, &self.review).await?;
            let session = Session {
                conn: self.cfg.conn.clone(),
                application_name: application_name(&self.pipeline, &self.cfg.name),
                origin: origin_name(&self.pipeline, &self.cfg.name),
            };
            self.crew = Some(Crew { client: Some(client), writer, session });
        }
        Ok(schema)
    }

    /// A mapped key as the target's text, the form batches coalesce by.
    fn key_text(&self, key: &[minijinja::Value]) -> Key {
        key.iter().map(|v| target::cell_text(v, false)).collect()
    }

    /// The writer, when no flight has it.
    fn writer(&self) -> Option<&Writer> {
        self.crew.as_ref().map(|c| &c.writer)
    }

    fn batch(&mut self) -> &mut Segment {
        let full = match self.segments.back() {
            Some(Segment::Batch { coalescer, failed, .. }) => {
                coalescer.changes() as usize + failed.len() >= self.cfg.batch.max_records
            }
            _ => true,
        };
        if full {
            self.segments.push_back(Segment::Batch {
                coalescer: Coalescer::new(self.horizon),
                failed: Vec::new(),
                last: self.accepted,
                started: Instant::now(),
            });
        }
        self.segments.back_mut().expect("just ensured")
    }

    /// Whether the oldest segment should be written now.
    fn due(&self, flush: bool) -> bool {
        match self.segments.front() {
            None => false,
            Some(Segment::Truncate { .. }) => true,
            Some(Segment::Batch { coalescer, failed, started, .. }) => {
                flush
                    || self.segments.len() > 1
                    || coalescer.changes() as usize + failed.len() >= self.cfg.batch.max_records
                    || started.elapsed() >= self.cfg.batch.max_age
            }
        }
    }

    /// Takes a landed flight back: its crew, its durable offset, and (after an error) the
    /// segments it did not write, ahead of everything newer.
    fn land(&mut self, landed: Landed) -> Result<()> {
        self.crew = Some(landed.crew);
        if let Some(d) = landed.durable {
            self.durable = d;
        }
        let a = landed.applied;
        self.totals.add(&a);
        metrics::counter!("sluice_sink_writes_total", "sink" => self.cfg.name.clone())
            .increment(a.upserted + a.deleted);
        metrics::counter!("sluice_dead_letters_total", "sink" => self.cfg.name.clone()).increment(a.rejected);
        for s in landed.remaining.into_iter().rev() {
            self.segments.push_front(s);
        }
        landed.error.map_or(Ok(()), Err)
    }

    /// Sends every due segment on one flight (segments with nothing to write just move the
    /// durable offset).
    fn launch(&mut self, flush: bool) {
        let mut due = VecDeque::new();
        while self.due(flush) {
            let segment = self.segments.pop_front().expect("due");
            if due.is_empty() && segment.is_empty() {
                self.durable = segment.last();
            } else {
                due.push_back(segment);
            }
        }
        if !due.is_empty() {
            let crew = self.crew.take().expect("a segment with writes means the table's schema was seen and connected");
            self.flight = Some(tokio::spawn(fly(crew, due)));
        }
    }
}

#[async_trait::async_trait]
impl Sink for PostgresSink {
    async fn write(&mut self, records: Vec<LogRecord>) -> Result<()> {
        for r in records {
            let e = &r.event;
            let schema =
                if e.table == self.cfg.mapping.table { Some(self.schema(e.schema_id, None).await?) } else { None };
            self.accepted = r.offset;
            let Some(schema) = schema else {
                // Another table: nothing to write, but the batch covers its offset.
                if let Segment::Batch { last, .. } = self.batch() {
                    *last = r.offset;
                }
                continue;
            };
            let (key, change) = match self.mapper.map(&r.event) {
                Ok(Mapped::Truncate) => {
                    self.segments.push_back(Segment::Truncate { offset: r.offset });
                    continue;
                }
                Ok(Mapped::Skip(_)) => {
                    if let Segment::Batch { last, .. } = self.batch() {
                        *last = r.offset;
                    }
                    continue;
                }
                Ok(Mapped::Upsert { key, fields }) if r.event.op == Op::Insert => (key, Change::Insert(fields)),
                Ok(Mapped::Upsert { key, fields }) => (key, Change::Upsert(fields)),
                Ok(Mapped::Delete { key }) => (key, Change::Delete),
                Err(err) => {
                    tracing::warn!(sink = %self.cfg.name, offset = r.offset, error = %err.0, "mapping failed; dead-lettered");
                    let entry =
                        Entry::new(r.offset, &self.cfg.name, Reason::Mapping, err.0, &r.event, &schema, None, None);
                    if let Segment::Batch { failed, last, .. } = self.batch() {
                        failed.push(entry);
                        *last = r.offset;
                    }
                    continue;
                }
            };
            let text = self.key_text(&key);
            let record = Record { offset: r.offset, event: r.event.clone(), schema, key };
            if let Segment::Batch { coalescer, last, .. } = self.batch() {
                coalescer.push(text, change, r.offset, record);
                *last = r.offset;
            }
        }
        Ok(())
    }

    async fn tick(&mut self, flush: bool) -> Result<Progress> {
        loop {
            if let Some(flight) = &self.flight {
                // Wait for the flight when flushing, or when too much waits behind it.
                if flight.is_finished() || flush || self.segments.len() > MAX_WAITING {
                    let flight = self.flight.take().expect("checked above");
                    let landed = flight.await.map_err(|e| Error::permanent("sink writer", e))?;
                    self.land(landed)?;
                }
            }
            if self.flight.is_none() {
                self.launch(flush);
            }
            let done = self.flight.is_none() && !self.due(flush);
            if !flush || done {
                break;
            }
        }
        Ok(Progress { cursor: self.durable, state: Vec::new() })
    }

    fn written(&self) -> (u64, u64) {
        (0, self.totals.upserted + self.totals.deleted)
    }
}

/// Connects to the target, checks its table against the mapping, and tags the session's writes.
pub async fn open(
    cfg: &PostgresSinkConfig,
    pipeline: &str,
    mapper: &Mapper,
    dead: &EntryStore,
    review: &EntryStore,
) -> Result<(Client, Writer)> {
    let client = connect(&cfg.conn, &application_name(pipeline, &cfg.name)).await?;
    let target = Target::introspect(
        &client,
        &cfg.table,
        mapper.key_names(),
        mapper.field_names(),
        &cfg.version,
        cfg.conflict.reads_target(),
    )
    .await?;
    let writer = Writer {
        sink: cfg.name.clone(),
        target,
        strategy: cfg.conflict.clone(),
        field_names: mapper.field_names().to_vec(),
        dead: dead.clone(),
        review: review.clone(),
    };
    mark_origin(&client, &origin_name(pipeline, &cfg.name)).await;
    Ok((client, writer))
}

/// How the sink's sessions show in `pg_stat_activity`.
pub fn application_name(pipeline: &str, sink: &str) -> String {
    format!("sluice {pipeline} sink {sink}")
}

/// The replication origin a sink's writes carry (`sluice:<pipeline>:<sink>`).
pub fn origin_name(pipeline: &str, sink: &str) -> String {
    format!("sluice:{pipeline}:{sink}")
}

/// Tags the session's transactions with a replication origin, so a pipeline reading this
/// database recognizes sluice's own writes. Needs superuser or a grant on the origin
/// functions; without it, writes are untagged and a two-way mirror relies on skipping
/// no-op updates to stop echoes after one round.
async fn mark_origin(client: &Client, name: &str) {
    // The backend of this sink's previous session (a restart, a CLI replay) may still hold the
    // origin for a moment after its client went away.
    const ATTEMPTS: u32 = 50;
    for attempt in 1..=ATTEMPTS {
        match try_mark_origin(client, name).await {
            Ok(()) => return,
            Err(e) if attempt < ATTEMPTS && e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                let reason = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
                tracing::warn!(origin = name, %reason, "cannot tag writes with a replication origin; echoes are not marked");
                return;
            }
        }
    }
}

async fn try_mark_origin(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS \
             (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&name],
        )
        .await?;
    client.execute("SELECT pg_replication_origin_session_setup($1)", &[&name]).await.map(|_| ())
}

//! The machinery every mapped sink shares: changes are mapped as they are accepted and
//! coalesced per key into batches of `batch.max_records` changes; a batch is written when full,
//! when its first change is `batch.max_age` old, or on flush. A truncate closes the batch before
//! it and is written on its own, so it never overtakes or is overtaken by the rows around it.
//! Batches are written by a background flight while the next are mapped; the durable cursor
//! moves to a batch's last offset only after the target confirmed it.
//!
//! A target system plugs in through [`Connect`] (opened once the mapping knows its fields) and
//! [`Target`] (writes one batch, one item per key).

mod flight;
pub mod replay;

use crate::config::BatchLimits;
use crate::deadletter::{Entry, EntryStore, Reason};
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, Position, TableSchema};
use crate::log::{EmbeddedLog, LogRecord};
use crate::mapping::coalesce::{Change, Coalescer, Write};
use crate::mapping::{Mapped, Mapper, MappingConfig};
use crate::runtime::sink::{Progress, Sink};
use flight::{fly, Landed, Segment};
use minijinja::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinHandle;

/// A mapped key as text: the form batches coalesce by.
pub type Key = Vec<Option<String>>;

/// Where a write comes from: the change (by log offset) and its mapped key.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: u64,
    pub event: Arc<ChangeEvent>,
    pub schema: Arc<TableSchema>,
    pub key: Vec<Value>,
}

impl Record {
    /// The (first) key value as text: the external ID a CRM record is upserted and deleted by.
    pub fn external_id(&self) -> String {
        self.key.first().map(|v| v.to_string()).unwrap_or_default()
    }
}

/// One key's write.
#[derive(Debug, Clone)]
pub struct Item {
    pub record: Record,
    pub write: Write<Vec<Value>>,
}

/// What batches came to, for counters and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub upserted: u64,
    pub deleted: u64,
    /// Conflicts where the target's record stayed as it was.
    pub kept: u64,
    pub parked: u64,
    /// Records set aside in the dead-letter queue (mapping failures and refusals).
    pub rejected: u64,
}

impl Applied {
    pub fn add(&mut self, other: &Applied) {
        self.upserted += other.upserted;
        self.deleted += other.deleted;
        self.kept += other.kept;
        self.parked += other.parked;
        self.rejected += other.rejected;
    }
}

/// A target system, connected.
#[async_trait::async_trait]
pub trait Target: Send + 'static {
    /// Writes one batch (one item per key, in first-seen order). Records the target refuses
    /// permanently are set aside by the target (with their reason) and counted as rejected; an
    /// error means nothing of the batch may be assumed written, and the batch is sent again.
    async fn write_batch(&mut self, items: Vec<Item>) -> Result<Applied>;

    /// Removes every record (a truncate of the source table at `position`).
    async fn truncate(&mut self, position: Position) -> Result<()>;
}

/// Opens a [`Target`] once the mapping knows its key and field names.
#[async_trait::async_trait]
pub trait Connect: Send + Sync + 'static {
    type Target: Target;
    async fn connect(&self, mapper: &Mapper) -> Result<Self::Target>;
}

/// Segments waiting beyond the one being filled, above which the sink waits for its flight:
/// bounds the memory of a sink whose target is slower than its source.
const MAX_WAITING: usize = 4;

/// A sink that maps, coalesces and writes batches to a [`Target`].
pub struct MappedSink<C: Connect> {
    name: String,
    table: crate::event::TableId,
    limits: BatchLimits,
    connector: C,
    log: EmbeddedLog,
    /// The connected target, when no flight has it (neither: not connected yet).
    target: Option<C::Target>,
    /// Segments being written in the background.
    flight: Option<JoinHandle<Landed<C::Target>>>,
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
}

impl<C: Connect> MappedSink<C> {
    /// Builds the sink; the mapping is checked against each source schema as it is first seen,
    /// and the target is connected then.
    pub async fn build(
        name: &str,
        mapping: MappingConfig,
        limits: BatchLimits,
        connector: C,
        log: EmbeddedLog,
        cursor: u64,
    ) -> Result<Self> {
        let table = mapping.table.clone();
        let mut sink = Self {
            name: name.to_string(),
            dead: EntryStore::dead_letters(log.dir(), name),
            mapper: Mapper::new(mapping),
            horizon: log.replay_horizon(),
            table,
            limits,
            connector,
            log,
            target: None,
            flight: None,
            schemas: HashMap::new(),
            segments: VecDeque::new(),
            durable: cursor,
            accepted: cursor,
            totals: Applied::default(),
        };
        // Resolve the mapping against the newest schema of the table, so a wrong column in the
        // mapping or the target stops the run now rather than at the first change.
        let latest = sink.log.schemas().await?.into_iter().filter(|(_, s)| s.table == sink.table).last();
        if let Some((id, schema)) = latest {
            sink.schema(id, Some(schema)).await?;
        }
        Ok(sink)
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
        if schema.table == self.table && self.target.is_none() && self.flight.is_none() {
            self.target = Some(self.connector.connect(&self.mapper).await?);
        }
        Ok(schema)
    }

    fn batch(&mut self) -> &mut Segment {
        let full = match self.segments.back() {
            Some(s @ Segment::Batch { .. }) => s.changes() >= self.limits.max_records,
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
            Some(s @ Segment::Batch { started, .. }) => {
                flush
                    || self.segments.len() > 1
                    || s.changes() >= self.limits.max_records
                    || started.elapsed() >= self.limits.max_age
            }
        }
    }

    /// Takes a landed flight back: its target, its durable offset, and (after an error) the
    /// segments it did not write, ahead of everything newer.
    fn land(&mut self, landed: Landed<C::Target>) -> Result<()> {
        self.target = Some(landed.target);
        if let Some(d) = landed.durable {
            self.durable = d;
        }
        let a = landed.applied;
        self.totals.add(&a);
        metrics::counter!("sluice_sink_writes_total", "sink" => self.name.clone()).increment(a.upserted + a.deleted);
        metrics::counter!("sluice_dead_letters_total", "sink" => self.name.clone()).increment(a.rejected);
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
            let target =
                self.target.take().expect("a segment with writes means the table's schema was seen and connected");
            self.flight = Some(tokio::spawn(fly(target, self.dead.clone(), due)));
        }
    }
}

#[async_trait::async_trait]
impl<C: Connect> Sink for MappedSink<C> {
    async fn write(&mut self, records: Vec<LogRecord>) -> Result<()> {
        for r in records {
            let e = &r.event;
            let schema = if e.table == self.table { Some(self.schema(e.schema_id, None).await?) } else { None };
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
                    self.segments.push_back(Segment::Truncate { offset: r.offset, position: r.event.position });
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
                    tracing::warn!(sink = %self.name, offset = r.offset, error = %err.0, "mapping failed; dead-lettered");
                    let entry = Entry::new(r.offset, &self.name, Reason::Mapping, err.0, &r.event, &schema, None, None);
                    if let Segment::Batch { failed, last, .. } = self.batch() {
                        failed.push(entry);
                        *last = r.offset;
                    }
                    continue;
                }
            };
            let text = key.iter().map(key_text).collect();
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

/// A key value as text: what makes two changes "the same key".
fn key_text(v: &Value) -> Option<String> {
    if v.is_none() || v.is_undefined() {
        None
    } else {
        Some(v.to_string())
    }
}

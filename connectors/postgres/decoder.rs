//! pgoutput messages to change events, in commit order.

use super::backfill::fence::{Fence, Verdict};
use super::backfill::{self, key_bytes, Backfills, Deposit, Outcome};
use super::catalog::Catalog;
use super::replication::WalMessage;
use super::toast::ToastResolver;
use super::values::{decode, PG_EPOCH_MICROS};
use super::HEARTBEAT_PREFIX;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, Position, Row, TableId, TableSchema, Value};
use crate::log::{EmbeddedLog, SchemaRegistry, WriteBatch};
use crate::runtime::progress::{now_ms, SourceProgress};
use pg_walstream::{LogicalReplicationMessage as M, TupleData};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

struct Relation {
    schema_id: u32,
    schema: Arc<TableSchema>,
}

/// A transaction being received (non-streamed: the server sends it whole at commit).
struct OpenTx {
    commit_lsn: u64,
    commit_ts_us: i64,
    xid: u32,
    ordinal: u64,
    /// Set by an Origin message: the transaction was written under a replication origin.
    origin: Option<Arc<str>>,
}

pub struct Decoder {
    pipeline: String,
    tables: Vec<TableId>,
    registry: SchemaRegistry,
    relations: HashMap<u32, Relation>,
    tx: Option<OpenTx>,
    /// The streamed transaction whose chunk is being received.
    stream: Option<u32>,
    /// Next staging sequence per streamed transaction.
    stream_seq: HashMap<u32, u64>,
    /// Replication origins of streamed transactions (sent once, in their first chunk).
    stream_origin: HashMap<u32, Arc<str>>,
    toast: ToastResolver,
    /// The highest LSN safe to acknowledge once the current batch is durable.
    ack: Option<u64>,
    backfills: Arc<Backfills>,
    /// Which keys of backfilled tables each transaction touched.
    fence: Fence,
}

impl Decoder {
    pub fn new(pipeline: &str, tables: &[TableId], registry: SchemaRegistry, backfills: Arc<Backfills>) -> Self {
        let mut fence = Fence::default();
        // A new session re-receives streamed transactions from their start: none is blind.
        for table in backfills.running_tables() {
            fence.track(&table, []);
        }
        Self {
            pipeline: pipeline.to_string(),
            tables: tables.to_vec(),
            registry,
            relations: HashMap::new(),
            tx: None,
            stream: None,
            stream_seq: HashMap::new(),
            stream_origin: HashMap::new(),
            toast: ToastResolver::default(),
            ack: None,
            backfills,
            fence,
        }
    }

    /// A position is waiting to be acknowledged with the next flush.
    pub fn ack_pending(&self) -> bool {
        self.ack.is_some()
    }

    pub fn take_ack(&mut self) -> Option<u64> {
        self.ack.take()
    }

    pub fn batch_committed(&mut self) {
        self.toast.batch_committed();
        // Tables whose backfills ended (done or failed) need no more recording.
        if !self.fence.idle() {
            let running = self.backfills.running_tables();
            self.fence.retain(|t| running.contains(t));
            if running.is_empty() {
                self.fence.prune(std::iter::empty());
            }
        }
    }

    pub async fn handle(
        &mut self,
        msg: WalMessage,
        batch: &mut WriteBatch,
        catalog: &mut Catalog,
        log: &EmbeddedLog,
        progress: &SourceProgress,
    ) -> Result<()> {
        let fetched = match msg.message {
            M::Insert { relation_id, tuple } => {
                self.change(relation_id, Op::Insert, None, Some(tuple), msg.stream_xid, batch, catalog, log).await?
            }
            M::Update { relation_id, old_tuple, new_tuple, .. } => {
                self.change(relation_id, Op::Update, old_tuple, Some(new_tuple), msg.stream_xid, batch, catalog, log)
                    .await?
            }
            M::Delete { relation_id, old_tuple, .. } => {
                self.change(relation_id, Op::Delete, Some(old_tuple), None, msg.stream_xid, batch, catalog, log).await?
            }
            other => {
                self.control(other, msg.wal_end, msg.stream_xid, batch, catalog, progress).await?;
                false
            }
        };
        if fetched {
            progress.toast_fetched.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("sluice_toast_fetched_total").increment(1);
        }
        Ok(())
    }

    /// Everything but row changes: transaction boundaries, schemas, streaming, messages.
    async fn control(
        &mut self,
        message: M,
        wal_end: u64,
        stream_xid: Option<u32>,
        batch: &mut WriteBatch,
        catalog: &mut Catalog,
        progress: &SourceProgress,
    ) -> Result<()> {
        match message {
            M::Begin { final_lsn, timestamp, xid } => {
                self.tx = Some(OpenTx {
                    commit_lsn: final_lsn,
                    commit_ts_us: timestamp + PG_EPOCH_MICROS,
                    xid,
                    ordinal: 0,
                    origin: None,
                });
            }
            M::Commit { end_lsn, .. } => {
                if let Some(tx) = &self.tx {
                    self.fence.commit(tx.xid);
                }
                if let Some(tx) = self.tx.take().filter(|tx| tx.ordinal > 0) {
                    progress.last_data_ms.store(now_ms(), Ordering::Release);
                    progress.last_commit_us.store(tx.commit_ts_us as u64, Ordering::Release);
                    progress.events.fetch_add(tx.ordinal, Ordering::Relaxed);
                }
                self.ack = Some(end_lsn);
            }
            M::Relation { relation_id, namespace, relation_name, columns, .. } => {
                let table = TableId::new(&*namespace, &*relation_name);
                if !self.tables.contains(&table) {
                    self.relations.remove(&relation_id);
                    return Ok(());
                }
                let pk = catalog.primary_key(relation_id).await?;
                let cols: Vec<(String, u32, i32)> =
                    columns.iter().map(|c| (c.name.to_string(), c.type_id, c.type_modifier)).collect();
                let schema = catalog.schema(table.clone(), &cols, &pk).await?;
                let (schema_id, schema) = self.registry.intern(schema, batch);
                if self.relations.get(&relation_id).is_some_and(|r| r.schema_id != schema_id) {
                    tracing::info!(table = %table, schema_id, "table schema changed");
                }
                self.relations.insert(relation_id, Relation { schema_id, schema });
            }
            M::Truncate { relation_ids, .. } => {
                for rel in relation_ids {
                    let Some(r) = self.relations.get(&rel) else { continue };
                    let (schema_id, schema) = (r.schema_id, r.schema.clone());
                    self.toast.truncate(&schema.table);
                    let event = self.event(&schema, schema_id, Op::Truncate, Vec::new(), None, None);
                    self.emit(event, &schema, schema_id, stream_xid, batch);
                }
            }
            M::StreamStart { xid, .. } => self.stream = Some(xid),
            M::StreamStop => self.stream = None,
            M::StreamCommit { xid, commit_lsn, end_lsn, timestamp, .. } => {
                batch.promote(xid, commit_lsn, timestamp + PG_EPOCH_MICROS);
                self.fence.commit(xid);
                self.toast.promote(xid);
                self.stream_seq.remove(&xid);
                self.stream_origin.remove(&xid);
                self.ack = Some(end_lsn);
                progress.last_data_ms.store(now_ms(), Ordering::Release);
            }
            M::StreamAbort { xid, subtransaction_xid, .. } => {
                batch.abort(xid, subtransaction_xid);
                self.fence.abort(xid, subtransaction_xid);
                if xid == subtransaction_xid {
                    self.toast.abort(xid);
                    self.stream_seq.remove(&xid);
                    self.stream_origin.remove(&xid);
                }
            }
            M::Message { flags, prefix, content, .. } if prefix == backfill::PREFIX => {
                // Backfill messages are transactional: they sit in commit order.
                if flags & 1 == 1 && self.tx.is_some() {
                    self.backfill_message(&content, batch, progress);
                }
            }
            M::Message { flags, prefix, content, .. } => {
                let transactional = flags & 1 == 1;
                if !transactional && self.tx.is_none() {
                    // Nothing of an open transaction precedes a non-transactional message here,
                    // so its position is safe to acknowledge once the batch is durable.
                    self.ack = Some(wal_end);
                    if prefix == HEARTBEAT_PREFIX {
                        let text = String::from_utf8_lossy(&content);
                        if let Some(ms) = text.strip_prefix(&format!("{}:", self.pipeline)).and_then(|t| t.parse().ok())
                        {
                            progress.heartbeat_seen_ms.fetch_max(ms, Ordering::AcqRel);
                        }
                    }
                }
            }
            M::Origin { origin_name, .. } => {
                let name: Arc<str> = Arc::from(origin_name);
                match (self.stream, &mut self.tx) {
                    (Some(xid), _) => {
                        self.stream_origin.insert(xid, name);
                    }
                    (None, Some(tx)) => tx.origin = Some(name),
                    (None, None) => {}
                }
            }
            M::Type { .. } => {}
            other => {
                return Err(Error::permanent(
                    "pgoutput",
                    format!("unexpected message {other:?} (two-phase commit is not enabled)"),
                ));
            }
        }
        Ok(())
    }

    fn backfill_message(&mut self, content: &[u8], batch: &mut WriteBatch, progress: &SourceProgress) {
        match backfill::Message::decode(content) {
            Some(backfill::Message::Request(request)) if request.pipeline == self.pipeline => {
                let tables = request.tables.clone();
                let (id, name) = (request.id.clone(), request.name.clone());
                if self.backfills.add(*request) {
                    tracing::info!(job = %id, name = %name, "backfill requested");
                    for table in &tables {
                        self.fence.track(table, self.stream_seq.keys().copied());
                    }
                }
            }
            Some(backfill::Message::High(piece)) => {
                if let Some(deposit) = self.backfills.take_deposit(&piece) {
                    self.land(deposit, batch, progress);
                }
            }
            _ => {}
        }
    }

    /// Lands a backfill piece at the current transaction's commit position: the rows no
    /// transaction unseen by the piece's snapshot touched.
    fn land(&mut self, deposit: Deposit, batch: &mut WriteBatch, progress: &SourceProgress) {
        let Deposit { job, table, chunk, last, snapshot, schema, rows, reply, permit: _permit } = deposit;
        let (stale, everything) = match self.fence.judge(&schema.table, &snapshot) {
            Verdict::Redo => {
                let _ = reply.send(Outcome::Redo);
                return;
            }
            Verdict::Land { stale, everything } => (stale, everything),
        };
        let tx = self.tx.as_ref().expect("backfill messages are transactional");
        let (lsn, commit_ts_us) = (tx.commit_lsn, tx.commit_ts_us);
        let (schema_id, schema) = self.registry.intern((*schema).clone(), batch);
        batch.uses_schema(schema_id, &schema);
        let key_idx = schema.key_indexes();
        // The table's last backfill row lets sinks finish what they hold for it now, as the end
        // of a snapshot does.
        let ends_table = last && self.backfills.ends_table(&job, table, chunk);
        let mut landed = 0u64;
        let n = rows.len();
        batch.reserve(n);
        for (i, row) in rows.into_iter().enumerate().filter(|_| !everything) {
            let key: Row = key_idx.iter().map(|&k| row[k].clone()).collect();
            if !stale.is_empty() && stale.contains(&key_bytes(&key)) {
                continue;
            }
            batch.append(ChangeEvent {
                table: schema.table.clone(),
                schema_id,
                op: Op::Read,
                key,
                before: None,
                after: Some(row),
                position: Position::snapshot(lsn, landed),
                commit_ts_us,
                tx_id: None,
                toast_fetched: false,
                snapshot_last: ends_table && i + 1 == n,
                origin: None,
            });
            landed += 1;
        }
        let now = now_ms();
        let finished = self.backfills.with_book(|b| b.piece_landed(&job, table, chunk, landed, last, now));
        if finished {
            tracing::info!(job = %job, "backfill complete");
        }
        progress.events.fetch_add(landed, Ordering::Relaxed);
        progress.last_data_ms.store(now, Ordering::Release);
        metrics::counter!("sluice_backfill_rows_total", "table" => schema.table.to_string()).increment(landed);
        if let Some(outstanding) = self.backfills.outstanding_snapshots() {
            self.fence.prune(outstanding.iter());
        }
        let _ = reply.send(Outcome::Landed);
    }

    #[allow(clippy::too_many_arguments)]
    async fn change(
        &mut self,
        relation_id: u32,
        op: Op,
        old: Option<TupleData>,
        new: Option<TupleData>,
        stream_xid: Option<u32>,
        batch: &mut WriteBatch,
        catalog: &mut Catalog,
        log: &EmbeddedLog,
    ) -> Result<bool> {
        let Some(r) = self.relations.get(&relation_id) else { return Ok(false) };
        let (schema_id, schema) = (r.schema_id, r.schema.clone());
        let before = old.map(|t| row(&schema, &t)).transpose()?;
        let after = new.map(|t| row(&schema, &t)).transpose()?;
        let key_of =
            |r: &Row| -> Row { schema.columns.iter().zip(r).filter(|(c, _)| c.key).map(|(_, v)| v.clone()).collect() };
        let source = after.as_ref().or(before.as_ref()).expect("a change has a row");
        let key = key_of(source);
        // The server sends the old row of an update only when the key changed (or with REPLICA
        // IDENTITY FULL): a changed key is the old key's delete, then the new key's insert, as
        // Debezium emits it, so keyed sinks and changelog readers never keep the old key.
        let old_key = before.as_ref().map(key_of).filter(|k| op == Op::Update && *k != key);
        // With REPLICA IDENTITY DEFAULT the old row of a delete holds only the key.
        let before = before.filter(|b| b.iter().enumerate().any(|(i, v)| !schema.columns[i].key && *v != Value::Null));
        let Some(old_key) = old_key else {
            let mut event = self.event(&schema, schema_id, op, key, before, after);
            self.toast.resolve(&mut event, &schema, self.stream, log, catalog.client()).await?;
            let fetched = event.toast_fetched;
            self.emit(event, &schema, schema_id, stream_xid, batch);
            return Ok(fetched);
        };
        // Unchanged TOAST values of the new row are the old key's: resolved under it before the
        // delete forgets them, then remembered under the new key.
        let mut insert = self.event(&schema, schema_id, Op::Insert, key, before.clone(), after);
        self.toast.resolve_as(&mut insert, Some(&old_key), &schema, self.stream, log, catalog.client()).await?;
        let mut delete = self.event(&schema, schema_id, Op::Delete, old_key, before, None);
        self.toast.resolve(&mut delete, &schema, self.stream, log, catalog.client()).await?;
        self.emit(delete, &schema, schema_id, stream_xid, batch);
        insert.before = None;
        insert.position = self.position();
        let fetched = insert.toast_fetched;
        self.emit(insert, &schema, schema_id, stream_xid, batch);
        Ok(fetched)
    }

    /// The position of the next change of the current transaction.
    fn position(&self) -> Position {
        match &self.tx {
            Some(tx) => Position::change(tx.commit_lsn, tx.ordinal),
            // Streamed: positions are assigned when the transaction commits.
            None => Position::change(0, 0),
        }
    }

    fn event(
        &self,
        schema: &TableSchema,
        schema_id: u32,
        op: Op,
        key: Row,
        before: Option<Row>,
        after: Option<Row>,
    ) -> ChangeEvent {
        let position = self.position();
        let (commit_ts_us, tx_id, origin) = match &self.tx {
            Some(tx) => (tx.commit_ts_us, Some(tx.xid as u64), tx.origin.clone()),
            // Streamed: commit time is assigned when the transaction commits.
            None => (0, self.stream.map(|x| x as u64), self.stream.and_then(|x| self.stream_origin.get(&x).cloned())),
        };
        ChangeEvent {
            table: schema.table.clone(),
            schema_id,
            op,
            key,
            before,
            after,
            position,
            commit_ts_us,
            tx_id,
            toast_fetched: false,
            snapshot_last: false,
            origin,
        }
    }

    fn emit(
        &mut self,
        event: ChangeEvent,
        schema: &Arc<TableSchema>,
        schema_id: u32,
        stream_xid: Option<u32>,
        batch: &mut WriteBatch,
    ) {
        batch.uses_schema(schema_id, schema);
        if !self.fence.idle() && self.fence.tracks(&event.table) {
            let ids = match (self.stream, &self.tx) {
                (Some(top), _) => Some((top, stream_xid.unwrap_or(top))),
                (None, Some(tx)) => Some((tx.xid, tx.xid)),
                (None, None) => None,
            };
            if let Some((top, sub)) = ids {
                match event.op {
                    Op::Truncate => self.fence.truncate(top, sub, &event.table),
                    _ => self.fence.touch(top, sub, &event.table, key_bytes(&event.key)),
                }
            }
        }
        match (self.stream, &mut self.tx) {
            (Some(top), _) => {
                let seq = self.stream_seq.entry(top).or_default();
                *seq += 1;
                batch.stage(top, stream_xid.unwrap_or(top), *seq, event);
            }
            (None, Some(tx)) => {
                tx.ordinal += 1;
                batch.append(event);
            }
            (None, None) => batch.append(event),
        }
    }
}

fn row(schema: &TableSchema, tuple: &TupleData) -> Result<Row> {
    if tuple.columns.len() != schema.columns.len() {
        return Err(Error::permanent(
            "pgoutput",
            format!("{}: row has {} columns, schema has {}", schema.table, tuple.columns.len(), schema.columns.len()),
        ));
    }
    tuple
        .columns
        .iter()
        .zip(&schema.columns)
        .map(|(c, col)| {
            if c.is_null() {
                Ok(Value::Null)
            } else if c.is_unchanged() {
                Ok(Value::UnchangedToast)
            } else {
                let text = c.as_str().ok_or_else(|| Error::permanent("pgoutput", "value is not text"))?;
                decode(&col.ty, &text).map_err(|e| Error::permanent(format!("{} column {}", schema.table, col.name), e))
            }
        })
        .collect()
}

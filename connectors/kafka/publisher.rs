//! Drains the source's local log into Kafka. Its durable cursor is the in-order delivery
//! watermark: an offset counts only when it and every offset before it have a successful
//! delivery report.

use super::envelope::{EnvelopeWriter, Flavor};
use super::topics::Topics;
use super::transactions::{Marker, TransactionTracker, TxOrder};
use super::{classify, client_config, EVENT_HEADER, SCHEMA_HEADER};
use crate::config::KafkaTransportConfig;
use crate::error::{Error, Result};
use crate::event::{Op, TableSchema};
use crate::log::{EmbeddedLog, LogRecord};
use crate::runtime::sink::{Progress, Sink};
use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// The name under which the publisher's cursor is stored in the local log.
pub const PUBLISHER: &str = "kafka";

/// Turns "log offsets up to N are in Kafka and durable in the local log" into "source positions
/// up to P may be acknowledged": the source records, at each commit, the head it reached and the
/// position it may acknowledge once that head is delivered and checkpointed. (The publisher
/// produces commits before their checkpoint, so a change reaches Kafka without waiting for an
/// fsync; a crash reverts the local log to its checkpoint, and the slot resends from there.)
#[derive(Clone)]
pub struct AckGate {
    inner: Arc<Mutex<GateState>>,
    acked: watch::Sender<u64>,
}

#[derive(Default)]
struct GateState {
    /// (log head, source position acknowledgeable once the head is delivered), rising.
    pending: VecDeque<(u64, u64)>,
    delivered: u64,
    /// The local log's durable head (see `EmbeddedLog::checkpoint`).
    durable: u64,
    /// The newest (log head, source position) committed, delivered or not.
    latest: (u64, u64),
}

impl Default for AckGate {
    fn default() -> Self {
        Self { inner: Arc::default(), acked: watch::channel(0).0 }
    }
}

impl AckGate {
    /// The source committed up to `head` in the local log and may acknowledge `position`
    /// once everything up to `head` is delivered.
    pub fn committed(&self, head: u64, position: u64) {
        let mut s = self.inner.lock().expect("ack gate lock");
        s.pending.push_back((head, position));
        s.latest = (head, position);
        self.release(&mut s);
    }

    /// The newest (log head, source position) the source committed: once everything up to
    /// that head is published, every change at or before the position is.
    pub fn latest(&self) -> (u64, u64) {
        self.inner.lock().expect("ack gate lock").latest
    }

    /// Everything up to `offset` is in Kafka.
    pub fn delivered(&self, offset: u64) {
        let mut s = self.inner.lock().expect("ack gate lock");
        s.delivered = s.delivered.max(offset);
        self.release(&mut s);
    }

    /// Everything up to `offset` is durable in the local log.
    pub fn durable(&self, offset: u64) {
        let mut s = self.inner.lock().expect("ack gate lock");
        s.durable = s.durable.max(offset);
        self.release(&mut s);
    }

    /// Waits (at most `limit`) until every committed head is delivered, and returns the
    /// acknowledgeable position: at a clean stop the slot is told all Kafka has, so the next
    /// start does not capture and publish it again.
    pub async fn settled(&self, limit: std::time::Duration) -> u64 {
        let mut acked = self.acked.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        while !self.inner.lock().expect("ack gate lock").pending.is_empty() {
            if !matches!(tokio::time::timeout_at(deadline, acked.changed()).await, Ok(Ok(()))) {
                break;
            }
        }
        let position = *acked.borrow();
        position
    }

    /// The acknowledgeable source position, as it rises.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    fn release(&self, s: &mut GateState) {
        let mut released = None;
        while let Some(&(head, position)) = s.pending.front() {
            if head > s.delivered.min(s.durable) {
                break;
            }
            released = Some(position);
            s.pending.pop_front();
        }
        if let Some(p) = released {
            self.acked.send_if_modified(|acked| {
                let moved = p > *acked;
                *acked = (*acked).max(p);
                moved
            });
        }
    }
}

/// One log record on its way: its delivery reports (a truncate goes to every partition, a
/// delete is followed by a tombstone).
struct InFlight {
    record: LogRecord,
    deliveries: Vec<DeliveryFuture>,
}

/// The publisher, run as a sink of the local log.
pub struct KafkaPublisher {
    producer: FutureProducer,
    /// To create the producer again after a fatal error (an idempotent producer whose
    /// sequence the broker lost, say, after a restart).
    config: rdkafka::ClientConfig,
    topics: Topics,
    envelope: EnvelopeWriter,
    log: EmbeddedLog,
    /// Each schema with its encoded header, looked up once.
    schemas: HashMap<u32, (Arc<TableSchema>, Arc<[u8]>)>,
    /// Records accepted but not produced yet: new ones, or ones whose delivery failed.
    unsent: VecDeque<LogRecord>,
    in_flight: VecDeque<InFlight>,
    delivered: u64,
    gate: AckGate,
    produced: u64,
    /// Debezium's heartbeat topic, and when the last beat went out.
    heartbeat: Heartbeat,
    /// The newest log offset produced (delivered or not).
    produced_offset: u64,
    /// With `transaction_metadata` (PostgreSQL): the transaction topic and where the
    /// publisher is in the stream of transactions.
    transactions: Option<Transactions>,
}

struct Transactions {
    topic: String,
    tracker: TransactionTracker,
    /// What each record not yet delivered was given (markers before it, its place), so a
    /// record sent again after a failed delivery is sent exactly as the first time.
    placed: HashMap<u64, (Vec<Marker>, Option<TxOrder>)>,
}

/// A record in `__debezium-heartbeat.PREFIX` every interval, as Debezium's connectors write it
/// (key `{"serverName": PREFIX}`, value `{"ts_ms": ...}`), so consumers can tell a quiet source
/// from a dead one.
struct Heartbeat {
    topic: String,
    key: String,
    every: std::time::Duration,
    last: Option<std::time::Instant>,
}

impl KafkaPublisher {
    pub async fn build(
        cfg: &KafkaTransportConfig,
        envelope: EnvelopeWriter,
        log: EmbeddedLog,
        cursor: u64,
        gate: AckGate,
    ) -> Result<Self> {
        let mut c = client_config(cfg);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", cfg.compression.as_str())
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("message.max.bytes", cfg.max_message_bytes.to_string())
            // The Java client's partitioner, so a key lands where Debezium would put it.
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", "30000")
            .set("queue.buffering.max.messages", "200000");
        let producer: FutureProducer = c.create().map_err(|e| Error::config(format!("kafka producer: {e}")))?;
        gate.delivered(cursor);
        let topics = Topics::new(cfg)?;
        let heartbeat_topic = Topics::heartbeat_topic(&cfg.topic_prefix);
        topics.create(&heartbeat_topic, 1).await?;
        let transactions = if cfg.transaction_metadata && envelope.flavor == Flavor::Postgres {
            let topic = Topics::transaction_topic(&cfg.topic_prefix);
            // One partition: BEGIN and END of every transaction in commit order.
            topics.create(&topic, 1).await?;
            Some(Transactions { topic, tracker: TransactionTracker::new(cfg.schemas), placed: HashMap::new() })
        } else {
            None
        };
        Ok(Self {
            producer,
            config: c,
            topics,
            envelope,
            log,
            schemas: HashMap::new(),
            unsent: VecDeque::new(),
            in_flight: VecDeque::new(),
            delivered: cursor,
            gate,
            produced: 0,
            heartbeat: Heartbeat {
                topic: heartbeat_topic,
                key: serde_json::json!({ "serverName": cfg.topic_prefix }).to_string(),
                every: cfg.heartbeat,
                last: None,
            },
            produced_offset: cursor,
            transactions,
        })
    }

    async fn schema(&mut self, id: u32) -> Result<(Arc<TableSchema>, Arc<[u8]>)> {
        if let Some(s) = self.schemas.get(&id) {
            return Ok(s.clone());
        }
        let schema =
            self.log.schema(id).await?.ok_or_else(|| Error::Storage(format!("schema {id} is not registered")))?;
        let encoded: Arc<[u8]> = postcard::to_allocvec(&schema)?.into();
        let entry = (Arc::new(schema), encoded);
        self.schemas.insert(id, entry.clone());
        Ok(entry)
    }

    /// Sends a heartbeat when one is due. Its delivery is not awaited: a lost beat is only late.
    fn beat(&mut self) {
        let hb = &mut self.heartbeat;
        if hb.last.is_some_and(|at| at.elapsed() < hb.every) {
            return;
        }
        let value = format!("{{\"ts_ms\":{}}}", chrono::Utc::now().timestamp_millis());
        let record: FutureRecord<'_, str, str> =
            FutureRecord::to(&hb.topic).key(hb.key.as_str()).payload(value.as_str());
        if let Err((e, _)) = self.producer.send_result(record) {
            tracing::debug!(error = %e, "heartbeat not sent");
        }
        hb.last = Some(std::time::Instant::now());
    }

    /// Publishes the END of the open transaction once the source has committed past it and
    /// every change it committed is produced (nothing follows it to end it otherwise).
    async fn end_finished_transaction(&mut self) -> Result<()> {
        let Some(t) = self.transactions.as_ref() else { return Ok(()) };
        let (head, position) = self.gate.latest();
        if !self.unsent.is_empty() || self.produced_offset < head {
            return Ok(());
        }
        let Some(end) = t.tracker.end_if_past(position) else { return Ok(()) };
        let record: FutureRecord<'_, str, str> =
            FutureRecord::to(&t.topic).key(end.key.as_str()).payload(end.value.as_str());
        let delivery = self.producer.send_result(record).map_err(|(e, _)| classify("kafka produce", e))?;
        if let Some(e) = failure(delivery.await) {
            return Err(classify("kafka produce", e));
        }
        if let Some(t) = self.transactions.as_mut() {
            t.tracker.ended();
        }
        Ok(())
    }

    /// Produces every unsent record, in order.
    async fn send_unsent(&mut self) -> Result<()> {
        while let Some(record) = self.unsent.pop_front() {
            let later = self.unsent.len();
            match self.produce(&record).await {
                Ok(deliveries) => self.in_flight.push_back(InFlight { record, deliveries }),
                Err(e) => {
                    if e.is_retryable() {
                        self.requeue_in_flight().await?;
                    }
                    // Records requeued while producing this one are older: it goes after them.
                    let older = self.unsent.len() - later;
                    self.unsent.insert(older, record);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn produce(&mut self, record: &LogRecord) -> Result<Vec<DeliveryFuture>> {
        let event = &record.event;
        let (schema, schema_bytes) = self.schema(event.schema_id).await?;
        let (topic, partitions) = self.topics.ensure(&event.table).await?;
        let key = self.envelope.key(&schema, event);
        let (markers, order) = match self.transactions.as_mut() {
            Some(t) => t.placed.entry(record.offset).or_insert_with(|| t.tracker.next(event)).clone(),
            None => (Vec::new(), None),
        };
        let value = self.envelope.value_in(&schema, event, chrono::Utc::now().timestamp_millis(), order.as_ref());
        let encoded = postcard::to_allocvec(event.as_ref())?;
        let headers = OwnedHeaders::new()
            .insert(Header { key: EVENT_HEADER, value: Some(encoded.as_slice()) })
            .insert(Header { key: SCHEMA_HEADER, value: Some(&schema_bytes[..]) });
        // A truncate has no key, and every key's partition must see it in order.
        let targets: Vec<Option<i32>> =
            if event.op == Op::Truncate { (0..partitions).map(Some).collect() } else { vec![None] };
        let mut deliveries = Vec::with_capacity(targets.len() + markers.len() + 1);
        if let Some(t) = self.transactions.as_ref().filter(|_| !markers.is_empty()) {
            let topic = t.topic.clone();
            for m in &markers {
                deliveries.push(
                    self.send(&topic, Some(m.key.as_bytes()), Some(m.value.as_bytes()), None, None, record).await?,
                );
            }
        }
        let last = targets.len() - 1;
        let mut headers = Some(headers);
        for (i, partition) in targets.into_iter().enumerate() {
            // Copied only for a truncate's extra partitions: a copy costs as much as the encoding.
            let h = if i == last { headers.take() } else { headers.clone() };
            deliveries.push(self.send(&topic, key.as_deref(), Some(&value), h, partition, record).await?);
        }
        if event.op == Op::Delete {
            // Debezium's tombstone, so log compaction can drop the key.
            deliveries.push(self.send(&topic, key.as_deref(), None, None, None, record).await?);
        }
        self.produced += 1;
        self.produced_offset = self.produced_offset.max(record.offset);
        Ok(deliveries)
    }

    async fn send(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
        partition: Option<i32>,
        record: &LogRecord,
    ) -> Result<DeliveryFuture> {
        let mut r: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        r.key = key;
        r.payload = value;
        r.headers = headers;
        r.partition = partition;
        loop {
            match self.producer.send_result(r) {
                Ok(delivery) => return Ok(delivery),
                // The local queue is full: wait for the oldest delivery, then try again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    r = back;
                    if !self.settle_front(true).await? {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                Err((e, _)) => return Err(self.refused(e, record)),
            }
        }
    }

    /// After a failed delivery: waits for every report still out, then queues all in-flight
    /// records to be sent again, in order (those delivered meanwhile become replays, which
    /// consumers absorb). A producer in a fatal state is replaced first.
    async fn requeue_in_flight(&mut self) -> Result<()> {
        for f in self.in_flight.iter_mut() {
            for d in f.deliveries.drain(..) {
                let _ = d.await;
            }
        }
        let again: Vec<LogRecord> = self.in_flight.drain(..).map(|f| f.record).collect();
        for r in again.into_iter().rev() {
            self.unsent.push_front(r);
        }
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!(error = %code, reason, "kafka producer failed fatally; starting a new one");
            self.producer = self.config.create().map_err(|e| Error::config(format!("kafka producer: {e}")))?;
        }
        Ok(())
    }

    /// An error for a record Kafka will not take, naming its table and key.
    fn refused(&self, e: KafkaError, record: &LogRecord) -> Error {
        let size = matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
        );
        let event = &record.event;
        let key = format!("{:?}", event.key);
        match classify("kafka produce", e) {
            Error::Permanent { message, .. } if size => Error::permanent(
                "kafka produce",
                format!(
                    "the change to {} with key {key} is larger than transport.producer.max_message_bytes \
                     or the topic's max.message.bytes ({message}); raise both, or leave the column out",
                    event.table
                ),
            ),
            other => other,
        }
    }

    /// Takes the oldest in-flight record's delivery reports if they are in (waiting for them
    /// when `wait`); returns whether one was taken. A failed delivery sends that record and
    /// every later one again, after all of them have settled, so nothing is in flight twice.
    async fn settle_front(&mut self, wait: bool) -> Result<bool> {
        let Some(front) = self.in_flight.front_mut() else { return Ok(false) };
        let mut error: Option<KafkaError> = None;
        while let Some(delivery) = front.deliveries.first_mut() {
            let outcome = if wait { Some(delivery.await) } else { delivery.now_or_never() };
            let Some(outcome) = outcome else { return Ok(false) };
            front.deliveries.remove(0);
            if let Some(e) = failure(outcome) {
                error = Some(e);
            }
        }
        if let Some(e) = error {
            let e = self.refused(e, &self.in_flight[0].record);
            if !e.is_retryable() {
                return Err(e);
            }
            self.requeue_in_flight().await?;
            return Err(e);
        }
        let done = self.in_flight.pop_front().expect("front exists");
        self.delivered = done.record.offset;
        if let Some(t) = self.transactions.as_mut() {
            t.placed.remove(&done.record.offset);
        }
        Ok(true)
    }
}

/// The error of a delivery report, if the delivery failed (a report that never came is
/// `Canceled`).
fn failure(
    outcome: std::result::Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Option<KafkaError> {
    match outcome {
        Ok(Ok(_)) => None,
        Ok(Err((e, _))) => Some(e),
        Err(_) => Some(KafkaError::Canceled),
    }
}

#[async_trait::async_trait]
impl Sink for KafkaPublisher {
    async fn write(&mut self, records: Vec<LogRecord>) -> Result<()> {
        self.unsent.extend(records);
        self.send_unsent().await?;
        // Take what is in without waiting, so the queue of reports stays short.
        while self.settle_front(false).await? {}
        Ok(())
    }

    async fn tick(&mut self, flush: bool) -> Result<Progress> {
        self.send_unsent().await?;
        self.beat();
        self.end_finished_transaction().await?;
        if flush {
            self.producer.flush(std::time::Duration::from_secs(0)).ok();
        }
        while self.settle_front(flush).await? {}
        self.gate.delivered(self.delivered);
        Ok(Progress { cursor: self.delivered, state: Vec::new() })
    }

    fn written(&self) -> (u64, u64) {
        (0, self.produced)
    }
}

#[cfg(test)]
mod tests {
    use super::AckGate;

    #[test]
    fn a_position_is_released_once_delivered_and_durable() {
        let gate = AckGate::default();
        let acked = gate.subscribe();
        gate.committed(10, 100);
        gate.committed(20, 200);
        gate.delivered(20);
        assert_eq!(*acked.borrow(), 0, "delivered but not checkpointed");
        gate.durable(15);
        assert_eq!(*acked.borrow(), 100, "head 10 is both; head 20 is not durable yet");
        gate.durable(25);
        assert_eq!(*acked.borrow(), 200);
        gate.committed(30, 300);
        gate.durable(30);
        assert_eq!(*acked.borrow(), 200, "durable but not delivered");
        gate.delivered(30);
        assert_eq!(*acked.borrow(), 300);
    }
}

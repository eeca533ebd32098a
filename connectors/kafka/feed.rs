//! Feeds one sink from Kafka through its consumer group.
//!
//! Messages are appended to the sink's local buffer log, which the ordinary sink runner reads.
//! A consumer offset is committed only once the sink's cursor in the buffer covers it, so a
//! process that dies loses nothing: its partitions' uncommitted messages go to whichever
//! member takes them over, as replays the sinks already absorb (upserts by key, positions).
//! When the group takes partitions away from a live member, it first makes everything it
//! buffered from them durable and commits, so two members never write one key at once.

use super::debezium::{DebeziumDecoder, Origin};
use super::undecodable::UndecodableRecords;
use super::{client_config, EVENT_HEADER, SCHEMA_HEADER};
use crate::config::KafkaTransportConfig;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, TableSchema};
use crate::log::{EmbeddedLog, SchemaRegistry, WriteBatch};
use crate::runtime::Shutdown;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages appended to the buffer per commit, at most.
const BATCH: usize = 2_000;
/// How long a member giving up partitions waits for its sink before it lets go anyway.
const REVOKE_WAIT: Duration = Duration::from_secs(20);
/// librdkafka's `max.poll.interval.ms`: above [`REVOKE_WAIT`], as a revoke blocks polling.
/// It also bounds a JoinGroup request, so a join the coordinator never answers is retried
/// after about this long instead of the default five minutes.
const MAX_POLL_INTERVAL_MS: &str = "30000";
/// How long a member that is behind may receive nothing before it fetches again.
const STALL: Duration = Duration::from_secs(15);

type Partition = (Arc<str>, i32);

/// What the polling thread hands to the feed, in the order the consumer saw it.
enum Item {
    Message {
        partition: Partition,
        offset: i64,
        event: Option<Box<(ChangeEvent, TableSchema)>>,
    },
    /// The group takes these partitions away; reply once they are durable and committed.
    Revoke(Vec<Partition>, std_mpsc::Sender<()>),
    Failed(Error),
}

/// What the runtime sees of a running feed.
#[derive(Clone, Default)]
pub struct FeedHandle {
    /// When the last message arrived (ms since the epoch), for `--until-idle`.
    pub last_message_ms: Arc<AtomicI64>,
    /// Set while the sink should make everything it holds durable now (a revoke waits on it).
    pub flush_now: Arc<AtomicBool>,
    /// Partitions are assigned and read up to their high watermarks (checked every second).
    pub caught_up: Arc<AtomicBool>,
}

struct GroupContext {
    items: mpsc::Sender<Item>,
    sink: String,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // The consumer's destructor runs this too, and it may run on a runtime thread (when the
        // feed lets go of the consumer after the polling thread): blocking there panics inside
        // the destructor and the process never stops. The feed has committed by then.
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        if let Rebalance::Revoke(list) = rebalance {
            let parts = partitions(list);
            if parts.is_empty() {
                return;
            }
            let (reply, done) = std_mpsc::channel();
            if self.items.blocking_send(Item::Revoke(parts, reply)).is_ok() {
                // The group waits for this member; a sink that cannot finish in time leaves
                // its partitions uncommitted, and the next member replays them.
                if done.recv_timeout(REVOKE_WAIT).is_err() {
                    tracing::warn!(sink = %self.sink, "partitions revoked before the sink finished them; they will be replayed");
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let names: Vec<String> = partitions(list).iter().map(|(t, p)| format!("{t}[{p}]")).collect();
            tracing::info!(sink = %self.sink, partitions = %names.join(","), "partitions assigned");
        }
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<Partition> {
    list.elements().iter().map(|e| (Arc::from(e.topic()), e.partition())).collect()
}

/// Reads one sink's topics into its buffer log.
pub struct KafkaFeed {
    consumer: Arc<BaseConsumer<GroupContext>>,
    items: mpsc::Receiver<Item>,
    buffer: EmbeddedLog,
    sink: String,
    registry: SchemaRegistry,
    /// (buffer offset that makes it durable, partition, Kafka offset), in buffer order.
    pending: VecDeque<(u64, Partition, i64)>,
    handle: FeedHandle,
    shutdown: Shutdown,
    /// Set once the last offsets are committed: only then may the member leave the group.
    finished: Arc<AtomicBool>,
}

impl KafkaFeed {
    /// Joins the group `sluice.PIPELINE.SINK` and subscribes to `topics` (a name starting with
    /// `^` is a pattern).
    pub async fn start(
        cfg: &KafkaTransportConfig,
        pipeline: &str,
        sink: &str,
        topics: Vec<String>,
        buffer: EmbeddedLog,
        shutdown: Shutdown,
    ) -> Result<(Self, FeedHandle)> {
        let (tx, items) = mpsc::channel(BATCH * 4);
        let mut c = client_config(cfg);
        c.set("group.id", format!("sluice.{pipeline}.{sink}"))
            .set("group.instance.id", format!("{}.{sink}", super::member_id(&cfg.path)?))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "10000")
            .set("max.poll.interval.ms", MAX_POLL_INTERVAL_MS)
            .set("heartbeat.interval.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "5000");
        let context = GroupContext { items: tx.clone(), sink: sink.to_string() };
        let consumer: BaseConsumer<GroupContext> =
            c.create_with_context(context).map_err(|e| Error::config(format!("kafka consumer: {e}")))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| super::classify("kafka subscribe", e))?;
        let consumer = Arc::new(consumer);
        let poller = consumer.clone();
        let stop = shutdown.clone();
        let finished = Arc::new(AtomicBool::new(false));
        let committed = finished.clone();
        let name = sink.to_string();
        let undecodable = UndecodableRecords::new(buffer.dir());
        std::thread::Builder::new()
            .name(format!("kafka-{sink}"))
            .spawn(move || poll(poller, tx, stop, committed, name, undecodable))
            .map_err(|e| Error::permanent("kafka consumer thread", e))?;
        let registry = SchemaRegistry::load(&buffer).await?;
        let handle = FeedHandle::default();
        // Quiet time counts from the start, so the stall check does not fire before the first fetch.
        handle.last_message_ms.store(crate::runtime::progress::now_ms() as i64, Ordering::Release);
        let feed = Self {
            consumer,
            items,
            buffer,
            sink: sink.to_string(),
            registry,
            pending: VecDeque::new(),
            handle: handle.clone(),
            shutdown,
            finished,
        };
        Ok((feed, handle))
    }

    /// Runs until shutdown; commits what the sink has made durable every second.
    pub async fn run(mut self) -> Result<()> {
        let mut commit = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                item = self.items.recv() => match item {
                    Some(item) => self.handle(item).await?,
                    None => break,
                },
                _ = commit.tick() => {
                    self.commit_durable(CommitMode::Async).await?;
                    self.check_progress().await;
                }
                _ = self.shutdown.requested() => break,
            }
        }
        // The sink runner makes what it holds durable as it stops: wait for it (briefly), and
        // commit, so the next start does not replay what is already done.
        let head = self.buffer.head();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.buffer.cursor(&self.sink).await? < head && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let committed = self.commit_durable(CommitMode::Sync).await;
        self.finished.store(true, Ordering::Release);
        committed
    }

    async fn handle(&mut self, first: Item) -> Result<()> {
        let mut batch = WriteBatch::unguarded();
        let mut head = self.buffer.head();
        let mut appended: Vec<(u64, Partition, i64)> = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Message { partition, offset, event } => {
                    if let Some(event) = event {
                        let (mut event, schema) = *event;
                        event.schema_id = self.registry.intern(schema, &mut batch).0;
                        batch.append(event);
                        head += 1;
                    }
                    appended.push((head, partition, offset));
                }
                Item::Revoke(parts, reply) => {
                    self.append(batch, appended).await?;
                    self.revoke(parts).await?;
                    let _ = reply.send(());
                    return Ok(());
                }
                Item::Failed(e) => return Err(e),
            }
            if appended.len() < BATCH {
                next = self.items.try_recv().ok();
            }
        }
        self.append(batch, appended).await
    }

    async fn append(&mut self, batch: WriteBatch, appended: Vec<(u64, Partition, i64)>) -> Result<()> {
        if appended.is_empty() {
            return Ok(());
        }
        // The buffer keeps every event, so it numbers them as `handle` counted them.
        self.buffer.commit(batch).await?;
        self.pending.extend(appended);
        self.handle.last_message_ms.store(crate::runtime::progress::now_ms() as i64, Ordering::Release);
        Ok(())
    }

    /// Publishes whether the member is caught up; a member that is behind yet has received
    /// nothing for [`STALL`] says so and restarts fetching at its position (seen with a
    /// broker that came back from a restart and left a fetch unanswered).
    async fn check_progress(&mut self) {
        let consumer = self.consumer.clone();
        let behind = tokio::task::spawn_blocking(move || behind(&consumer)).await.ok().flatten();
        let caught_up = behind.as_ref().is_some_and(Vec::is_empty) && self.items.is_empty();
        self.handle.caught_up.store(caught_up, Ordering::Release);
        let quiet_ms = crate::runtime::progress::now_ms() as i64 - self.handle.last_message_ms.load(Ordering::Acquire);
        let Some(behind) = behind.filter(|b| !b.is_empty() && quiet_ms >= STALL.as_millis() as i64) else { return };
        let at: Vec<String> = behind.iter().map(|(t, p, at, high)| format!("{t}[{p}] at {at:?} of {high}")).collect();
        tracing::warn!(sink = %self.sink, behind = %at.join(", "), "consumer receives nothing while behind; fetching again");
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for (topic, partition, at, _) in behind {
                if let Some(at) = at {
                    let _ = consumer.seek(&topic, partition, Offset::Offset(at), Duration::from_secs(5));
                }
            }
        })
        .await;
        // Counts as activity, so the next attempt waits a full STALL again.
        self.handle.last_message_ms.store(crate::runtime::progress::now_ms() as i64, Ordering::Release);
    }

    /// Commits, per partition, the offset after the last message the sink has made durable.
    async fn commit_durable(&mut self, mode: CommitMode) -> Result<()> {
        let cursor = self.buffer.cursor(&self.sink).await?;
        let mut next: HashMap<Partition, i64> = HashMap::new();
        while let Some((at, _, _)) = self.pending.front() {
            if *at > cursor {
                break;
            }
            let (_, partition, offset) = self.pending.pop_front().expect("front exists");
            next.insert(partition, offset + 1);
        }
        self.commit(next, mode)
    }

    fn commit(&self, next: HashMap<Partition, i64>, mode: CommitMode) -> Result<()> {
        if next.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            list.add_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(|e| Error::permanent("kafka commit", e))?;
        }
        match self.consumer.commit(&list, mode) {
            Ok(()) => Ok(()),
            // The group moved on (a rebalance) or the broker is away: the next commit covers it.
            Err(e) => {
                tracing::warn!(sink = %self.sink, error = %e, "offset commit failed; retried with the next one");
                Ok(())
            }
        }
    }

    /// Makes everything buffered from `parts` durable in the sink, commits it, and forgets it.
    async fn revoke(&mut self, parts: Vec<Partition>) -> Result<()> {
        let target = self.pending.iter().filter(|(_, p, _)| parts.contains(p)).map(|(at, _, _)| *at).max();
        if let Some(target) = target {
            self.handle.flush_now.store(true, Ordering::Release);
            let deadline = tokio::time::Instant::now() + REVOKE_WAIT - Duration::from_secs(5);
            while self.buffer.cursor(&self.sink).await? < target && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = self.shutdown.requested() => break,
                }
            }
            self.handle.flush_now.store(false, Ordering::Release);
        }
        self.commit_durable(CommitMode::Sync).await?;
        self.pending.retain(|(_, p, _)| !parts.contains(p));
        let names: Vec<String> = parts.iter().map(|(t, p)| format!("{t}[{p}]")).collect();
        tracing::info!(sink = %self.sink, partitions = %names.join(","), "partitions handed over");
        Ok(())
    }
}

/// The polling thread: rebalance callbacks run inside `poll`, and may block it while the sink
/// finishes revoked partitions, so it must not be a runtime worker.
fn poll(
    consumer: Arc<BaseConsumer<GroupContext>>,
    items: mpsc::Sender<Item>,
    shutdown: Shutdown,
    finished: Arc<AtomicBool>,
    sink: String,
    undecodable: UndecodableRecords,
) {
    let mut debezium = DebeziumDecoder::default();
    while !shutdown.is_requested() {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let item = match message {
            Ok(m) => {
                let partition: Partition = (Arc::from(m.topic()), m.partition());
                match decode(&m, &mut debezium) {
                    Ok(event) => Item::Message { partition, offset: m.offset(), event },
                    // Kept before its offset can be committed; the feed goes on past it.
                    Err(e) => match undecodable.set_aside(&m, &e.to_string()) {
                        Ok(file) => {
                            tracing::warn!(sink = %sink, error = %e, kept = %file.display(), "undecodable record set aside");
                            metrics::counter!("sluice_kafka_undecodable_total", "sink" => sink.clone()).increment(1);
                            Item::Message { partition, offset: m.offset(), event: None }
                        }
                        Err(io) => Item::Failed(io),
                    },
                }
            }
            Err(e) => {
                tracing::warn!(sink = %sink, error = %e, "kafka consumer");
                continue;
            }
        };
        if items.blocking_send(item).is_err() {
            break;
        }
    }
    // Leaving the group before the feed's last commit would make that commit fail.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !finished.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    consumer.unsubscribe();
}

/// A partition not read to its end: topic, partition, position reached, high watermark.
type Lag = (String, i32, Option<i64>, i64);

/// How far behind the member is: `None` without partitions; else each partition not read
/// up to its high watermark, with the position reached (`None` before the first fetch).
fn behind(consumer: &BaseConsumer<GroupContext>) -> Option<Vec<Lag>> {
    let position = consumer.position().ok()?;
    if position.count() == 0 {
        return None;
    }
    // Where the group left each partition: one it left at its end holds nothing to read, though
    // this session has fetched nothing from it (so it has no position). Asked of the broker
    // only when such a partition is met.
    let committed = std::cell::OnceCell::new();
    let committed_at = |topic: &str, partition: i32| {
        let list = committed.get_or_init(|| consumer.committed(Duration::from_secs(1)).ok());
        match list.as_ref().and_then(|c: &TopicPartitionList| c.find_partition(topic, partition)).map(|e| e.offset()) {
            Some(Offset::Offset(at)) => Some(at),
            _ => None,
        }
    };
    let mut out = Vec::new();
    for e in position.elements() {
        let Ok((low, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(1)) else {
            out.push((e.topic().to_string(), e.partition(), None, -1));
            continue;
        };
        match e.offset() {
            Offset::Offset(at) if at < high => out.push((e.topic().to_string(), e.partition(), Some(at), high)),
            Offset::Offset(_) => {}
            // Nothing read in this session yet: caught up only if there is nothing to read.
            _ if low < high && committed_at(e.topic(), e.partition()).is_none_or(|at| at < high) => {
                out.push((e.topic().to_string(), e.partition(), None, high))
            }
            _ => {}
        }
    }
    Some(out)
}

/// The event a sluice publisher put in the headers, or else the Debezium envelope's; `None`
/// for a tombstone (nothing for the sink, but its offset still counts). An error is about this
/// record alone.
fn decode(
    m: &rdkafka::message::BorrowedMessage<'_>,
    debezium: &mut DebeziumDecoder,
) -> Result<Option<Box<(ChangeEvent, TableSchema)>>> {
    let envelope = |debezium: &mut DebeziumDecoder| {
        let origin = Origin { topic: m.topic(), partition: m.partition(), offset: m.offset() };
        Ok(debezium.decode(&origin, m.key(), m.payload())?.map(Box::new))
    };
    let Some(headers) = m.headers() else { return envelope(debezium) };
    let (mut event, mut schema) = (None, None);
    for h in headers.iter() {
        match h.key {
            EVENT_HEADER => event = h.value,
            SCHEMA_HEADER => schema = h.value,
            _ => {}
        }
    }
    let (Some(event), Some(schema)) = (event, schema) else { return envelope(debezium) };
    let bad = |e: postcard::Error| {
        Error::permanent(
            "kafka consume",
            format!("{}[{}] offset {}: undecodable sluice event ({e})", m.topic(), m.partition(), m.offset()),
        )
    };
    Ok(Some(Box::new((postcard::from_bytes(event).map_err(bad)?, postcard::from_bytes(schema).map_err(bad)?))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The consumer's destructor runs the revoke callback on whichever thread lets go of it
    /// last. On a runtime thread the callback must return instead of blocking: blocking there
    /// panicked inside the destructor, and the process never stopped.
    #[tokio::test]
    async fn a_revoke_on_a_runtime_thread_returns_without_blocking() {
        let (tx, _items) = mpsc::channel(1);
        // Nothing listens there; creating a consumer does not connect.
        let consumer: BaseConsumer<GroupContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "sluice-test")
            .create_with_context(GroupContext { items: tx, sink: "lake".into() })
            .unwrap();
        let mut revoked = TopicPartitionList::new();
        revoked.add_partition("shop.public.orders", 0);
        consumer.context().pre_rebalance(&consumer, &Rebalance::Revoke(&revoked));
    }
}

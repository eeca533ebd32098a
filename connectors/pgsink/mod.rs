//! The PostgreSQL sink: keeps a table in another database as a mapped mirror of a source table.
//! The mapping, batching and flights are [`crate::connectors::mapped`]'s; this module connects,
//! checks the target table, and writes batches through [`writer::Writer`].

pub mod queue;
pub mod target;
mod tombstones;
pub mod writer;

use crate::config::{PgConnection, PostgresSinkConfig};
use crate::connectors::mapped::{Applied, Connect, Item, MappedSink, Target as MappedTarget};
use crate::connectors::postgres::client::{connect, query_error};
use crate::deadletter::EntryStore;
use crate::error::{Error, Result};
use crate::event::Position;
use crate::log::EmbeddedLog;
use crate::mapping::Mapper;
use target::Target;
use tokio_postgres::Client;
use writer::Writer;

/// The PostgreSQL sink.
pub type PostgresSink = MappedSink<PgConnect>;

/// Builds the PostgreSQL sink of `cfg`.
pub async fn build(cfg: PostgresSinkConfig, pipeline: &str, log: EmbeddedLog, cursor: u64) -> Result<PostgresSink> {
    let (name, mapping, batch) = (cfg.name.clone(), cfg.mapping.clone(), cfg.batch);
    let connector = PgConnect {
        dead: EntryStore::dead_letters(log.dir(), &cfg.name),
        review: EntryStore::conflicts(log.dir(), &cfg.name),
        pipeline: pipeline.to_string(),
        cfg,
    };
    MappedSink::build(&name, mapping, batch, connector, log, cursor).await
}

/// Opens the target database for the sink.
pub struct PgConnect {
    cfg: PostgresSinkConfig,
    pipeline: String,
    dead: EntryStore,
    review: EntryStore,
}

#[async_trait::async_trait]
impl Connect for PgConnect {
    type Target = PgTarget;

    async fn connect(&self, mapper: &Mapper) -> Result<PgTarget> {
        let (client, writer) = open(&self.cfg, &self.pipeline, mapper, &self.dead, &self.review).await?;
        let session = Session {
            conn: self.cfg.conn.clone(),
            application_name: application_name(&self.pipeline, &self.cfg.name),
            origin: origin_name(&self.pipeline, &self.cfg.name),
        };
        Ok(PgTarget { client: Some(client), writer, session })
    }
}

/// How to open the sink's session again after the target dropped it.
#[derive(Debug, Clone)]
pub struct Session {
    pub conn: PgConnection,
    pub application_name: String,
    pub origin: String,
}

impl Session {
    /// Connects and tags the session's writes with the sink's replication origin.
    pub async fn open(&self) -> Result<Client> {
        let client = connect(&self.conn, &self.application_name).await?;
        mark_origin(&client, &self.origin).await;
        Ok(client)
    }
}

/// The connected target database.
pub struct PgTarget {
    client: Option<Client>,
    writer: Writer,
    session: Session,
}

impl PgTarget {
    async fn client(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.client = Some(self.session.open().await.map_err(|e| Error::retryable("target connection", e))?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

#[async_trait::async_trait]
impl MappedTarget for PgTarget {
    async fn write_batch(&mut self, items: Vec<Item>) -> Result<Applied> {
        self.client().await?;
        let client = self.client.as_mut().expect("connected above");
        self.writer.apply(client, &items, None).await
    }

    async fn truncate(&mut self, position: Position) -> Result<()> {
        self.client().await?;
        let client = self.client.as_mut().expect("connected above");
        let tx = client.transaction().await.map_err(|e| query_error("begin", e))?;
        self.writer.target.truncate(&tx, &position.to_string()).await?;
        tx.commit().await.map_err(|e| query_error("commit", e))
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

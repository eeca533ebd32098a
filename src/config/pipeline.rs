//! The validated, typed pipeline: everything checked and resolved, nothing connected yet.

use super::secret::Secret;
use crate::event::TableId;
use crate::mapping::conflict::Strategy;
use crate::mapping::MappingConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A pipeline ready to build.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The file it was read from, for messages.
    pub file: PathBuf,
    pub source: SourceConfig,
    pub transport: TransportConfig,
    pub sinks: Vec<SinkConfig>,
    pub metrics_listen: Option<SocketAddr>,
    /// Backfills run on a schedule while the pipeline streams.
    pub backfills: Vec<BackfillSchedule>,
}

/// A backfill run at the slots of a cron expression, in a time zone.
#[derive(Debug, Clone)]
pub struct BackfillSchedule {
    pub name: String,
    pub cron: croner::Cron,
    pub time_zone: chrono_tz::Tz,
    pub tables: Vec<TableId>,
    /// The `where` clause, and where it is in the file (for errors the database finds).
    pub filter: Option<String>,
    pub filter_at: Option<(u64, u64)>,
    /// Incremental runs read only rows whose cursor column grew since the last run.
    pub cursor: Option<String>,
    pub parallelism: u32,
    pub chunk_rows: u64,
}

/// Chunks read at once by a backfill unless it says otherwise.
pub const DEFAULT_BACKFILL_PARALLELISM: u32 = 2;
/// Rows per backfill chunk (the unit of checkpointing) unless it says otherwise.
pub const DEFAULT_BACKFILL_CHUNK_ROWS: u64 = 100_000;

#[derive(Debug, Clone)]
pub enum SourceConfig {
    Postgres(PostgresSourceConfig),
    Mongodb(MongoSourceConfig),
    /// Topics in the Debezium envelope; the pipeline's transport holds their connection.
    Kafka(KafkaSourceConfig),
}

/// Debezium topics (written by Debezium or by sluice) that the sinks read directly.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    /// Topic names, or regular expressions starting with `^`.
    pub topics: Vec<String>,
}

impl SourceConfig {
    /// The PostgreSQL source, for the features only it has (backfills, slot lag).
    pub fn postgres(&self) -> Option<&PostgresSourceConfig> {
        match self {
            SourceConfig::Postgres(pg) => Some(pg),
            SourceConfig::Mongodb(_) | SourceConfig::Kafka(_) => None,
        }
    }
}

/// A MongoDB deployment captured through change streams.
#[derive(Debug, Clone)]
pub struct MongoSourceConfig {
    /// The connection string; a secret because it usually holds the password.
    pub url: Secret,
    /// Hosts of the connection string, for messages.
    pub display: String,
    pub database: String,
    /// The collections captured; `None` captures every collection the database has at start.
    pub collections: Option<Vec<String>>,
    pub full_document: FullDocument,
    pub snapshot: SnapshotMode,
    pub on_history_lost: HistoryLost,
    pub json: JsonMode,
    /// Documents per snapshot chunk (the unit of snapshot checkpointing).
    pub snapshot_chunk_docs: u64,
}

/// What an update event carries besides the change itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullDocument {
    /// The document as it is when the event is read (a later state, or none if since deleted).
    UpdateLookup,
    /// Post- and pre-images when the collection records them, nothing otherwise.
    WhenAvailable,
    /// Post- and pre-images; the server fails the stream when one is missing.
    Required,
}

impl FullDocument {
    /// The name the pipeline file uses.
    pub fn name(self) -> &'static str {
        match self {
            FullDocument::UpdateLookup => "update_lookup",
            FullDocument::WhenAvailable => "when_available",
            FullDocument::Required => "required",
        }
    }
}

/// What to do when the stored resume point has left the oplog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryLost {
    /// Stop with an error naming the collection.
    Fail,
    /// Read the affected collections again from a new snapshot, then stream.
    Resnapshot,
}

impl HistoryLost {
    /// The name the pipeline file uses.
    pub fn name(self) -> &'static str {
        match self {
            HistoryLost::Fail => "fail",
            HistoryLost::Resnapshot => "resnapshot",
        }
    }
}

/// How BSON values are written as Extended JSON (v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonMode {
    /// Plain JSON numbers and strings where they are exact (what Debezium's connector emits).
    Relaxed,
    /// Every value with its BSON type (`{"$numberInt": "1"}`), for consumers that must tell
    /// Int32 from Int64 from Double.
    Canonical,
}

#[derive(Debug, Clone)]
pub struct PostgresSourceConfig {
    pub conn: PgConnection,
    pub tables: Vec<TableId>,
    pub snapshot: SnapshotMode,
    pub slot: String,
    pub publication: String,
    /// How often a heartbeat message is written so an idle publication's slot still advances.
    pub heartbeat: Duration,
    pub snapshot_chunk_rows: u64,
}

/// How to reach a PostgreSQL server. The password is a [`Secret`].
#[derive(Debug, Clone)]
pub struct PgConnection {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub tls: TlsMode,
    /// CA bundle for `verify-full`/`verify-ca`; the system's web roots when absent.
    pub root_cert: Option<PathBuf>,
}

impl PgConnection {
    /// `host:port/db` for messages: never the password.
    pub fn display_target(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }
}

/// libpq's `sslmode` values that sluice supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Read every table once, then stream.
    Initial,
    /// Stream only changes made after the slot was created.
    Never,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum TransportConfig {
    Embedded { path: PathBuf },
    Kafka(KafkaTransportConfig),
}

impl TransportConfig {
    /// The local directory: the whole log when embedded; with Kafka, the source's buffer and
    /// state and each sink's buffer.
    pub fn path(&self) -> &Path {
        match self {
            TransportConfig::Embedded { path } => path,
            TransportConfig::Kafka(k) => &k.path,
        }
    }

    /// Where a sink keeps its local files (dead letters, review queue, spool): beside the log
    /// when embedded; with Kafka, in the sink's own buffer.
    pub fn sink_dir(&self, sink: &str) -> PathBuf {
        match self {
            TransportConfig::Embedded { path } => path.clone(),
            TransportConfig::Kafka(k) => k.path.join("sinks").join(sink),
        }
    }
}

/// `transport: { type: kafka }`: changes go to Kafka topics and sinks read them through
/// consumer groups.
#[derive(Debug, Clone)]
pub struct KafkaTransportConfig {
    pub path: PathBuf,
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics are `PREFIX.SCHEMA.TABLE`, as Debezium names them.
    pub topic_prefix: String,
    /// Partitions of topics sluice creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Embed a Kafka Connect schema in every key and value (Debezium's JsonConverter with
    /// `schemas.enable=true`); off, the payload alone.
    pub schemas: bool,
    /// How often the heartbeat topic gets a record, so consumers see the source is alive.
    pub heartbeat: Duration,
    /// Debezium's `provide.transaction.metadata`: BEGIN/END records in `PREFIX.transaction`
    /// and each change's place in its transaction in its envelope (PostgreSQL sources).
    pub transaction_metadata: bool,
    pub compression: KafkaCompression,
    pub linger_ms: u32,
    /// Larger records are refused with the table and key named (librdkafka's `message.max.bytes`).
    pub max_message_bytes: u64,
    pub security: Option<KafkaSecurity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaCompression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl KafkaCompression {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Zstd => "zstd",
        }
    }
}

/// Passed through to librdkafka as `security.protocol`, `sasl.*` and `ssl.ca.location`.
#[derive(Debug, Clone)]
pub struct KafkaSecurity {
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`, with SASL.
    pub mechanism: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
}

/// Built once per run, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum SinkConfig {
    Parquet(ParquetSinkConfig),
    Postgres(PostgresSinkConfig),
    Hubspot(HubSpotSinkConfig),
    Salesforce(SalesforceSinkConfig),
}

impl SinkConfig {
    pub fn name(&self) -> &str {
        match self {
            SinkConfig::Parquet(p) => &p.name,
            SinkConfig::Postgres(p) => &p.name,
            SinkConfig::Hubspot(p) => &p.name,
            SinkConfig::Salesforce(p) => &p.name,
        }
    }
}

/// HubSpot CRM objects kept as a mapped mirror of a source table.
#[derive(Debug, Clone)]
pub struct HubSpotSinkConfig {
    pub name: String,
    /// The API's base URL (`https://api.hubapi.com`, or an emulator's).
    pub url: String,
    /// A private-app token or an OAuth app's refresh token.
    pub auth: CrmAuth,
    /// The object type: contacts, companies, deals, or a custom object's name.
    pub object: String,
    /// The mapping; its key's target is the `idProperty` (a unique property).
    pub mapping: MappingConfig,
    pub batch: BatchLimits,
    pub rate: AccountLimits,
}

/// A destination account's request budget, shared by every sink writing to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountLimits {
    /// Requests per rolling 10 seconds (HubSpot Free/Starter 100, Pro/Enterprise 190).
    pub ten_second_max: u32,
    /// Requests per day.
    pub daily_max: u64,
    /// How long a sink parks when the daily allocation is exhausted before trying again
    /// (at most until the window resets).
    pub park_probe: Duration,
}

/// How a CRM sink signs in.
#[derive(Debug, Clone)]
pub enum CrmAuth {
    /// A token that does not expire (HubSpot private app).
    Token(Secret),
    /// An OAuth app's refresh token (HubSpot).
    RefreshToken { client_id: String, client_secret: Secret, refresh_token: Secret },
    /// Salesforce JWT bearer flow: the connected app's consumer key, the integration user and
    /// the certificate's private key (PEM).
    Jwt { client_id: String, username: String, private_key: Secret, audience: String },
    /// Salesforce client-credentials flow (My Domain host).
    ClientCredentials { client_id: String, client_secret: Secret },
}

/// Salesforce sObjects kept as a mapped mirror of a source table.
#[derive(Debug, Clone)]
pub struct SalesforceSinkConfig {
    pub name: String,
    /// The login or My Domain host the token comes from (`https://acme.my.salesforce.com`).
    pub url: String,
    pub auth: CrmAuth,
    /// REST API version, e.g. `62.0`.
    pub api_version: String,
    /// The sObject type (Contact, Account, a custom `X__c`).
    pub object: String,
    /// The mapping; its key's target is the external ID field.
    pub mapping: MappingConfig,
    pub batch: BatchLimits,
    /// Batches with at least this many upserts go through Bulk API 2.0.
    pub bulk_threshold: usize,
    /// Parking time when the org's daily allocation is exhausted.
    pub park_probe: Duration,
}

/// A table in another PostgreSQL database, kept as a mapped mirror of a source table.
#[derive(Debug, Clone)]
pub struct PostgresSinkConfig {
    pub name: String,
    pub conn: PgConnection,
    /// The target table.
    pub table: TableId,
    pub mapping: MappingConfig,
    pub conflict: Strategy,
    pub version: VersionGuard,
    pub batch: BatchLimits,
}

/// What keeps an older change from overwriting a newer one at the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionGuard {
    /// A text column holding the source position of the change that wrote the record.
    Position { column: String },
    /// A mapped timestamp (or other ordered) field: a record is written only if not older.
    Field { column: String },
    /// No guard (the target accepts whatever comes last).
    None,
}

/// When a sink writes what it has gathered.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Changes per batch (before coalescing).
    pub max_records: usize,
    /// How long the first change of a batch may wait.
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct ParquetSinkConfig {
    pub name: String,
    pub target: ObjectTarget,
    pub roll: Roll,
    pub unbounded_numeric: NumericPolicy,
    pub partition_by: PartitionBy,
    pub nested: NestedLayout,
    pub compression: ParquetCompression,
}

/// The codec of a Parquet sink's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParquetCompression {
    /// Parquet's customary default.
    Snappy,
    /// zstd level 1: in the backfill benchmark, files half the size of snappy's for no more CPU.
    Zstd,
    /// LZ4_RAW (not the deprecated framed LZ4).
    Lz4,
    None,
}

impl ParquetCompression {
    /// Every codec, the default first.
    const ALL: [Self; 4] = [Self::Snappy, Self::Zstd, Self::Lz4, Self::None];

    /// The codec a pipeline file names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The name a pipeline file gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Snappy => "snappy",
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
            Self::None => "none",
        }
    }
}

/// How a Parquet sink writes JSON columns (MongoDB documents, PostgreSQL json/jsonb).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedLayout {
    /// JSON text (Parquet's JSON logical type), exactly as captured.
    Json,
    /// Structs and lists typed from the values (see `connectors/parquet/nested.rs`);
    /// `extended`: the text is MongoDB Extended JSON, so BSON types are read back.
    Struct { extended: bool },
}

/// Where files go.
#[derive(Debug, Clone)]
pub enum ObjectTarget {
    /// A local directory.
    File {
        root: PathBuf,
    },
    S3(S3Target),
}

#[derive(Debug, Clone)]
pub struct S3Target {
    pub bucket: String,
    /// Key prefix without leading slash, ending in `/` when not empty.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    /// Files at least this large are sent with multipart upload.
    pub multipart_threshold: u64,
}

/// When an open file is closed and a new one started.
#[derive(Debug, Clone, Copy)]
pub struct Roll {
    pub max_rows: u64,
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// How NUMERIC columns without declared precision are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumericPolicy {
    /// Exact decimal text in a string column (never loses digits).
    String,
    /// DECIMAL(precision, scale); a value that does not fit exactly stops the sink with an error.
    Decimal { precision: u8, scale: i8 },
}

/// Hive-style partitioning of each table's changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionBy {
    /// `date=YYYY-MM-DD` of the commit time (UTC).
    CommitDate,
    /// One directory per table.
    None,
}

impl JsonMode {
    /// The name the pipeline file uses.
    pub fn name(self) -> &'static str {
        match self {
            JsonMode::Relaxed => "relaxed",
            JsonMode::Canonical => "canonical",
        }
    }
}

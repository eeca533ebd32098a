//! The pipeline file exactly as written: serde structs that reject unknown keys.
//! Values that validation may reject are `Spanned` so errors can point at them.
//!
//! `type` is a spanned enum field of a flat struct rather than a `#[serde(tag = "type")]`
//! enum: serde buffers a tagged enum's map before choosing the variant, which throws away the
//! location of every key and value inside it. Validation still dispatches with one `match` on
//! the type and rejects keys that do not belong to it.

use indexmap::IndexMap;
use serde::Deserialize;
use serde_saphyr::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub name: Spanned<String>,
    pub source: RawSource,
    #[serde(default)]
    pub transport: Option<RawTransport>,
    pub sinks: Spanned<Vec<RawSink>>,
    #[serde(default)]
    pub metrics: Option<RawMetrics>,
    #[serde(default)]
    pub backfills: Vec<RawBackfill>,
}

/// A scheduled backfill.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackfill {
    pub name: Spanned<String>,
    pub schedule: Spanned<String>,
    #[serde(default)]
    pub time_zone: Option<Spanned<String>>,
    pub tables: Spanned<Vec<Spanned<String>>>,
    #[serde(default, rename = "where")]
    pub filter: Option<Spanned<String>>,
    #[serde(default)]
    pub mode: Option<Spanned<String>>,
    #[serde(default)]
    pub cursor: Option<Spanned<String>>,
    #[serde(default)]
    pub parallelism: Option<Spanned<u32>>,
    #[serde(default)]
    pub chunk_rows: Option<Spanned<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Postgres,
    Mongodb,
    Kafka,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(rename = "type")]
    pub kind: Spanned<SourceKind>,
    /// PostgreSQL and MongoDB: required (checked in validation, which names the type).
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    /// PostgreSQL only.
    #[serde(default)]
    pub tables: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub snapshot: Option<Spanned<String>>,
    #[serde(default)]
    pub slot: Option<Spanned<String>>,
    #[serde(default)]
    pub publication: Option<Spanned<String>>,
    #[serde(default)]
    pub heartbeat: Option<Spanned<String>>,
    #[serde(default)]
    pub snapshot_chunk_rows: Option<Spanned<u64>>,
    /// MongoDB only, as are the keys below.
    #[serde(default)]
    pub database: Option<Spanned<String>>,
    #[serde(default)]
    pub collections: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub full_document: Option<Spanned<String>>,
    #[serde(default)]
    pub on_history_lost: Option<Spanned<String>>,
    #[serde(default)]
    pub json: Option<Spanned<String>>,
    /// Kafka only, as are the keys below.
    #[serde(default)]
    pub brokers: Option<Spanned<String>>,
    #[serde(default)]
    pub topics: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub security: Option<RawKafkaSecurity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    Embedded,
    Kafka,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTransport {
    #[serde(rename = "type")]
    pub kind: Spanned<TransportKind>,
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub brokers: Option<Spanned<String>>,
    #[serde(default)]
    pub topic_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub partitions: Option<Spanned<i64>>,
    #[serde(default)]
    pub replication_factor: Option<Spanned<i64>>,
    #[serde(default)]
    pub schemas: Option<Spanned<bool>>,
    #[serde(default)]
    pub heartbeat: Option<Spanned<String>>,
    #[serde(default)]
    pub transaction_metadata: Option<Spanned<bool>>,
    #[serde(default)]
    pub producer: Option<RawKafkaProducer>,
    #[serde(default)]
    pub security: Option<RawKafkaSecurity>,
}

/// `transport.producer` of a kafka transport.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaProducer {
    #[serde(default)]
    pub compression: Option<Spanned<String>>,
    #[serde(default)]
    pub linger_ms: Option<Spanned<i64>>,
    #[serde(default)]
    pub max_message_bytes: Option<Spanned<String>>,
}

/// `transport.security` of a kafka transport.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafkaSecurity {
    pub protocol: Spanned<String>,
    #[serde(default)]
    pub mechanism: Option<Spanned<String>>,
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Parquet,
    Postgres,
    Hubspot,
    Salesforce,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub kind: Spanned<SinkKind>,
    pub url: Spanned<String>,
    #[serde(default)]
    pub s3: Option<RawS3>,
    #[serde(default)]
    pub roll: Option<RawRoll>,
    #[serde(default)]
    pub unbounded_numeric: Option<Spanned<String>>,
    #[serde(default)]
    pub partition_by: Option<Spanned<String>>,
    /// Parquet sinks: JSON columns as JSON text or as typed structs and lists.
    #[serde(default)]
    pub nested: Option<Spanned<String>>,
    /// Parquet sinks: the page compression codec.
    #[serde(default)]
    pub compression: Option<Spanned<String>>,
    /// Mapped sinks: the target table or object.
    #[serde(default)]
    pub table: Option<Spanned<String>>,
    /// Mapped sinks: the source table read (default: the only one).
    #[serde(default)]
    pub from: Option<Spanned<String>>,
    #[serde(default)]
    pub key: Option<RawKey>,
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    #[serde(default)]
    pub fields: Option<Spanned<IndexMap<String, Spanned<String>>>>,
    #[serde(default)]
    pub conflict: Option<RawConflict>,
    #[serde(default)]
    pub version: Option<Spanned<String>>,
    #[serde(default)]
    pub batch: Option<RawBatch>,
    #[serde(default)]
    pub echoes: Option<Spanned<String>>,
    /// CRM sinks: the object type (contacts, companies, a custom object).
    #[serde(default)]
    pub object: Option<Spanned<String>>,
    /// CRM sinks: the API token.
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    /// CRM sinks: the destination account's rate limits.
    #[serde(default)]
    pub rate: Option<RawRate>,
    /// CRM sinks: how sluice signs in (instead of `token`).
    #[serde(default)]
    pub auth: Option<RawAuth>,
    /// Salesforce: the REST API version, e.g. "62.0".
    #[serde(default)]
    pub api_version: Option<Spanned<String>>,
    /// Salesforce: batches of at least this many upserts go through Bulk API 2.0.
    #[serde(default)]
    pub bulk_threshold: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    #[serde(default)]
    pub client_id: Option<Spanned<String>>,
    #[serde(default)]
    pub client_secret: Option<Spanned<String>>,
    #[serde(default)]
    pub refresh_token: Option<Spanned<String>>,
    #[serde(default)]
    pub username: Option<Spanned<String>>,
    #[serde(default)]
    pub private_key: Option<Spanned<String>>,
    #[serde(default)]
    pub audience: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    #[serde(default)]
    pub ten_second_max: Option<Spanned<u64>>,
    #[serde(default)]
    pub daily_max: Option<Spanned<u64>>,
    /// How long a sink parks when the daily allocation is exhausted, before trying again.
    #[serde(default)]
    pub park_probe: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub source: Spanned<String>,
    pub target: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConflict {
    pub strategy: Spanned<String>,
    #[serde(default)]
    pub source_field: Option<Spanned<String>>,
    #[serde(default)]
    pub target_field: Option<Spanned<String>>,
    #[serde(default)]
    pub owners: Option<IndexMap<String, Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    #[serde(default)]
    pub max_records: Option<Spanned<u64>>,
    #[serde(default)]
    pub max_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawS3 {
    #[serde(default)]
    pub endpoint: Option<Spanned<String>>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub path_style: Option<bool>,
    #[serde(default)]
    pub access_key_id: Option<Spanned<String>>,
    #[serde(default)]
    pub secret_access_key: Option<Spanned<String>>,
    #[serde(default)]
    pub multipart_threshold: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoll {
    #[serde(default)]
    pub max_rows: Option<Spanned<u64>>,
    #[serde(default)]
    pub max_bytes: Option<Spanned<String>>,
    #[serde(default)]
    pub max_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Spanned<String>,
}

//! The pipeline file exactly as written: serde structs that reject unknown keys.
//! Values that validation may reject are `Spanned` so errors can point at them.

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
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSource {
    Postgres(RawPostgresSource),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgresSource {
    pub url: Spanned<String>,
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    pub tables: Spanned<Vec<Spanned<String>>>,
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
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawTransport {
    Embedded(RawEmbedded),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbedded {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSink {
    Parquet(RawParquetSink),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawParquetSink {
    pub name: Spanned<String>,
    pub url: Spanned<String>,
    #[serde(default)]
    pub s3: Option<RawS3>,
    #[serde(default)]
    pub roll: Option<RawRoll>,
    #[serde(default)]
    pub unbounded_numeric: Option<Spanned<String>>,
    #[serde(default)]
    pub partition_by: Option<Spanned<String>>,
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

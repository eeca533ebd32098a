//! Turns a raw pipeline into a typed one. Pure apart from reading `${file:...}` secrets.

use super::pipeline::*;
use super::raw::*;
use super::secret::{interpolate, Secret};
use super::ConfigError;
use crate::event::TableId;
use crate::mapping::{Expr, Located};
use serde_saphyr::Spanned;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(super) struct Ctx<'a> {
    pub(super) file: &'a Path,
}

impl Ctx<'_> {
    pub(super) fn err<T>(&self, at: &Spanned<T>, message: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        let loc = at.referenced;
        ConfigError {
            file: self.file.to_path_buf(),
            at: (loc.line() > 0).then(|| (loc.line(), loc.column())),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// Resolves `${env:..}`/`${file:..}` in a value, pointing at it on failure.
    pub(super) fn resolve(&self, field: &str, value: &Spanned<String>) -> Result<String, ConfigError> {
        interpolate(&value.value).map_err(|e| self.err(value, format!("{field}: {}", e.message), e.fix))
    }

    pub(super) fn duration(&self, field: &str, value: &Spanned<String>) -> Result<Duration, ConfigError> {
        humantime::parse_duration(value.value.trim()).map_err(|e| {
            self.err(
                value,
                format!("{field}: `{}` is not a duration ({e})", value.value),
                "write it like 500ms, 5s, 2m or 1h",
            )
        })
    }

    /// Compiles an expression, pointing at the exact character on failure.
    pub(super) fn expr(&self, field: &str, value: &Spanned<String>) -> Result<Located, ConfigError> {
        let loc = value.referenced;
        // A quoted scalar's span includes its quotes.
        let quoted = u64::from(loc.span().len() > value.value.chars().count() as u64);
        let located = |offset: usize| {
            let before = &value.value[..offset.min(value.value.len())];
            match before.rfind('\n') {
                Some(nl) => {
                    (loc.line() + before.matches('\n').count() as u64, before[nl + 1..].chars().count() as u64 + 1)
                }
                None => (loc.line(), loc.column() + quoted + before.chars().count() as u64),
            }
        };
        let expr = Expr::compile(&value.value).map_err(|e| ConfigError {
            file: self.file.to_path_buf(),
            at: (loc.line() > 0).then(|| located(e.offset)),
            message: format!("{field}: {} in `{}`", e.message, value.value),
            fix: "write an expression like `{{ after.email | lower }}`; the README's mapping reference lists \
                  the variables (after, before, key, op, source) and filters"
                .into(),
        })?;
        for name in expr.secret_names() {
            if std::env::var_os(&name).is_none() {
                return Err(self.err(
                    value,
                    format!("{field}: secret('{name}') names an environment variable that is not set"),
                    format!(
                        "export {name} before starting sluice (it is read from the environment, never from the file)"
                    ),
                ));
            }
        }
        let (line, column) = (loc.line(), loc.column() + quoted);
        Ok(Located { expr: Arc::new(expr), file: self.file.to_path_buf(), line, column })
    }

    pub(super) fn size(&self, field: &str, value: &Spanned<String>) -> Result<u64, ConfigError> {
        value.value.trim().parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| {
            self.err(
                value,
                format!("{field}: `{}` is not a size ({e})", value.value),
                "write it like 64MiB, 128MB or 1GiB",
            )
        })
    }
}

pub fn validate(file: &Path, raw: RawPipeline) -> Result<Pipeline, ConfigError> {
    let cx = Ctx { file };
    let name = raw.name.value.trim().to_string();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(cx.err(
            &raw.name,
            format!("name: `{}` is not a valid pipeline name", raw.name.value),
            "use letters, digits, `-` and `_` only (it names the replication slot and the data directory)",
        ));
    }
    let default_path = PathBuf::from("data").join(&name);
    let (source, transport) = match raw.source.kind.value {
        SourceKind::Kafka => {
            let (source, conn) = super::kafka::kafka_source(&cx, raw.source, raw.transport, default_path)?;
            (SourceConfig::Kafka(source), TransportConfig::Kafka(conn))
        }
        kind => {
            let source = if kind == SourceKind::Postgres {
                super::mongo::reject_mongo_keys(&cx, &raw.source)?;
                SourceConfig::Postgres(postgres_source(&cx, &name, raw.source)?)
            } else {
                SourceConfig::Mongodb(super::mongo::mongo_source(&cx, raw.source)?)
            };
            let transport = match raw.transport {
                None => TransportConfig::Embedded { path: default_path },
                Some(t) => match t.kind.value {
                    TransportKind::Embedded => {
                        super::kafka::reject_kafka_keys(&cx, &t)?;
                        TransportConfig::Embedded {
                            path: t.path.map(|p| PathBuf::from(p.value)).unwrap_or(default_path),
                        }
                    }
                    TransportKind::Kafka => {
                        if let Some(tm) =
                            t.transaction_metadata.as_ref().filter(|t| t.value && kind == SourceKind::Mongodb)
                        {
                            return Err(cx.err(
                                tm,
                                "transport.transaction_metadata: applies to PostgreSQL sources only",
                                "remove it; a MongoDB source publishes no transaction boundaries",
                            ));
                        }
                        TransportConfig::Kafka(super::kafka::kafka_transport(&cx, &name, t, default_path)?)
                    }
                },
            };
            (source, transport)
        }
    };
    // Empty for a source that captures whatever its database or topics hold: sinks then name theirs.
    let source_tables = match &source {
        SourceConfig::Postgres(pg) => pg.tables.clone(),
        SourceConfig::Mongodb(m) => super::mongo::mongo_tables(m),
        SourceConfig::Kafka(_) => Vec::new(),
    };
    // Publishing to Kafka is a use of its own: other consumers read the topics.
    let publishes = matches!(transport, TransportConfig::Kafka(_)) && !matches!(source, SourceConfig::Kafka(_));
    if raw.sinks.value.is_empty() && !publishes {
        return Err(cx.err(
            &raw.sinks,
            "sinks: the list is empty",
            "declare at least one sink, e.g. `- { name: lake, type: parquet, url: file:///tmp/lake/ }` \
             (only a pipeline that publishes to Kafka, `transport: { type: kafka }`, may have none)",
        ));
    }
    let mut sinks = Vec::new();
    for sink in raw.sinks.value {
        let sink = match sink.kind.value {
            SinkKind::Parquet => {
                SinkConfig::Parquet(parquet_sink(&cx, sink, matches!(source, SourceConfig::Mongodb(_)))?)
            }
            SinkKind::Postgres => SinkConfig::Postgres(super::mapped::postgres_sink(&cx, sink, &source_tables)?),
            SinkKind::Hubspot => SinkConfig::Hubspot(super::crm::hubspot_sink(&cx, sink, &source_tables)?),
            SinkKind::Salesforce => SinkConfig::Salesforce(super::crm::salesforce_sink(&cx, sink, &source_tables)?),
        };
        sinks.push(sink);
    }
    for (i, a) in sinks.iter().enumerate() {
        if sinks[..i].iter().any(|b| b.name() == a.name()) {
            return Err(ConfigError {
                file: file.to_path_buf(),
                at: None,
                message: format!("sinks: two sinks are named `{}`", a.name()),
                fix: "give every sink a unique name (it keys the sink's position in the log)".into(),
            });
        }
    }
    let metrics_listen = match raw.metrics {
        None => None,
        Some(m) => Some(m.listen.value.parse().map_err(|_| {
            cx.err(
                &m.listen,
                format!("metrics.listen: `{}` is not an address", m.listen.value),
                "write host:port, e.g. 127.0.0.1:9464",
            )
        })?),
    };
    if let (SourceConfig::Mongodb(_) | SourceConfig::Kafka(_), Some(first)) = (&source, raw.backfills.first()) {
        return Err(cx.err(
            &first.name,
            "backfills: scheduled backfills read PostgreSQL tables; this pipeline's source is not postgres",
            "remove `backfills`; a MongoDB collection is read again by its snapshot (see on_history_lost)",
        ));
    }
    let backfills = super::backfill::schedules(&cx, raw.backfills)?;
    Ok(Pipeline { name, file: file.to_path_buf(), source, transport, sinks, metrics_listen, backfills })
}

fn postgres_source(cx: &Ctx, pipeline: &str, raw: RawSource) -> Result<PostgresSourceConfig, ConfigError> {
    let raw_url = super::mongo::required_url(cx, "postgres", &raw)?;
    let url_text = cx.resolve("source.url", raw_url)?;
    let mut conn = parse_pg_url(&url_text).map_err(|m| {
        cx.err(raw_url, format!("source.url: {m}"), "write it as postgres://user@host:5432/database?sslmode=require")
    })?;
    if let Some(pw) = &raw.password {
        conn.password = Some(Secret::new(cx.resolve("source.password", pw)?));
    }
    let Some(raw_tables) = &raw.tables else {
        return Err(cx.err(
            &raw.kind,
            "source: a postgres source needs `tables`",
            "list the tables to capture, e.g. `tables: [public.orders]`",
        ));
    };
    let mut tables = Vec::new();
    for t in &raw_tables.value {
        let id = TableId::parse(t.value.trim()).ok_or_else(|| {
            cx.err(
                t,
                format!("source.tables: `{}` is not a table name", t.value),
                "write schema.table, e.g. public.orders",
            )
        })?;
        if tables.contains(&id) {
            return Err(cx.err(t, format!("source.tables: `{id}` is listed twice"), "list each table once"));
        }
        tables.push(id);
    }
    if tables.is_empty() {
        return Err(cx.err(
            raw_tables,
            "source.tables: the list is empty",
            "list the tables to capture, e.g. [public.orders]",
        ));
    }
    let snapshot = match raw.snapshot.as_ref().map(|s| s.value.as_str()) {
        None | Some("initial") => SnapshotMode::Initial,
        Some("never") => SnapshotMode::Never,
        Some(other) => {
            return Err(cx.err(
                raw.snapshot.as_ref().unwrap(),
                format!("source.snapshot: `{other}` is not a snapshot mode"),
                "use `initial` or `never`",
            ))
        }
    };
    // PostgreSQL names slots with lower-case letters, digits and `_` only.
    let default_name = format!("sluice_{}", pipeline.to_ascii_lowercase().replace('-', "_"));
    let slot = ident(cx, "source.slot", raw.slot.as_ref(), &default_name)?;
    let publication = ident(cx, "source.publication", raw.publication.as_ref(), &default_name)?;
    let heartbeat = match &raw.heartbeat {
        Some(h) => cx.duration("source.heartbeat", h)?,
        None => Duration::from_secs(10),
    };
    let snapshot_chunk_rows = match &raw.snapshot_chunk_rows {
        Some(n) if n.value == 0 => {
            return Err(cx.err(n, "source.snapshot_chunk_rows: must be at least 1", "use a value like 20000"))
        }
        Some(n) => n.value,
        None => 20_000,
    };
    Ok(PostgresSourceConfig { conn, tables, snapshot, slot, publication, heartbeat, snapshot_chunk_rows })
}

/// Replication slot and publication names: lower-case letters, digits and `_`, at most 63 bytes.
fn ident(cx: &Ctx, field: &str, value: Option<&Spanned<String>>, default: &str) -> Result<String, ConfigError> {
    let Some(v) = value else { return Ok(default.to_string()) };
    let ok = !v.value.is_empty()
        && v.value.len() <= 63
        && v.value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(v.value.clone())
    } else {
        Err(cx.err(
            v,
            format!("{field}: `{}` is not a valid name", v.value),
            "use lower-case letters, digits and `_`, at most 63 characters",
        ))
    }
}

/// Parses a libpq-style URL. `sslmode` and `sslrootcert` are read from the query string.
pub fn parse_pg_url(text: &str) -> Result<PgConnection, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if url.scheme() != "postgres" && url.scheme() != "postgresql" {
        return Err(format!("scheme `{}` is not postgres://", url.scheme()));
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default()
    };
    let host = url.host_str().ok_or("the URL has no host")?.trim_matches(['[', ']']).to_string();
    let user = if url.username().is_empty() { "postgres".to_string() } else { decode(url.username()) };
    let dbname = url.path().trim_start_matches('/');
    let dbname = if dbname.is_empty() { user.clone() } else { decode(dbname) };
    let mut tls = TlsMode::Prefer;
    let mut root_cert = None;
    for (k, v) in url.query_pairs() {
        match &*k {
            "sslmode" => {
                tls = match &*v {
                    "disable" => TlsMode::Disable,
                    "prefer" | "allow" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    }
                }
            }
            "sslrootcert" => root_cert = Some(PathBuf::from(&*v)),
            other => return Err(format!("query parameter `{other}` is not supported (only sslmode and sslrootcert)")),
        }
    }
    Ok(PgConnection {
        host,
        port: url.port().unwrap_or(5432),
        user,
        password: url.password().map(|p| Secret::new(decode(p))),
        dbname,
        tls,
        root_cert,
    })
}

pub(super) fn sink_name(cx: &Ctx, raw: &RawSink) -> Result<String, ConfigError> {
    let name = raw.name.value.clone();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(cx.err(&raw.name, format!("sink name `{name}` is not valid"), "use letters, digits, `-` and `_`"));
    }
    Ok(name)
}

/// Rejects a key given for a sink type it does not apply to.
pub(super) fn only_for<T>(
    cx: &Ctx,
    sink: &str,
    kind: &str,
    key: &str,
    value: Option<&Spanned<T>>,
) -> Result<(), ConfigError> {
    match value {
        Some(v) => Err(cx.err(
            v,
            format!("sink {sink}: `{key}` does not apply to {kind} sinks"),
            format!("remove `{key}`; the README's sink reference lists the keys of each type"),
        )),
        None => Ok(()),
    }
}

/// A Parquet sink; `extended_json`: the source writes JSON columns as MongoDB Extended JSON.
fn parquet_sink(cx: &Ctx, raw: RawSink, extended_json: bool) -> Result<ParquetSinkConfig, ConfigError> {
    let name = sink_name(cx, &raw)?;
    only_for(cx, &name, "parquet", "table", raw.table.as_ref())?;
    only_for(cx, &name, "parquet", "from", raw.from.as_ref())?;
    only_for(cx, &name, "parquet", "when", raw.when.as_ref())?;
    only_for(cx, &name, "parquet", "fields", raw.fields.as_ref())?;
    only_for(cx, &name, "parquet", "version", raw.version.as_ref())?;
    only_for(cx, &name, "parquet", "echoes", raw.echoes.as_ref())?;
    only_for(cx, &name, "parquet", "key", raw.key.as_ref().map(|k| &k.source))?;
    only_for(cx, &name, "parquet", "conflict", raw.conflict.as_ref().map(|c| &c.strategy))?;
    only_for(cx, &name, "parquet", "object", raw.object.as_ref())?;
    only_for(cx, &name, "parquet", "token", raw.token.as_ref())?;
    only_for(cx, &name, "parquet", "auth", raw.auth.as_ref().map(|a| &a.kind))?;
    only_for(cx, &name, "parquet", "api_version", raw.api_version.as_ref())?;
    only_for(cx, &name, "parquet", "bulk_threshold", raw.bulk_threshold.as_ref())?;
    only_for(cx, &name, "parquet", "rate", raw.rate.as_ref().map(|_| &raw.name))?;
    if raw.batch.is_some() {
        return Err(cx.err(
            &raw.name,
            format!("sink {name}: `batch` does not apply to parquet sinks"),
            "parquet files are sized by `roll:`; remove `batch:`",
        ));
    }
    let url = cx.resolve("url", &raw.url)?;
    let target = if let Some(path) = url.strip_prefix("file://") {
        if raw.s3.is_some() {
            return Err(cx.err(
                &raw.url,
                format!("sink {name}: `s3:` settings given for a file:// url"),
                "remove the s3: block or use an s3:// url",
            ));
        }
        if path.is_empty() {
            return Err(cx.err(
                &raw.url,
                format!("sink {name}: file:// url has no path"),
                "write file:///absolute/dir/ or file://relative/dir/",
            ));
        }
        ObjectTarget::File { root: PathBuf::from(path) }
    } else if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(cx.err(&raw.url, format!("sink {name}: s3:// url has no bucket"), "write s3://bucket/prefix/"));
        }
        let prefix = match prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let s3 = raw.s3.as_ref();
        let secret = |field: &str, v: Option<&Spanned<String>>| -> Result<Option<Secret>, ConfigError> {
            v.map(|v| cx.resolve(field, v).map(Secret::new)).transpose()
        };
        let multipart_threshold = match s3.and_then(|s| s.multipart_threshold.as_ref()) {
            Some(v) => cx.size("s3.multipart_threshold", v)?.max(5 * 1024 * 1024),
            None => 16 * 1024 * 1024,
        };
        ObjectTarget::S3(S3Target {
            bucket: bucket.to_string(),
            prefix,
            endpoint: s3.and_then(|s| s.endpoint.as_ref()).map(|e| cx.resolve("s3.endpoint", e)).transpose()?,
            region: s3.and_then(|s| s.region.clone()).unwrap_or_else(|| "us-east-1".into()),
            path_style: s3.and_then(|s| s.path_style).unwrap_or(false),
            access_key_id: secret("s3.access_key_id", s3.and_then(|s| s.access_key_id.as_ref()))?,
            secret_access_key: secret("s3.secret_access_key", s3.and_then(|s| s.secret_access_key.as_ref()))?,
            multipart_threshold,
        })
    } else {
        return Err(cx.err(
            &raw.url,
            format!("sink {name}: `{url}` is neither file:// nor s3://"),
            "write s3://bucket/prefix/ or file:///dir/",
        ));
    };
    let mut roll = Roll { max_rows: 1_000_000, max_bytes: 128 * 1024 * 1024, max_age: Duration::from_secs(60) };
    if let Some(r) = &raw.roll {
        if let Some(n) = &r.max_rows {
            if n.value == 0 {
                return Err(cx.err(n, "roll.max_rows: must be at least 1", "use a value like 1000000"));
            }
            roll.max_rows = n.value;
        }
        if let Some(b) = &r.max_bytes {
            roll.max_bytes = cx.size("roll.max_bytes", b)?;
        }
        if let Some(a) = &r.max_age {
            roll.max_age = cx.duration("roll.max_age", a)?;
        }
    }
    let unbounded_numeric = match &raw.unbounded_numeric {
        None => NumericPolicy::String,
        Some(v) => parse_numeric_policy(&v.value).ok_or_else(|| {
            cx.err(
                v,
                format!("unbounded_numeric: `{}` is not a policy", v.value),
                "use `string` (exact text) or `decimal(P,S)` with P up to 76, e.g. decimal(38,9)",
            )
        })?,
    };
    let partition_by = match raw.partition_by.as_ref().map(|p| p.value.as_str()) {
        None | Some("commit_date") => PartitionBy::CommitDate,
        Some("none") => PartitionBy::None,
        Some(other) => {
            return Err(cx.err(
                raw.partition_by.as_ref().unwrap(),
                format!("partition_by: `{other}` is not supported"),
                "use `commit_date` or `none`",
            ))
        }
    };
    let nested = match raw.nested.as_ref().map(|n| n.value.as_str()) {
        None | Some("json") => NestedLayout::Json,
        Some("struct") => NestedLayout::Struct { extended: extended_json },
        Some(other) => {
            return Err(cx.err(
                raw.nested.as_ref().unwrap(),
                format!("nested: `{other}` is not a layout"),
                "use `json` (JSON text, the default) or `struct` (typed structs and lists)",
            ))
        }
    };
    let compression = match &raw.compression {
        None => ParquetCompression::Snappy,
        Some(c) => ParquetCompression::from_name(&c.value).ok_or_else(|| {
            cx.err(
                c,
                format!("compression: `{}` is not a Parquet codec sluice writes", c.value),
                "use `snappy` (the default), `zstd` (about half the size), `lz4` or `none`",
            )
        })?,
    };
    Ok(ParquetSinkConfig { name, target, roll, unbounded_numeric, partition_by, nested, compression })
}

fn parse_numeric_policy(text: &str) -> Option<NumericPolicy> {
    let text = text.trim();
    if text == "string" {
        return Some(NumericPolicy::String);
    }
    let inner = text.strip_prefix("decimal(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',')?;
    let precision: u8 = p.trim().parse().ok()?;
    let scale: i8 = s.trim().parse().ok()?;
    (1..=76).contains(&precision).then_some(())?;
    (0..=precision as i8).contains(&scale).then_some(NumericPolicy::Decimal { precision, scale })
}

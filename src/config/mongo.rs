//! Validation of a `type: mongodb` source, and the keys that belong to one source type only.

use super::pipeline::*;
use super::raw::RawSource;
use super::secret::Secret;
use super::validate::Ctx;
use super::ConfigError;
use crate::event::TableId;
use serde_saphyr::Spanned;

/// Documents per snapshot chunk unless the file says otherwise.
const DEFAULT_SNAPSHOT_CHUNK_DOCS: u64 = 10_000;

/// Rejects a key that the source's type does not have.
pub(super) fn not_for<T>(
    cx: &Ctx,
    kind: &str,
    key: &str,
    value: Option<&Spanned<T>>,
    fix: &str,
) -> Result<(), ConfigError> {
    match value {
        Some(v) => Err(cx.err(v, format!("source.{key}: does not apply to {kind} sources"), fix)),
        None => Ok(()),
    }
}

/// The MongoDB-only keys must not appear in a PostgreSQL source.
pub(super) fn reject_mongo_keys(cx: &Ctx, raw: &RawSource) -> Result<(), ConfigError> {
    let fix = "remove it; the README's source reference lists the keys of each source type";
    not_for(cx, "postgres", "database", raw.database.as_ref(), "remove it; the database is the URL's path")?;
    not_for(cx, "postgres", "collections", raw.collections.as_ref(), "list tables under `tables:`")?;
    not_for(cx, "postgres", "full_document", raw.full_document.as_ref(), fix)?;
    not_for(cx, "postgres", "on_history_lost", raw.on_history_lost.as_ref(), fix)?;
    not_for(cx, "postgres", "json", raw.json.as_ref(), fix)?;
    reject_kafka_source_keys(cx, "postgres", raw)
}

/// The Kafka-only keys must not appear in a PostgreSQL or MongoDB source.
fn reject_kafka_source_keys(cx: &Ctx, kind: &str, raw: &RawSource) -> Result<(), ConfigError> {
    let fix = "remove it; a kafka source reads topics, and a kafka transport names its brokers under `transport:`";
    not_for(cx, kind, "brokers", raw.brokers.as_ref(), fix)?;
    not_for(cx, kind, "topics", raw.topics.as_ref(), fix)?;
    not_for(cx, kind, "security", raw.security.as_ref().map(|s| &s.protocol), fix)
}

/// The connection string a PostgreSQL or MongoDB source needs.
pub(super) fn required_url<'a>(cx: &Ctx, kind: &str, raw: &'a RawSource) -> Result<&'a Spanned<String>, ConfigError> {
    raw.url.as_ref().ok_or_else(|| {
        cx.err(&raw.kind, format!("source: a {kind} source needs `url`"), "add the connection string as `url:`")
    })
}

/// Validates a MongoDB source.
pub(super) fn mongo_source(cx: &Ctx, raw: RawSource) -> Result<MongoSourceConfig, ConfigError> {
    let fix = "remove it; the README's source reference lists the keys of each source type";
    not_for(cx, "mongodb", "tables", raw.tables.as_ref(), "list collections under `collections:`")?;
    not_for(cx, "mongodb", "slot", raw.slot.as_ref(), fix)?;
    not_for(cx, "mongodb", "publication", raw.publication.as_ref(), fix)?;
    not_for(cx, "mongodb", "heartbeat", raw.heartbeat.as_ref(), fix)?;
    not_for(
        cx,
        "mongodb",
        "password",
        raw.password.as_ref(),
        "put it in the URL as ${env:NAME}: mongodb://user:${env:MONGO_PASSWORD}@host/",
    )?;
    reject_kafka_source_keys(cx, "mongodb", &raw)?;
    let raw_url = required_url(cx, "mongodb", &raw)?;
    let url = cx.resolve("source.url", raw_url)?;
    let display = mongo_hosts(&url).map_err(|m| {
        cx.err(
            raw_url,
            format!("source.url: {m}"),
            "write it as mongodb://user:${env:MONGO_PASSWORD}@host:27017/?replicaSet=rs0",
        )
    })?;
    let Some(database) = raw.database.as_ref() else {
        return Err(cx.err(
            &raw.kind,
            "source: a mongodb source needs `database`",
            "add `database: NAME` (the database whose collections are captured)",
        ));
    };
    let db = database.value.trim();
    if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$']) {
        return Err(cx.err(
            database,
            format!("source.database: `{}` is not a database name", database.value),
            "MongoDB database names have no `/\\. \"$`",
        ));
    }
    let collections = match &raw.collections {
        None => None,
        Some(list) => {
            let mut names: Vec<String> = Vec::new();
            for c in &list.value {
                let name = c.value.trim();
                if name.is_empty() || name.starts_with("system.") || name.contains('$') {
                    return Err(cx.err(
                        c,
                        format!("source.collections: `{}` is not a collection that can be watched", c.value),
                        "name a user collection (not system.*, no `$`)",
                    ));
                }
                if names.iter().any(|n| n == name) {
                    return Err(cx.err(c, format!("source.collections: `{name}` is listed twice"), "list each once"));
                }
                names.push(name.to_string());
            }
            if names.is_empty() {
                return Err(cx.err(
                    list,
                    "source.collections: the list is empty",
                    "list the collections to capture, or remove `collections` to capture all of them",
                ));
            }
            Some(names)
        }
    };
    let full_document = choice(
        cx,
        "full_document",
        raw.full_document.as_ref(),
        &[
            ("update_lookup", FullDocument::UpdateLookup),
            ("when_available", FullDocument::WhenAvailable),
            ("required", FullDocument::Required),
        ],
        "a full-document mode",
        "use update_lookup, when_available or required (the last two read pre- and post-images)",
    )?;
    let snapshot = choice(
        cx,
        "snapshot",
        raw.snapshot.as_ref(),
        &[("initial", SnapshotMode::Initial), ("never", SnapshotMode::Never)],
        "a snapshot mode",
        "use `initial` or `never`",
    )?;
    let on_history_lost = choice(
        cx,
        "on_history_lost",
        raw.on_history_lost.as_ref(),
        &[("fail", HistoryLost::Fail), ("resnapshot", HistoryLost::Resnapshot)],
        "a policy",
        "use `fail` (stop with an error) or `resnapshot` (read the affected collections again)",
    )?;
    let json = choice(
        cx,
        "json",
        raw.json.as_ref(),
        &[("relaxed", JsonMode::Relaxed), ("canonical", JsonMode::Canonical)],
        "an Extended JSON mode",
        "use `relaxed` (plain numbers, as Debezium) or `canonical` (every value typed)",
    )?;
    let snapshot_chunk_docs = match &raw.snapshot_chunk_rows {
        Some(n) if n.value == 0 => {
            return Err(cx.err(n, "source.snapshot_chunk_rows: must be at least 1", "use a value like 10000"))
        }
        Some(n) => n.value,
        None => DEFAULT_SNAPSHOT_CHUNK_DOCS,
    };
    Ok(MongoSourceConfig {
        url: Secret::new(url),
        display,
        database: db.to_string(),
        collections,
        full_document,
        snapshot,
        on_history_lost,
        json,
        snapshot_chunk_docs,
    })
}

/// One of `options` by name (the first is the default when the key is absent).
fn choice<T: Copy>(
    cx: &Ctx,
    key: &str,
    value: Option<&Spanned<String>>,
    options: &[(&str, T)],
    what: &str,
    fix: &str,
) -> Result<T, ConfigError> {
    let Some(v) = value else { return Ok(options[0].1) };
    let name = v.value.trim();
    match options.iter().find(|(n, _)| *n == name) {
        Some((_, t)) => Ok(*t),
        None => Err(cx.err(v, format!("source.{key}: `{name}` is not {what}"), fix)),
    }
}

/// The tables a MongoDB source captures, when they are known before connecting.
pub(super) fn mongo_tables(cfg: &MongoSourceConfig) -> Vec<TableId> {
    cfg.collections.iter().flatten().map(|c| TableId::new(&cfg.database, c)).collect()
}

/// The host list of a connection string, without credentials.
fn mongo_hosts(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("mongodb://")
        .or_else(|| url.strip_prefix("mongodb+srv://"))
        .ok_or("the scheme is not mongodb:// or mongodb+srv://")?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let hosts = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    if hosts.is_empty() {
        return Err("the URL has no host".into());
    }
    Ok(hosts.to_string())
}

#[cfg(test)]
mod tests {
    use super::mongo_hosts;

    #[test]
    fn hosts_never_include_the_credentials() {
        assert_eq!(mongo_hosts("mongodb://sync:s3cr@t@a:27017,b:27017/?replicaSet=rs0").unwrap(), "a:27017,b:27017");
        assert_eq!(mongo_hosts("mongodb+srv://cluster0.example.net/shop").unwrap(), "cluster0.example.net");
        assert!(mongo_hosts("postgres://x@y/z").is_err());
    }
}

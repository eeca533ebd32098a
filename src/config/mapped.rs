//! Validation of mapped sinks: target, key, filter, fields, conflict strategy, version guard
//! and batch limits. Expressions are compiled here, so a typo fails before anything connects.

use super::pipeline::*;
use super::raw::*;
use super::secret::Secret;
use super::validate::{only_for, parse_pg_url, sink_name, Ctx};
use super::ConfigError;
use crate::event::TableId;
use crate::mapping::conflict::Strategy;
use crate::mapping::{Located, MappingConfig};
use serde_saphyr::Spanned;
use std::time::Duration;

pub(super) fn postgres_sink(cx: &Ctx, raw: RawSink, sources: &[TableId]) -> Result<PostgresSinkConfig, ConfigError> {
    let name = sink_name(cx, &raw)?;
    let kind = "postgres";
    only_for(cx, &name, kind, "object", raw.object.as_ref())?;
    only_for(cx, &name, kind, "token", raw.token.as_ref())?;
    only_for(cx, &name, kind, "rate", raw.rate.as_ref().map(|_| &raw.name))?;
    only_for(cx, &name, kind, "auth", raw.auth.as_ref().map(|a| &a.kind))?;
    only_for(cx, &name, kind, "api_version", raw.api_version.as_ref())?;
    only_for(cx, &name, kind, "bulk_threshold", raw.bulk_threshold.as_ref())?;
    no_parquet_keys(cx, &name, kind, &raw)?;
    let url = cx.resolve("url", &raw.url)?;
    let mut conn = parse_pg_url(&url).map_err(|m| {
        cx.err(&raw.url, format!("sink {name}: url: {m}"), "write it as postgres://user@host:5432/database")
    })?;
    if conn.password.is_none() {
        conn.password = std::env::var("PGPASSWORD").ok().map(Secret::new);
    }
    let table = match &raw.table {
        Some(t) => TableId::parse(t.value.trim()).ok_or_else(|| {
            cx.err(t, format!("sink {name}: table `{}` is not a table name", t.value), "write schema.table")
        })?,
        None => {
            return Err(cx.err(
                &raw.name,
                format!("sink {name}: a postgres sink needs `table:` (the target table)"),
                "add e.g. `table: public.customers`",
            ))
        }
    };
    let mapping = mapping(cx, &name, &raw, sources)?;
    let conflict = strategy(cx, &name, raw.conflict.as_ref(), mapping.fields.as_deref())?;
    let version = match raw.version.as_ref().map(|v| (v, v.value.trim())) {
        None | Some((_, "position")) => VersionGuard::Position { column: "_sluice_version".into() },
        Some((_, "none")) => VersionGuard::None,
        Some((v, text)) => match text.strip_prefix("field:").map(str::trim) {
            Some(f) if !f.is_empty() => VersionGuard::Field { column: f.to_string() },
            _ => {
                return Err(cx.err(
                    v,
                    format!("sink {name}: version `{text}` is not a guard"),
                    "use `position` (a _sluice_version column, the default), `field:<mapped field>` or `none`",
                ))
            }
        },
    };
    let batch = batch(cx, &raw, 500)?;
    Ok(PostgresSinkConfig { name, conn, table, mapping, conflict, version, batch })
}

/// Refuses the keys that only Parquet sinks have.
pub(super) fn no_parquet_keys(cx: &Ctx, name: &str, kind: &str, raw: &RawSink) -> Result<(), ConfigError> {
    only_for(cx, name, kind, "unbounded_numeric", raw.unbounded_numeric.as_ref())?;
    only_for(cx, name, kind, "partition_by", raw.partition_by.as_ref())?;
    only_for(cx, name, kind, "nested", raw.nested.as_ref())?;
    only_for(cx, name, kind, "compression", raw.compression.as_ref())?;
    if raw.s3.is_some() || raw.roll.is_some() {
        return Err(cx.err(
            &raw.name,
            format!("sink {name}: `s3` and `roll` apply to parquet sinks only"),
            format!("remove them from this {kind} sink"),
        ));
    }
    Ok(())
}

/// The mapping keys shared by every mapped sink type.
pub(super) fn mapping(cx: &Ctx, name: &str, raw: &RawSink, sources: &[TableId]) -> Result<MappingConfig, ConfigError> {
    let table = match &raw.from {
        Some(f) => {
            let id = TableId::parse(f.value.trim()).ok_or_else(|| {
                cx.err(f, format!("sink {name}: from `{}` is not a table name", f.value), "write schema.table")
            })?;
            // An empty list is a source that captures whatever its database holds.
            if !sources.is_empty() && !sources.contains(&id) {
                let listed: Vec<String> = sources.iter().map(|t| t.to_string()).collect();
                return Err(cx.err(
                    f,
                    format!("sink {name}: from `{id}` is not a source table"),
                    format!("use one of the source's tables: {}", listed.join(", ")),
                ));
            }
            id
        }
        None if sources.len() == 1 => sources[0].clone(),
        None if sources.is_empty() => {
            return Err(cx.err(
                &raw.name,
                format!(
                    "sink {name}: the source does not list its tables (every collection, or whatever its topics \
                     hold); say which one this sink maps"
                ),
                "add `from: schema.table` (for MongoDB, `from: database.collection`)",
            ))
        }
        None => {
            return Err(cx.err(
                &raw.name,
                format!("sink {name}: the source captures {} tables; say which one this sink maps", sources.len()),
                "add `from: schema.table`",
            ))
        }
    };
    let key = match &raw.key {
        Some(k) => {
            let target = k.target.value.trim();
            if target.is_empty() {
                return Err(cx.err(&k.target, "key.target: empty", "name the target's key column or external id"));
            }
            Some(vec![(target.to_string(), cx.expr("key.source", &k.source)?)])
        }
        None => None,
    };
    let when = raw.when.as_ref().map(|w| cx.expr("when", w)).transpose()?;
    let fields = match &raw.fields {
        Some(f) if f.value.is_empty() => {
            return Err(cx.err(
                f,
                "fields: the map is empty",
                "list target fields, or remove `fields:` to copy every column",
            ))
        }
        Some(f) => Some(
            f.value
                .iter()
                .map(|(target, e)| Ok((target.clone(), cx.expr(&format!("fields.{target}"), e)?)))
                .collect::<Result<Vec<_>, ConfigError>>()?,
        ),
        None => None,
    };
    let drop_echoes = match raw.echoes.as_ref().map(|e| (e, e.value.trim())) {
        None | Some((_, "drop")) => true,
        Some((_, "keep")) => false,
        Some((e, other)) => {
            return Err(cx.err(
                e,
                format!("sink {name}: echoes `{other}` is not a policy"),
                "use `drop` (default: changes written by sluice sinks are not mirrored back) or `keep`",
            ))
        }
    };
    Ok(MappingConfig { table, key, when, fields, drop_echoes })
}

fn strategy(
    cx: &Ctx,
    name: &str,
    raw: Option<&RawConflict>,
    fields: Option<&[(String, Located)]>,
) -> Result<Strategy, ConfigError> {
    let Some(raw) = raw else { return Ok(Strategy::SourceWins) };
    let extra = |key: &str, present: bool| -> Result<(), ConfigError> {
        if present {
            Err(cx.err(
                &raw.strategy,
                format!("sink {name}: conflict.{key} does not apply to strategy `{}`", raw.strategy.value),
                format!("remove conflict.{key}"),
            ))
        } else {
            Ok(())
        }
    };
    let strategy = match raw.strategy.value.trim() {
        "source_wins" | "target_wins" => {
            extra("source_field", raw.source_field.is_some())?;
            extra("target_field", raw.target_field.is_some())?;
            extra("owners", raw.owners.is_some())?;
            match raw.strategy.value.trim() {
                "source_wins" => Strategy::SourceWins,
                _ => Strategy::TargetWins,
            }
        }
        "newest_wins" => {
            extra("owners", raw.owners.is_some())?;
            let (Some(source), Some(target)) = (&raw.source_field, &raw.target_field) else {
                return Err(cx.err(
                    &raw.strategy,
                    format!("sink {name}: newest_wins needs conflict.source_field and conflict.target_field"),
                    "e.g. `source_field: after.updated_at, target_field: updated_at`",
                ));
            };
            // `after.updated_at` is accepted as shorthand for `{{ after.updated_at }}`.
            let text =
                if source.value.contains("{{") { source.value.clone() } else { format!("{{{{ {} }}}}", source.value) };
            let spanned = Spanned { value: text, referenced: source.referenced, defined: source.defined };
            Strategy::NewestWins {
                source: cx.expr("conflict.source_field", &spanned)?,
                target_field: target.value.trim().to_string(),
            }
        }
        "merge" | "manual" => {
            extra("source_field", raw.source_field.is_some())?;
            extra("target_field", raw.target_field.is_some())?;
            let mut target_owned = Vec::new();
            for (field, side) in raw.owners.iter().flatten() {
                if let Some(f) = fields {
                    if !f.iter().any(|(n, _)| n == field) {
                        return Err(cx.err(
                            side,
                            format!("sink {name}: conflict.owners names `{field}`, which is not a mapped field"),
                            "list only fields under `fields:`",
                        ));
                    }
                }
                match side.value.trim() {
                    "source" => {}
                    "target" => target_owned.push(field.clone()),
                    other => {
                        return Err(cx.err(
                            side,
                            format!("sink {name}: owner `{other}` of `{field}` is not a side"),
                            "use `source` or `target`",
                        ))
                    }
                }
            }
            if raw.strategy.value.trim() == "merge" {
                Strategy::Merge { target_owned }
            } else {
                Strategy::Manual { target_owned }
            }
        }
        other => {
            return Err(cx.err(
                &raw.strategy,
                format!("sink {name}: conflict strategy `{other}` is not known"),
                "use source_wins, target_wins, newest_wins, merge or manual",
            ))
        }
    };
    Ok(strategy)
}

pub(super) fn batch(cx: &Ctx, raw: &RawSink, default_records: usize) -> Result<BatchLimits, ConfigError> {
    let mut limits = BatchLimits { max_records: default_records, max_age: Duration::from_secs(1) };
    if let Some(b) = &raw.batch {
        if let Some(n) = &b.max_records {
            if n.value == 0 {
                return Err(cx.err(n, "batch.max_records: must be at least 1", "use a value like 500"));
            }
            limits.max_records = n.value as usize;
        }
        if let Some(a) = &b.max_age {
            limits.max_age = cx.duration("batch.max_age", a)?;
        }
    }
    Ok(limits)
}

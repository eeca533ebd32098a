//! How source changes become target records: key, filter and field expressions, then coalescing
//! per key and conflict resolution against the target (see [`coalesce`] and [`conflict`]).

pub mod coalesce;
pub mod conflict;
pub mod context;
pub mod expr;

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, TableId, TableSchema};
use context::{convert, EventView, SchemaIndex};
pub use expr::{Expr, ExprList};
use minijinja::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Where an expression was written, for messages.
#[derive(Debug, Clone)]
pub struct Located {
    pub expr: Arc<Expr>,
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
}

impl Located {
    fn at(&self) -> String {
        format!("{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A sink's validated mapping (no I/O yet).
#[derive(Debug, Clone)]
pub struct MappingConfig {
    /// The source table this sink reads.
    pub table: TableId,
    /// Target key columns and their expressions; `None` uses the source primary key by name.
    pub key: Option<Vec<(String, Located)>>,
    /// Rows for which this is false (or none) are not written; an update that makes it false
    /// deletes the target record.
    pub when: Option<Located>,
    /// Target fields in order; `None` copies every source column under its own name.
    pub fields: Option<Vec<(String, Located)>>,
    /// Whether changes written by a sluice sink (a replication origin named `sluice…`) are
    /// dropped: the loop breaker of two-way mirroring.
    pub drop_echoes: bool,
}

/// What one change becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    Upsert {
        key: Vec<Value>,
        fields: Vec<Value>,
    },
    Delete {
        key: Vec<Value>,
    },
    /// Empty the target (a truncate of the source table).
    Truncate,
    Skip(Skip),
}

/// Why a change produces no target write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Another table than the sink's.
    OtherTable,
    /// `when` was false.
    Filtered,
    /// Written by a sluice sink: an echo of a two-way mirror.
    Echo,
}

/// A record that cannot be mapped: it goes to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError(pub String);

enum Source {
    Column(usize),
    Expr(Located),
}

/// The mapping resolved against one table schema.
struct Plan {
    index: Arc<SchemaIndex>,
    key: Vec<Source>,
    fields: Vec<Source>,
    /// All fields as one expression, when every field is one.
    combined: Option<ExprList>,
}

/// Maps changes; resolves (and checks) the mapping once per table schema.
pub struct Mapper {
    config: MappingConfig,
    plans: HashMap<u32, Plan>,
    key_names: Vec<String>,
    field_names: Vec<String>,
}

impl Mapper {
    pub fn new(config: MappingConfig) -> Self {
        Self { config, plans: HashMap::new(), key_names: Vec::new(), field_names: Vec::new() }
    }

    pub fn config(&self) -> &MappingConfig {
        &self.config
    }

    /// Target key column names (known after the first schema is seen).
    pub fn key_names(&self) -> &[String] {
        &self.key_names
    }

    /// Target field names in the order of [`Mapped::Upsert`]'s values.
    pub fn field_names(&self) -> &[String] {
        &self.field_names
    }

    /// Resolves the mapping for a schema: a column the mapping names that the table lacks is a
    /// configuration error, reported before any record of that schema is mapped.
    pub fn prepare(&mut self, schema_id: u32, schema: Arc<TableSchema>) -> Result<()> {
        if self.plans.contains_key(&schema_id) || schema.table != self.config.table {
            return Ok(());
        }
        let index = Arc::new(SchemaIndex::new(schema.clone()));
        let by_name = |name: &str| index.column(name).map(Source::Column);
        let key = match &self.config.key {
            Some(k) => k
                .iter()
                .map(|(_, e)| self.checked(&index, e).map(|_| Source::Expr(e.clone())))
                .collect::<Result<_>>()?,
            None => schema.columns.iter().filter(|c| c.key).filter_map(|c| by_name(&c.name)).collect(),
        };
        // Copying every column skips sluice's own bookkeeping columns (`_sluice_version`,
        // `_sluice_hash`): in a two-way mirror the source table is also a target.
        let copied: Vec<usize> =
            (0..schema.columns.len()).filter(|&i| !schema.columns[i].name.starts_with("_sluice_")).collect();
        let key_names: Vec<String> = match &self.config.key {
            Some(k) => k.iter().map(|(n, _)| n.clone()).collect(),
            None => schema.columns.iter().filter(|c| c.key).map(|c| c.name.clone()).collect(),
        };
        let fields: Vec<Source> = match &self.config.fields {
            Some(f) => f
                .iter()
                .map(|(_, e)| self.checked(&index, e).map(|_| Source::Expr(e.clone())))
                .collect::<Result<_>>()?,
            None => copied.iter().map(|&i| Source::Column(i)).collect(),
        };
        let field_names: Vec<String> = match &self.config.fields {
            Some(f) => f.iter().map(|(n, _)| n.clone()).collect(),
            None => copied.iter().map(|&i| schema.columns[i].name.clone()).collect(),
        };
        if let Some(w) = &self.config.when {
            self.checked(&index, w)?;
        }
        if !self.field_names.is_empty() && (self.field_names != field_names || self.key_names != key_names) {
            return Err(Error::config(format!(
                "table {} changed its columns, and the sink copies columns by name; declare `fields:` \
                 so the target's shape does not follow the source's",
                schema.table
            )));
        }
        self.key_names = key_names;
        self.field_names = field_names;
        let exprs: Vec<&Expr> = fields
            .iter()
            .filter_map(|f| match f {
                Source::Expr(e) => Some(&*e.expr),
                Source::Column(_) => None,
            })
            .collect();
        let combined = (exprs.len() == fields.len() && !exprs.is_empty()).then(|| ExprList::compile(&exprs)).flatten();
        self.plans.insert(schema_id, Plan { index, key, fields, combined });
        Ok(())
    }

    /// An expression reading `after.x`, `before.x` or `key.x` where the table has no column x
    /// would fail on every record; say so once, pointing at the expression.
    fn checked(&self, index: &SchemaIndex, e: &Located) -> Result<()> {
        for var in e.expr.variables() {
            let mut parts = var.splitn(3, '.');
            let (root, column) = (parts.next().unwrap_or(""), parts.next());
            if let (Some(column), true) = (column, matches!(root, "after" | "before" | "key")) {
                if index.column(column).is_none() {
                    let mut known: Vec<&str> = index.schema.columns.iter().map(|c| c.name.as_str()).collect();
                    known.sort_unstable();
                    return Err(Error::config(format!(
                        "{}: `{var}` names no column of {} (its columns: {}); fix the expression `{}`",
                        e.at(),
                        index.schema.table,
                        known.join(", "),
                        e.expr.source
                    )));
                }
            }
        }
        Ok(())
    }

    /// Maps one change. [`Mapper::prepare`] must have seen its schema.
    pub fn map(&self, event: &Arc<ChangeEvent>) -> Result<Mapped, MapError> {
        if event.table != self.config.table {
            return Ok(Mapped::Skip(Skip::OtherTable));
        }
        if self.config.drop_echoes && event.origin.as_deref().is_some_and(|o| o.starts_with("sluice")) {
            return Ok(Mapped::Skip(Skip::Echo));
        }
        let plan = self
            .plans
            .get(&event.schema_id)
            .ok_or_else(|| MapError(format!("schema {} of {} was not prepared", event.schema_id, event.table)))?;
        if event.op == Op::Truncate {
            return Ok(Mapped::Truncate);
        }
        let key_ctx = EventView::key_value(event.clone(), plan.index.clone());
        let key = plan
            .key
            .iter()
            .zip(&self.key_names)
            .map(|(s, name)| {
                let v = self.value(s, event, &key_ctx, true)?;
                if v.is_none() || v.is_undefined() {
                    return Err(MapError(format!("key `{name}` is null")));
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if event.op == Op::Delete {
            return Ok(Mapped::Delete { key });
        }
        let ctx = EventView::value(event.clone(), plan.index.clone());
        if let Some(w) = &self.config.when {
            let keep = w.expr.eval(&ctx).map_err(|e| MapError(format!("when `{}`: {e}", w.expr.source)))?;
            if !keep.is_true() {
                // A row that stops matching leaves the target; one that never matched was
                // never written, so it needs no delete.
                return Ok(match event.op {
                    Op::Update => Mapped::Delete { key },
                    _ => Mapped::Skip(Skip::Filtered),
                });
            }
        }
        if let Some(values) = plan.combined.as_ref().and_then(|c| c.eval(&ctx)) {
            return Ok(Mapped::Upsert { key, fields: values });
        }
        let fields = plan.fields.iter().map(|s| self.value(s, event, &ctx, false)).collect::<Result<Vec<_>, _>>()?;
        Ok(Mapped::Upsert { key, fields })
    }

    fn value(&self, source: &Source, event: &ChangeEvent, ctx: &Value, key: bool) -> Result<Value, MapError> {
        match source {
            Source::Column(i) => {
                let row = if key { event.after.as_ref().or(event.before.as_ref()) } else { event.after.as_ref() };
                match row {
                    Some(r) => Ok(r.get(*i).map(convert).unwrap_or_default()),
                    // A delete without an old row: the key columns come from the event's key.
                    None => {
                        let plan_schema = &self.plans[&event.schema_id].index.schema;
                        let pos = plan_schema.columns[..*i].iter().filter(|c| c.key).count();
                        Ok(event.key.get(pos).map(convert).unwrap_or_default())
                    }
                }
            }
            Source::Expr(e) => e.expr.eval(ctx).map_err(|err| MapError(format!("`{}`: {err}", e.expr.source))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Column, ColumnType, Position, Value as Cell};

    fn schema() -> Arc<TableSchema> {
        let col = |name: &str, ty, key| Column { name: name.into(), ty, key, toastable: false };
        Arc::new(TableSchema {
            table: TableId::new("public", "people"),
            columns: vec![
                col("id", ColumnType::Int64, true),
                col("email", ColumnType::Text, false),
                col("status", ColumnType::Text, false),
            ],
            toast_target: 0,
        })
    }

    fn event(op: Op, id: i64, email: &str, status: &str) -> Arc<ChangeEvent> {
        let row = vec![Cell::Int(id), Cell::Text(email.into()), Cell::Text(status.into())];
        Arc::new(ChangeEvent {
            table: TableId::new("public", "people"),
            schema_id: 1,
            op,
            key: vec![Cell::Int(id)],
            before: None,
            after: (op != Op::Delete).then_some(row),
            position: Position::change(1, 0),
            commit_ts_us: 0,
            tx_id: None,
            toast_fetched: false,
            snapshot_last: false,
            origin: None,
        })
    }

    fn located(text: &str) -> Located {
        Located { expr: Arc::new(Expr::compile(text).unwrap()), file: "p.yaml".into(), line: 3, column: 9 }
    }

    fn mapper(fields: Option<Vec<(&str, &str)>>, when: Option<&str>) -> Mapper {
        let mut m = Mapper::new(MappingConfig {
            table: TableId::new("public", "people"),
            key: Some(vec![("ext_id".into(), located("{{ after.id }}"))]),
            when: when.map(located),
            fields: fields.map(|f| f.into_iter().map(|(n, e)| (n.to_string(), located(e))).collect()),
            drop_echoes: true,
        });
        m.prepare(1, schema()).unwrap();
        m
    }

    #[test]
    fn fields_filters_and_deletes() {
        let m = mapper(Some(vec![("email", "{{ after.email | lower }}")]), Some("{{ after.status != 'test' }}"));
        assert_eq!(
            m.map(&event(Op::Insert, 1, "A@X.io", "live")).unwrap(),
            Mapped::Upsert { key: vec![Value::from(1)], fields: vec![Value::from("a@x.io")] }
        );
        assert_eq!(m.map(&event(Op::Insert, 2, "b", "test")).unwrap(), Mapped::Skip(Skip::Filtered));
        // An update that stops matching removes the record it may have written before.
        assert_eq!(m.map(&event(Op::Update, 2, "b", "test")).unwrap(), Mapped::Delete { key: vec![Value::from(2)] });
        // A delete carries only its key; `after.id` in the key reads the removed row.
        assert_eq!(m.map(&event(Op::Delete, 3, "", "")).unwrap(), Mapped::Delete { key: vec![Value::from(3)] });
        assert_eq!(m.field_names(), ["email"]);
    }

    #[test]
    fn the_source_block_and_the_key_are_readable() {
        let m = mapper(
            Some(vec![
                ("at", "{{ source.ts }}"),
                ("pos", "{{ source.position }}"),
                ("k", "{{ key.id }}"),
                ("op", "{{ op }}"),
            ]),
            None,
        );
        let Mapped::Upsert { fields, .. } = m.map(&event(Op::Update, 4, "a", "b")).unwrap() else { panic!() };
        assert_eq!(
            fields,
            vec![
                Value::from("1970-01-01T00:00:00Z"),
                Value::from("0000000000000001-c-000000000000"),
                Value::from(4),
                Value::from("update")
            ]
        );
    }

    #[test]
    fn without_fields_every_column_is_copied() {
        let m = mapper(None, None);
        assert_eq!(m.field_names(), ["id", "email", "status"]);
        let Mapped::Upsert { fields, .. } = m.map(&event(Op::Read, 1, "a", "b")).unwrap() else { panic!() };
        assert_eq!(fields, vec![Value::from(1), Value::from("a"), Value::from("b")]);
    }

    #[test]
    fn a_missing_column_is_a_config_error_that_points_at_the_expression() {
        let mut m = Mapper::new(MappingConfig {
            table: TableId::new("public", "people"),
            key: None,
            when: None,
            fields: Some(vec![("email".into(), located("{{ after.emial }}"))]),
            drop_echoes: true,
        });
        let e = m.prepare(1, schema()).unwrap_err().to_string();
        assert!(e.contains("p.yaml:3:9") && e.contains("after.emial") && e.contains("email, id, status"), "{e}");
    }

    #[test]
    fn evaluation_errors_are_record_errors_and_echoes_are_dropped() {
        let m = mapper(Some(vec![("n", "{{ after.email | int }}")]), None);
        assert!(m.map(&event(Op::Insert, 1, "not a number", "x")).is_err());
        let mut echo = (*event(Op::Insert, 1, "1", "x")).clone();
        echo.origin = Some("sluice:mirror:b".into());
        assert_eq!(m.map(&Arc::new(echo)).unwrap(), Mapped::Skip(Skip::Echo));
    }
}

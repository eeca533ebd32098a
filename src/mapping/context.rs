//! What an expression sees: a change event as `op`, `after`, `before`, `key`, `table` and
//! `source`, with column values converted only when an expression reads them.
//!
//! Values keep their meaning: numerics stay exact decimal text (compare them with `| float`),
//! temporal values are ISO 8601 text (timestamps with zone in UTC, `Z`), JSON is its text,
//! UUIDs are hyphenated text, binary stays bytes.

use crate::event::{ChangeEvent, Op, TableSchema, Value as Cell};
use chrono::{DateTime, NaiveDate, NaiveTime};
use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// A table schema with its columns indexed by name.
#[derive(Debug)]
pub struct SchemaIndex {
    pub schema: Arc<TableSchema>,
    by_name: HashMap<String, usize>,
    names: Vec<Value>,
}

impl SchemaIndex {
    pub fn new(schema: Arc<TableSchema>) -> Self {
        let by_name = schema.columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        let names = schema.columns.iter().map(|c| Value::from(c.name.as_str())).collect();
        Self { schema, by_name, names }
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}

/// Which row of the event a [`RowView`] shows.
#[derive(Debug, Clone, Copy)]
enum Image {
    After,
    Before,
    /// The old row of a delete as far as known (the before image, else the key columns).
    Deleted,
    Key,
}

/// One row of an event, as a map from column name to value.
#[derive(Debug)]
struct RowView {
    event: Arc<ChangeEvent>,
    index: Arc<SchemaIndex>,
    image: Image,
}

impl RowView {
    fn cell(&self, i: usize) -> Option<Value> {
        let e = &self.event;
        let key_cell = || {
            let pos = self.index.schema.columns[..i].iter().filter(|c| c.key).count();
            self.index.schema.columns[i].key.then(|| e.key.get(pos)).flatten()
        };
        let cell = match self.image {
            Image::After => e.after.as_ref()?.get(i),
            Image::Before => e.before.as_ref()?.get(i),
            Image::Deleted => match &e.before {
                Some(b) => b.get(i),
                None => Some(key_cell().unwrap_or(&Cell::Null)),
            },
            Image::Key => key_cell(),
        }?;
        Some(convert(cell))
    }
}

impl Object for RowView {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        self.cell(self.index.column(key)?)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let names: Vec<Value> = match self.image {
            Image::Key => {
                self.index.schema.columns.iter().filter(|c| c.key).map(|c| Value::from(c.name.as_str())).collect()
            }
            _ => self.index.names.clone(),
        };
        Enumerator::Values(names)
    }
}

/// The root of an expression's context for one event.
#[derive(Debug)]
pub struct EventView {
    event: Arc<ChangeEvent>,
    index: Arc<SchemaIndex>,
    /// Key expressions of a delete read the removed row as `after`.
    deleted_as_after: bool,
    /// `after`, made once per event rather than once per field that reads it.
    after: OnceLock<Value>,
}

impl EventView {
    /// The context for field and filter expressions.
    pub fn value(event: Arc<ChangeEvent>, index: Arc<SchemaIndex>) -> Value {
        Value::from_object(Self { event, index, deleted_as_after: false, after: OnceLock::new() })
    }

    /// The context for the key expression: for a delete, `after` is the removed row, since a
    /// key written as `{{ after.id }}` must find the same target record when the row goes.
    pub fn key_value(event: Arc<ChangeEvent>, index: Arc<SchemaIndex>) -> Value {
        let deleted = event.op == Op::Delete;
        Value::from_object(Self { event, index, deleted_as_after: deleted, after: OnceLock::new() })
    }

    fn row(&self, image: Image) -> Value {
        Value::from_object(RowView { event: self.event.clone(), index: self.index.clone(), image })
    }
}

impl Object for EventView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.get_value_by_str(key.as_str()?)
    }

    fn get_value_by_str(self: &Arc<Self>, key: &str) -> Option<Value> {
        let e = &self.event;
        Some(match key {
            "op" => Value::from(e.op.as_str()),
            "after" => self
                .after
                .get_or_init(|| match (self.deleted_as_after, &e.after) {
                    (true, _) => self.row(Image::Deleted),
                    (false, Some(_)) => self.row(Image::After),
                    (false, None) => Value::from(()),
                })
                .clone(),
            "before" => match (e.op, &e.before) {
                (_, Some(_)) => self.row(Image::Before),
                (Op::Delete, None) => self.row(Image::Deleted),
                _ => Value::from(()),
            },
            "key" => self.row(Image::Key),
            "table" => Value::from(e.table.to_string()),
            "source" => Value::from(std::collections::BTreeMap::from([
                ("position", Value::from(e.position.to_string())),
                ("ts", Value::from(timestamptz_text(e.commit_ts_us))),
                ("ts_us", Value::from(e.commit_ts_us)),
                ("tx_id", e.tx_id.map(Value::from).unwrap_or(Value::from(()))),
                ("snapshot", Value::from(e.op == Op::Read)),
            ])),
            _ => return None,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["op", "after", "before", "key", "table", "source"])
    }
}

/// A column value as an expression sees it.
pub fn convert(cell: &Cell) -> Value {
    match cell {
        Cell::Null | Cell::UnchangedToast => Value::from(()),
        Cell::Bool(b) => Value::from(*b),
        Cell::Int(i) => Value::from(*i),
        Cell::Float(f) => Value::from(*f),
        Cell::Numeric(s) | Cell::Text(s) | Cell::Json(s) | Cell::Enum(s) | Cell::Other(s) => Value::from(s.as_str()),
        Cell::Bytes(b) => Value::from_bytes(b.clone()),
        Cell::Uuid(u) => Value::from(uuid::Uuid::from_bytes(*u).hyphenated().to_string()),
        Cell::Date(d) => Value::from(date_text(*d)),
        Cell::Time(us) => Value::from(time_text(*us)),
        Cell::TimeTz(us, offset) => Value::from(format!("{}{}", time_text(*us), offset_text(*offset))),
        Cell::Timestamp(us) => Value::from(timestamp_text(*us)),
        Cell::TimestampTz(us) => Value::from(timestamptz_text(*us)),
        Cell::Interval(iv) => {
            let secs = iv.micros as f64 / 1e6;
            Value::from(format!("P{}M{}DT{}S", iv.months, iv.days, secs))
        }
        Cell::Array(items) => Value::from(items.iter().map(convert).collect::<Vec<_>>()),
    }
}

fn date_text(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        // Display rather than format(): it skips parsing a format string for every value.
        d => NaiveDate::from_num_days_from_ce_opt(d + 719_163).map(|d| d.to_string()).unwrap_or_else(|| d.to_string()),
    }
}

fn time_text(us: i64) -> String {
    let secs = (us / 1_000_000) as u32;
    let nanos = (us % 1_000_000) as u32 * 1000;
    NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos)
        .map(|t| t.to_string())
        .unwrap_or_else(|| "24:00:00".into())
}

fn offset_text(secs: i32) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let a = secs.unsigned_abs();
    format!("{sign}{:02}:{:02}", a / 3600, a / 60 % 60)
}

fn timestamp_text(us: i64) -> String {
    match us {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        us => DateTime::from_timestamp_micros(us)
            .map(|t| format!("{}T{}", t.date_naive(), t.time()))
            .unwrap_or_else(|| us.to_string()),
    }
}

/// RFC 3339 in UTC, the form every CRM and PostgreSQL accept.
pub fn timestamptz_text(us: i64) -> String {
    match us {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        us => DateTime::from_timestamp_micros(us)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            .unwrap_or_else(|| us.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporal_text_is_iso_8601() {
        assert_eq!(date_text(0), "1970-01-01");
        assert_eq!(date_text(20_418), "2025-11-26");
        assert_eq!(time_text(3_600_000_000 + 500_000), "01:00:00.500");
        assert_eq!(offset_text(-19_800), "-05:30");
        assert_eq!(timestamp_text(1_500_000), "1970-01-01T00:00:01.500");
        assert_eq!(timestamptz_text(1_000_000), "1970-01-01T00:00:01Z");
        assert_eq!(timestamptz_text(i64::MAX), "infinity");
    }
}

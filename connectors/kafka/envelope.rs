//! Debezium's change-event envelope, written as JSON, so that Debezium consumers read sluice
//! topics unchanged.
//!
//! PostgreSQL tables follow the PostgreSQL connector: key `{"id": 1}`, value `{"before",
//! "after", "source", "op", "ts_ms", "transaction"}`, with the connector's default temporal
//! modes (`adaptive_time_microseconds`: dates as days, times and timestamps as microseconds,
//! zoned values as ISO-8601 text) and `decimal.handling.mode=string`, because its default
//! (`precise`) is base64 of unscaled bytes that no JSON consumer reads. MongoDB collections
//! follow the MongoDB connector: key `{"id": "<_id as Extended JSON>"}`, `after` as Extended
//! JSON text and `updateDescription`. With `schemas: true` each key and value is wrapped as
//! `{"schema": ..., "payload": ...}`, as Kafka Connect's JsonConverter writes it.

use super::transactions::TxOrder;
use crate::event::{ChangeEvent, ColumnType, Interval, Op, Phase, TableSchema, Value};
use base64::Engine;
use chrono::{DateTime, SecondsFormat};
use std::fmt::Write as _;

/// Debezium's placeholder for an unchanged TOAST value it could not reconstruct.
const UNAVAILABLE: &str = "__debezium_unavailable_value";
/// Debezium's `interval.handling.mode=numeric` months: 365.25 / 12 days.
const MICROS_PER_MONTH: f64 = 365.25 / 12.0 * 86_400_000_000.0;

/// Which Debezium connector's layout a table's events follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Postgres,
    Mongo,
}

/// What every envelope of one pipeline shares.
#[derive(Debug, Clone)]
pub struct EnvelopeWriter {
    pub flavor: Flavor,
    /// Debezium's `topic.prefix`, shown as `source.name`.
    pub name: String,
    /// The database (PostgreSQL) or the database captured (MongoDB).
    pub db: String,
    pub schemas: bool,
}

impl EnvelopeWriter {
    /// The record key: the key columns by name; `None` for a truncate, which has no key.
    pub fn key(&self, schema: &TableSchema, event: &ChangeEvent) -> Option<Vec<u8>> {
        if event.op == Op::Truncate {
            return None;
        }
        let mut out = String::with_capacity(64);
        let keys = schema.key_indexes();
        if self.schemas {
            out.push_str("{\"schema\":");
            self.key_schema(schema, &keys, &mut out);
            out.push_str(",\"payload\":");
        }
        out.push('{');
        match self.flavor {
            Flavor::Mongo => {
                out.push_str("\"id\":");
                json_str(&mut out, json_text(event.key.first()).unwrap_or("null"));
            }
            Flavor::Postgres => {
                for (n, (i, value)) in keys.iter().zip(&event.key).enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    json_str(&mut out, &schema.columns[*i].name);
                    out.push(':');
                    write_value(&mut out, value, &schema.columns[*i].ty);
                }
            }
        }
        out.push('}');
        if self.schemas {
            out.push('}');
        }
        Some(out.into_bytes())
    }

    /// The record value. `now_ms` is Debezium's envelope `ts_ms`, the time sluice handled it.
    pub fn value(&self, schema: &TableSchema, event: &ChangeEvent, now_ms: i64) -> Vec<u8> {
        self.value_in(schema, event, now_ms, None)
    }

    /// The record value with the change's place in its transaction (PostgreSQL, with
    /// transaction metadata on); `None` writes `"transaction": null`.
    pub fn value_in(&self, schema: &TableSchema, event: &ChangeEvent, now_ms: i64, tx: Option<&TxOrder>) -> Vec<u8> {
        let mut out = String::with_capacity(256);
        if self.schemas {
            out.push_str("{\"schema\":");
            self.value_schema(schema, &mut out);
            out.push_str(",\"payload\":");
        }
        out.push('{');
        match self.flavor {
            Flavor::Postgres => {
                out.push_str("\"before\":");
                self.row(&mut out, schema, event.before.as_deref());
                out.push_str(",\"after\":");
                self.row(&mut out, schema, event.after.as_deref());
            }
            Flavor::Mongo => {
                out.push_str("\"before\":");
                opt_json_str(&mut out, column(event.before.as_deref(), 1));
                out.push_str(",\"after\":");
                opt_json_str(&mut out, column(event.after.as_deref(), 1));
                out.push_str(",\"updateDescription\":");
                match column(event.after.as_deref(), 2) {
                    Some(text) => update_description(&mut out, text),
                    None => out.push_str("null"),
                }
            }
        }
        out.push_str(",\"source\":");
        self.source(&mut out, event);
        let _ = write!(out, ",\"op\":\"{}\",\"ts_ms\":{now_ms}", op_code(event.op));
        if self.flavor == Flavor::Postgres {
            match tx {
                Some(tx) => {
                    out.push_str(",\"transaction\":{\"id\":");
                    json_str(&mut out, &tx.id);
                    let _ = write!(
                        out,
                        ",\"total_order\":{},\"data_collection_order\":{}}}",
                        tx.total_order, tx.data_collection_order
                    );
                }
                None => out.push_str(",\"transaction\":null"),
            }
        }
        out.push('}');
        if self.schemas {
            out.push('}');
        }
        out.into_bytes()
    }

    fn row(&self, out: &mut String, schema: &TableSchema, row: Option<&[Value]>) {
        let Some(row) = row else {
            out.push_str("null");
            return;
        };
        out.push('{');
        for (i, (column, value)) in schema.columns.iter().zip(row).enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_str(out, &column.name);
            out.push(':');
            write_value(out, value, &column.ty);
        }
        out.push('}');
    }

    fn source(&self, out: &mut String, event: &ChangeEvent) {
        let snapshot = match (event.position.phase, event.snapshot_last) {
            (Phase::Snapshot, true) => "last",
            (Phase::Snapshot, false) => "true",
            (Phase::Change, _) => "false",
        };
        let ts_ms = event.commit_ts_us.div_euclid(1000);
        let connector = match self.flavor {
            Flavor::Postgres => "postgresql",
            Flavor::Mongo => "mongodb",
        };
        let _ = write!(
            out,
            "{{\"version\":\"sluice-{}\",\"connector\":\"{connector}\",\"name\":",
            env!("CARGO_PKG_VERSION")
        );
        json_str(out, &self.name);
        let _ = write!(out, ",\"ts_ms\":{ts_ms},\"snapshot\":\"{snapshot}\",\"db\":");
        json_str(out, &self.db);
        match self.flavor {
            Flavor::Postgres => {
                out.push_str(",\"schema\":");
                json_str(out, &event.table.schema);
                out.push_str(",\"table\":");
                json_str(out, &event.table.name);
                match event.tx_id {
                    Some(tx) => {
                        let _ = write!(out, ",\"txId\":{tx}");
                    }
                    None => out.push_str(",\"txId\":null"),
                }
                let _ = write!(out, ",\"lsn\":{},\"xmin\":null}}", event.position.lsn);
            }
            Flavor::Mongo => {
                out.push_str(",\"collection\":");
                json_str(out, &event.table.name);
                // A cluster time is (seconds << 32 | increment); `ord` is the increment.
                let _ = write!(out, ",\"ord\":{},\"lsid\":null,\"txnNumber\":null}}", event.position.lsn & 0xFFFF_FFFF);
            }
        }
    }

    fn key_schema(&self, schema: &TableSchema, keys: &[usize], out: &mut String) {
        out.push_str("{\"type\":\"struct\",\"fields\":[");
        match self.flavor {
            Flavor::Mongo => out.push_str("{\"type\":\"string\",\"optional\":false,\"field\":\"id\"}"),
            Flavor::Postgres => {
                for (n, i) in keys.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    field_schema(out, &schema.columns[*i].name, &schema.columns[*i].ty, false);
                }
            }
        }
        let _ = write!(out, "],\"optional\":false,\"name\":\"{}.Key\"}}", self.topic_stem(schema));
    }

    fn value_schema(&self, schema: &TableSchema, out: &mut String) {
        let stem = self.topic_stem(schema);
        out.push_str("{\"type\":\"struct\",\"fields\":[");
        match self.flavor {
            Flavor::Postgres => {
                for side in ["before", "after"] {
                    out.push_str("{\"type\":\"struct\",\"fields\":[");
                    for (i, c) in schema.columns.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        field_schema(out, &c.name, &c.ty, !c.key);
                    }
                    let _ = write!(out, "],\"optional\":true,\"name\":\"{stem}.Value\",\"field\":\"{side}\"}},");
                }
            }
            Flavor::Mongo => {
                out.push_str(
                    "{\"type\":\"string\",\"optional\":true,\"name\":\"io.debezium.data.Json\",\"field\":\"before\"},\
                     {\"type\":\"string\",\"optional\":true,\"name\":\"io.debezium.data.Json\",\"field\":\"after\"},\
                     {\"type\":\"struct\",\"fields\":[{\"type\":\"array\",\"items\":{\"type\":\"string\",\"optional\":false},\
                     \"optional\":true,\"field\":\"removedFields\"},{\"type\":\"string\",\"optional\":true,\
                     \"name\":\"io.debezium.data.Json\",\"field\":\"updatedFields\"},{\"type\":\"array\",\"items\":\
                     {\"type\":\"struct\",\"fields\":[{\"type\":\"string\",\"optional\":false,\"field\":\"field\"},\
                     {\"type\":\"int32\",\"optional\":false,\"field\":\"size\"}],\"optional\":false},\"optional\":true,\
                     \"field\":\"truncatedArrays\"}],\"optional\":true,\"field\":\"updateDescription\"},",
                );
            }
        }
        out.push_str("{\"type\":\"struct\",\"fields\":[");
        let common = [
            ("string", "version", false),
            ("string", "connector", false),
            ("string", "name", false),
            ("int64", "ts_ms", false),
            ("string", "snapshot", true),
            ("string", "db", false),
        ];
        let specific: &[(&str, &str, bool)] = match self.flavor {
            Flavor::Postgres => &[
                ("string", "schema", false),
                ("string", "table", false),
                ("int64", "txId", true),
                ("int64", "lsn", true),
                ("int64", "xmin", true),
            ],
            Flavor::Mongo => &[
                ("string", "collection", false),
                ("int32", "ord", false),
                ("string", "lsid", true),
                ("int64", "txnNumber", true),
            ],
        };
        for (i, (ty, name, optional)) in common.iter().chain(specific).enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{{\"type\":\"{ty}\",\"optional\":{optional},\"field\":\"{name}\"}}");
        }
        let connector = match self.flavor {
            Flavor::Postgres => "postgresql",
            Flavor::Mongo => "mongodb",
        };
        let _ = write!(
            out,
            "],\"optional\":false,\"name\":\"io.debezium.connector.{connector}.Source\",\"field\":\"source\"}},\
             {{\"type\":\"string\",\"optional\":false,\"field\":\"op\"}},\
             {{\"type\":\"int64\",\"optional\":true,\"field\":\"ts_ms\"}}"
        );
        if self.flavor == Flavor::Postgres {
            out.push_str(
                ",{\"type\":\"struct\",\"fields\":[{\"type\":\"string\",\"optional\":false,\"field\":\"id\"},\
                 {\"type\":\"int64\",\"optional\":false,\"field\":\"total_order\"},\
                 {\"type\":\"int64\",\"optional\":false,\"field\":\"data_collection_order\"}],\
                 \"optional\":true,\"name\":\"event.block\",\"field\":\"transaction\"}",
            );
        }
        let _ = write!(out, "],\"optional\":false,\"name\":\"{stem}.Envelope\"}}");
    }

    fn topic_stem(&self, schema: &TableSchema) -> String {
        match self.flavor {
            Flavor::Postgres => format!("{}.{}.{}", self.name, schema.table.schema, schema.table.name),
            Flavor::Mongo => format!("{}.{}.{}", self.name, self.db, schema.table.name),
        }
    }
}

/// Debezium's `op` letter.
pub fn op_code(op: Op) -> &'static str {
    match op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Truncate => "t",
        Op::Read => "r",
    }
}

/// Column `i` of a row, when it holds JSON text.
fn column(row: Option<&[Value]>, i: usize) -> Option<&str> {
    row.and_then(|r| json_text(r.get(i)))
}

fn json_text(value: Option<&Value>) -> Option<&str> {
    match value {
        Some(Value::Json(text)) => Some(text),
        _ => None,
    }
}

/// Writes `s` as a JSON string literal.
pub(super) fn json_str(out: &mut String, s: &str) {
    // Column names and most values need no escape: copied as they are, with no allocation.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serializes"));
    }
}

fn opt_json_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// sluice keeps `{"updatedFields": {...}, "removedFields": [...], "truncatedArrays": [...]}`;
/// Debezium sends `updatedFields` as JSON text.
fn update_description(out: &mut String, text: &str) {
    let parsed: serde_json::Value = serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
    let part = |k: &str| parsed.get(k).filter(|v| !v.is_null());
    out.push_str("{\"removedFields\":");
    out.push_str(&part("removedFields").map(|v| v.to_string()).unwrap_or_else(|| "null".into()));
    out.push_str(",\"updatedFields\":");
    opt_json_str(out, part("updatedFields").map(|v| v.to_string()).as_deref());
    out.push_str(",\"truncatedArrays\":");
    out.push_str(&part("truncatedArrays").map(|v| v.to_string()).unwrap_or_else(|| "null".into()));
    out.push('}');
}

/// A Kafka Connect field schema for a column type.
fn field_schema(out: &mut String, name: &str, ty: &ColumnType, optional: bool) {
    out.push('{');
    type_schema(out, ty);
    let _ = write!(out, ",\"optional\":{optional},\"field\":");
    json_str(out, name);
    out.push('}');
}

fn type_schema(out: &mut String, ty: &ColumnType) {
    let (connect, logical) = match ty {
        ColumnType::Bool => ("boolean", None),
        ColumnType::Int16 => ("int16", None),
        ColumnType::Int32 => ("int32", None),
        ColumnType::Int64 => ("int64", None),
        ColumnType::Float32 => ("float", None),
        ColumnType::Float64 => ("double", None),
        ColumnType::Numeric(_) | ColumnType::Text | ColumnType::Other(_) => ("string", None),
        ColumnType::Bytes => ("bytes", None),
        ColumnType::Json => ("string", Some("io.debezium.data.Json")),
        ColumnType::Uuid => ("string", Some("io.debezium.data.Uuid")),
        ColumnType::Date => ("int32", Some("io.debezium.time.Date")),
        ColumnType::Time => ("int64", Some("io.debezium.time.MicroTime")),
        ColumnType::TimeTz => ("string", Some("io.debezium.time.ZonedTime")),
        ColumnType::Timestamp => ("int64", Some("io.debezium.time.MicroTimestamp")),
        ColumnType::TimestampTz => ("string", Some("io.debezium.time.ZonedTimestamp")),
        ColumnType::Interval => ("int64", Some("io.debezium.time.MicroDuration")),
        ColumnType::Enum => ("string", Some("io.debezium.data.Enum")),
        ColumnType::Array(item) => {
            out.push_str("\"type\":\"array\",\"items\":{");
            type_schema(out, item);
            out.push_str(",\"optional\":true}");
            return;
        }
    };
    let _ = write!(out, "\"type\":\"{connect}\"");
    if let Some(name) = logical {
        let _ = write!(out, ",\"name\":\"{name}\",\"version\":1");
    }
}

/// One value in Debezium's JSON form for its column type.
fn write_value(out: &mut String, value: &Value, ty: &ColumnType) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) if f.is_finite() => {
            let _ = write!(out, "{f:?}");
        }
        // JSON has no NaN or infinities; Debezium's JsonConverter writes them as text.
        Value::Float(f) => json_str(out, &f.to_string()),
        Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Enum(s) | Value::Other(s) => json_str(out, s),
        Value::Bytes(b) => json_str(out, &base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Uuid(u) => json_str(out, &uuid::Uuid::from_bytes(*u).to_string()),
        Value::Date(d) => {
            let _ = write!(out, "{d}");
        }
        Value::Time(us) | Value::Timestamp(us) => {
            let _ = write!(out, "{us}");
        }
        Value::TimeTz(us, offset) => {
            // ZonedTime is the time in UTC.
            let utc = (us - i64::from(*offset) * 1_000_000).rem_euclid(86_400_000_000);
            let (s, frac) = (utc / 1_000_000, utc % 1_000_000);
            let _ = write!(out, "\"{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
            if frac > 0 {
                let _ = write!(out, ".{frac:06}");
            }
            out.push_str("Z\"");
        }
        Value::TimestampTz(us) => match *us {
            i64::MAX => json_str(out, "infinity"),
            i64::MIN => json_str(out, "-infinity"),
            us => match DateTime::from_timestamp_micros(us) {
                Some(t) => json_str(out, &t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
                None => out.push_str("null"),
            },
        },
        Value::Interval(Interval { months, days, micros }) => {
            let total = f64::from(*months) * MICROS_PER_MONTH + f64::from(*days) * 86_400_000_000.0 + *micros as f64;
            let _ = write!(out, "{}", total.round() as i64);
        }
        Value::Array(items) => {
            let item_ty = match ty {
                ColumnType::Array(t) => t.as_ref(),
                other => other,
            };
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, item_ty);
            }
            out.push(']');
        }
        Value::UnchangedToast => json_str(out, UNAVAILABLE),
    }
}

#[cfg(test)]
#[path = "envelope_tests.rs"]
mod tests;

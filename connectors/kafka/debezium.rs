//! Reads records in the Debezium envelope (written by Debezium's relational connectors or by
//! sluice) into change events, for the `kafka` source.
//!
//! With embedded schemas (`JsonConverter` with `schemas.enable=true`) every column gets its
//! exact type from the Kafka Connect schema, logical types included. Without them the types are
//! inferred from the JSON values (integers, floats, booleans, text, JSON for objects and
//! arrays); a column that is null keeps the type it had in the table's previous record.

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Column, ColumnType, Interval, Op, Position, Row, TableId, TableSchema, Value};
use base64::Engine;
use serde_json::{Map, Value as Json};
use std::collections::HashMap;

/// Where a record came from, for positions and messages.
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Turns Debezium records into change events; keeps each table's last inferred schema.
#[derive(Default)]
pub struct DebeziumDecoder {
    inferred: HashMap<TableId, TableSchema>,
}

impl DebeziumDecoder {
    /// The change a record carries; `None` for a tombstone. A record that is not a Debezium
    /// change envelope is a permanent error naming where it is.
    pub fn decode(
        &mut self,
        origin: &Origin<'_>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<Option<(ChangeEvent, TableSchema)>> {
        let Some(value) = value else { return Ok(None) };
        let bad = |why: String| {
            Error::permanent(
                "kafka source",
                format!(
                    "{}[{}] offset {}: not a Debezium change record: {why}",
                    origin.topic, origin.partition, origin.offset
                ),
            )
        };
        let value: Json = serde_json::from_slice(value).map_err(|e| bad(format!("the value is not JSON ({e})")))?;
        let (payload, schema) = split_schema(&value);
        let payload = payload.as_object().ok_or_else(|| bad("the value is not an object".into()))?;
        let op = match payload.get("op").and_then(Json::as_str) {
            Some("c") => Op::Insert,
            Some("u") => Op::Update,
            Some("d") => Op::Delete,
            Some("r") => Op::Read,
            Some("t") => Op::Truncate,
            Some(other) => return Err(bad(format!("unknown op `{other}`"))),
            None => return Err(bad("it has no `op`".into())),
        };
        let source = payload.get("source").and_then(Json::as_object).cloned().unwrap_or_default();
        if source.get("connector").and_then(Json::as_str) == Some("mongodb") {
            return Err(bad("MongoDB connector records are not read by the kafka source yet".into()));
        }
        let table = table_of(&source, origin.topic);
        let key_fields: Vec<String> = match key.map(serde_json::from_slice::<Json>) {
            Some(Ok(k)) => split_schema(&k).0.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default(),
            Some(Err(e)) => return Err(bad(format!("the key is not JSON ({e})"))),
            None => Vec::new(),
        };
        let row_schema = schema.and_then(|s| field_schema(s, "after").or_else(|| field_schema(s, "before")));
        let (before, after) = (payload.get("before"), payload.get("after"));
        let (table_schema, units) = match row_schema {
            Some(fields) => typed_schema(&table, fields, &key_fields).map_err(bad)?,
            None => {
                let schema = self.infer(&table, [before, after], &key_fields);
                let units = vec![Unit::Micros; schema.columns.len()];
                (schema, units)
            }
        };
        let row = |v: Option<&Json>| -> Result<Option<Row>> {
            match v {
                Some(Json::Object(o)) => Ok(Some(decode_row(&table_schema, &units, o).map_err(bad)?)),
                _ => Ok(None),
            }
        };
        let (before, after) = (row(before)?, row(after)?);
        let key: Row = match (&after, &before) {
            _ if op == Op::Truncate => Vec::new(),
            (Some(r), _) | (None, Some(r)) => {
                table_schema.columns.iter().zip(r).filter(|(c, _)| c.key).map(|(_, v)| v.clone()).collect()
            }
            (None, None) => return Err(bad(format!("a `{}` record has neither before nor after", op.as_str()))),
        };
        let lsn = source.get("lsn").and_then(Json::as_u64).unwrap_or(origin.offset.max(0) as u64);
        let position = if op == Op::Read {
            Position::snapshot(lsn, origin.offset.max(0) as u64)
        } else {
            Position::change(lsn, origin.offset.max(0) as u64)
        };
        let commit_ts_us = source
            .get("ts_us")
            .and_then(Json::as_i64)
            .or_else(|| source.get("ts_ms").and_then(Json::as_i64).map(|ms| ms * 1000))
            .or_else(|| payload.get("ts_ms").and_then(Json::as_i64).map(|ms| ms * 1000))
            .unwrap_or(0);
        let event = ChangeEvent {
            table: table.clone(),
            schema_id: 0,
            op,
            key,
            before,
            after,
            position,
            commit_ts_us,
            tx_id: source.get("txId").and_then(Json::as_u64),
            toast_fetched: false,
            snapshot_last: source.get("snapshot").and_then(Json::as_str) == Some("last"),
            origin: None,
        };
        Ok(Some((event, table_schema)))
    }

    /// A schema from the JSON values; null columns keep their previous type.
    fn infer(&mut self, table: &TableId, rows: [Option<&Json>; 2], key_fields: &[String]) -> TableSchema {
        let previous = self.inferred.get(table);
        let mut columns: Vec<Column> = Vec::new();
        for row in rows.into_iter().flatten().filter_map(Json::as_object) {
            for (name, value) in row {
                let seen = previous.and_then(|p| p.columns.iter().find(|c| &c.name == name)).map(|c| c.ty.clone());
                let ty = match (json_type(value), seen) {
                    (Some(ty), _) | (None, Some(ty)) => ty,
                    (None, None) => ColumnType::Text,
                };
                match columns.iter_mut().find(|c| &c.name == name) {
                    Some(_) if value.is_null() => {}
                    Some(c) => c.ty = ty,
                    None => columns.push(Column {
                        name: name.clone(),
                        ty,
                        key: key_fields.contains(name),
                        toastable: false,
                    }),
                }
            }
        }
        if columns.is_empty() {
            if let Some(p) = previous {
                return p.clone();
            }
        }
        let schema = TableSchema { table: table.clone(), columns, toast_target: 0 };
        self.inferred.insert(table.clone(), schema.clone());
        schema
    }
}

/// `(payload, schema)` of a record written with or without embedded schemas.
fn split_schema(v: &Json) -> (&Json, Option<&Json>) {
    match v.as_object() {
        Some(o) if o.len() == 2 && o.contains_key("schema") && o.contains_key("payload") => {
            (&o["payload"], o.get("schema"))
        }
        _ => (v, None),
    }
}

/// The table a record belongs to: `source.schema` (PostgreSQL, SQL Server) or `source.db`
/// (MySQL) with `source.table`; else the topic's last two segments.
fn table_of(source: &Map<String, Json>, topic: &str) -> TableId {
    let text = |k: &str| source.get(k).and_then(Json::as_str).filter(|s| !s.is_empty());
    if let (Some(schema), Some(table)) = (text("schema").or_else(|| text("db")), text("table")) {
        return TableId::new(schema, table);
    }
    let mut parts = topic.rsplitn(3, '.');
    let table = parts.next().unwrap_or(topic);
    TableId::new(parts.next().unwrap_or("kafka"), table)
}

/// The fields of the envelope's `after` (or `before`) struct.
fn field_schema<'a>(envelope: &'a Json, field: &str) -> Option<&'a Vec<Json>> {
    envelope["fields"].as_array()?.iter().find(|f| f["field"] == field).and_then(|f| f["fields"].as_array())
}

/// The table schema and each column's time unit, from the `after` struct's field schemas.
fn typed_schema(
    table: &TableId,
    fields: &[Json],
    key_fields: &[String],
) -> std::result::Result<(TableSchema, Vec<Unit>), String> {
    let mut columns = Vec::with_capacity(fields.len());
    let mut units = Vec::with_capacity(fields.len());
    for f in fields {
        let name = f["field"].as_str().ok_or("a schema field has no name")?.to_string();
        let (ty, unit) = connect_type(f).map_err(|e| format!("column {name}: {e}"))?;
        columns.push(Column { key: key_fields.contains(&name), name, ty, toastable: false });
        units.push(unit);
    }
    Ok((TableSchema { table: table.clone(), columns, toast_target: 0 }, units))
}

/// How a column's JSON numbers are to be read: the unit of a logical time type, or the scale
/// of a `Decimal` (its base64 bytes are the unscaled integer).
#[derive(Clone, Copy, PartialEq)]
enum Unit {
    Micros,
    Millis,
    Nanos,
    Scale(u32),
}

impl Unit {
    fn micros(self, n: i64) -> i64 {
        match self {
            Unit::Millis => n * 1000,
            Unit::Nanos => n / 1000,
            Unit::Micros | Unit::Scale(_) => n,
        }
    }
}

/// The column type a Kafka Connect field schema describes, and the unit of its numbers.
fn connect_type(f: &Json) -> std::result::Result<(ColumnType, Unit), String> {
    use ColumnType as T;
    let logical = f["name"].as_str().unwrap_or("");
    let unit = match logical {
        "io.debezium.time.Time"
        | "io.debezium.time.Timestamp"
        | "org.apache.kafka.connect.data.Time"
        | "org.apache.kafka.connect.data.Timestamp" => Unit::Millis,
        "io.debezium.time.NanoTime" | "io.debezium.time.NanoTimestamp" => Unit::Nanos,
        "org.apache.kafka.connect.data.Decimal" => {
            let scale = &f["parameters"]["scale"];
            let scale = scale.as_str().and_then(|s| s.parse().ok()).or_else(|| scale.as_u64().map(|s| s as u32));
            Unit::Scale(scale.ok_or("a Decimal without parameters.scale")?)
        }
        _ => Unit::Micros,
    };
    let ty = match (f["type"].as_str().unwrap_or(""), logical) {
        ("int32", "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => T::Date,
        ("int32" | "int64", "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => T::Time,
        ("int64", "io.debezium.time.MicroTime" | "io.debezium.time.NanoTime") => T::Time,
        (
            "int64",
            "io.debezium.time.Timestamp" | "io.debezium.time.MicroTimestamp" | "io.debezium.time.NanoTimestamp",
        ) => T::Timestamp,
        ("int64", "org.apache.kafka.connect.data.Timestamp") => T::Timestamp,
        ("int64", "io.debezium.time.MicroDuration") => T::Interval,
        ("string", "io.debezium.time.ZonedTimestamp") => T::TimestampTz,
        ("string", "io.debezium.data.Json") => T::Json,
        ("string", "io.debezium.data.Uuid") => T::Uuid,
        ("string", "io.debezium.data.Enum") => T::Enum,
        ("bytes", "org.apache.kafka.connect.data.Decimal") | ("struct", "io.debezium.data.VariableScaleDecimal") => {
            T::Numeric(None)
        }
        ("boolean", _) => T::Bool,
        ("int8" | "int16", _) => T::Int16,
        ("int32", _) => T::Int32,
        ("int64", _) => T::Int64,
        ("float" | "float32", _) => T::Float32,
        ("double" | "float64", _) => T::Float64,
        ("string", _) => T::Text,
        ("bytes", _) => T::Bytes,
        ("array", _) => T::Array(Box::new(connect_type(&f["items"])?.0)),
        ("struct" | "map", _) => T::Json,
        (other, _) => return Err(format!("unknown Kafka Connect type `{other}`")),
    };
    Ok((ty, unit))
}

/// The type of a JSON value, without a schema; `None` for null.
fn json_type(v: &Json) -> Option<ColumnType> {
    Some(match v {
        Json::Null => return None,
        Json::Bool(_) => ColumnType::Bool,
        Json::Number(n) if n.is_i64() || n.is_u64() => ColumnType::Int64,
        Json::Number(_) => ColumnType::Float64,
        Json::String(_) => ColumnType::Text,
        Json::Array(_) | Json::Object(_) => ColumnType::Json,
    })
}

fn decode_row(schema: &TableSchema, units: &[Unit], o: &Map<String, Json>) -> std::result::Result<Row, String> {
    schema
        .columns
        .iter()
        .zip(units)
        .map(|(c, unit)| {
            value(o.get(&c.name).unwrap_or(&Json::Null), &c.ty, *unit).map_err(|e| format!("column {}: {e}", c.name))
        })
        .collect()
}

/// One value of a column type from its Debezium JSON form.
fn value(v: &Json, ty: &ColumnType, unit: Unit) -> std::result::Result<Value, String> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let int = || v.as_i64().ok_or_else(|| format!("`{v}` is not an integer"));
    let text = || v.as_str().map(str::to_string).ok_or_else(|| format!("`{v}` is not a string"));
    Ok(match ty {
        ColumnType::Bool => Value::Bool(v.as_bool().ok_or_else(|| format!("`{v}` is not a boolean"))?),
        ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 => Value::Int(int()?),
        ColumnType::Float32 | ColumnType::Float64 => {
            Value::Float(v.as_f64().ok_or_else(|| format!("`{v}` is not a number"))?)
        }
        ColumnType::Numeric(_) => Value::Numeric(numeric(v, unit)?),
        ColumnType::Bytes => Value::Bytes(
            base64::engine::general_purpose::STANDARD.decode(text()?).map_err(|e| format!("bad base64 ({e})"))?,
        ),
        ColumnType::Json => match v {
            Json::String(s) => Value::Json(s.clone()),
            other => Value::Json(other.to_string()),
        },
        ColumnType::Uuid => {
            Value::Uuid(*uuid::Uuid::parse_str(&text()?).map_err(|e| format!("bad uuid ({e})"))?.as_bytes())
        }
        ColumnType::Date => Value::Date(int()? as i32),
        ColumnType::Time => Value::Time(unit.micros(int()?)),
        ColumnType::Timestamp => Value::Timestamp(unit.micros(int()?)),
        ColumnType::TimestampTz => {
            let t = chrono::DateTime::parse_from_rfc3339(&text()?).map_err(|e| format!("bad timestamp ({e})"))?;
            Value::TimestampTz(t.timestamp_micros())
        }
        ColumnType::Interval => Value::Interval(Interval { months: 0, days: 0, micros: int()? }),
        ColumnType::Enum => Value::Enum(text()?),
        ColumnType::Array(item) => Value::Array(
            v.as_array()
                .ok_or_else(|| format!("`{v}` is not an array"))?
                .iter()
                .map(|i| value(i, item, unit))
                .collect::<std::result::Result<_, _>>()?,
        ),
        ColumnType::Text | ColumnType::TimeTz | ColumnType::Other(_) => match v {
            Json::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        },
    })
}

/// Exact decimal text from a `Decimal` (base64 of the unscaled two's-complement big-endian
/// integer, scale in the schema) or a `VariableScaleDecimal` (`{scale, value}`), or a string.
fn numeric(v: &Json, unit: Unit) -> std::result::Result<String, String> {
    let (scale, bytes) = match v {
        Json::String(s) => match unit {
            Unit::Scale(scale) => (scale, s.as_str()),
            _ => return Ok(s.clone()),
        },
        Json::Object(o) => (
            o.get("scale").and_then(Json::as_u64).ok_or("a VariableScaleDecimal without scale")? as u32,
            o.get("value").and_then(Json::as_str).ok_or("a VariableScaleDecimal without value")?,
        ),
        Json::Number(n) => return Ok(n.to_string()),
        other => return Err(format!("`{other}` is not a decimal")),
    };
    let raw = base64::engine::general_purpose::STANDARD.decode(bytes).map_err(|e| format!("bad base64 ({e})"))?;
    if raw.is_empty() || raw.len() > 16 {
        return Err(format!("a decimal of {} bytes is out of range", raw.len()));
    }
    let fill = if raw[0] & 0x80 != 0 { 0xFF } else { 0 };
    let mut wide = [fill; 16];
    wide[16 - raw.len()..].copy_from_slice(&raw);
    let unscaled = i128::from_be_bytes(wide);
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    let scale = scale as usize;
    Ok(if scale == 0 {
        format!("{sign}{digits}")
    } else {
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        format!("{sign}{int}.{frac}")
    })
}

#[cfg(test)]
#[path = "debezium_tests.rs"]
mod tests;

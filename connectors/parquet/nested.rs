//! The `nested: struct` layout: JSON columns (MongoDB documents, PostgreSQL json/jsonb) written
//! as typed Parquet structs and lists instead of JSON text.
//!
//! A JSON column declares no type, so a file's type for it is inferred from the values it holds
//! (a [`Shape`]). A batch whose values fit the open file's shapes is written into it; one that
//! brings a new field or a conflicting type closes the file, and the next file takes the union
//! of both, so no value is ever coerced to fit. Values of conflicting types (an integer in one
//! document and a string in another, for the same field) keep their exact Extended JSON text in
//! a JSON-typed field. MongoDB values are read as Extended JSON, so each BSON type keeps its
//! own Parquet type; PostgreSQL JSON is read as plain JSON.

use arrow::array::*;
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use arrow_schema::extension;
use mongodb::bson::{spec::BinarySubtype, Bson};
use std::sync::Arc;

/// The type inferred for a JSON value, and the Parquet type it is written as.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Only nulls or missing fields so far (written as an all-null JSON field).
    Null,
    Bool,
    Int32,
    Int64,
    Double,
    Text,
    /// Decimal128, written as its exact decimal text.
    Decimal,
    /// Written as its 24 hex digits.
    ObjectId,
    /// A BSON date: milliseconds since the epoch, UTC.
    DateTime,
    /// A BSON timestamp: `{time, increment}`.
    Timestamp,
    Binary,
    /// Binary of UUID subtype: a Parquet UUID.
    Uuid,
    /// `{pattern, options}`.
    Regex,
    /// A document: its fields in the order first seen.
    Struct(Vec<(String, Shape)>),
    List(Box<Shape>),
    /// Values of conflicting types, or of types with no column form: Extended JSON text.
    Json,
}

impl Shape {
    /// The shape of one value.
    pub fn of(value: &Bson) -> Shape {
        match value {
            Bson::Null | Bson::Undefined => Shape::Null,
            Bson::Boolean(_) => Shape::Bool,
            Bson::Int32(_) => Shape::Int32,
            Bson::Int64(_) => Shape::Int64,
            Bson::Double(_) => Shape::Double,
            Bson::String(_) => Shape::Text,
            Bson::Decimal128(_) => Shape::Decimal,
            Bson::ObjectId(_) => Shape::ObjectId,
            Bson::DateTime(_) => Shape::DateTime,
            Bson::Timestamp(_) => Shape::Timestamp,
            Bson::Binary(b) if b.subtype == BinarySubtype::Uuid && b.bytes.len() == 16 => Shape::Uuid,
            Bson::Binary(_) => Shape::Binary,
            Bson::RegularExpression(_) => Shape::Regex,
            Bson::Document(d) => Shape::Struct(d.iter().map(|(k, v)| (k.clone(), Shape::of(v))).collect()),
            Bson::Array(items) => {
                Shape::List(Box::new(items.iter().fold(Shape::Null, |acc, v| acc.unify(Shape::of(v)))))
            }
            _ => Shape::Json,
        }
    }

    /// The narrowest shape both `self` and `other` are written in without losing anything.
    pub fn unify(self, other: Shape) -> Shape {
        match (self, other) {
            (a, b) if a == b => a,
            (Shape::Null, b) => b,
            (a, Shape::Null) => a,
            (Shape::Int32, Shape::Int64) | (Shape::Int64, Shape::Int32) => Shape::Int64,
            // Every Int32 is exact as a double; an Int64 may not be.
            (Shape::Int32, Shape::Double) | (Shape::Double, Shape::Int32) => Shape::Double,
            (Shape::Struct(mut fields), Shape::Struct(more)) => {
                for (name, shape) in more {
                    match fields.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, have)) => *have = std::mem::replace(have, Shape::Null).unify(shape),
                        None => fields.push((name, shape)),
                    }
                }
                Shape::Struct(fields)
            }
            (Shape::List(a), Shape::List(b)) => Shape::List(Box::new(a.unify(*b))),
            _ => Shape::Json,
        }
    }

    /// Whether values of shape `other` can be written as `self` unchanged.
    pub fn holds(&self, other: &Shape) -> bool {
        self.clone().unify(other.clone()) == *self
    }

    /// The Arrow field of a value of this shape.
    pub fn field(&self, name: &str) -> Field {
        let f = Field::new(name, self.data_type(), true);
        match self {
            Shape::Null | Shape::Json => f.with_extension_type(extension::Json::default()),
            Shape::Struct(fields) if fields.is_empty() => f.with_extension_type(extension::Json::default()),
            Shape::Uuid => f.with_extension_type(extension::Uuid),
            _ => f,
        }
    }

    fn data_type(&self) -> DataType {
        match self {
            Shape::Bool => DataType::Boolean,
            Shape::Int32 => DataType::Int32,
            Shape::Int64 => DataType::Int64,
            Shape::Double => DataType::Float64,
            Shape::Null | Shape::Json | Shape::Text | Shape::Decimal | Shape::ObjectId => DataType::Utf8,
            Shape::DateTime => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            Shape::Timestamp => DataType::Struct(timestamp_fields()),
            Shape::Binary => DataType::Binary,
            Shape::Uuid => DataType::FixedSizeBinary(16),
            Shape::Regex => DataType::Struct(regex_fields()),
            // Parquet has no empty group: a document never seen with a field stays JSON text.
            Shape::Struct(fields) if fields.is_empty() => DataType::Utf8,
            Shape::Struct(fields) => DataType::Struct(fields.iter().map(|(n, s)| s.field(n)).collect()),
            Shape::List(item) => DataType::List(Arc::new(item.field("item"))),
        }
    }

    /// An Arrow array of `values` (`None` for a null or a missing field), which this shape holds.
    pub fn array(&self, values: &[Option<&Bson>]) -> Result<ArrayRef, String> {
        let values: Vec<Option<&Bson>> =
            values.iter().map(|v| v.filter(|b| !matches!(b, Bson::Null | Bson::Undefined))).collect();
        let mismatch = |v: &Bson| format!("{} does not fit the file's {self:?}", json_text(v));
        macro_rules! build {
            ($arr:ty, $($pat:pat => $out:expr),+) => {{
                let mut out = Vec::with_capacity(values.len());
                for v in values {
                    out.push(match v {
                        None => None,
                        $(Some($pat) => Some($out),)+
                        Some(other) => return Err(mismatch(other)),
                    });
                }
                Arc::new(<$arr>::from(out)) as ArrayRef
            }};
        }
        Ok(match self {
            Shape::Bool => build!(BooleanArray, Bson::Boolean(b) => *b),
            Shape::Int32 => build!(Int32Array, Bson::Int32(i) => *i),
            Shape::Int64 => build!(Int64Array, Bson::Int32(i) => *i as i64, Bson::Int64(i) => *i),
            Shape::Double => build!(Float64Array, Bson::Int32(i) => *i as f64, Bson::Double(d) => *d),
            Shape::Text => build!(StringArray, Bson::String(s) => s.as_str()),
            Shape::Decimal => build!(StringArray, Bson::Decimal128(d) => d.to_string()),
            Shape::ObjectId => build!(StringArray, Bson::ObjectId(o) => o.to_hex()),
            Shape::DateTime => {
                let arr = build!(TimestampMillisecondArray, Bson::DateTime(d) => d.timestamp_millis());
                let arr = arr.as_any().downcast_ref::<TimestampMillisecondArray>().expect("built above");
                Arc::new(arr.clone().with_timezone("UTC"))
            }
            Shape::Binary => build!(BinaryArray, Bson::Binary(b) => b.bytes.as_slice()),
            Shape::Uuid => {
                let mut out = FixedSizeBinaryBuilder::with_capacity(values.len(), 16);
                for v in &values {
                    match v {
                        None => out.append_null(),
                        Some(Bson::Binary(b)) if b.bytes.len() == 16 => {
                            out.append_value(&b.bytes).map_err(|e| e.to_string())?
                        }
                        Some(other) => return Err(mismatch(other)),
                    }
                }
                Arc::new(out.finish())
            }
            Shape::Timestamp => {
                let mut time = Vec::with_capacity(values.len());
                let mut increment = Vec::with_capacity(values.len());
                for v in &values {
                    let (t, i) = match v {
                        None => (0, 0),
                        Some(Bson::Timestamp(ts)) => (ts.time, ts.increment),
                        Some(other) => return Err(mismatch(other)),
                    };
                    time.push(t);
                    increment.push(i);
                }
                let children: Vec<ArrayRef> =
                    vec![Arc::new(UInt32Array::from(time)), Arc::new(UInt32Array::from(increment))];
                structure(timestamp_fields(), children, &values)?
            }
            Shape::Regex => {
                let mut pattern = StringBuilder::new();
                let mut options = StringBuilder::new();
                for v in &values {
                    match v {
                        None => {
                            pattern.append_value("");
                            options.append_value("");
                        }
                        Some(Bson::RegularExpression(r)) => {
                            pattern.append_value(&r.pattern);
                            options.append_value(&r.options);
                        }
                        Some(other) => return Err(mismatch(other)),
                    }
                }
                let children: Vec<ArrayRef> = vec![Arc::new(pattern.finish()), Arc::new(options.finish())];
                structure(regex_fields(), children, &values)?
            }
            Shape::Struct(fields) if !fields.is_empty() => {
                let mut children = Vec::with_capacity(fields.len());
                for (name, shape) in fields {
                    let column: Vec<Option<&Bson>> = values
                        .iter()
                        .map(|v| match v {
                            Some(Bson::Document(d)) => Ok(d.get(name)),
                            None => Ok(None),
                            Some(other) => Err(mismatch(other)),
                        })
                        .collect::<Result<_, _>>()?;
                    children.push(shape.array(&column).map_err(|e| format!("{name}: {e}"))?);
                }
                let DataType::Struct(arrow_fields) = self.data_type() else { unreachable!("a struct shape") };
                structure(arrow_fields, children, &values)?
            }
            Shape::List(item) => {
                let mut flat: Vec<Option<&Bson>> = Vec::new();
                let mut lengths = Vec::with_capacity(values.len());
                for v in &values {
                    match v {
                        None => lengths.push(0),
                        Some(Bson::Array(items)) => {
                            flat.extend(items.iter().map(Some));
                            lengths.push(items.len());
                        }
                        Some(other) => return Err(mismatch(other)),
                    }
                }
                let child = item.array(&flat)?;
                let valid = NullBuffer::from(values.iter().map(Option::is_some).collect::<Vec<_>>());
                Arc::new(
                    ListArray::try_new(
                        Arc::new(item.field("item")),
                        OffsetBuffer::from_lengths(lengths),
                        child,
                        Some(valid),
                    )
                    .map_err(|e| e.to_string())?,
                )
            }
            // Null, Json and the empty document: the values' own text (null where there is none).
            _ => Arc::new(StringArray::from(values.iter().map(|v| v.map(json_text)).collect::<Vec<_>>())),
        })
    }
}

fn structure(fields: Fields, children: Vec<ArrayRef>, values: &[Option<&Bson>]) -> Result<ArrayRef, String> {
    let valid = NullBuffer::from(values.iter().map(Option::is_some).collect::<Vec<_>>());
    Ok(Arc::new(StructArray::try_new(fields, children, Some(valid)).map_err(|e| e.to_string())?))
}

fn timestamp_fields() -> Fields {
    Fields::from(vec![Field::new("time", DataType::UInt32, false), Field::new("increment", DataType::UInt32, false)])
}

fn regex_fields() -> Fields {
    Fields::from(vec![Field::new("pattern", DataType::Utf8, false), Field::new("options", DataType::Utf8, false)])
}

/// A value as relaxed Extended JSON text (plain JSON for plain JSON values).
fn json_text(value: &Bson) -> String {
    value.clone().into_relaxed_extjson().to_string()
}

/// Reads a JSON column's text: as Extended JSON (MongoDB) or plain JSON (numbers as Int64 or
/// Double, objects as documents).
pub fn parse(text: &str, extended: bool) -> Result<Bson, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if extended {
        Bson::try_from(json).map_err(|e| format!("not Extended JSON: {e}"))
    } else {
        Ok(plain(json))
    }
}

fn plain(json: serde_json::Value) -> Bson {
    match json {
        serde_json::Value::Null => Bson::Null,
        serde_json::Value::Bool(b) => Bson::Boolean(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            // A number beyond i64 and f64 keeps its digits as text.
            None => {
                n.as_f64().filter(|f| f.is_finite()).map(Bson::Double).unwrap_or_else(|| Bson::String(n.to_string()))
            }
        },
        serde_json::Value::String(s) => Bson::String(s),
        serde_json::Value::Array(items) => Bson::Array(items.into_iter().map(plain).collect()),
        serde_json::Value::Object(map) => Bson::Document(map.into_iter().map(|(k, v)| (k, plain(v))).collect()),
    }
}

#[cfg(test)]
#[path = "nested_tests.rs"]
mod tests;

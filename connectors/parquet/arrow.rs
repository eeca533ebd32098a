//! Change events to Arrow record batches: one typed column per table column, then metadata.

use crate::config::NumericPolicy;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, ColumnType, Op, TableSchema, Value};
use arrow::array::*;
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{i256, DataType, Field, Fields, Schema, TimeUnit};
use arrow_schema::extension;
use std::sync::Arc;

/// The metadata columns every changelog file carries, after the table's own columns.
pub const META_COLUMNS: [&str; 6] =
    ["_sluice_op", "_sluice_position", "_sluice_lsn", "_sluice_commit_ts", "_sluice_tx_id", "_sluice_toast_fetched"];

/// The Arrow schema of a table's changelog.
pub fn arrow_schema(schema: &TableSchema, numeric: NumericPolicy) -> Arc<Schema> {
    let mut fields: Vec<Field> = schema.columns.iter().map(|c| field(&c.name, &c.ty, numeric)).collect();
    fields.push(Field::new(META_COLUMNS[0], DataType::Utf8, false));
    fields.push(Field::new(META_COLUMNS[1], DataType::Utf8, false));
    fields.push(Field::new(META_COLUMNS[2], DataType::Int64, false));
    fields.push(Field::new(META_COLUMNS[3], DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false));
    fields.push(Field::new(META_COLUMNS[4], DataType::Int64, true));
    fields.push(Field::new(META_COLUMNS[5], DataType::Boolean, false));
    Arc::new(Schema::new(fields))
}

fn field(name: &str, ty: &ColumnType, numeric: NumericPolicy) -> Field {
    // Canonical extension types become Parquet's JSON and UUID logical types.
    let f = Field::new(name, data_type(ty, numeric), true);
    match ty {
        ColumnType::Json => f.with_extension_type(extension::Json::default()),
        ColumnType::Uuid => f.with_extension_type(extension::Uuid),
        _ => f,
    }
}

fn data_type(ty: &ColumnType, numeric: NumericPolicy) -> DataType {
    match ty {
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Int16 => DataType::Int16,
        ColumnType::Int32 => DataType::Int32,
        ColumnType::Int64 => DataType::Int64,
        ColumnType::Float32 => DataType::Float32,
        ColumnType::Float64 => DataType::Float64,
        ColumnType::Numeric(Some((p, s))) => decimal(*p as u8, *s as i8),
        ColumnType::Numeric(None) => match numeric {
            NumericPolicy::String => DataType::Utf8,
            NumericPolicy::Decimal { precision, scale } => decimal(precision, scale),
        },
        ColumnType::Text | ColumnType::Enum | ColumnType::Other(_) | ColumnType::TimeTz | ColumnType::Json => {
            DataType::Utf8
        }
        ColumnType::Bytes => DataType::Binary,
        ColumnType::Uuid => DataType::FixedSizeBinary(16),
        ColumnType::Date => DataType::Date32,
        ColumnType::Time => DataType::Time64(TimeUnit::Microsecond),
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        ColumnType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnType::Interval => DataType::Struct(interval_fields()),
        ColumnType::Array(elem) => DataType::List(Arc::new(field("item", elem, numeric))),
    }
}

fn decimal(p: u8, s: i8) -> DataType {
    if p <= 38 {
        DataType::Decimal128(p.max(1), s)
    } else {
        DataType::Decimal256(p, s)
    }
}

fn interval_fields() -> Fields {
    Fields::from(vec![
        Field::new("months", DataType::Int32, false),
        Field::new("days", DataType::Int32, false),
        Field::new("micros", DataType::Int64, false),
    ])
}

/// The value of column `ci` an event's row shows: the row after the change, or for a delete
/// its key columns (the rest null).
pub fn value_of<'e>(e: &'e ChangeEvent, ci: usize, key_idx: &[usize]) -> &'e Value {
    match (&e.after, e.op) {
        (Some(after), _) => &after[ci],
        (None, Op::Delete) => key_idx.iter().position(|&k| k == ci).map(|p| &e.key[p]).unwrap_or(&Value::Null),
        (None, _) => &Value::Null,
    }
}

/// Builds one record batch from events of one table schema; a column given in `built` (by
/// index; the list may be shorter) is taken as it is.
pub fn record_batch(
    schema: &TableSchema,
    arrow: &Arc<Schema>,
    events: &[&ChangeEvent],
    mut built: Vec<Option<ArrayRef>>,
) -> Result<RecordBatch> {
    let key_idx = schema.key_indexes();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(arrow.fields().len());
    for (ci, col) in schema.columns.iter().enumerate() {
        if let Some(column) = built.get_mut(ci).and_then(Option::take) {
            columns.push(column);
            continue;
        }
        let values: Vec<&Value> = events.iter().map(|e| value_of(e, ci, &key_idx)).collect();
        let dt = arrow.field(ci).data_type();
        columns.push(
            array(&col.ty, dt, &values)
                .map_err(|m| Error::permanent(format!("parquet: {} column {}", schema.table, col.name), m))?,
        );
    }
    columns.push(Arc::new(StringArray::from_iter_values(events.iter().map(|e| e.op.as_str()))));
    let mut positions = StringBuilder::with_capacity(events.len(), events.len() * 32);
    let mut text = String::with_capacity(32);
    for e in events {
        text.clear();
        write_position(&e.position, &mut text);
        positions.append_value(&text);
    }
    columns.push(Arc::new(positions.finish()));
    columns.push(Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.position.lsn as i64))));
    columns.push(Arc::new(
        TimestampMicrosecondArray::from_iter_values(events.iter().map(|e| e.commit_ts_us)).with_timezone("UTC"),
    ));
    columns.push(Arc::new(Int64Array::from_iter(events.iter().map(|e| e.tx_id.map(|x| x as i64)))));
    columns.push(Arc::new(BooleanArray::from_iter(events.iter().map(|e| Some(e.toast_fetched)))));
    RecordBatch::try_new(arrow.clone(), columns).map_err(|e| Error::permanent("parquet: record batch", e))
}

fn array(ty: &ColumnType, dt: &DataType, values: &[&Value]) -> std::result::Result<ArrayRef, String> {
    let mismatch = |v: &Value| format!("value {v:?} does not match column type {ty:?}");
    macro_rules! build {
        ($arr:ty, $pat:pat => $out:expr) => {{
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                out.push(match v {
                    Value::Null => None,
                    $pat => Some($out),
                    other => return Err(mismatch(other)),
                });
            }
            Arc::new(<$arr>::from(out)) as ArrayRef
        }};
    }
    Ok(match dt {
        DataType::Boolean => build!(BooleanArray, Value::Bool(b) => *b),
        DataType::Int16 => build!(Int16Array, Value::Int(i) => i16::try_from(*i).map_err(|e| e.to_string())?),
        DataType::Int32 => build!(Int32Array, Value::Int(i) => i32::try_from(*i).map_err(|e| e.to_string())?),
        DataType::Int64 => build!(Int64Array, Value::Int(i) => *i),
        DataType::Float32 => build!(Float32Array, Value::Float(f) => *f as f32),
        DataType::Float64 => build!(Float64Array, Value::Float(f) => *f),
        DataType::Date32 => build!(Date32Array, Value::Date(d) => *d),
        DataType::Time64(_) => build!(Time64MicrosecondArray, Value::Time(t) => *t),
        DataType::Timestamp(_, None) => build!(TimestampMicrosecondArray, Value::Timestamp(t) => *t),
        DataType::Timestamp(_, Some(_)) => {
            let arr = build!(TimestampMicrosecondArray, Value::TimestampTz(t) => *t);
            Arc::new(
                arr.as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .expect("built above")
                    .clone()
                    .with_timezone("UTC"),
            )
        }
        DataType::Binary => build!(BinaryArray, Value::Bytes(b) => b.as_slice()),
        DataType::FixedSizeBinary(_) => {
            let items: Vec<Option<&[u8]>> = values
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::Uuid(u) => Ok(Some(u.as_slice())),
                    other => Err(mismatch(other)),
                })
                .collect::<std::result::Result<_, _>>()?;
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(items.into_iter(), 16)
                    .map_err(|e| e.to_string())?,
            )
        }
        DataType::Utf8 => {
            // Straight into the array's buffer: no intermediate String per value.
            let mut out = StringBuilder::with_capacity(values.len(), values.len() * 16);
            for v in values {
                match v {
                    Value::Null => out.append_null(),
                    Value::Text(s) | Value::Enum(s) | Value::Other(s) | Value::Json(s) | Value::Numeric(s) => {
                        out.append_value(s)
                    }
                    Value::TimeTz(t, off) => out.append_value(format_timetz(*t, *off)),
                    other => return Err(mismatch(other)),
                }
            }
            Arc::new(out.finish())
        }
        DataType::Decimal128(p, s) => {
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                out.push(match v {
                    Value::Null => None,
                    Value::Numeric(text) => Some(unscaled_i128(text, *p, *s)?),
                    other => return Err(mismatch(other)),
                });
            }
            Arc::new(Decimal128Array::from(out).with_precision_and_scale(*p, *s).map_err(|e| e.to_string())?)
        }
        DataType::Decimal256(p, s) => {
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                out.push(match v {
                    Value::Null => None,
                    Value::Numeric(text) => {
                        Some(i256::from_string(&unscaled(text, *p, *s)?).ok_or("decimal out of range")?)
                    }
                    other => return Err(mismatch(other)),
                });
            }
            Arc::new(Decimal256Array::from(out).with_precision_and_scale(*p, *s).map_err(|e| e.to_string())?)
        }
        DataType::Struct(fields) => {
            let mut months = Vec::with_capacity(values.len());
            let mut days = Vec::with_capacity(values.len());
            let mut micros = Vec::with_capacity(values.len());
            let mut valid = Vec::with_capacity(values.len());
            for v in values {
                let iv = match v {
                    Value::Null => None,
                    Value::Interval(iv) => Some(*iv),
                    other => return Err(mismatch(other)),
                };
                valid.push(iv.is_some());
                let iv = iv.unwrap_or(crate::event::Interval { months: 0, days: 0, micros: 0 });
                months.push(iv.months);
                days.push(iv.days);
                micros.push(iv.micros);
            }
            let children: Vec<ArrayRef> = vec![
                Arc::new(Int32Array::from(months)),
                Arc::new(Int32Array::from(days)),
                Arc::new(Int64Array::from(micros)),
            ];
            Arc::new(
                StructArray::try_new(fields.clone(), children, Some(NullBuffer::from(valid)))
                    .map_err(|e| e.to_string())?,
            )
        }
        DataType::List(child) => {
            let ColumnType::Array(elem) = ty else { return Err(format!("list for non-array type {ty:?}")) };
            let mut flat: Vec<&Value> = Vec::new();
            let mut lengths = Vec::with_capacity(values.len());
            let mut valid = Vec::with_capacity(values.len());
            for v in values {
                match v {
                    Value::Null => {
                        lengths.push(0);
                        valid.push(false);
                    }
                    Value::Array(items) => {
                        if items.iter().any(|i| matches!(i, Value::Array(_))) {
                            return Err("multi-dimensional arrays are not supported in Parquet output".into());
                        }
                        flat.extend(items.iter());
                        lengths.push(items.len());
                        valid.push(true);
                    }
                    other => return Err(mismatch(other)),
                }
            }
            let child_array = array(elem, child.data_type(), &flat)?;
            Arc::new(
                ListArray::try_new(
                    child.clone(),
                    OffsetBuffer::from_lengths(lengths),
                    child_array,
                    Some(NullBuffer::from(valid)),
                )
                .map_err(|e| e.to_string())?,
            )
        }
        other => return Err(format!("no Arrow conversion for {other:?}")),
    })
}

/// Writes a position exactly as its `Display` does (fixed-width hex), without the formatter.
fn write_position(p: &crate::event::Position, out: &mut String) {
    fn hex(v: u64, width: usize, out: &mut String) {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        for i in (0..width).rev() {
            out.push(DIGITS[((v >> (i * 4)) & 0xF) as usize] as char);
        }
    }
    hex(p.lsn, 16, out);
    out.push_str(match p.phase {
        crate::event::Phase::Snapshot => "-s-",
        crate::event::Phase::Change => "-c-",
    });
    hex(p.seq, 12, out);
}

fn format_timetz(micros: i64, offset: i32) -> String {
    let (h, m, s, us) = (micros / 3_600_000_000, micros / 60_000_000 % 60, micros / 1_000_000 % 60, micros % 1_000_000);
    let sign = if offset < 0 { '-' } else { '+' };
    let off = offset.abs();
    format!("{h:02}:{m:02}:{s:02}.{us:06}{sign}{:02}:{:02}", off / 3600, off / 60 % 60)
}

/// A decimal's text split into sign, integer digits and fractional digits without trailing
/// zeros; refuses what cannot be a DECIMAL at `scale` without rounding.
fn decimal_parts(text: &str, scale: usize) -> std::result::Result<(bool, &str, &str), String> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Err(format!("{text} cannot be written as DECIMAL; set unbounded_numeric: string"));
    }
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale {
        return Err(format!("{text} has more than {scale} fractional digits; writing it would round"));
    }
    Ok((neg, int, frac))
}

/// The unscaled integer text of an exact decimal at `scale`; refuses anything that would round.
pub fn unscaled(text: &str, precision: u8, scale: i8) -> std::result::Result<String, String> {
    let scale = scale.max(0) as usize;
    let (neg, int, frac_trimmed) = decimal_parts(text, scale)?;
    let mut out = String::with_capacity(int.len() + scale + 1);
    out.push_str(int.trim_start_matches('0'));
    out.push_str(frac_trimmed);
    out.extend(std::iter::repeat_n('0', scale - frac_trimmed.len()));
    let significant = out.trim_start_matches('0');
    if significant.len() > precision as usize {
        return Err(format!("{text} needs more than {precision} digits"));
    }
    let body = if significant.is_empty() { "0".to_string() } else { significant.to_string() };
    Ok(if neg && body != "0" { format!("-{body}") } else { body })
}

/// [`unscaled`] as an integer, for precisions up to 38, without building text: the hot path of
/// every bounded NUMERIC column.
fn unscaled_i128(text: &str, precision: u8, scale: i8) -> std::result::Result<i128, String> {
    let scale = scale.max(0) as usize;
    let (neg, int, frac) = decimal_parts(text, scale)?;
    let too_wide = || format!("{text} needs more than {precision} digits");
    let mut value: i128 = 0;
    let mut significant = 0usize;
    for b in int.bytes().chain(frac.bytes()) {
        if !b.is_ascii_digit() {
            return Err(format!("{text} is not a decimal number"));
        }
        if value == 0 && b == b'0' {
            continue;
        }
        significant += 1;
        if significant > precision.min(38) as usize {
            return Err(too_wide());
        }
        value = value * 10 + (b - b'0') as i128;
    }
    let pad = scale - frac.len();
    if value != 0 {
        significant += pad;
        if significant > precision as usize || significant > 38 {
            return Err(too_wide());
        }
        value *= 10i128.pow(pad as u32);
    }
    Ok(if neg { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::{unscaled, unscaled_i128, write_position};
    use crate::event::Position;

    #[test]
    fn positions_are_written_like_display() {
        for p in [Position::change(0x1_2345_6789, 7), Position::snapshot(u64::MAX, 0xFFFF_FFFF_FFFF)] {
            let mut s = String::new();
            write_position(&p, &mut s);
            assert_eq!(s, p.to_string());
        }
    }

    proptest::proptest! {
        /// Any decimal that fits is scaled to exactly its unscaled integer.
        #[test]
        fn decimal_text_scales_to_its_integer(unscaled_value in -(10i128.pow(30))..10i128.pow(30), scale in 0u32..10) {
            let digits = unscaled_value.unsigned_abs().to_string();
            let padded = format!("{digits:0>width$}", width = scale as usize + 1);
            let (int, frac) = padded.split_at(padded.len() - scale as usize);
            let sign = if unscaled_value < 0 { "-" } else { "" };
            let text = if scale == 0 { format!("{sign}{int}") } else { format!("{sign}{int}.{frac}") };
            proptest::prop_assert_eq!(unscaled(&text, 38, scale as i8).unwrap(), unscaled_value.to_string());
        }

        /// The integer path agrees with the text path on every input, accepted or refused.
        #[test]
        fn integer_and_text_scaling_agree(
            text in "-?[0-9]{0,25}(\\.[0-9]{0,12})?",
            precision in 1u8..=38,
            scale in 0i8..12,
        ) {
            let by_text = unscaled(&text, precision, scale).map(|t| t.parse::<i128>().unwrap());
            let by_int = unscaled_i128(&text, precision, scale);
            proptest::prop_assert_eq!(by_text.is_ok(), by_int.is_ok(), "{} p{} s{}: {:?} {:?}", text, precision, scale, by_text, by_int);
            if let (Ok(a), Ok(b)) = (by_text, by_int) {
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn decimals_scale_exactly_or_refuse() {
        assert_eq!(unscaled("12.5", 10, 3).unwrap(), "12500");
        assert_eq!(unscaled("-0.010", 5, 2).unwrap(), "-1");
        assert_eq!(unscaled("0", 5, 2).unwrap(), "0");
        assert!(unscaled("1.2345", 10, 3).is_err());
        assert!(unscaled("123456", 5, 0).is_err());
        assert!(unscaled("NaN", 5, 0).is_err());
    }
}

//! PostgreSQL's binary COPY format, which the snapshot reads: it costs the server less than
//! text (no output functions for integers and timestamps) and sluice less (no text parsing).
//!
//! Only types whose binary form is simple and fixed are read in binary; the snapshot casts every
//! other column to text in its query and decodes it as the text form, like the stream does.

use super::values::{self, PG_EPOCH_MICROS};
use crate::event::{ColumnType, Value};
use std::ops::Range;

/// The 11-byte signature, then 4 bytes of flags and 4 of header-extension length.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const HEADER_FIXED: usize = SIGNATURE.len() + 8;
/// Days between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_DAYS: i32 = (PG_EPOCH_MICROS / 86_400_000_000) as i32;

/// Whether the snapshot reads `ty` in binary; otherwise it selects the column as text.
pub fn reads_binary(ty: &ColumnType) -> bool {
    matches!(
        ty,
        ColumnType::Bool
            | ColumnType::Int16
            | ColumnType::Int32
            | ColumnType::Int64
            | ColumnType::Float64
            | ColumnType::Numeric(_)
            | ColumnType::Text
            | ColumnType::Bytes
            | ColumnType::Uuid
            | ColumnType::Date
            | ColumnType::Time
            | ColumnType::Timestamp
            | ColumnType::TimestampTz
    )
}

/// Splits a binary COPY stream into rows as bytes arrive.
#[derive(Default)]
pub struct BinaryRows {
    header_done: bool,
}

/// What [`BinaryRows::next_row`] found at the front of the buffer.
pub enum Next {
    /// A row: `fields` holds each field's byte range in the buffer (`None` for NULL); the row
    /// (and the stream header, before the first row) took `consumed` bytes.
    Row { consumed: usize },
    /// The buffer ends inside a row or the header; wait for more bytes.
    NeedMore,
    /// The trailer: the stream is complete.
    End,
}

impl BinaryRows {
    /// Parses the next row from the front of `buf`, filling `fields` with its field ranges.
    pub fn next_row(&mut self, buf: &[u8], fields: &mut Vec<Option<Range<usize>>>) -> Result<Next, String> {
        let mut at = 0;
        if !self.header_done {
            if buf.len() < HEADER_FIXED {
                return Ok(Next::NeedMore);
            }
            if &buf[..SIGNATURE.len()] != SIGNATURE {
                return Err("not a binary COPY stream".into());
            }
            at = HEADER_FIXED + be_u32(&buf[SIGNATURE.len() + 4..]) as usize;
        }
        let Some(count) = buf.get(at..at + 2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
            return Ok(Next::NeedMore);
        };
        at += 2;
        if count == -1 {
            self.header_done = true;
            return Ok(Next::End);
        }
        fields.clear();
        for _ in 0..count {
            let Some(len) = buf.get(at..at + 4).map(be_u32) else { return Ok(Next::NeedMore) };
            at += 4;
            if (len as i32) < 0 {
                fields.push(None);
                continue;
            }
            let end = at + len as usize;
            if buf.len() < end {
                return Ok(Next::NeedMore);
            }
            fields.push(Some(at..end));
            at = end;
        }
        self.header_done = true;
        Ok(Next::Row { consumed: at })
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn fixed<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N], String> {
    b.try_into().map_err(|_| format!("{what}: expected {N} bytes, got {}", b.len()))
}

/// Decodes one field: binary for the types [`reads_binary`] accepts, text for the rest.
pub fn decode(ty: &ColumnType, b: &[u8]) -> Result<Value, String> {
    if !reads_binary(ty) {
        let text = std::str::from_utf8(b).map_err(|_| "text form is not UTF-8".to_string())?;
        return values::decode(ty, text);
    }
    Ok(match ty {
        ColumnType::Bool => Value::Bool(fixed::<1>(b, "boolean")?[0] != 0),
        ColumnType::Int16 => Value::Int(i16::from_be_bytes(fixed(b, "smallint")?) as i64),
        ColumnType::Int32 => Value::Int(i32::from_be_bytes(fixed(b, "integer")?) as i64),
        ColumnType::Int64 => Value::Int(i64::from_be_bytes(fixed(b, "bigint")?)),
        ColumnType::Float64 => Value::Float(f64::from_be_bytes(fixed(b, "double precision")?)),
        ColumnType::Numeric(_) => Value::Numeric(numeric(b)?),
        ColumnType::Text => {
            Value::Text(std::str::from_utf8(b).map_err(|_| "text value is not UTF-8".to_string())?.to_owned())
        }
        ColumnType::Bytes => Value::Bytes(b.to_vec()),
        ColumnType::Uuid => Value::Uuid(fixed(b, "uuid")?),
        ColumnType::Date => Value::Date(match i32::from_be_bytes(fixed(b, "date")?) {
            // ±infinity keep their sentinels, as the text form's decoder gives them.
            d @ (i32::MAX | i32::MIN) => d,
            d => d + PG_EPOCH_DAYS,
        }),
        ColumnType::Time => Value::Time(i64::from_be_bytes(fixed(b, "time")?)),
        ColumnType::Timestamp => Value::Timestamp(timestamp(fixed(b, "timestamp")?)),
        ColumnType::TimestampTz => Value::TimestampTz(timestamp(fixed(b, "timestamptz")?)),
        other => unreachable!("{other:?} is read as text"),
    })
}

/// Signs of the binary numeric form; the last three mark special values, not signs.
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// Decodes a binary `numeric` into the exact text `numeric_out` gives (what the stream and
/// the text form carry): the value is base-10000 digits, the first of weight `weight`, shown
/// with `dscale` fraction digits. Sending these costs the server far less than formatting.
pub fn numeric(b: &[u8]) -> Result<String, String> {
    let header: [u8; 8] = b.get(..8).and_then(|h| h.try_into().ok()).ok_or("numeric: header too short")?;
    let [nd0, nd1, w0, w1, s0, s1, ds0, ds1] = header;
    let ndigits = i16::from_be_bytes([nd0, nd1]);
    let weight = i16::from_be_bytes([w0, w1]) as i32;
    let sign = u16::from_be_bytes([s0, s1]);
    let dscale = u16::from_be_bytes([ds0, ds1]) as i32;
    match sign {
        NUMERIC_NAN => return Ok("NaN".into()),
        NUMERIC_PINF => return Ok("Infinity".into()),
        NUMERIC_NINF => return Ok("-Infinity".into()),
        NUMERIC_POS | NUMERIC_NEG => {}
        other => return Err(format!("numeric: unknown sign {other:#06x}")),
    }
    if ndigits < 0 || b.len() != 8 + 2 * ndigits as usize || dscale > 0x3FFF {
        return Err(format!("numeric: {} digits do not fit {} bytes", ndigits, b.len()));
    }
    let digits = &b[8..];
    if digits.chunks_exact(2).any(|d| u16::from_be_bytes([d[0], d[1]]) > 9999) {
        return Err("numeric: digit out of range".into());
    }
    let digit = |i: i32| match usize::try_from(i).ok().and_then(|i| digits.get(2 * i..2 * i + 2)) {
        Some(d) => u16::from_be_bytes([d[0], d[1]]),
        None => 0,
    };
    let mut out = String::with_capacity(((weight.max(0) + 1) * 4 + dscale + 2) as usize);
    if sign == NUMERIC_NEG {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        let first = digit(0);
        let width = match first {
            0..=9 => 1,
            10..=99 => 2,
            100..=999 => 3,
            _ => 4,
        };
        push_digits(&mut out, first, width);
        for i in 1..=weight {
            push_digits(&mut out, digit(i), 4);
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut remaining = dscale as usize;
        let mut i = weight + 1;
        while remaining > 0 {
            // The last group may show only its leading digits.
            let shown = remaining.min(4);
            push_digits(&mut out, digit(i) / 10u16.pow(4 - shown as u32), shown);
            remaining -= shown;
            i += 1;
        }
    }
    Ok(out)
}

/// Appends the last `width` decimal digits of `v`, zero-padded (a snapshot formats a numeric
/// per row; `write!` spent about 1.5% of a backfill's CPU in the formatting machinery).
fn push_digits(out: &mut String, v: u16, width: usize) {
    let mut digits = [b'0'; 4];
    let mut v = v;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.push_str(std::str::from_utf8(&digits[4 - width..]).expect("ASCII digits"));
}

/// Decodes a `tid` (a row version's place in the heap): its block, then its offset there.
pub fn tid(b: &[u8]) -> Result<(u32, u16), String> {
    let b: [u8; 6] = fixed(b, "tid")?;
    Ok((u32::from_be_bytes([b[0], b[1], b[2], b[3]]), u16::from_be_bytes([b[4], b[5]])))
}

fn timestamp(b: [u8; 8]) -> i64 {
    match i64::from_be_bytes(b) {
        t @ (i64::MAX | i64::MIN) => t,
        t => t + PG_EPOCH_MICROS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[Vec<Option<&[u8]>>]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(b"ext!");
        for row in rows {
            out.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for f in row {
                match f {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    #[test]
    fn splits_rows_across_any_chunk_boundary() {
        let data = stream(&[vec![Some(b"ab"), None, Some(b"")], vec![Some(&[1, 2, 3][..]), Some(b"x"), None]]);
        for split in 0..=data.len() {
            let mut parser = BinaryRows::default();
            let mut fields = Vec::new();
            let mut buf = data[..split].to_vec();
            let mut rest = &data[split..];
            let mut rows: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
            loop {
                match parser.next_row(&buf, &mut fields).unwrap() {
                    Next::Row { consumed } => {
                        rows.push(fields.iter().map(|f| f.clone().map(|r| buf[r].to_vec())).collect());
                        buf.drain(..consumed);
                    }
                    Next::NeedMore => {
                        assert!(!rest.is_empty(), "split {split}: stream ended inside a row");
                        buf.extend_from_slice(rest);
                        rest = &[];
                    }
                    Next::End => break,
                }
            }
            assert_eq!(
                rows,
                vec![
                    vec![Some(b"ab".to_vec()), None, Some(vec![])],
                    vec![Some(vec![1, 2, 3]), Some(b"x".to_vec()), None]
                ],
                "split at {split}"
            );
        }
    }

    fn numeric_bytes(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = [ndigits.to_be_bytes(), weight.to_be_bytes(), sign.to_be_bytes(), dscale.to_be_bytes()].concat();
        out.extend(digits.iter().flat_map(|d| d.to_be_bytes()));
        out
    }

    proptest::proptest! {
        /// The digit pushing gives what `numeric_out`'s rule, written with `format!`, gives.
        #[test]
        fn numerics_format_like_their_text_form(
            digits in proptest::collection::vec(0u16..10000, 0..6),
            weight in -3i16..6,
            dscale in 0u16..20,
            negative in proptest::bool::ANY,
        ) {
            let sign = if negative { NUMERIC_NEG } else { NUMERIC_POS };
            let bytes = numeric_bytes(digits.len() as i16, weight, sign, dscale, &digits);
            let digit = |i: i32| usize::try_from(i).ok().and_then(|i| digits.get(i)).copied().unwrap_or(0);
            let mut expected = String::from(if negative { "-" } else { "" });
            if weight < 0 {
                expected.push('0');
            } else {
                expected += &digit(0).to_string();
                for i in 1..=weight as i32 {
                    expected += &format!("{:04}", digit(i));
                }
            }
            if dscale > 0 {
                let fraction: String =
                    (weight as i32 + 1..).take(dscale.div_ceil(4) as usize).map(|i| format!("{:04}", digit(i))).collect();
                expected = format!("{expected}.{}", &fraction[..dscale as usize]);
            }
            proptest::prop_assert_eq!(numeric(&bytes).unwrap(), expected);
        }
    }

    #[test]
    fn rejects_malformed_numerics() {
        assert!(numeric(&[0, 1]).unwrap_err().contains("too short"));
        assert!(numeric(&numeric_bytes(2, 0, NUMERIC_POS, 0, &[1])).unwrap_err().contains("do not fit"));
        assert!(numeric(&numeric_bytes(1, 0, NUMERIC_POS, 0, &[10000])).unwrap_err().contains("out of range"));
        assert!(numeric(&numeric_bytes(0, 0, 0x1234, 0, &[])).unwrap_err().contains("unknown sign"));
    }

    #[test]
    fn decodes_binary_scalars_like_their_text_forms() {
        let cases: Vec<(ColumnType, Vec<u8>, &str)> = vec![
            (ColumnType::Bool, vec![1], "t"),
            (ColumnType::Int16, (-5i16).to_be_bytes().to_vec(), "-5"),
            (ColumnType::Int32, 70_000i32.to_be_bytes().to_vec(), "70000"),
            (ColumnType::Int64, i64::MIN.to_be_bytes().to_vec(), "-9223372036854775808"),
            (ColumnType::Float64, 0.1f64.to_be_bytes().to_vec(), "0.1"),
            (ColumnType::Text, "héllo".as_bytes().to_vec(), "héllo"),
            (ColumnType::Date, (-1i32).to_be_bytes().to_vec(), "1999-12-31"),
            (ColumnType::Date, i32::MAX.to_be_bytes().to_vec(), "infinity"),
            (ColumnType::Time, 45_296_000_001i64.to_be_bytes().to_vec(), "12:34:56.000001"),
            (ColumnType::Timestamp, 1i64.to_be_bytes().to_vec(), "2000-01-01 00:00:00.000001"),
            (ColumnType::TimestampTz, (-1i64).to_be_bytes().to_vec(), "1999-12-31 23:59:59.999999+00"),
            (ColumnType::TimestampTz, i64::MIN.to_be_bytes().to_vec(), "-infinity"),
            (ColumnType::Numeric(None), numeric_bytes(2, 0, NUMERIC_NEG, 2, &[12, 5000]), "-12.50"),
            (ColumnType::Numeric(None), numeric_bytes(0, 0, NUMERIC_POS, 0, &[]), "0"),
            (ColumnType::Numeric(None), numeric_bytes(1, -2, NUMERIC_POS, 9, &[1]), "0.000000010"),
            (ColumnType::Numeric(None), numeric_bytes(1, 1, NUMERIC_POS, 0, &[1]), "10000"),
            (ColumnType::Numeric(None), numeric_bytes(0, 0, NUMERIC_NAN, 0, &[]), "NaN"),
            (ColumnType::Numeric(None), numeric_bytes(0, 0, NUMERIC_NINF, 0, &[]), "-Infinity"),
        ];
        for (ty, binary, text) in cases {
            assert_eq!(decode(&ty, &binary).unwrap(), values::decode(&ty, text).unwrap(), "{ty:?} {text}");
        }
        let uuid = uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(
            decode(&ColumnType::Uuid, uuid.as_bytes()).unwrap(),
            values::decode(&ColumnType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap()
        );
        assert!(decode(&ColumnType::Int32, &[0, 1]).unwrap_err().contains("expected 4 bytes"));
    }
}

//! PostgreSQL text-format values to [`Value`]s.
//!
//! Both pgoutput (text mode) and the snapshot's `COPY` produce the server's text output.
//! Sessions sluice opens ask for ISO dates, UTC, ISO 8601 intervals and shortest-exact floats
//! ([`SESSION_OPTIONS`]), but a walsender may run with the server's defaults, so the parsers
//! also accept offsets other than UTC and the `postgres` interval style.

use crate::event::{ColumnType, Interval, Value};
use chrono::NaiveDate;

/// Startup options for every connection sluice opens, so text output parses one way.
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c timezone=UTC -c intervalstyle=iso_8601 -c extra_float_digits=3";

const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), from which the server's
/// binary timestamps count.
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Decodes one value of type `ty` from its text form.
pub fn decode(ty: &ColumnType, text: &str) -> Result<Value, String> {
    let bad = |what: &str| format!("cannot read `{}` as {what}", truncate(text));
    Ok(match ty {
        ColumnType::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(bad("boolean")),
        },
        ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 => {
            Value::Int(text.parse().map_err(|_| bad("integer"))?)
        }
        ColumnType::Float32 | ColumnType::Float64 => Value::Float(parse_float(text).ok_or_else(|| bad("float"))?),
        ColumnType::Numeric(_) => {
            let ok = matches!(text, "NaN" | "Infinity" | "-Infinity")
                || (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-'));
            if !ok {
                return Err(bad("numeric"));
            }
            Value::Numeric(text.to_string())
        }
        ColumnType::Text => Value::Text(text.to_string()),
        ColumnType::Enum => Value::Enum(text.to_string()),
        ColumnType::Other(_) => Value::Other(text.to_string()),
        ColumnType::Json => Value::Json(text.to_string()),
        ColumnType::Bytes => {
            let hex = text.strip_prefix("\\x").ok_or_else(|| bad("bytea (hex format)"))?;
            Value::Bytes(hex::decode(hex).map_err(|_| bad("bytea"))?)
        }
        ColumnType::Uuid => Value::Uuid(*uuid::Uuid::parse_str(text).map_err(|_| bad("uuid"))?.as_bytes()),
        ColumnType::Date => Value::Date(parse_date(text).ok_or_else(|| bad("date"))?),
        ColumnType::Time => Value::Time(parse_time(text).ok_or_else(|| bad("time"))?),
        ColumnType::TimeTz => {
            let (time, offset) = split_offset(text).ok_or_else(|| bad("time with time zone"))?;
            Value::TimeTz(parse_time(time).ok_or_else(|| bad("time with time zone"))?, offset)
        }
        ColumnType::Timestamp => Value::Timestamp(parse_timestamp(text).ok_or_else(|| bad("timestamp"))?),
        ColumnType::TimestampTz => Value::TimestampTz(parse_timestamptz(text).ok_or_else(|| bad("timestamptz"))?),
        ColumnType::Interval => Value::Interval(
            parse_interval(text).or_else(|| parse_postgres_interval(text)).ok_or_else(|| bad("interval"))?,
        ),
        ColumnType::Array(elem) => parse_array(elem, text)?,
    })
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// `YYYY-MM-DD[ BC]` or ±infinity, as days since 1970-01-01.
fn parse_date(text: &str) -> Option<i32> {
    match text {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    date_days(text, bc)
}

/// `YYYY-MM-DD` (a year before Christ when `bc`) as days since 1970-01-01.
fn date_days(text: &str, bc: bool) -> Option<i32> {
    let mut parts = text.splitn(3, '-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    let year = if bc { 1 - year } else { year };
    let date = NaiveDate::from_ymd_opt(year, month, day)?;
    Some(chrono::Datelike::num_days_from_ce(&date) - UNIX_EPOCH_DAYS_FROM_CE)
}

fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    }
}

/// `HH:MM:SS[.ffffff]` as microseconds since midnight (`24:00:00` is allowed). Parsed by hand:
/// chrono's format-string parser was a visible share of snapshot CPU.
fn parse_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return None;
    }
    let two = |i: usize| -> Option<i64> {
        let (h, l) = (b[i].wrapping_sub(b'0'), b[i + 1].wrapping_sub(b'0'));
        (h < 10 && l < 10).then_some((h * 10 + l) as i64)
    };
    let (h, m, s) = (two(0)?, two(3)?, two(6)?);
    if m > 59 || s > 60 || h > 24 {
        return None;
    }
    let micros = match &b[8..] {
        [] => 0,
        [b'.', frac @ ..] if !frac.is_empty() && frac.len() <= 6 && frac.iter().all(u8::is_ascii_digit) => {
            frac.iter().fold(0i64, |acc, d| acc * 10 + (d - b'0') as i64) * 10i64.pow(6 - frac.len() as u32)
        }
        _ => return None,
    };
    let total = (h * 3600 + m * 60 + s) * 1_000_000 + micros;
    (total <= 86_400_000_000).then_some(total)
}

/// Splits `...+HH[:MM[:SS]]` into the text before the offset and the offset in seconds.
fn split_offset(text: &str) -> Option<(&str, i32)> {
    let idx = text.rfind(['+', '-'])?;
    let (body, off) = text.split_at(idx);
    let sign = if off.starts_with('-') { -1 } else { 1 };
    let mut secs = 0;
    for (i, part) in off[1..].split(':').enumerate() {
        let n: i32 = part.parse().ok()?;
        secs += n * [3600, 60, 1].get(i)?;
    }
    Some((body, sign * secs))
}

fn parse_timestamp(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    timestamp_micros(text, bc)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` as microseconds since the epoch.
fn timestamp_micros(text: &str, bc: bool) -> Option<i64> {
    let (date, time) = text.split_once(' ')?;
    Some(date_days(date, bc)? as i64 * 86_400_000_000 + parse_time(time)?)
}

fn parse_timestamptz(text: &str) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (body, offset) = split_offset(text)?;
    Some(timestamp_micros(body, bc)? - offset as i64 * 1_000_000)
}

/// ISO 8601 with PostgreSQL's signed fields: `P1Y-2M3DT4H5M6.5S`, `PT0S`.
fn parse_interval(text: &str) -> Option<Interval> {
    let body = text.strip_prefix('P')?;
    let (date_part, time_part) = body.split_once('T').unwrap_or((body, ""));
    let mut iv = Interval { months: 0, days: 0, micros: 0 };
    for (num, unit) in fields(date_part)? {
        let n: i64 = num.parse().ok()?;
        match unit {
            'Y' => iv.months += (n * 12) as i32,
            'M' => iv.months += n as i32,
            'W' => iv.days += (n * 7) as i32,
            'D' => iv.days += n as i32,
            _ => return None,
        }
    }
    for (num, unit) in fields(time_part)? {
        let micros = match unit {
            'H' => num.parse::<i64>().ok()? * 3_600_000_000,
            'M' => num.parse::<i64>().ok()? * 60_000_000,
            'S' => parse_seconds_micros(num)?,
            _ => return None,
        };
        iv.micros += micros;
    }
    Some(iv)
}

/// The `postgres` interval style: `1 year 2 mons -3 days +04:05:06.000007`, `-00:00:01.5`.
fn parse_postgres_interval(text: &str) -> Option<Interval> {
    let mut iv = Interval { months: 0, days: 0, micros: 0 };
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word.contains(':') {
            let (neg, hms) = match word.as_bytes()[0] {
                b'-' => (true, &word[1..]),
                b'+' => (false, &word[1..]),
                _ => (false, word),
            };
            let mut parts = hms.splitn(3, ':');
            let h: i64 = parts.next()?.parse().ok()?;
            let m: i64 = parts.next()?.parse().ok()?;
            let s = parse_seconds_micros(parts.next().unwrap_or("0"))?;
            let micros = h * 3_600_000_000 + m * 60_000_000 + s;
            iv.micros += if neg { -micros } else { micros };
            continue;
        }
        let n: i64 = word.parse().ok()?;
        match words.next()?.trim_end_matches('s') {
            "year" => iv.months += (n * 12) as i32,
            "mon" => iv.months += n as i32,
            "day" => iv.days += n as i32,
            _ => return None,
        }
    }
    Some(iv)
}

fn fields(text: &str) -> Option<Vec<(&str, char)>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c.is_ascii_alphabetic() {
            out.push((&text[start..i], c));
            start = i + 1;
        }
    }
    (start == text.len()).then_some(out)
}

/// `-6.789` seconds as exact microseconds.
fn parse_seconds_micros(num: &str) -> Option<i64> {
    let (neg, digits) = match num.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, num),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if frac.len() > 6 {
        return None;
    }
    let micros = whole.parse::<i64>().ok()? * 1_000_000 + format!("{frac:0<6}").parse::<i64>().ok()?;
    Some(if neg { -micros } else { micros })
}

/// Parses an array literal (`{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`).
fn parse_array(elem: &ColumnType, text: &str) -> Result<Value, String> {
    // A lower-bound decoration such as `[0:1]={...}` precedes non-default bounds.
    let text = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut chars = text.char_indices().peekable();
    let value = parse_array_level(elem, text, &mut chars)?;
    match chars.next() {
        None => Ok(value),
        Some(_) => Err(format!("trailing text after array `{}`", truncate(text))),
    }
}

fn parse_array_level(
    elem: &ColumnType,
    text: &str,
    chars: &mut std::iter::Peekable<std::str::CharIndices>,
) -> Result<Value, String> {
    let bad = || format!("malformed array `{}`", truncate(text));
    if chars.next().map(|(_, c)| c) != Some('{') {
        return Err(bad());
    }
    let mut items = Vec::new();
    if chars.peek().map(|&(_, c)| c) == Some('}') {
        chars.next();
        return Ok(Value::Array(items));
    }
    loop {
        match chars.peek().map(|&(_, c)| c) {
            Some('{') => items.push(parse_array_level(elem, text, chars)?),
            Some('"') => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next().ok_or_else(bad)?.1 {
                        '\\' => s.push(chars.next().ok_or_else(bad)?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(decode(elem, &s)?);
            }
            Some(_) => {
                let mut s = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                items.push(if s == "NULL" { Value::Null } else { decode(elem, &s)? });
            }
            None => return Err(bad()),
        }
        match chars.next().map(|(_, c)| c) {
            Some(',') => continue,
            Some('}') => return Ok(Value::Array(items)),
            _ => return Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporal_values_keep_microseconds_and_zone() {
        assert_eq!(decode(&ColumnType::Date, "1970-01-02").unwrap(), Value::Date(1));
        assert_eq!(decode(&ColumnType::Date, "0001-01-01 BC").unwrap(), Value::Date(-719_528));
        assert_eq!(decode(&ColumnType::Time, "00:00:01.000002").unwrap(), Value::Time(1_000_002));
        assert_eq!(decode(&ColumnType::Time, "23:59:59.5").unwrap(), Value::Time(86_399_500_000));
        assert_eq!(decode(&ColumnType::Time, "24:00:00").unwrap(), Value::Time(86_400_000_000));
        assert!(decode(&ColumnType::Time, "24:00:01").is_err());
        assert!(decode(&ColumnType::Time, "1:00:00").is_err());
        assert_eq!(decode(&ColumnType::TimestampTz, "1970-01-01 01:00:00.5+01").unwrap(), Value::TimestampTz(500_000));
        assert_eq!(decode(&ColumnType::TimeTz, "10:00:00-03:30").unwrap(), Value::TimeTz(36_000_000_000, -12_600));
        assert_eq!(decode(&ColumnType::Timestamp, "infinity").unwrap(), Value::Timestamp(i64::MAX));
    }

    #[test]
    fn intervals_parse_signed_iso_fields() {
        let iv = |m, d, us| Value::Interval(Interval { months: m, days: d, micros: us });
        assert_eq!(decode(&ColumnType::Interval, "P1Y-2M3DT4H5M6.000007S").unwrap(), iv(10, 3, 14_706_000_007));
        assert_eq!(decode(&ColumnType::Interval, "PT-0.5S").unwrap(), iv(0, 0, -500_000));
        assert_eq!(decode(&ColumnType::Interval, "PT0S").unwrap(), iv(0, 0, 0));
        assert_eq!(
            decode(&ColumnType::Interval, "1 year 2 mons -3 days +04:05:06.000007").unwrap(),
            iv(14, -3, 14_706_000_007)
        );
        assert_eq!(decode(&ColumnType::Interval, "-00:00:01.5").unwrap(), iv(0, 0, -1_500_000));
        assert_eq!(decode(&ColumnType::Interval, "1 day").unwrap(), iv(0, 1, 0));
        assert_eq!(decode(&ColumnType::Interval, "00:00:00").unwrap(), iv(0, 0, 0));
    }

    #[test]
    fn arrays_handle_quotes_nulls_and_nesting() {
        let text = ColumnType::Array(Box::new(ColumnType::Text));
        assert_eq!(
            decode(&text, r#"{"a b","c\"d",NULL,e}"#).unwrap(),
            Value::Array(vec![
                Value::Text("a b".into()),
                Value::Text("c\"d".into()),
                Value::Null,
                Value::Text("e".into())
            ])
        );
        let ints = ColumnType::Array(Box::new(ColumnType::Int32));
        assert_eq!(
            decode(&ints, "{{1,2},{3,4}}").unwrap(),
            Value::Array(vec![
                Value::Array(vec![Value::Int(1), Value::Int(2)]),
                Value::Array(vec![Value::Int(3), Value::Int(4)])
            ])
        );
        assert_eq!(decode(&ints, "{}").unwrap(), Value::Array(vec![]));
    }

    #[test]
    fn exact_numerics_and_bytes() {
        let big = "123456789012345678901234567890.123456789012345678901234567890";
        assert_eq!(decode(&ColumnType::Numeric(None), big).unwrap(), Value::Numeric(big.into()));
        assert_eq!(decode(&ColumnType::Bytes, "\\x00ff").unwrap(), Value::Bytes(vec![0, 255]));
        assert!(decode(&ColumnType::Numeric(None), "12a").is_err());
    }
}

//! The change-event model every source produces and every sink consumes.
//!
//! Values keep the source's exact meaning: numerics are carried as their exact decimal text
//! (never through `f64`), temporal values as integer microseconds, JSON as the server's own text
//! (so JSON `null` stays distinct from SQL `NULL`), and an unchanged TOAST column is its own
//! state until the source reconstructs it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A table's schema-qualified name. Shared (`Arc`) because every event carries one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableId {
    pub schema: Arc<str>,
    pub name: Arc<str>,
}

impl TableId {
    pub fn new(schema: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self { schema: Arc::from(schema.as_ref()), name: Arc::from(name.as_ref()) }
    }

    /// Parses `schema.table`, defaulting the schema to `public`.
    pub fn parse(s: &str) -> Option<Self> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        (!schema.is_empty() && !name.is_empty() && !name.contains('.')).then(|| Self::new(schema, name))
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row read by a snapshot, not a change.
    Read,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Read => "read",
        }
    }
}

/// Where an event sits in the source's history; totally ordered.
///
/// PostgreSQL changes are at `(commit LSN, Change, ordinal in the transaction)`. Snapshot rows
/// are at `(LSN the snapshot was taken at, Snapshot, row number)`, so they sort before every
/// change that committed at or after that point and after every change that committed before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub lsn: u64,
    pub phase: Phase,
    pub seq: u64,
}

/// Orders snapshot rows before changes at the same LSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    Snapshot,
    Change,
}

impl Position {
    pub fn change(commit_lsn: u64, ordinal: u64) -> Self {
        Self { lsn: commit_lsn, phase: Phase::Change, seq: ordinal }
    }

    pub fn snapshot(snapshot_lsn: u64, row: u64) -> Self {
        Self { lsn: snapshot_lsn, phase: Phase::Snapshot, seq: row }
    }
}

impl fmt::Display for Position {
    /// Fixed-width hex, so the text sorts like the position (file names rely on this).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::Snapshot => 's',
            Phase::Change => 'c',
        };
        write!(f, "{:016X}-{phase}-{:012X}", self.lsn, self.seq)
    }
}

/// Formats an LSN the way PostgreSQL prints it (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses PostgreSQL's `X/Y` LSN text.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// An interval as PostgreSQL stores it: the three parts do not convert into each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Interval {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

/// A typed column value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Exact decimal text as the server printed it, including `NaN` and `±Infinity`.
    Numeric(String),
    Text(String),
    Bytes(Vec<u8>),
    /// JSON or JSONB text exactly as the server printed it; JSON `null` is `Json("null")`.
    Json(String),
    Uuid([u8; 16]),
    /// Days since 1970-01-01 (`i32::MAX`/`i32::MIN` for ±infinity).
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Microseconds since midnight and the zone offset in seconds east of UTC.
    TimeTz(i64, i32),
    /// Microseconds since 1970-01-01 00:00, no zone (`i64::MAX`/`i64::MIN` for ±infinity).
    Timestamp(i64),
    /// Microseconds since 1970-01-01 00:00 UTC (`i64::MAX`/`i64::MIN` for ±infinity).
    TimestampTz(i64),
    Interval(Interval),
    /// A value of an enum type, by label.
    Enum(String),
    Array(Vec<Value>),
    /// A value of a type sluice does not model (inet, money, ranges ...), in the server's text form.
    Other(String),
    /// The source did not send this column because it is TOASTed and did not change.
    /// Sources replace it before an event leaves them; sinks never see it.
    UnchangedToast,
}

/// One row's values, in the order of its table schema's columns.
pub type Row = Vec<Value>;

/// A change to one row (or, for truncate, to a whole table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub table: TableId,
    /// The table schema this event's rows follow, as registered in the log.
    pub schema_id: u32,
    pub op: Op,
    /// Primary-key values, in the order of the schema's key columns (empty for truncate).
    pub key: Row,
    /// The row before the change, when the source has it (REPLICA IDENTITY FULL).
    pub before: Option<Row>,
    /// The row after the change; `None` for delete and truncate.
    pub after: Option<Row>,
    pub position: Position,
    /// Commit time in microseconds since the Unix epoch (snapshot time for reads).
    pub commit_ts_us: i64,
    pub tx_id: Option<u64>,
    /// An unchanged TOAST value had never been seen for this key and was fetched from the
    /// source by key, so it is the value current at fetch time rather than at the change.
    pub toast_fetched: bool,
    /// The last row of its table's initial snapshot (Debezium's `snapshot: last`) or of a
    /// backfill of the table, so a sink can finish what it holds for the table now instead of
    /// at its next roll.
    pub snapshot_last: bool,
    /// The replication origin of the transaction that made the change, when its writer set one
    /// (sluice's own sinks do), so a two-way mirror can drop its own echoes.
    pub origin: Option<Arc<str>>,
}

impl ChangeEvent {
    /// Roughly how much memory the event holds, for byte-bounded batches.
    pub fn approx_size(&self) -> usize {
        let rows = [Some(&self.key), self.before.as_ref(), self.after.as_ref()];
        96 + rows.into_iter().flatten().flat_map(|r| r.iter()).map(Value::approx_size).sum::<usize>()
    }
}

impl Value {
    /// Roughly how much memory the value holds.
    pub fn approx_size(&self) -> usize {
        16 + match self {
            Value::Numeric(s) | Value::Text(s) | Value::Json(s) | Value::Enum(s) | Value::Other(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Array(items) => items.iter().map(Value::approx_size).sum(),
            _ => 0,
        }
    }
}

/// A column of a table schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// Part of the primary key.
    pub key: bool,
    /// The server may store values out of line (TOAST), so updates may omit them.
    pub toastable: bool,
}

/// The type of a column, as much as a sink needs to pick a physical type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ColumnType {
    Bool,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// NUMERIC(precision, scale), or unbounded when `None`.
    Numeric(Option<(u16, u16)>),
    Text,
    Bytes,
    Json,
    Uuid,
    Date,
    Time,
    TimeTz,
    Timestamp,
    TimestampTz,
    Interval,
    Enum,
    Array(Box<ColumnType>),
    /// Carried as text; the name is the server's type name.
    Other(String),
}

/// The shape of one table at one point in its history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableSchema {
    pub table: TableId,
    pub columns: Vec<Column>,
    /// Row size (bytes on disk) above which the server may move values out of line
    /// (`toast_tuple_target`); 0 when the table has no TOAST storage at all.
    pub toast_target: u32,
}

impl TableSchema {
    /// Whether the server may have stored some value of `row` out of line, so that a later
    /// update could omit it. PostgreSQL externalizes values only from tuples larger than
    /// `toast_tuple_target`; the row's on-disk size is bounded from above by 24 bytes of header
    /// plus, per column, 32 bytes and eight times its text length (the widest ratio is a small
    /// array or jsonb value, whose binary form is a few times its text).
    pub fn may_toast(&self, row: &[Value]) -> bool {
        if self.toast_target == 0 || !self.columns.iter().any(|c| c.toastable) {
            return false;
        }
        let bound: usize = 24 + row.iter().map(|v| 32 + 8 * v.approx_size().saturating_sub(16)).sum::<usize>();
        bound > self.toast_target as usize
    }

    /// Indexes of the key columns, in column order.
    pub fn key_indexes(&self) -> Vec<usize> {
        (0..self.columns.len()).filter(|&i| self.columns[i].key).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn position() -> impl Strategy<Value = Position> {
        (any::<u64>(), any::<bool>(), 0u64..(1 << 48)).prop_map(|(lsn, snap, seq)| Position {
            lsn,
            phase: if snap { Phase::Snapshot } else { Phase::Change },
            seq,
        })
    }

    proptest! {
        /// File names are positions as text; they must sort exactly like the positions.
        #[test]
        fn position_text_sorts_like_positions(a in position(), b in position()) {
            prop_assert_eq!(a.cmp(&b), a.to_string().cmp(&b.to_string()));
        }

        #[test]
        fn lsn_text_round_trips(lsn in any::<u64>()) {
            prop_assert_eq!(parse_lsn(&format_lsn(lsn)), Some(lsn));
        }
    }

    #[test]
    fn snapshot_rows_sort_before_changes_at_the_same_lsn() {
        assert!(Position::snapshot(100, u64::MAX) < Position::change(100, 0));
        assert!(Position::change(99, u64::MAX) < Position::snapshot(100, 0));
    }
}

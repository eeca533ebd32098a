//! TOAST state: the last value of each toastable column, per table and key.
//!
//! Storage cost: one entry per live row of a table with toastable columns (text, bytea, json,
//! jsonb, arrays, numeric ...), holding those columns' values: roughly the size of the table's
//! variable-length data. Deleted rows and truncated tables release their entries.

use crate::event::{Position, TableId, Value};
use serde::{Deserialize, Serialize};

/// The toastable values of one row as of `position`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToastEntry {
    pub position: Position,
    /// Column name and value; by name so an added or dropped column does not shift them.
    pub values: Vec<(String, Value)>,
}

impl ToastEntry {
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| n == column).map(|(_, v)| v)
    }
}

/// The table part of a TOAST key; postcard's length prefixes make it prefix-free.
pub fn toast_table_prefix(table: &TableId) -> Vec<u8> {
    postcard::to_allocvec(&(&table.schema, &table.name)).expect("strings always encode")
}

/// The key of a row's TOAST entry.
pub fn toast_key(table: &TableId, key: &[Value]) -> Vec<u8> {
    let mut out = toast_table_prefix(table);
    out.extend(postcard::to_allocvec(key).expect("values always encode"));
    out
}

//! Reconstructs unchanged TOAST values so no change row carries a placeholder.
//!
//! Order of lookup for a column the server left out: the old row (REPLICA IDENTITY FULL), the
//! values of earlier changes not yet committed to the log (this batch, or this streamed
//! transaction), the durable TOAST state in the log, and only then the source itself, by key;
//! a value fetched from the source is flagged on the event because it is current at fetch time.

use super::client::{qualified, query_error, quote_ident, quote_literal};
use super::values::decode;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, TableSchema, Value};
use crate::log::{toast_key, EmbeddedLog};
use std::collections::HashMap;
use tokio_postgres::Client;

/// At most this many rows of one streamed transaction are remembered in memory; beyond it the
/// transaction's own earlier values are fetched from the source (and flagged).
const STREAM_OVERLAY_LIMIT: usize = 100_000;

type Values = Vec<(String, Value)>;

#[derive(Default)]
pub struct ToastResolver {
    /// Values of appended changes whose batch has not committed yet.
    pending: HashMap<Vec<u8>, Values>,
    /// Values of changes staged by each streamed transaction still in progress.
    streams: HashMap<u32, HashMap<Vec<u8>, Values>>,
}

impl ToastResolver {
    /// Fills every `UnchangedToast` in `event.after`; records the row's toastable values.
    pub async fn resolve(
        &mut self,
        event: &mut ChangeEvent,
        schema: &TableSchema,
        stream: Option<u32>,
        log: &EmbeddedLog,
        client: &Client,
    ) -> Result<()> {
        self.resolve_as(event, None, schema, stream, log, client).await
    }

    /// [`Self::resolve`], looking remembered values up under `remembered_as` when given (the
    /// row's key before an update changed it) and remembering the result under the event's key.
    pub async fn resolve_as(
        &mut self,
        event: &mut ChangeEvent,
        remembered_as: Option<&[Value]>,
        schema: &TableSchema,
        stream: Option<u32>,
        log: &EmbeddedLog,
        client: &Client,
    ) -> Result<()> {
        if !schema.columns.iter().any(|c| c.toastable) || schema.toast_target == 0 {
            return Ok(());
        }
        let has_unchanged = event.after.as_ref().is_some_and(|a| a.contains(&Value::UnchangedToast));
        if !has_unchanged && event.after.as_ref().is_some_and(|a| !schema.may_toast(a)) {
            // Small rows are never remembered (see TableSchema::may_toast); only forget a
            // pending entry an earlier large version of this row may have left.
            if !self.pending.is_empty() || !self.streams.is_empty() {
                self.forget(stream, toast_key(&event.table, &event.key));
            }
            return Ok(());
        }
        let key = toast_key(&event.table, &event.key);
        let Some(after) = event.after.as_mut() else {
            self.forget(stream, key);
            return Ok(());
        };
        let missing: Vec<usize> = (0..after.len()).filter(|&i| after[i] == Value::UnchangedToast).collect();
        if !missing.is_empty() {
            let old_key;
            let lookup_key: &[u8] = match remembered_as {
                Some(old) => {
                    old_key = toast_key(&event.table, old);
                    &old_key
                }
                None => &key,
            };
            let mut stored: Option<Values> = None;
            for &i in &missing {
                let name = &schema.columns[i].name;
                if let Some(v) = event.before.as_ref().and_then(|b| b.get(i)).filter(|v| **v != Value::UnchangedToast) {
                    after[i] = v.clone();
                    continue;
                }
                let local = stream
                    .and_then(|x| self.streams.get(&x))
                    .and_then(|m| m.get(lookup_key))
                    .or_else(|| self.pending.get(lookup_key));
                if let Some(v) = local.and_then(|vals| lookup(vals, name)) {
                    after[i] = v.clone();
                    continue;
                }
                if stored.is_none() {
                    stored = log.toast_get(vec![lookup_key.to_vec()]).await?.pop().flatten().map(|e| e.values);
                }
                if let Some(v) = stored.as_ref().and_then(|vals| lookup(vals, name)) {
                    after[i] = v.clone();
                }
            }
            let still: Vec<usize> = missing.into_iter().filter(|&i| after[i] == Value::UnchangedToast).collect();
            if !still.is_empty() {
                let fetched = fetch(client, schema, &event.key, &still).await?;
                for (i, v) in still.into_iter().zip(fetched) {
                    after[i] = v;
                }
                event.toast_fetched = true;
            }
        }
        let values: Values = schema
            .columns
            .iter()
            .zip(after.iter())
            .filter(|(c, _)| c.toastable)
            .map(|(c, v)| (c.name.clone(), v.clone()))
            .collect();
        match stream {
            Some(x) => {
                let overlay = self.streams.entry(x).or_default();
                if overlay.len() < STREAM_OVERLAY_LIMIT || overlay.contains_key(&key) {
                    overlay.insert(key, values);
                }
            }
            None => {
                self.pending.insert(key, values);
            }
        }
        Ok(())
    }

    fn forget(&mut self, stream: Option<u32>, key: Vec<u8>) {
        if let Some(overlay) = stream.and_then(|x| self.streams.get_mut(&x)) {
            overlay.remove(&key);
        }
        // Older pending values must not serve later lookups in this batch either.
        self.pending.remove(&key);
    }

    /// A truncate invalidates every remembered value of the table.
    pub fn truncate(&mut self, table: &crate::event::TableId) {
        let prefix = crate::log::toast_key(table, &Vec::new());
        let prefix = &prefix[..prefix.len() - 1];
        self.pending.retain(|k, _| !k.starts_with(prefix));
        for m in self.streams.values_mut() {
            m.retain(|k, _| !k.starts_with(prefix));
        }
    }

    /// The streamed transaction committed: its values are now pending like any other.
    pub fn promote(&mut self, xid: u32) {
        if let Some(m) = self.streams.remove(&xid) {
            self.pending.extend(m);
        }
    }

    pub fn abort(&mut self, xid: u32) {
        self.streams.remove(&xid);
    }

    /// The batch committed: its values are in the durable TOAST state now.
    pub fn batch_committed(&mut self) {
        self.pending.clear();
    }
}

fn lookup<'a>(vals: &'a Values, name: &str) -> Option<&'a Value> {
    vals.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Reads the current values of some columns of one row from the source.
async fn fetch(client: &Client, schema: &TableSchema, key: &[Value], columns: &[usize]) -> Result<Vec<Value>> {
    let cols: Vec<String> =
        columns.iter().map(|&i| format!("{}::text", quote_ident(&schema.columns[i].name))).collect();
    let mut conds = Vec::new();
    for (idx, v) in schema.key_indexes().into_iter().zip(key) {
        let lit = key_literal(v).ok_or_else(|| Error::permanent("toast fetch", "key value has no text form"))?;
        conds.push(format!("{} = {}", quote_ident(&schema.columns[idx].name), quote_literal(&lit)));
    }
    let sql = format!("SELECT {} FROM {} WHERE {}", cols.join(", "), qualified(&schema.table), conds.join(" AND "));
    let row = client.query_opt(&sql, &[]).await.map_err(|e| query_error("toast fetch", e))?;
    let Some(row) = row else {
        // The row is gone; the change is still emitted, with NULL for values no one can know.
        return Ok(vec![Value::Null; columns.len()]);
    };
    columns
        .iter()
        .enumerate()
        .map(|(n, &i)| match row.get::<_, Option<String>>(n) {
            None => Ok(Value::Null),
            Some(text) => decode(&schema.columns[i].ty, &text).map_err(|e| Error::permanent("toast fetch", e)),
        })
        .collect()
}

/// The text literal of a key value, as PostgreSQL would accept it back.
pub fn key_literal(v: &Value) -> Option<String> {
    Some(match v {
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Numeric(s) | Value::Text(s) | Value::Enum(s) | Value::Other(s) | Value::Json(s) => s.clone(),
        Value::Uuid(u) => uuid::Uuid::from_bytes(*u).to_string(),
        Value::Bytes(b) => format!("\\x{}", hex::encode(b)),
        _ => return None,
    })
}

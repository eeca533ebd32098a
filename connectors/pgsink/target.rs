//! The target table: its columns, and the statements that write a batch to it.
//!
//! Every statement takes its rows as one text array per column (`unnest($1::text[], ...)`)
//! and casts each to the target column's declared type, so a batch of any size is one round
//! trip, PostgreSQL does every type conversion (an exact numeric stays exact), and a value the
//! type refuses is the server's error, with the server's message, for that record.

use super::tombstones::Tombstones;
use crate::config::VersionGuard;
use crate::connectors::postgres::client::{qualified, query_error, quote_ident};
use crate::error::{Error, Result};
use crate::event::TableId;
use minijinja::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Transaction};

/// The column holding a hash of what sluice last wrote to a record (conflict detection).
pub const HASH_COLUMN: &str = "_sluice_hash";

/// One record to write: text per key column and per field, and its version.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: Vec<Option<String>>,
    pub fields: Vec<Option<String>>,
    /// The guard value (position text, or none when the guard is a mapped field or off).
    pub version: Option<String>,
}

/// A record the target refused, by its index in the batch, with the server's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub index: usize,
    pub reason: String,
}

/// The target's side of one record, read before a batch when the conflict strategy needs it.
#[derive(Debug, Clone)]
pub struct State {
    /// Changed outside sluice since sluice last wrote it (or never written by sluice).
    pub changed: bool,
    pub target_newer: bool,
    /// The record as JSON, for the review queue.
    pub row: serde_json::Value,
}

/// Which fields an upsert updates on an existing record.
#[derive(Debug, Clone, Copy)]
pub enum Fields<'a> {
    All,
    /// Only where the mask is true (merge: source-owned fields).
    Owned(&'a [bool]),
}

/// The target table as introspected at start.
#[derive(Debug, Clone)]
pub struct Target {
    table: TableId,
    key: Vec<String>,
    fields: Vec<String>,
    /// Declared type of every key column, then every field, as `format_type` prints it.
    types: HashMap<String, String>,
    version: VersionGuard,
    has_hash: bool,
    /// Kept under the position guard, so a change older than a delete cannot undo it.
    tombstones: Option<Tombstones>,
}

impl Target {
    /// Reads the table's columns and checks that everything the sink writes exists: every
    /// mapped column, a unique index on the key, and the guard and hash columns when used.
    pub async fn introspect(
        client: &Client,
        table: &TableId,
        key: &[String],
        fields: &[String],
        version: &VersionGuard,
        needs_hash: bool,
    ) -> Result<Self> {
        let name = qualified(table);
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
                &[&name],
            )
            .await
            .map_err(|e| query_error("target columns", e))?;
        if rows.is_empty() {
            return Err(Error::config(format!("target table {table} does not exist; create it first")));
        }
        let types: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let missing = |c: &str| !types.contains_key(c);
        for c in key.iter().chain(fields) {
            if missing(c) {
                return Err(Error::config(format!(
                    "target table {table} has no column `{c}` that the mapping writes; add it \
                     (ALTER TABLE {name} ADD COLUMN {} <type>) or map to an existing column",
                    quote_ident(c)
                )));
            }
        }
        let marker = |column: &str, what: &str| {
            Error::config(format!(
                "target table {table} needs a text column `{column}` for {what}: \
                 ALTER TABLE {name} ADD COLUMN {} text",
                quote_ident(column)
            ))
        };
        if let VersionGuard::Position { column } = version {
            if missing(column) {
                return Err(marker(column, "the version guard (or set `version: none`)"));
            }
        }
        if let VersionGuard::Field { column } = version {
            if !fields.contains(column) {
                return Err(Error::config(format!(
                    "version field `{column}` is not one of the sink's mapped fields; map it or choose another"
                )));
            }
        }
        if needs_hash && missing(HASH_COLUMN) {
            return Err(marker(HASH_COLUMN, "conflict detection"));
        }
        let unique: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisunique \
                 AND i.indpred IS NULL AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
                 WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = (SELECT array_agg(k ORDER BY k) FROM unnest($2::text[]) k))",
                &[&name, &key],
            )
            .await
            .map_err(|e| query_error("target key", e))?
            .get(0);
        if !unique {
            return Err(Error::config(format!(
                "target table {table} has no unique index on the key ({}); upserts need one: \
                 CREATE UNIQUE INDEX ON {name} ({})",
                key.join(", "),
                key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
            )));
        }
        let has_hash = !missing(HASH_COLUMN);
        let tombstones = match version {
            VersionGuard::Position { .. } => Some(Tombstones::ensure(client, table, key.len()).await?),
            _ => None,
        };
        Ok(Self {
            table: table.clone(),
            key: key.to_vec(),
            fields: fields.to_vec(),
            types,
            version: version.clone(),
            has_hash,
            tombstones,
        })
    }

    fn ty(&self, column: &str) -> &str {
        &self.types[column]
    }

    /// Fields that are not also key columns (a key column is written from the key).
    fn value_fields(&self) -> impl Iterator<Item = (usize, &String)> {
        self.fields.iter().enumerate().filter(|(_, f)| !self.key.contains(f))
    }

    /// Converts mapped values to the text PostgreSQL parses for each target column.
    pub fn texts(&self, key: &[Value], fields: &[Value]) -> (Vec<Option<String>>, Vec<Option<String>>) {
        let k = key.iter().zip(&self.key).map(|(v, c)| cell_text(v, self.ty(c).ends_with("[]"))).collect();
        let f = fields.iter().zip(&self.fields).map(|(v, c)| cell_text(v, self.ty(c).ends_with("[]"))).collect();
        (k, f)
    }

    /// The key of a record as its text, the form batches coalesce by.
    pub fn key_columns(&self) -> &[String] {
        &self.key
    }

    /// Begins the transaction that writes `keys` (each key's column texts). Under the position
    /// guard it first takes the keys' locks (see `tombstones`), so a concurrent writer of one of
    /// them has committed before this transaction reads or writes it.
    pub async fn begin<'c>(&self, client: &'c mut Client, keys: &[Vec<Option<String>>]) -> Result<Transaction<'c>> {
        let tx = client.transaction().await.map_err(|e| query_error("begin", e))?;
        if let Some(tombstones) = &self.tombstones {
            let texts: Vec<String> = keys.iter().map(|k| serde_json::to_string(k).expect("strings encode")).collect();
            tombstones.lock_keys(&tx, &texts).await?;
        }
        Ok(tx)
    }

    /// Upserts rows in `tx`, isolating records the server refuses (returned, not written).
    pub async fn upsert(&self, tx: &mut Transaction<'_>, rows: &[Row], which: Fields<'_>) -> Result<Vec<Rejected>> {
        self.isolate(tx, rows, 0, &Statement::Upsert(self.upsert_sql(which))).await
    }

    /// Deletes rows by key in `tx` (respecting the position guard), isolating refusals.
    pub async fn delete(&self, tx: &mut Transaction<'_>, rows: &[Row]) -> Result<Vec<Rejected>> {
        self.isolate(tx, rows, 0, &Statement::Delete(self.delete_sql())).await
    }

    /// Runs `stmt` on `rows` inside a savepoint; when the server refuses the data, splits the
    /// rows in halves until each refused record stands alone, so one bad record costs only
    /// itself (and about 2·log2(batch) extra statements) while the rest of the batch is written.
    fn isolate<'a>(
        &'a self,
        tx: &'a mut Transaction<'_>,
        rows: &'a [Row],
        offset: usize,
        stmt: &'a Statement,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Rejected>>> + Send + 'a>> {
        Box::pin(async move {
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let sp = tx.savepoint("sluice_part").await.map_err(|e| query_error("savepoint", e))?;
            let outcome = match stmt {
                Statement::Upsert(sql) => self.run_upsert(&sp, sql, rows).await,
                Statement::Delete(sql) => self.run_delete(&sp, sql, rows).await,
            };
            match outcome {
                Ok(()) => {
                    sp.commit().await.map_err(|e| query_error("release savepoint", e))?;
                    Ok(Vec::new())
                }
                Err(e) if is_data_error(&e) => {
                    sp.rollback().await.map_err(|e| query_error("rollback to savepoint", e))?;
                    if rows.len() == 1 {
                        let db = e.as_db_error().expect("data errors come from the server");
                        let detail = db.detail().map(|d| format!(" ({d})")).unwrap_or_default();
                        return Ok(vec![Rejected {
                            index: offset,
                            reason: format!("{}{detail} [SQLSTATE {}]", db.message(), db.code().code()),
                        }]);
                    }
                    let mid = rows.len() / 2;
                    let mut out = self.isolate(tx, &rows[..mid], offset, stmt).await?;
                    out.extend(self.isolate(tx, &rows[mid..], offset + mid, stmt).await?);
                    Ok(out)
                }
                Err(e) => Err(query_error("target write", e)),
            }
        })
    }

    /// Removes every record (a truncate of the source table at `version`). Under the position
    /// guard only records older than the truncate go, and the truncate leaves a tombstone for
    /// the whole table, so a replayed older change cannot bring a record back either.
    pub async fn truncate(&self, tx: &Transaction<'_>, version: &str) -> Result<()> {
        let table = qualified(&self.table);
        let (VersionGuard::Position { column }, Some(tombstones)) = (&self.version, &self.tombstones) else {
            return tx
                .batch_execute(&format!("DELETE FROM {table}"))
                .await
                .map_err(|e| query_error("target truncate", e));
        };
        let column = quote_ident(column);
        tombstones.lock_table(tx).await?;
        tx.execute(&format!("DELETE FROM {table} AS t WHERE t.{column} IS NULL OR t.{column} < $1"), &[&version])
            .await
            .map_err(|e| query_error("target truncate", e))?;
        tx.execute(&tombstones.record_table(), &[&version]).await.map_err(|e| query_error("target truncate", e))?;
        Ok(())
    }

    fn upsert_sql(&self, which: Fields<'_>) -> String {
        let (mut u, _) = self.key_unnest(Unnest::default());
        let mut casts: Vec<String> =
            self.key.iter().enumerate().map(|(i, k)| format!("k{i}::{}", self.ty(k))).collect();
        let mut written: Vec<&String> = self.key.iter().collect();
        for (j, f) in self.value_fields() {
            u.column(format!("f{j}"), "text");
            casts.push(format!("f{j}::{}", self.ty(f)));
            written.push(f);
        }
        let mut columns: Vec<String> = written.iter().map(|c| quote_ident(c)).collect();
        let mut values = casts.clone();
        if let VersionGuard::Position { column } = &self.version {
            u.column("v", "text");
            columns.push(quote_ident(column));
            values.push("v".into());
        }
        if self.has_hash {
            columns.push(quote_ident(HASH_COLUMN));
            values.push(format!("md5(ROW({})::text)", casts.join(", ")));
        }
        let owned = |name: &str| match which {
            Fields::All => true,
            Fields::Owned(mask) => self.fields.iter().position(|f| f == name).is_none_or(|j| mask[j]),
        };
        let mut set: Vec<String> = self
            .value_fields()
            .filter(|(_, f)| owned(f))
            .map(|(_, f)| format!("{0} = EXCLUDED.{0}", quote_ident(f)))
            .collect();
        if let VersionGuard::Position { column } = &self.version {
            set.push(format!("{0} = EXCLUDED.{0}", quote_ident(column)));
        }
        let mut lhs: Vec<String> = Vec::new();
        let mut rhs: Vec<String> = Vec::new();
        for (_, f) in self.value_fields().filter(|(_, f)| owned(f)) {
            lhs.push(format!("t.{}", quote_ident(f)));
            rhs.push(format!("EXCLUDED.{}", quote_ident(f)));
        }
        if self.has_hash {
            let row: Vec<String> = written
                .iter()
                .map(
                    |c| if owned(c) { format!("EXCLUDED.{}", quote_ident(c)) } else { format!("t.{}", quote_ident(c)) },
                )
                .collect();
            let hash = format!("md5(ROW({})::text)", row.join(", "));
            set.push(format!("{} = {hash}", quote_ident(HASH_COLUMN)));
            lhs.push(format!("t.{}", quote_ident(HASH_COLUMN)));
            rhs.push(hash);
        }
        let mut guard: Vec<String> = Vec::new();
        match &self.version {
            VersionGuard::Position { column } => {
                guard.push(format!("(t.{0} IS NULL OR t.{0} < EXCLUDED.{0})", quote_ident(column)));
            }
            VersionGuard::Field { column } => {
                guard.push(format!("(t.{0} IS NULL OR t.{0} <= EXCLUDED.{0})", quote_ident(column)));
            }
            VersionGuard::None => {}
        }
        // A write that changes nothing is skipped: no dead tuple, and no change for a two-way
        // mirror to echo back.
        if !lhs.is_empty() {
            guard.push(format!("ROW({}) IS DISTINCT FROM ROW({})", lhs.join(", "), rhs.join(", ")));
        }
        let conflict_cols: Vec<String> = self.key.iter().map(|k| quote_ident(k)).collect();
        let action = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!(
                "DO UPDATE SET {} WHERE {}",
                set.join(", "),
                if guard.is_empty() { "true".into() } else { guard.join(" AND ") }
            )
        };
        let (with, unburied) = match &self.tombstones {
            Some(t) => (format!("WITH cleared AS ({}) ", t.clear(&u.from())), format!(" WHERE {}", t.unburied())),
            None => (String::new(), String::new()),
        };
        format!(
            "{with}INSERT INTO {} AS t ({}) SELECT {} FROM {}{unburied} ON CONFLICT ({}) {action}",
            qualified(&self.table),
            columns.join(", "),
            values.join(", "),
            u.from(),
            conflict_cols.join(", "),
        )
    }

    async fn run_upsert(&self, tx: &Transaction<'_>, sql: &str, rows: &[Row]) -> Result<(), tokio_postgres::Error> {
        let mut columns: Vec<Vec<Option<&str>>> = Vec::new();
        for i in 0..self.key.len() {
            columns.push(rows.iter().map(|r| r.key[i].as_deref()).collect());
        }
        for (j, _) in self.value_fields() {
            columns.push(rows.iter().map(|r| r.fields[j].as_deref()).collect());
        }
        if matches!(self.version, VersionGuard::Position { .. }) {
            columns.push(rows.iter().map(|r| r.version.as_deref()).collect());
        }
        let refs: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        tx.execute(sql, &refs).await.map(|_| ())
    }

    /// Adds the key columns (`k0`, `k1` ...) to `u`, with the conditions that match them to
    /// the table's key.
    fn key_unnest(&self, mut u: Unnest) -> (Unnest, Vec<String>) {
        let mut on = Vec::new();
        for (i, k) in self.key.iter().enumerate() {
            u.column(format!("k{i}"), "text");
            on.push(format!("t.{} = u.k{i}::{}", quote_ident(k), self.ty(k)));
        }
        (u, on)
    }

    fn delete_sql(&self) -> String {
        let (mut u, keys) = self.key_unnest(Unnest::default());
        let table = qualified(&self.table);
        // The position guard always comes with tombstones (see `introspect`).
        let (VersionGuard::Position { column }, Some(tombstones)) = (&self.version, &self.tombstones) else {
            return format!("DELETE FROM {table} AS t USING {} WHERE {}", u.from(), keys.join(" AND "));
        };
        u.column("v", "text");
        let column = quote_ident(column);
        let on = format!("{} AND (t.{column} IS NULL OR t.{column} < u.v)", keys.join(" AND "));
        // Both parts see the table as it was: a tombstone is recorded unless the record holds
        // this version or a newer one (then the delete is stale and the record guards itself).
        let stale = format!("EXISTS (SELECT 1 FROM {table} AS t WHERE {} AND t.{column} >= u.v)", keys.join(" AND "));
        format!(
            "WITH u AS (SELECT * FROM {}), deleted AS (DELETE FROM {table} AS t USING u WHERE {on}) {}",
            u.from(),
            tombstones.record(&format!("NOT {stale}"))
        )
    }

    async fn run_delete(&self, tx: &Transaction<'_>, sql: &str, rows: &[Row]) -> Result<(), tokio_postgres::Error> {
        let mut columns: Vec<Vec<Option<&str>>> = Vec::new();
        for i in 0..self.key.len() {
            columns.push(rows.iter().map(|r| r.key[i].as_deref()).collect());
        }
        if matches!(self.version, VersionGuard::Position { .. }) {
            columns.push(rows.iter().map(|r| r.version.as_deref()).collect());
        }
        let refs: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        tx.execute(sql, &refs).await.map(|_| ())
    }

    /// Reads the target's side of each key: whether it changed outside sluice, whether its
    /// timestamp field is newer than `source_ts` (text per key, cast to the field's type).
    pub async fn states(
        &self,
        client: &impl GenericClient,
        keys: &[Vec<Option<String>>],
        newest: Option<(&str, &[Option<String>])>,
    ) -> Result<HashMap<usize, State>> {
        let mut first = Unnest::default();
        first.column("i", "int4");
        let (mut u, on) = self.key_unnest(first);
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> =
            vec![Box::new((0..keys.len() as i32).collect::<Vec<i32>>())];
        for i in 0..self.key.len() {
            params.push(Box::new(keys.iter().map(|key| key[i].clone()).collect::<Vec<_>>()));
        }
        let written: Vec<String> = self
            .key
            .iter()
            .chain(self.value_fields().map(|(_, f)| f))
            .map(|c| format!("t.{}", quote_ident(c)))
            .collect();
        let newer = match newest {
            Some((field, ts)) => {
                u.column("s", "text");
                params.push(Box::new(ts.to_vec()));
                format!("COALESCE(t.{} > u.s::{}, false)", quote_ident(field), self.ty(field))
            }
            None => "false".into(),
        };
        let sql = format!(
            "SELECT u.i, md5(ROW({})::text) IS DISTINCT FROM t.{}, {newer}, to_jsonb(t)::text \
             FROM {} JOIN {} AS t ON {} FOR UPDATE OF t",
            written.join(", "),
            quote_ident(HASH_COLUMN),
            u.from(),
            qualified(&self.table),
            on.join(" AND ")
        );
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let rows = client.query(&sql, &refs).await.map_err(|e| query_error("target read", e))?;
        let mut out = HashMap::new();
        for r in rows {
            let i: i32 = r.get(0);
            let text: String = r.get(3);
            let mut row: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            if let Some(m) = row.as_object_mut() {
                m.remove(HASH_COLUMN);
                if let VersionGuard::Position { column } = &self.version {
                    m.remove(column);
                }
            }
            out.insert(i as usize, State { changed: r.get(1), target_newer: r.get(2), row });
        }
        Ok(out)
    }
}

/// A statement's array parameters as rows: `unnest($1::text[], ...) AS u(k0, ...)`.
#[derive(Default)]
struct Unnest {
    inputs: Vec<String>,
    names: Vec<String>,
}

impl Unnest {
    /// The next parameter, an array of `ty`, as column `name` of `u`.
    fn column(&mut self, name: impl Into<String>, ty: &str) {
        self.inputs.push(format!("${}::{ty}[]", self.inputs.len() + 1));
        self.names.push(name.into());
    }

    fn from(&self) -> String {
        format!("unnest({}) AS u({})", self.inputs.join(", "), self.names.join(", "))
    }
}

/// A batch statement, run whole or over parts of its rows.
enum Statement {
    Upsert(String),
    Delete(String),
}

/// Errors that belong to the data of some record: bad values (class 22), violated constraints
/// (23), values of the wrong type (42804). Anything else is not the record's fault.
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let c = db.code().code();
        c.starts_with("22") || c.starts_with("23") || c == "42804"
    })
}

/// A mapped value as the text PostgreSQL parses; `None` is SQL NULL.
pub fn cell_text(v: &Value, array: bool) -> Option<String> {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => None,
        ValueKind::Bool => Some(if v.is_true() { "true" } else { "false" }.into()),
        ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        ValueKind::Bytes => Some(format!("\\x{}", hex::encode(v.as_bytes().unwrap_or_default()))),
        ValueKind::Seq | ValueKind::Iterable if array => Some(array_literal(v)),
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
            Some(serde_json::to_string(v).unwrap_or_else(|_| v.to_string()))
        }
        _ => Some(v.to_string()),
    }
}

/// `{a,"b c",NULL}`: PostgreSQL's array input syntax.
fn array_literal(v: &Value) -> String {
    let items: Vec<String> = v
        .try_iter()
        .map(|it| {
            it.map(|item| match cell_text(&item, true) {
                None => "NULL".to_string(),
                Some(t) if item.kind() == minijinja::value::ValueKind::Seq => t,
                Some(t) => format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\"")),
            })
            .collect()
        })
        .unwrap_or_default();
    format!("{{{}}}", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_postgres_input_text() {
        assert_eq!(cell_text(&Value::from(()), false), None);
        assert_eq!(cell_text(&Value::from(true), false).as_deref(), Some("true"));
        assert_eq!(cell_text(&Value::from(12), false).as_deref(), Some("12"));
        assert_eq!(cell_text(&Value::from("12.50"), false).as_deref(), Some("12.50"));
        assert_eq!(cell_text(&Value::from_bytes(vec![1, 255]), false).as_deref(), Some("\\x01ff"));
        let seq = Value::from(vec![Value::from("a b"), Value::from(()), Value::from("q\"")]);
        assert_eq!(cell_text(&seq, true).as_deref(), Some("{\"a b\",NULL,\"q\\\"\"}"));
        assert_eq!(cell_text(&seq, false).as_deref(), Some("[\"a b\",null,\"q\\\"\"]"));
    }
}

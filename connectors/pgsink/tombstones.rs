//! Versions of deleted records, so a delete stays a delete against older changes.
//!
//! The position guard compares a change with the version the record holds. A deleted record
//! holds nothing, so without a tombstone an older upsert arriving after the delete (a member
//! that lost its Kafka partitions while its sink was still writing them, or any replay out of
//! order) would bring the record back. With tombstones every key behaves as one register whose
//! version is the newest change applied to it, whatever order the changes arrive in:
//! - a delete removes the record if older and raises the key's tombstone to its version;
//! - an upsert is skipped when the key's tombstone is at or above its version, and clears
//!   tombstones below it, so the table holds only keys that are deleted now;
//! - a truncate removes the records older than it and keeps one tombstone for the whole table
//!   (an empty key), which every older upsert also yields to.
//!
//! Two members may write one key at once (one still finishing a batch of partitions it lost, the
//! other starting on them). A statement decides from the snapshot it started with, so an upsert
//! that began before a concurrent delete committed would not see its tombstone, would wait for
//! the row the delete removes, and then insert it again. So every transaction that writes keys
//! first takes a lock per key (and the table's lock, shared; a truncate takes it alone): writers
//! of one key go one after the other, and each statement sees what the previous one committed.

use crate::connectors::postgres::client::{query_error, quote_ident, quote_literal};
use crate::error::{Error, Result};
use crate::event::TableId;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Transaction};

/// Keys a transaction locks one by one at most. PostgreSQL's lock table holds about
/// `max_locks_per_transaction` (64) × `max_connections` locks for all sessions together, so a
/// larger batch locks the whole table instead (its writers then take turns).
pub const MAX_KEY_LOCKS: usize = 1_000;

/// The tombstone table's name, created in the target table's schema.
pub const TABLE: &str = "sluice_tombstones";

/// The tombstones of one target table (shared by every sink that writes it).
#[derive(Debug, Clone)]
pub struct Tombstones {
    /// `"schema".sluice_tombstones`.
    table: String,
    /// The target table's name as a SQL literal: the tombstones of one target.
    target: String,
    /// Key columns, as `k0`, `k1` ... of the statement's `unnest` rows.
    key_columns: usize,
}

impl Tombstones {
    /// Creates the tombstone table next to `target` unless it exists.
    pub async fn ensure(client: &Client, target: &TableId, key_columns: usize) -> Result<Self> {
        let table = format!("{}.{}", quote_ident(&target.schema), quote_ident(TABLE));
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (target text NOT NULL, key text[] NOT NULL, \
             version text NOT NULL, PRIMARY KEY (target, key))"
        );
        if let Err(e) = client.batch_execute(&ddl).await {
            // Two sinks starting at once may race to create it; only its absence matters.
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .map_err(|e| query_error("tombstone table", e))?
                .get(0);
            if !exists {
                let reason = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
                return Err(Error::config(format!(
                    "cannot create {table}, which the version guard keeps deleted keys in ({reason}); \
                     create it as a user who may: {ddl}"
                )));
            }
        }
        Ok(Self { table, target: quote_literal(&format!("{}.{}", target.schema, target.name)), key_columns })
    }

    /// Takes, for the rest of `tx`, the table's lock shared and then the lock of every key in
    /// `keys` (each as its text), in one order for every writer, so none waits on another in a
    /// cycle. More than [`MAX_KEY_LOCKS`] keys take the table's lock alone instead.
    pub async fn lock_keys(&self, tx: &Transaction<'_>, keys: &[String]) -> Result<()> {
        if keys.len() > MAX_KEY_LOCKS {
            return self.lock_table(tx).await;
        }
        let table = format!("SELECT pg_advisory_xact_lock_shared({})", self.table_lock());
        // DISTINCT and ORDER BY keep the subquery from being merged: the locks are taken in order.
        let each = format!(
            "SELECT pg_advisory_xact_lock(s.h) FROM (SELECT DISTINCT hashtextextended({} || k, 0) AS h \
             FROM unnest($1::text[]) AS k ORDER BY 1) AS s",
            self.target
        );
        // Sent together (the client pipelines them), run in this order: one round trip.
        let params: [&(dyn ToSql + Sync); 1] = [&keys];
        futures::try_join!(tx.execute(&table, &[]), tx.execute(&each, &params))
            .map_err(|e| query_error("target key locks", e))?;
        Ok(())
    }

    /// Takes, for the rest of `tx`, the table's lock alone: no key is written until `tx` ends.
    pub async fn lock_table(&self, tx: &Transaction<'_>) -> Result<()> {
        let sql = format!("SELECT pg_advisory_xact_lock({})", self.table_lock());
        tx.execute(&sql, &[]).await.map_err(|e| query_error("target table lock", e))?;
        Ok(())
    }

    /// The advisory lock id of the target table, shared by key writers and taken alone by a
    /// truncate or a batch of too many keys.
    fn table_lock(&self) -> String {
        format!("hashtextextended({}, 0)", self.target)
    }

    /// The key of an `unnest` row `u` as the tombstone's key.
    fn key(&self) -> String {
        let parts: Vec<String> = (0..self.key_columns).map(|i| format!("u.k{i}")).collect();
        format!("ARRAY[{}]::text[]", parts.join(", "))
    }

    /// A condition on `unnest` row `u` (with version `u.v`): no delete of its key, and no
    /// truncate, at or after it.
    pub fn unburied(&self) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM {} AS x WHERE x.target = {} AND x.key IN ({}, '{{}}') AND x.version >= u.v)",
            self.table,
            self.target,
            self.key()
        )
    }

    /// A statement removing the tombstones older than the rows of `unnest` (`from`).
    pub fn clear(&self, from: &str) -> String {
        format!(
            "DELETE FROM {} AS x USING {from} WHERE x.target = {} AND x.key = {} AND x.version < u.v",
            self.table,
            self.target,
            self.key()
        )
    }

    /// A statement recording a truncate at version `$1`: the whole table's tombstone, whose key
    /// is empty (a delete's key never is).
    pub fn record_table(&self) -> String {
        format!(
            "INSERT INTO {} AS x (target, key, version) VALUES ({}, '{{}}', $1) \
             ON CONFLICT (target, key) DO UPDATE SET version = EXCLUDED.version WHERE x.version < EXCLUDED.version",
            self.table, self.target
        )
    }

    /// A statement recording the rows of CTE `u` for which `condition` holds as tombstones,
    /// keeping the newest version of each.
    pub fn record(&self, condition: &str) -> String {
        format!(
            "INSERT INTO {} AS x (target, key, version) SELECT {}, {}, u.v FROM u WHERE {condition} \
             ON CONFLICT (target, key) DO UPDATE SET version = EXCLUDED.version WHERE x.version < EXCLUDED.version",
            self.table,
            self.target,
            self.key()
        )
    }
}

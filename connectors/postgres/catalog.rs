//! Catalog queries: table shapes, keys, replica identity, types, the publication and the slot.

use super::client::{qualified, query_error, quote_ident};
use crate::error::{Error, Result};
use crate::event::{Column, ColumnType, TableId, TableSchema};
use std::collections::HashMap;
use tokio_postgres::Client;

/// What sluice needs to know about a captured table.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    pub schema: TableSchema,
}

/// A type's catalog entry, cached per OID.
#[derive(Debug, Clone)]
struct TypeInfo {
    name: String,
    kind: char,
    category: char,
    elem: u32,
    base: u32,
    base_typmod: i32,
    storage: char,
}

/// Catalog access on one ordinary connection, with a type cache.
pub struct Catalog {
    client: Client,
    types: HashMap<u32, TypeInfo>,
}

impl Catalog {
    pub fn new(client: Client) -> Self {
        Self { client, types: HashMap::new() }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Loads a table and checks it can be captured: it exists, has a primary key, and its
    /// replica identity lets deletes and updates be keyed.
    pub async fn table(&mut self, id: &TableId) -> Result<TableInfo> {
        let row = self
            .client
            .query_opt(
                "SELECT c.oid, c.relreplident::text, c.relkind::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&&*id.schema, &&*id.name],
            )
            .await
            .map_err(|e| query_error("catalog", e))?
            .ok_or_else(|| {
                Error::config(format!("table {id} does not exist; create it or remove it from source.tables"))
            })?;
        let oid: u32 = row.get(0);
        let identity: String = row.get(1);
        let kind: String = row.get(2);
        if kind == "p" {
            // Its changes are published under the partitions' names and its rows live in them.
            return Err(Error::config(format!(
                "{id} is a partitioned table; list its partitions in source.tables instead \
                 (SELECT relid FROM pg_partition_tree('{id}') WHERE isleaf)"
            )));
        }
        if kind != "r" {
            return Err(Error::config(format!("{id} is not a table (relkind {kind}); only tables can be captured")));
        }
        let pk = self.primary_key(oid).await?;
        if pk.is_empty() {
            return Err(Error::config(format!(
                "table {id} has no primary key; sluice keys every change by it. \
                 Add one (ALTER TABLE {} ADD PRIMARY KEY (...)) or remove the table from source.tables",
                qualified(id)
            )));
        }
        match identity.as_str() {
            "n" => {
                return Err(Error::config(format!(
                    "table {id} has REPLICA IDENTITY NOTHING, so its updates and deletes carry no key; \
                     run ALTER TABLE {} REPLICA IDENTITY DEFAULT",
                    qualified(id)
                )))
            }
            "f" => {
                tracing::warn!(table = %id, "REPLICA IDENTITY FULL writes the whole old row to WAL on every change; DEFAULT is enough for sluice")
            }
            "i" => {
                tracing::warn!(table = %id, "REPLICA IDENTITY USING INDEX: deletes are keyed by that index; sluice keys by the primary key, which must match it")
            }
            _ => {}
        }
        let rows = self
            .client
            .query(
                "SELECT attname::text, atttypid, atttypmod FROM pg_attribute WHERE attrelid = $1 \
                 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&oid],
            )
            .await
            .map_err(|e| query_error("catalog", e))?;
        let cols: Vec<(String, u32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        let schema = self.schema(id.clone(), &cols, &pk).await?;
        Ok(TableInfo { oid, schema })
    }

    /// The primary key columns of a table by OID, in key order.
    pub async fn primary_key(&self, oid: u32) -> Result<Vec<String>> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid \
                 AND a.attnum = ANY(i.indkey::int2[]) WHERE i.indrelid = $1 AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&oid],
            )
            .await
            .map_err(|e| query_error("catalog", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Builds a schema from column names, type OIDs and modifiers (as a Relation message gives).
    pub async fn schema(&mut self, table: TableId, cols: &[(String, u32, i32)], pk: &[String]) -> Result<TableSchema> {
        let mut columns = Vec::with_capacity(cols.len());
        for (name, oid, typmod) in cols {
            let (ty, toastable) = self.column_type(*oid, *typmod).await?;
            columns.push(Column { name: name.clone(), ty, key: pk.contains(name), toastable });
        }
        let toast_target = self.toast_target(&table).await?;
        Ok(TableSchema { table, columns, toast_target })
    }

    /// The table's `toast_tuple_target` (2032 unless set), or 0 when it has no TOAST table.
    async fn toast_target(&self, table: &TableId) -> Result<u32> {
        let row = self
            .client
            .query_opt(
                "SELECT c.reltoastrelid <> 0, coalesce((SELECT split_part(o, '=', 2)::int FROM unnest(c.reloptions) o \
                 WHERE o LIKE 'toast_tuple_target=%'), 2032) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&&*table.schema, &&*table.name],
            )
            .await
            .map_err(|e| query_error("catalog", e))?;
        Ok(match row {
            Some(r) if r.get::<_, bool>(0) => r.get::<_, i32>(1).max(0) as u32,
            _ => 0,
        })
    }

    async fn type_info(&mut self, oid: u32) -> Result<TypeInfo> {
        if let Some(t) = self.types.get(&oid) {
            return Ok(t.clone());
        }
        let row = self
            .client
            .query_one(
                "SELECT typname::text, typtype::text, typcategory::text, typelem, typbasetype, typtypmod, typstorage::text \
                 FROM pg_type WHERE oid = $1",
                &[&oid],
            )
            .await
            .map_err(|e| query_error("catalog: type", e))?;
        let ch = |s: String| s.chars().next().unwrap_or(' ');
        let info = TypeInfo {
            name: row.get(0),
            kind: ch(row.get(1)),
            category: ch(row.get(2)),
            elem: row.get(3),
            base: row.get(4),
            base_typmod: row.get(5),
            storage: ch(row.get(6)),
        };
        self.types.insert(oid, info.clone());
        Ok(info)
    }

    /// Maps a type to sluice's column type; also says whether values may be TOASTed.
    pub async fn column_type(&mut self, oid: u32, typmod: i32) -> Result<(ColumnType, bool)> {
        let mut oid = oid;
        let mut typmod = typmod;
        let mut info = self.type_info(oid).await?;
        while info.kind == 'd' {
            oid = info.base;
            if typmod < 0 {
                typmod = info.base_typmod;
            }
            info = self.type_info(oid).await?;
        }
        let toastable = info.storage != 'p';
        let ty = match oid {
            16 => ColumnType::Bool,
            21 => ColumnType::Int16,
            23 => ColumnType::Int32,
            20 | 26 => ColumnType::Int64,
            700 => ColumnType::Float32,
            701 => ColumnType::Float64,
            1700 => ColumnType::Numeric(numeric_typmod(typmod)),
            25 | 1043 | 1042 | 19 | 18 => ColumnType::Text,
            17 => ColumnType::Bytes,
            114 | 3802 => ColumnType::Json,
            2950 => ColumnType::Uuid,
            1082 => ColumnType::Date,
            1083 => ColumnType::Time,
            1266 => ColumnType::TimeTz,
            1114 => ColumnType::Timestamp,
            1184 => ColumnType::TimestampTz,
            1186 => ColumnType::Interval,
            _ if info.category == 'A' && info.elem != 0 => {
                let (elem, _) = Box::pin(self.column_type(info.elem, typmod)).await?;
                ColumnType::Array(Box::new(elem))
            }
            _ if info.kind == 'e' => ColumnType::Enum,
            _ => ColumnType::Other(info.name.clone()),
        };
        Ok((ty, toastable))
    }

    /// Creates the publication if missing and adds any listed table it lacks.
    pub async fn ensure_publication(&self, name: &str, tables: &[TableId]) -> Result<()> {
        let exists = self
            .client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(|e| query_error("publication", e))?
            .is_some();
        if !exists {
            let list: Vec<String> = tables.iter().map(qualified).collect();
            let sql = format!("CREATE PUBLICATION {} FOR TABLE {}", quote_ident(name), list.join(", "));
            match self.client.batch_execute(&sql).await {
                Ok(()) => {
                    tracing::info!(publication = name, "created publication");
                    return Ok(());
                }
                // Another member of the pipeline, starting at the same moment, created it.
                Err(e) if made_meanwhile(&e) => {}
                Err(e) => return Err(publication_error(name, e)),
            }
        }
        let rows = self
            .client
            .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&name])
            .await
            .map_err(|e| query_error("publication", e))?;
        let present: Vec<TableId> =
            rows.iter().map(|r| TableId::new(r.get::<_, String>(0), r.get::<_, String>(1))).collect();
        for t in tables.iter().filter(|t| !present.contains(t)) {
            let sql = format!("ALTER PUBLICATION {} ADD TABLE {}", quote_ident(name), qualified(t));
            match self.client.batch_execute(&sql).await {
                Ok(()) => tracing::info!(publication = name, table = %t, "added table to publication"),
                Err(e) if made_meanwhile(&e) => {}
                Err(e) => return Err(publication_error(name, e)),
            }
        }
        Ok(())
    }

    /// The slot's confirmed flush LSN, or `None` if it does not exist. A slot of another plugin
    /// or database is a configuration error.
    pub async fn slot_position(&self, slot: &str) -> Result<Option<u64>> {
        let row = self
            .client
            .query_opt(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text, current_database()::text, wal_status \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| query_error("replication slot", e))?;
        let Some(row) = row else { return Ok(None) };
        let plugin: Option<String> = row.get(0);
        let database: Option<String> = row.get(1);
        let current: String = row.get(3);
        if plugin.as_deref() != Some("pgoutput") || database.as_deref() != Some(current.as_str()) {
            return Err(Error::config(format!(
                "replication slot {slot} exists but belongs to plugin {plugin:?} on database {database:?}; \
                 choose another source.slot or drop it with SELECT pg_drop_replication_slot('{slot}')"
            )));
        }
        let wal_status: Option<String> = row.get(4);
        if wal_status.as_deref() == Some("lost") {
            return Err(Error::config(format!(
                "replication slot {slot} is invalidated (its WAL was removed, max_slot_wal_keep_size exceeded); \
                 changes were lost. Drop the slot and the pipeline's data directory to take a new snapshot"
            )));
        }
        let lsn: Option<String> = row.get(2);
        Ok(lsn.as_deref().and_then(crate::event::parse_lsn))
    }
}

/// The object a statement would create exists already: its name is taken (a unique violation
/// in the catalog, for a create that raced another) or it is a duplicate.
fn made_meanwhile(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| matches!(db.code().code(), "23505" | "42710"))
}

fn publication_error(name: &str, e: tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) if db.code().code() == "42501" => Error::config(format!(
            "not allowed to create or alter publication {name}: {}; create it as a superuser or the tables' owner",
            db.message()
        )),
        _ => query_error("publication", e),
    }
}

/// NUMERIC(p, s) from a type modifier; `None` when unconstrained.
fn numeric_typmod(typmod: i32) -> Option<(u16, u16)> {
    (typmod >= 4).then(|| {
        let t = typmod - 4;
        (((t >> 16) & 0xFFFF) as u16, (t & 0xFFFF) as u16)
    })
}

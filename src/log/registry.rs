//! Stable ids for table schemas: every event names the schema its rows follow by id.

use super::{EmbeddedLog, WriteBatch};
use crate::error::Result;
use crate::event::TableSchema;
use std::collections::HashMap;
use std::sync::Arc;

/// Assigns stable ids to table schemas; a schema change gets a new id.
pub struct SchemaRegistry {
    by_schema: HashMap<TableSchema, u32>,
    next: u32,
}

impl SchemaRegistry {
    pub async fn load(log: &EmbeddedLog) -> Result<Self> {
        let all = log.schemas().await?;
        let next = all.iter().map(|(id, _)| id + 1).max().unwrap_or(1);
        Ok(Self { by_schema: all.into_iter().map(|(id, s)| (s, id)).collect(), next })
    }

    /// The id of `schema`, registering it in `batch` if new.
    pub fn intern(&mut self, schema: TableSchema, batch: &mut WriteBatch) -> (u32, Arc<TableSchema>) {
        if let Some(&id) = self.by_schema.get(&schema) {
            return (id, Arc::new(schema));
        }
        let id = self.next;
        self.next += 1;
        batch.register_schema(id, schema.clone());
        self.by_schema.insert(schema.clone(), id);
        (id, Arc::new(schema))
    }
}

//! Writes one coalesced batch to the target in one transaction: conflicts decided against the
//! target's current state, refused records and parked conflicts set aside durably before the
//! transaction commits (so none is lost if the process dies in between; setting one aside twice
//! rewrites the same entry).

use super::target::{Fields, Rejected, Row, State, Target};
use crate::connectors::mapped::{Applied, Item};
use crate::connectors::postgres::client::query_error;
use crate::deadletter::{Entry, EntryStore, Reason};
use crate::error::Result;
use crate::mapping::coalesce::Write;
use crate::mapping::conflict::{decide, Decision, Strategy, TargetState};
use crate::mapping::context::{timestamptz_text, EventView, SchemaIndex};
use std::sync::Arc;
use tokio_postgres::Client;

pub struct Writer {
    pub sink: String,
    pub target: Target,
    pub strategy: Strategy,
    pub field_names: Vec<String>,
    pub dead: EntryStore,
    pub review: EntryStore,
}

impl Writer {
    /// Writes `items` (one per key) in one transaction. `force` replaces the strategy's
    /// decision (an operator resolving a conflict).
    pub async fn apply(&self, client: &mut Client, items: &[Item], force: Option<&Decision>) -> Result<Applied> {
        let mut applied = Applied::default();
        let keys: Vec<Vec<Option<String>>> = items.iter().map(|i| self.target.texts(&i.record.key, &[]).0).collect();
        let mut tx = self.target.begin(client, &keys).await?;
        // Read and locked in the transaction that writes: an edit on the target between the
        // decision and the write would otherwise be overwritten unseen.
        let states = if self.strategy.reads_target() && force.is_none() {
            let newest = self.newest_values(items);
            let newest = match (&self.strategy, &newest) {
                (Strategy::NewestWins { target_field, .. }, Some(v)) => Some((target_field.as_str(), v.as_slice())),
                _ => None,
            };
            self.target.states(&tx, &keys, newest).await?
        } else {
            Default::default()
        };
        let mut full = Vec::new();
        let mut owned: Vec<(Vec<bool>, Vec<usize>)> = Vec::new();
        let mut deletes = Vec::new();
        let mut parked = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let state = states.get(&i);
            let target_state = state.map(|s: &State| TargetState { changed: s.changed, target_newer: s.target_newer });
            let is_delete = item.write == Write::Delete;
            let decision = match force {
                Some(d) => d.clone(),
                None => decide(&self.strategy, target_state.as_ref(), is_delete, &self.field_names),
            };
            match decision {
                Decision::Write if is_delete => deletes.push(i),
                Decision::Write => full.push(i),
                Decision::WriteOwned(mask) => match owned.iter_mut().find(|(m, _)| *m == mask) {
                    Some((_, list)) => list.push(i),
                    None => owned.push((mask, vec![i])),
                },
                Decision::Keep => applied.kept += 1,
                Decision::Park => parked.push((i, state.map(|s| s.row.clone()))),
            }
        }
        let rows: Vec<Row> = items.iter().zip(&keys).map(|(item, key)| self.row(item, key.clone())).collect();
        let pick = |idx: &[usize]| idx.iter().map(|&i| rows[i].clone()).collect::<Vec<_>>();
        let mut rejected: Vec<(usize, String)> = Vec::new();
        let mut collect = |idx: &[usize], r: Vec<Rejected>| {
            rejected.extend(r.into_iter().map(|r| (idx[r.index], r.reason)));
        };
        let r = self.target.upsert(&mut tx, &pick(&full), Fields::All).await?;
        applied.upserted += (full.len() - r.len()) as u64;
        collect(&full, r);
        for (mask, idx) in &owned {
            let r = self.target.upsert(&mut tx, &pick(idx), Fields::Owned(mask)).await?;
            applied.upserted += (idx.len() - r.len()) as u64;
            collect(idx, r);
        }
        let r = self.target.delete(&mut tx, &pick(&deletes)).await?;
        applied.deleted += (deletes.len() - r.len()) as u64;
        collect(&deletes, r);
        for (i, reason) in rejected {
            applied.rejected += 1;
            tracing::warn!(sink = %self.sink, offset = items[i].record.offset, %reason, "target refused a record; dead-lettered");
            self.dead.put(self.entry(&items[i], Reason::Rejected, reason, None))?;
        }
        for (i, target) in parked {
            applied.parked += 1;
            let why = format!("the target changed this record too (strategy {})", self.strategy.name());
            self.review.put(self.entry(&items[i], Reason::Conflict, why, target))?;
        }
        tx.commit().await.map_err(|e| query_error("commit", e))?;
        Ok(applied)
    }

    /// The source side of newest_wins per item: the declared field, or a delete's commit time.
    fn newest_values(&self, items: &[Item]) -> Option<Vec<Option<String>>> {
        let Strategy::NewestWins { source, .. } = &self.strategy else { return None };
        // One column index per schema in the batch, not per record.
        let mut indexes: Vec<Arc<SchemaIndex>> = Vec::new();
        Some(
            items
                .iter()
                .map(|item| match item.write {
                    Write::Delete => Some(timestamptz_text(item.record.event.commit_ts_us)),
                    Write::Upsert(_) => {
                        let schema = &item.record.schema;
                        let index = match indexes.iter().find(|i| Arc::ptr_eq(&i.schema, schema)) {
                            Some(i) => i.clone(),
                            None => {
                                indexes.push(Arc::new(SchemaIndex::new(schema.clone())));
                                indexes.last().expect("just pushed").clone()
                            }
                        };
                        let ctx = EventView::value(item.record.event.clone(), index);
                        source.expr.eval(&ctx).ok().and_then(|v| super::target::cell_text(&v, false))
                    }
                })
                .collect(),
        )
    }

    fn row(&self, item: &Item, key: Vec<Option<String>>) -> Row {
        let fields = match &item.write {
            Write::Upsert(f) => self.target.texts(&[], f).1,
            Write::Delete => Vec::new(),
        };
        Row { key, fields, version: Some(item.record.event.position.to_string()) }
    }

    /// A record set aside, with its mapped form when it has one.
    pub fn entry(&self, item: &Item, reason: Reason, error: String, target: Option<serde_json::Value>) -> Entry {
        let mapped = match &item.write {
            Write::Upsert(fields) => Some(serde_json::Value::Object(
                self.field_names
                    .iter()
                    .zip(fields)
                    .map(|(n, v)| (n.clone(), serde_json::to_value(v).unwrap_or(serde_json::Value::Null)))
                    .collect(),
            )),
            Write::Delete => None,
        };
        Entry::new(
            item.record.offset,
            &self.sink,
            reason,
            error,
            &item.record.event,
            &item.record.schema,
            mapped,
            target,
        )
    }
}

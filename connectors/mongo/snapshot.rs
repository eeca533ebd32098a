//! A collection's snapshot: one scan in `_id` order, landed in chunks, each chunk committed
//! with the scan's position so a restart continues after the last landed document.

use super::document::JsonWriter;
use super::state::{state_key, CollectionState};
use super::Captured;
use crate::error::{Error, Result};
use crate::event::{ChangeEvent, Op, Position};
use crate::log::{EmbeddedLog, WriteBatch};
use crate::runtime::Shutdown;
use futures::TryStreamExt;
use mongodb::bson::{doc, spec::ElementType, Bson, Document};
use std::time::Duration;

/// How long a chunk waits for sinks that keep up before it lands anyway (as the PostgreSQL
/// snapshot does): they then read it from memory.
const READER_PATIENCE: Duration = Duration::from_millis(200);

/// BSON types in MongoDB's comparison order. `$gt` compares only within one type bracket, so
/// resuming after an `_id` must also take every `_id` of a type that sorts later.
const TYPE_ORDER: [&[ElementType]; 10] = [
    &[ElementType::MinKey],
    &[ElementType::Null],
    &[ElementType::Int32, ElementType::Int64, ElementType::Double, ElementType::Decimal128],
    &[ElementType::String, ElementType::Symbol],
    &[ElementType::EmbeddedDocument],
    &[ElementType::Array],
    &[ElementType::Binary],
    &[ElementType::ObjectId],
    &[ElementType::Boolean],
    &[ElementType::DateTime, ElementType::Timestamp, ElementType::RegularExpression, ElementType::MaxKey],
];

fn bracket(id: &Bson) -> usize {
    TYPE_ORDER.iter().position(|b| b.contains(&id.element_type())).unwrap_or(TYPE_ORDER.len() - 1)
}

/// The filter for every document after `id` in `_id` order, given the collection's greatest
/// `_id` now. When that is of `id`'s type bracket, so is everything between them, and `$gt`
/// alone is exact on any server; otherwise the later brackets are added by `$type`.
pub fn after_filter(id: Option<&Bson>, max: Option<&Bson>) -> Document {
    let Some(id) = id else { return Document::new() };
    let bracket = bracket(id);
    if max.is_none_or(|m| self::bracket(m) == bracket) {
        return doc! { "_id": { "$gt": id.clone() } };
    }
    let later: Vec<Bson> =
        TYPE_ORDER[bracket + 1..].iter().flat_map(|b| b.iter()).map(|t| Bson::Int32(*t as u8 as i32)).collect();
    if later.is_empty() {
        return doc! { "_id": { "$gt": id.clone() } };
    }
    doc! { "$or": [ { "_id": { "$gt": id.clone() } }, { "_id": { "$type": later } } ] }
}

/// Reads `collection` from where its state says, landing `chunk` documents per commit.
pub async fn run(
    coll: &mongodb::Collection<Document>,
    captured: &Captured,
    state: &mut CollectionState,
    chunk: u64,
    json: JsonWriter,
    log: &EmbeddedLog,
    shutdown: &Shutdown,
) -> Result<()> {
    let Some(snap) = state.snapshot.as_mut() else { return Ok(()) };
    let after = snap.after_id()?;
    tracing::info!(collection = %captured.table, resumed_after = snap.rows, "snapshot");
    let max = match &after {
        Some(_) => coll
            .find_one(Document::new())
            .sort(doc! { "_id": -1 })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(|e| super::error("snapshot", &captured.table, e))?
            .and_then(|d| d.get("_id").cloned()),
        None => None,
    };
    let mut cursor = coll
        .find(after_filter(after.as_ref(), max.as_ref()))
        .sort(doc! { "_id": 1 })
        .batch_size(chunk.min(10_000) as u32)
        .await
        .map_err(|e| super::error("snapshot", &captured.table, e))?;
    let ts_us = ((snap.at >> 32) as i64) * 1_000_000;
    // One document of look-ahead tells which row is the collection's last.
    let mut pending: Option<Document> = None;
    let mut batch = WriteBatch::new();
    loop {
        if shutdown.is_requested() {
            return Ok(());
        }
        let next = cursor.try_next().await.map_err(|e| super::error("snapshot", &captured.table, e))?;
        let last = next.is_none();
        if let Some(doc) = pending.take() {
            let snap = state.snapshot.as_mut().expect("snapshot in progress");
            let id = doc
                .get("_id")
                .cloned()
                .ok_or_else(|| Error::permanent("snapshot", format!("{}: a document has no _id", captured.table)))?;
            batch.append(ChangeEvent {
                table: captured.table.clone(),
                schema_id: captured.schema_id,
                op: Op::Read,
                key: vec![json.key(id.clone())],
                before: None,
                after: Some(json.row(&id, Some(doc), None)),
                position: Position::snapshot(snap.at, snap.rows),
                commit_ts_us: ts_us,
                tx_id: None,
                toast_fetched: false,
                snapshot_last: last,
                origin: None,
            });
            snap.rows += 1;
            snap.set_after_id(&id)?;
        }
        pending = next;
        if batch.len() as u64 >= chunk || (last && !batch.is_empty()) {
            let n = batch.len();
            if last {
                state.snapshot = None;
            }
            land(std::mem::take(&mut batch), captured, state, log).await?;
            metrics::counter!("sluice_snapshot_rows_total", "table" => captured.table.to_string()).increment(n as u64);
            log.make_room(n, READER_PATIENCE).await;
        }
        if last {
            if state.snapshot.take().is_some() {
                // An empty collection: its snapshot is done with no rows.
                land(WriteBatch::new(), captured, state, log).await?;
            }
            tracing::info!(collection = %captured.table, "snapshot done");
            return Ok(());
        }
    }
}

/// Commits rows with the collection's state.
async fn land(mut batch: WriteBatch, captured: &Captured, state: &CollectionState, log: &EmbeddedLog) -> Result<()> {
    batch.uses_schema(captured.schema_id, &captured.schema);
    batch.put_meta(state_key(&captured.name), state.encode()?);
    let events = batch.len();
    log.commit(batch).await?;
    metrics::counter!("sluice_events_in_total").increment(events as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    #[test]
    fn resuming_takes_later_types_too() {
        assert_eq!(after_filter(None, None), Document::new());
        let k = Bson::String("k".into());
        // Nothing of a later type: `$gt` alone.
        assert_eq!(after_filter(Some(&k), Some(&Bson::String("z".into()))), doc! { "_id": { "$gt": k.clone() } });
        let f = after_filter(Some(&k), Some(&Bson::Boolean(true)));
        let types = f.get_array("$or").unwrap()[1].as_document().unwrap().get_document("_id").unwrap();
        let types: Vec<i32> = types.get_array("$type").unwrap().iter().map(|t| t.as_i32().unwrap()).collect();
        // Object, array, binary, ObjectId, bool, date, timestamp, regex, max key: not numbers.
        assert_eq!(types, vec![3, 4, 5, 7, 8, 9, 17, 11, 127]);
        let oid = Bson::ObjectId(ObjectId::new());
        let f = after_filter(Some(&oid), Some(&Bson::DateTime(mongodb::bson::DateTime::now())));
        assert_eq!(f.get_array("$or").unwrap()[0], Bson::Document(doc! { "_id": { "$gt": oid } }));
        assert_eq!(after_filter(Some(&Bson::MaxKey), Some(&Bson::MaxKey)), doc! { "_id": { "$gt": Bson::MaxKey } });
    }
}

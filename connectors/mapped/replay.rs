//! `sluice dlq replay` for sinks whose target writes by key (the CRM sinks): each dead letter's
//! change is mapped with the current pipeline file and written through the sink's own
//! [`Target`], so a fixed mapping or a fixed target record lets it through. Records refused
//! again go back to the queue with the new reason, one more attempt counted.

use super::{Connect, Item, Record, Target};
use crate::deadletter::{now_text, EntryStore};
use crate::error::Result;
use crate::mapping::coalesce::Write;
use crate::mapping::{Mapped, Mapper, MappingConfig};
use std::sync::Arc;

/// What happened to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written (or, when the current mapping skips it, nothing to write); the entry is gone.
    Done,
    /// Failed again; the entry stays with the new error and one more attempt.
    Failed(String),
    /// No such entry.
    Missing,
}

/// Replays entries `ids` of `dead` through `connector`'s target.
pub async fn replay<C: Connect>(
    connector: &C,
    mapping: MappingConfig,
    dead: &EntryStore,
    ids: &[u64],
) -> Result<Vec<(u64, Outcome)>> {
    let mut mapper = Mapper::new(mapping);
    let mut target: Option<C::Target> = None;
    let mut out = Vec::new();
    for &id in ids {
        let Some(mut entry) = dead.get(id)? else {
            out.push((id, Outcome::Missing));
            continue;
        };
        let schema = Arc::new(entry.schema.clone());
        mapper.prepare(entry.change.schema_id, schema.clone())?;
        let event = Arc::new(entry.change.clone());
        let item = |key, write| Item {
            record: Record { offset: entry.id, event: event.clone(), schema: schema.clone(), key },
            write,
        };
        let item = match mapper.map(&event) {
            Ok(Mapped::Upsert { key, fields }) => item(key, Write::Upsert(fields)),
            Ok(Mapped::Delete { key }) => item(key, Write::Delete),
            Ok(Mapped::Skip(_) | Mapped::Truncate) => {
                dead.remove(id)?;
                out.push((id, Outcome::Done));
                continue;
            }
            Err(e) => {
                // `put` counts the attempt and keeps the first failure's time.
                (entry.error, entry.last_failed_at) = (e.0.clone(), now_text());
                dead.put(entry)?;
                out.push((id, Outcome::Failed(e.0)));
                continue;
            }
        };
        if target.is_none() {
            target = Some(connector.connect(&mapper).await?);
        }
        let applied = target.as_mut().expect("connected above").write_batch(vec![item]).await?;
        if applied.rejected == 0 {
            dead.remove(id)?;
            out.push((id, Outcome::Done));
        } else {
            // The target set the record aside again, with the new reason.
            let why = dead.get(id)?.map(|e| e.error).unwrap_or_else(|| "refused".into());
            out.push((id, Outcome::Failed(why)));
        }
    }
    Ok(out)
}

//! Working the queues from the CLI: replaying dead letters through the current mapping, and
//! resolving parked conflicts. Both write through the same [`Writer`] as the running sink, with
//! the same version guard, so a replayed old change never overwrites a newer one.

use super::open;
use super::writer::Writer;
use crate::config::PostgresSinkConfig;
use crate::connectors::mapped::{Item, Record};
use crate::deadletter::{now_text, Entry, EntryStore};
use crate::error::{Error, Result};
use crate::mapping::coalesce::Write;
use crate::mapping::conflict::Decision;
use crate::mapping::{Mapped, Mapper};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres::Client;

pub use crate::connectors::mapped::replay::Outcome;

/// Which side an operator takes for a parked conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Source,
    Target,
    Merged,
}

/// A connection and mapper for one sink, opened on first use.
struct Session<'a> {
    cfg: &'a PostgresSinkConfig,
    pipeline: &'a str,
    dead: EntryStore,
    review: EntryStore,
    mapper: Mapper,
    open: Option<(Client, Writer)>,
}

impl<'a> Session<'a> {
    fn new(cfg: &'a PostgresSinkConfig, pipeline: &'a str, data_dir: &Path) -> Self {
        Self {
            cfg,
            pipeline,
            dead: EntryStore::dead_letters(data_dir, &cfg.name),
            review: EntryStore::conflicts(data_dir, &cfg.name),
            mapper: Mapper::new(cfg.mapping.clone()),
            open: None,
        }
    }

    /// Maps an entry's change with the current mapping into the item to write (none to skip).
    async fn item(&mut self, entry: &Entry) -> Result<Result<Option<Item>, String>> {
        let schema = Arc::new(entry.schema.clone());
        self.mapper.prepare(entry.change.schema_id, schema.clone())?;
        if self.open.is_none() {
            self.open = Some(open(self.cfg, self.pipeline, &self.mapper, &self.dead, &self.review).await?);
        }
        let event = Arc::new(entry.change.clone());
        let item = |key, write| Item {
            record: Record { offset: entry.id, event: event.clone(), schema: schema.clone(), key },
            write,
        };
        Ok(match self.mapper.map(&event) {
            Ok(Mapped::Upsert { key, fields }) => Ok(Some(item(key, Write::Upsert(fields)))),
            Ok(Mapped::Delete { key }) => Ok(Some(item(key, Write::Delete))),
            Ok(Mapped::Skip(_) | Mapped::Truncate) => Ok(None),
            Err(e) => Err(e.0),
        })
    }

    async fn apply(&mut self, item: &Item, force: Option<&Decision>) -> Result<bool> {
        let (client, writer) = self.open.as_mut().expect("opened by item()");
        let applied = writer.apply(client, std::slice::from_ref(item), force).await?;
        Ok(applied.rejected == 0)
    }
}

/// Replays dead letters through the current mapping; entries that now succeed are removed.
pub async fn replay(
    cfg: &PostgresSinkConfig,
    pipeline: &str,
    data_dir: &Path,
    ids: &[u64],
) -> Result<Vec<(u64, Outcome)>> {
    let mut session = Session::new(cfg, pipeline, data_dir);
    let mut out = Vec::new();
    for &id in ids {
        let Some(mut entry) = session.dead.get(id)? else {
            out.push((id, Outcome::Missing));
            continue;
        };
        let outcome = match session.item(&entry).await? {
            Ok(None) => Outcome::Done,
            Ok(Some(item)) if session.apply(&item, None).await? => Outcome::Done,
            // The writer set the refused record aside again, with the new reason.
            Ok(Some(_)) => Outcome::Failed(session.dead.get(id)?.map(|e| e.error).unwrap_or_else(|| "refused".into())),
            Err(message) => {
                // `put` counts the attempt and keeps the first failure's time.
                entry.error = message.clone();
                entry.last_failed_at = now_text();
                session.dead.put(entry)?;
                Outcome::Failed(message)
            }
        };
        if outcome == Outcome::Done {
            session.dead.remove(id)?;
        }
        out.push((id, outcome));
    }
    Ok(out)
}

/// Applies an operator's decision to a parked conflict and removes it from the review queue.
pub async fn resolve(
    cfg: &PostgresSinkConfig,
    pipeline: &str,
    data_dir: &Path,
    id: u64,
    take: Take,
) -> Result<Outcome> {
    let mut session = Session::new(cfg, pipeline, data_dir);
    let Some(entry) = session.review.get(id)? else { return Ok(Outcome::Missing) };
    let item = match session.item(&entry).await? {
        Ok(Some(item)) => item,
        Ok(None) => {
            session.review.remove(id)?;
            return Ok(Outcome::Done);
        }
        Err(message) => return Err(Error::permanent(format!("conflict {id}"), message)),
    };
    let is_delete = item.write == Write::Delete;
    let fields = session.mapper.field_names().to_vec();
    let decision = match take {
        Take::Source => Decision::Write,
        // Keeping the target's record: record its current state as seen, so the next source
        // change is compared against it instead of conflicting again.
        Take::Target if is_delete => {
            session.review.remove(id)?;
            return Ok(Outcome::Done);
        }
        Take::Target => Decision::WriteOwned(vec![false; fields.len()]),
        Take::Merged => cfg.conflict.merged(is_delete, &fields),
    };
    if session.apply(&item, Some(&decision)).await? {
        session.review.remove(id)?;
        Ok(Outcome::Done)
    } else {
        let reason = session.dead.get(id)?.map(|e| e.error).unwrap_or_else(|| "refused".into());
        Ok(Outcome::Failed(reason))
    }
}

//! Durable queues of records set aside: the dead-letter queue (records that failed mapping or
//! that a sink rejected) and the review queue of `manual` conflicts.
//!
//! One JSON file per record, written to a temporary name, fsynced and renamed, so an entry is
//! either whole or absent after a crash, `sluice dlq` can work while the pipeline runs, and an
//! operator can read the queue with `cat`. An entry's id is the log offset of its change, so
//! setting the same change aside twice (a replay after a crash) rewrites one entry.

use crate::error::{Error, Result};
use crate::event::{ChangeEvent, TableSchema};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why a record was set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The mapping failed for it (a bad value, a failed coercion).
    Mapping,
    /// The target refused it permanently.
    Rejected,
    /// The target changed it too, and the strategy is `manual`.
    Conflict,
}

/// One record set aside, with everything needed to retry it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The log offset of the change.
    pub id: u64,
    pub sink: String,
    pub reason: Reason,
    /// The error, or the conflict, in words.
    pub error: String,
    /// Times the record has been tried (1 when first set aside).
    pub attempts: u32,
    pub first_failed_at: String,
    pub last_failed_at: String,
    /// The change as it came from the source, with its schema.
    pub change: ChangeEvent,
    pub schema: TableSchema,
    /// The mapped record as `{field: value}`, when mapping got that far.
    pub mapped: Option<serde_json::Value>,
    /// The target's record as `{field: value}` (conflicts).
    pub target: Option<serde_json::Value>,
}

impl Entry {
    /// A record set aside now, for the first time.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        sink: &str,
        reason: Reason,
        error: String,
        change: &ChangeEvent,
        schema: &TableSchema,
        mapped: Option<serde_json::Value>,
        target: Option<serde_json::Value>,
    ) -> Self {
        let now = now_text();
        Self {
            id,
            sink: sink.to_string(),
            reason,
            error,
            attempts: 1,
            first_failed_at: now.clone(),
            last_failed_at: now,
            change: change.clone(),
            schema: schema.clone(),
            mapped,
            target,
        }
    }
}

/// A directory of entries.
#[derive(Debug, Clone)]
pub struct EntryStore {
    dir: PathBuf,
}

impl EntryStore {
    /// The dead-letter queue of `sink` in a pipeline's data directory.
    pub fn dead_letters(data_dir: &Path, sink: &str) -> Self {
        Self { dir: data_dir.join("dlq").join(sink) }
    }

    /// The review queue of `sink`'s manual conflicts.
    pub fn conflicts(data_dir: &Path, sink: &str) -> Self {
        Self { dir: data_dir.join("conflicts").join(sink) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.json"))
    }

    /// Stores `entry` durably; an entry with the same id keeps its first time and counts attempts.
    pub fn put(&self, mut entry: Entry) -> Result<()> {
        if let Some(old) = self.get(entry.id)? {
            entry.first_failed_at = old.first_failed_at;
            entry.attempts = entry.attempts.max(old.attempts + 1);
        }
        let text = serde_json::to_vec_pretty(&entry)
            .map_err(|e| Error::Storage(format!("cannot encode dead letter {}: {e}", entry.id)))?;
        write_whole(&self.dir, &format!("{:020}.json", entry.id), &text)
    }

    pub fn get(&self, id: u64) -> Result<Option<Entry>> {
        match std::fs::read(self.path(id)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Storage(format!("{}: {e}", self.path(id).display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Storage(format!("{}: {e}", self.path(id).display()))),
        }
    }

    /// Ids of all entries, oldest change first.
    pub fn ids(&self) -> Result<Vec<u64>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::Storage(format!("{}: {e}", self.dir.display()))),
        };
        let mut ids: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Removes an entry; false if there was none.
    pub fn remove(&self, id: u64) -> Result<bool> {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::Storage(format!("{}: {e}", self.path(id).display()))),
        }
    }
}

/// Writes `bytes` as `dir/name` so that after a crash the file is either whole or absent:
/// written under a temporary name, fsynced, renamed, and the directory fsynced.
pub fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| Error::Storage(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Now as RFC 3339, for entry times.
pub fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, Position, TableId, Value};

    fn entry(id: u64) -> Entry {
        Entry {
            id,
            sink: "s".into(),
            reason: Reason::Mapping,
            error: "bad".into(),
            attempts: 1,
            first_failed_at: "t1".into(),
            last_failed_at: "t1".into(),
            change: ChangeEvent {
                table: TableId::new("public", "t"),
                schema_id: 1,
                op: Op::Insert,
                key: vec![Value::Int(1)],
                before: None,
                after: Some(vec![Value::Int(1), Value::Numeric("1.50".into())]),
                position: Position::change(5, 1),
                commit_ts_us: 7,
                tx_id: Some(3),
                toast_fetched: false,
                snapshot_last: false,
                origin: None,
            },
            schema: TableSchema { table: TableId::new("public", "t"), columns: vec![], toast_target: 0 },
            mapped: None,
            target: None,
        }
    }

    #[test]
    fn entries_round_trip_and_count_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let store = EntryStore::dead_letters(dir.path(), "s");
        assert!(store.ids().unwrap().is_empty());
        store.put(entry(12)).unwrap();
        store.put(entry(3)).unwrap();
        let mut again = entry(12);
        again.first_failed_at = "t2".into();
        store.put(again).unwrap();
        assert_eq!(store.ids().unwrap(), vec![3, 12]);
        let e = store.get(12).unwrap().unwrap();
        assert_eq!((e.attempts, e.first_failed_at.as_str()), (2, "t1"));
        assert_eq!(e.change, entry(12).change);
        assert!(store.remove(12).unwrap());
        assert!(!store.remove(12).unwrap());
        assert_eq!(store.ids().unwrap(), vec![3]);
    }
}

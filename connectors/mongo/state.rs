//! What the source keeps per collection in the log's metadata, committed with the events.

use crate::error::{Error, Result};
use crate::event::{Phase, Position};
use mongodb::bson::{self, Bson, Document, Timestamp};
use serde::{Deserialize, Serialize};

/// The metadata key of one collection's state.
pub fn state_key(collection: &str) -> String {
    format!("mongo.collection.{collection}")
}

/// A cluster time as one ordered number: seconds in the high half, the increment in the low.
pub fn time_value(t: Timestamp) -> u64 {
    (u64::from(t.time) << 32) | u64::from(t.increment)
}

/// Where one collection's capture stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CollectionState {
    /// The resume token (BSON bytes) after the last change landed; `None` until the stream was
    /// first opened, and again when the collection must be read anew.
    pub token: Option<Vec<u8>>,
    /// The token is an invalidate's: restart with `startAfter`, not `resumeAfter`.
    pub after_invalidate: bool,
    /// A snapshot in progress.
    pub snapshot: Option<SnapshotState>,
}

/// A snapshot scan in `_id` order, resumable after its last landed document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The cluster time the scan's rows sit at: no later than the stream's start.
    pub at: u64,
    /// The last `_id` landed (BSON bytes of `{_id: ...}`).
    pub after: Option<Vec<u8>>,
    pub rows: u64,
}

impl CollectionState {
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(postcard::from_bytes(bytes)?)
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        Ok(postcard::to_allocvec(self)?)
    }

    pub fn token(&self) -> Result<Option<Document>> {
        self.token
            .as_deref()
            .map(|b| bson::from_slice(b).map_err(|e| Error::Storage(format!("resume token: {e}"))))
            .transpose()
    }

    pub fn set_token(&mut self, token: &Document, after_invalidate: bool) -> Result<()> {
        self.token = Some(bson::to_vec(token).map_err(|e| Error::Storage(format!("resume token: {e}")))?);
        self.after_invalidate = after_invalidate;
        Ok(())
    }
}

/// The metadata key of the [`PositionClock`].
pub const CLOCK_KEY: &str = "mongo.clock";

/// Hands out change positions in landing order across every collection's stream.
///
/// The log keeps change positions strictly increasing (it drops a change at or below the last
/// one as a replay), while the streams of several collections interleave and many changes may
/// share a cluster time. So a change sits at its cluster time when that is ahead of the last
/// position, and right after the last position otherwise. Per document, that is stream order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionClock {
    pub last: Option<(u64, u64)>,
}

impl PositionClock {
    /// The position of the next change at `cluster_time`: never behind the last one.
    pub fn next_position(&mut self, cluster_time: u64) -> Position {
        let next = match self.last {
            Some((t, seq)) if cluster_time <= t => (t, seq + 1),
            _ => (cluster_time, 0),
        };
        self.last = Some(next);
        Position { lsn: next.0, phase: Phase::Change, seq: next.1 }
    }

    /// The earliest cluster time a new snapshot's rows may sit at: after every landed change,
    /// so a collection read again is never older than what its stream landed before.
    pub fn snapshot_floor(&self) -> u64 {
        self.last.map(|(t, _)| t + 1).unwrap_or(0)
    }
}

impl SnapshotState {
    pub fn after_id(&self) -> Result<Option<Bson>> {
        let Some(bytes) = &self.after else { return Ok(None) };
        let doc: Document = bson::from_slice(bytes).map_err(|e| Error::Storage(format!("snapshot position: {e}")))?;
        Ok(doc.get("_id").cloned())
    }

    pub fn set_after_id(&mut self, id: &Bson) -> Result<()> {
        let doc = bson::doc! { "_id": id.clone() };
        self.after = Some(bson::to_vec(&doc).map_err(|e| Error::Storage(format!("snapshot position: {e}")))?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn positions_never_move_backward_and_survive_a_restart() {
        let mut s = PositionClock::default();
        let t = time_value(Timestamp { time: 100, increment: 1 });
        assert_eq!(s.next_position(t), Position::change(t, 0));
        assert_eq!(s.next_position(t), Position::change(t, 1));
        // A cluster time from a server whose clock stepped back still sorts after.
        assert_eq!(s.next_position(t - 5), Position::change(t, 2));
        let mut restored: PositionClock = postcard::from_bytes(&postcard::to_allocvec(&s).unwrap()).unwrap();
        assert_eq!(restored.next_position(t), Position::change(t, 3));
        assert_eq!(restored.next_position(t + 1), Position::change(t + 1, 0));
        assert_eq!(restored.snapshot_floor(), t + 2);
    }

    #[test]
    fn tokens_and_snapshot_ids_round_trip() {
        let mut s = CollectionState::default();
        s.set_token(&doc! { "_data": "82ABC" }, true).unwrap();
        let mut snap = SnapshotState { at: 7, after: None, rows: 0 };
        snap.set_after_id(&Bson::String("k-9".into())).unwrap();
        s.snapshot = Some(snap);
        let back = CollectionState::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back.token().unwrap(), Some(doc! { "_data": "82ABC" }));
        assert!(back.after_invalidate);
        assert_eq!(back.snapshot.unwrap().after_id().unwrap(), Some(Bson::String("k-9".into())));
    }
}

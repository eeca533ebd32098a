//! Change-stream event documents, decoded into what the source needs from them.
//!
//! Events are read as raw documents (not the driver's typed struct) so that every shape the
//! server can send is handled here, in one place, and tested on the documents MongoDB's
//! documentation shows, including those the test server cannot produce.

use crate::event::Op;
use mongodb::bson::{Bson, Document, Timestamp};

/// One decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The event's resume token (`_id`).
    pub token: Document,
    /// The oplog time of the event; absent only on an invalidate from some servers.
    pub cluster_time: Option<Timestamp>,
    /// Wall-clock time of the operation (MongoDB 6.0+), milliseconds since the epoch.
    pub wall_ms: Option<i64>,
    /// The transaction number, for events of a multi-document transaction.
    pub txn: Option<i64>,
    pub kind: ChangeKind,
}

/// Made once per event and moved, never stored in bulk, so the variants' size gap costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    /// A document was inserted, updated, replaced or deleted.
    Document {
        op: Op,
        id: Bson,
        /// The document after the change: always for insert and replace; for update when the
        /// stream asks for it and the server still has it.
        after: Option<Document>,
        /// The pre-image, when the collection records them and the stream asks.
        before: Option<Document>,
        /// `updatedFields`, `removedFields` and `truncatedArrays` of an update.
        update: Option<Document>,
    },
    /// The collection was dropped (or its database): every document is gone.
    Dropped,
    /// The collection was renamed to `to` (`db.coll`): its documents left this name.
    Renamed { to: String },
    /// The stream ended; it can be restarted after this event with `startAfter`.
    Invalidate,
    /// An event of a kind the source does not act on (createIndexes, modify, ...), still a
    /// resume point.
    Other(String),
}

/// A change-stream document the source cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("change event {what}")]
pub struct DecodeError {
    pub what: String,
}

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError { what: what.into() }
}

/// Decodes one (reassembled) change event.
pub fn decode(mut event: Document) -> Result<Change, DecodeError> {
    let token = match event.remove("_id") {
        Some(Bson::Document(t)) => t,
        Some(other) => return Err(bad(format!("has a resume token that is not a document: {other}"))),
        None => return Err(bad("has no _id (resume token); a pipeline stage must not remove it")),
    };
    let op_type = match event.remove("operationType") {
        Some(Bson::String(s)) => s,
        _ => return Err(bad("has no operationType")),
    };
    let cluster_time = match event.get("clusterTime") {
        Some(Bson::Timestamp(t)) => Some(*t),
        _ => None,
    };
    let wall_ms = match event.get("wallTime") {
        Some(Bson::DateTime(d)) => Some(d.timestamp_millis()),
        _ => None,
    };
    let txn = match event.get("txnNumber") {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        _ => None,
    };
    let document = |event: &mut Document, field: &str| match event.remove(field) {
        Some(Bson::Document(d)) => Ok(Some(d)),
        None | Some(Bson::Null) => Ok(None),
        Some(other) => Err(bad(format!("{op_type}: {field} is not a document: {other}"))),
    };
    let kind = match op_type.as_str() {
        "insert" | "update" | "replace" | "delete" => {
            let id = match document(&mut event, "documentKey")? {
                Some(mut key) => key.remove("_id").ok_or_else(|| bad(format!("{op_type}: documentKey has no _id")))?,
                None => return Err(bad(format!("{op_type}: has no documentKey"))),
            };
            let after = document(&mut event, "fullDocument")?;
            let before = document(&mut event, "fullDocumentBeforeChange")?;
            let (op, update) = match op_type.as_str() {
                "insert" => {
                    if after.is_none() {
                        return Err(bad("insert: has no fullDocument"));
                    }
                    (Op::Insert, None)
                }
                "replace" => {
                    if after.is_none() {
                        return Err(bad("replace: has no fullDocument"));
                    }
                    (Op::Update, None)
                }
                "update" => (Op::Update, document(&mut event, "updateDescription")?),
                _ => (Op::Delete, None),
            };
            ChangeKind::Document { op, id, after: if op == Op::Delete { None } else { after }, before, update }
        }
        "drop" | "dropDatabase" => ChangeKind::Dropped,
        "rename" => {
            let to = match event.get_document("to") {
                Ok(to) => {
                    format!("{}.{}", to.get_str("db").unwrap_or_default(), to.get_str("coll").unwrap_or_default())
                }
                Err(_) => return Err(bad("rename: has no `to` namespace")),
            };
            ChangeKind::Renamed { to }
        }
        "invalidate" => ChangeKind::Invalidate,
        other => ChangeKind::Other(other.to_string()),
    };
    Ok(Change { token, cluster_time, wall_ms, txn, kind })
}

/// Joins the fragments `$changeStreamSplitLargeEvent` cuts an event of over 16 MiB into.
///
/// Each fragment carries `splitEvent: {fragment: i, of: n}` and some of the event's top-level
/// fields; the event is their union. Only the last fragment's `_id` resumes after the whole
/// event, so the joined event keeps that one.
#[derive(Debug, Default)]
pub struct Reassembly {
    parts: Option<(Document, i32)>,
}

impl Reassembly {
    /// No fragment is waiting for the rest of its event.
    pub fn is_empty(&self) -> bool {
        self.parts.is_none()
    }

    /// Adds an event or fragment; returns a whole event when one is complete.
    pub fn push(&mut self, mut fragment: Document) -> Result<Option<Document>, DecodeError> {
        let Some(split) = fragment.remove("splitEvent") else {
            if self.parts.is_some() {
                return Err(bad("arrived whole while a split event was still missing fragments"));
            }
            return Ok(Some(fragment));
        };
        let Bson::Document(split) = split else { return Err(bad("splitEvent is not a document")) };
        let (Ok(i), Ok(n)) = (split.get_i32("fragment"), split.get_i32("of")) else {
            return Err(bad("splitEvent lacks fragment or of"));
        };
        let expected = self.parts.as_ref().map(|(_, seen)| seen + 1).unwrap_or(1);
        if i != expected || i > n {
            return Err(bad(format!("fragment {i} of {n} arrived when fragment {expected} was due")));
        }
        let mut joined = self.parts.take().map(|(d, _)| d).unwrap_or_default();
        for (k, v) in fragment {
            joined.insert(k, v);
        }
        if i == n {
            Ok(Some(joined))
        } else {
            self.parts = Some((joined, i));
            Ok(None)
        }
    }
}

#[cfg(test)]
#[path = "change_tests.rs"]
mod tests;

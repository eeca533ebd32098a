//! Batches in flight: written to the target by a background task while the sink maps the next
//! ones, so the target's round trips and the mapping's CPU overlap instead of taking turns.
//!
//! A flight owns the target while it runs and gives it back when it lands, with the segments it
//! could not write (after an error, to be sent again first) and the last offset it made
//! durable. Segments are written strictly in order.

use super::{Applied, Item, Key, Record, Target};
use crate::deadletter::{Entry, EntryStore};
use crate::error::{Error, Result};
use crate::event::Position;
use crate::mapping::coalesce::{Coalescer, Pending};
use std::collections::VecDeque;
use std::time::Instant;

/// Changes accepted but not yet written, in log order.
pub enum Segment {
    Batch {
        coalescer: Coalescer<Key, Vec<minijinja::Value>, Record>,
        /// Records that failed mapping, dead-lettered when the batch is written.
        failed: Vec<Entry>,
        /// The last offset the batch covers (including skipped records).
        last: u64,
        started: Instant,
    },
    Truncate {
        offset: u64,
        /// The truncate's source position, for targets that guard by position.
        position: Position,
    },
}

impl Segment {
    /// The last offset the segment covers.
    pub fn last(&self) -> u64 {
        match self {
            Segment::Batch { last, .. } => *last,
            Segment::Truncate { offset, .. } => *offset,
        }
    }

    /// Changes accepted into the segment (before coalescing), mapping failures included.
    pub fn changes(&self) -> usize {
        match self {
            Segment::Batch { coalescer, failed, .. } => coalescer.changes() as usize + failed.len(),
            Segment::Truncate { .. } => 0,
        }
    }

    /// Covers only records with nothing to write (other tables, filtered rows).
    pub fn is_empty(&self) -> bool {
        matches!(self, Segment::Batch { coalescer, failed, .. } if coalescer.is_empty() && failed.is_empty())
    }
}

/// A flight back on the ground.
pub struct Landed<T> {
    pub target: T,
    /// Segments not written because of `error`, oldest first.
    pub remaining: VecDeque<Segment>,
    /// The last offset made durable by this flight, if any.
    pub durable: Option<u64>,
    pub applied: Applied,
    pub error: Option<Error>,
}

/// Writes `segments` in order, stopping at the first error.
pub async fn fly<T: Target>(mut target: T, dead: EntryStore, mut segments: VecDeque<Segment>) -> Landed<T> {
    let mut durable = None;
    let mut applied = Applied::default();
    while let Some(segment) = segments.front() {
        match write(&mut target, &dead, segment).await {
            Ok(a) => {
                applied.add(&a);
                durable = Some(segment.last());
                segments.pop_front();
            }
            Err(e) => return Landed { target, remaining: segments, durable, applied, error: Some(e) },
        }
    }
    Landed { target, remaining: segments, durable, applied, error: None }
}

async fn write<T: Target>(target: &mut T, dead: &EntryStore, segment: &Segment) -> Result<Applied> {
    match segment {
        Segment::Truncate { position, .. } => {
            target.truncate(*position).await?;
            Ok(Applied::default())
        }
        Segment::Batch { coalescer, failed, .. } => {
            // Durable before the batch (and so the cursor past it) can be confirmed.
            for entry in failed {
                dead.put(entry.clone())?;
            }
            // The segment stays whole until the target confirms it: a retry writes it again.
            let items: Vec<Item> = coalescer
                .pending()
                .map(|p: &Pending<Key, _, Record>| Item { record: p.last.clone(), write: p.write.clone() })
                .collect();
            let mut applied = if items.is_empty() { Applied::default() } else { target.write_batch(items).await? };
            applied.rejected += failed.len() as u64;
            Ok(applied)
        }
    }
}

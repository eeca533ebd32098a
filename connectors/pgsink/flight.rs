//! Batches in flight: written to the target by a background task while the sink maps the next
//! ones, so the target's round trips and the mapping's CPU overlap instead of taking turns.
//!
//! A flight owns the connection while it runs and gives it back when it lands, with the
//! segments it could not write (after an error, to be sent again first) and the last offset it
//! made durable. Segments are written strictly in order, each in its own transaction.

use super::writer::{Applied, Item, Record, Writer};
use super::{mark_origin, Key};
use crate::config::PgConnection;
use crate::connectors::postgres::client::{connect, query_error};
use crate::deadletter::Entry;
use crate::error::{Error, Result};
use crate::mapping::coalesce::{Coalescer, Pending};
use std::collections::VecDeque;
use std::time::Instant;
use tokio_postgres::Client;

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
    },
}

impl Segment {
    /// The last offset the segment covers.
    pub fn last(&self) -> u64 {
        match self {
            Segment::Batch { last, .. } => *last,
            Segment::Truncate { offset } => *offset,
        }
    }

    /// Covers only records with nothing to write (other tables, filtered rows).
    pub fn is_empty(&self) -> bool {
        matches!(self, Segment::Batch { coalescer, failed, .. } if coalescer.is_empty() && failed.is_empty())
    }
}

/// How to open the sink's session again after the target dropped it.
#[derive(Debug, Clone)]
pub struct Session {
    pub conn: PgConnection,
    pub application_name: String,
    pub origin: String,
}

impl Session {
    /// Connects and tags the session's writes with the sink's replication origin.
    pub async fn open(&self) -> Result<Client> {
        let client = connect(&self.conn, &self.application_name).await?;
        mark_origin(&client, &self.origin).await;
        Ok(client)
    }
}

/// What a flight carries: the connection and the writer.
pub struct Crew {
    pub client: Option<Client>,
    pub writer: Writer,
    pub session: Session,
}

/// A flight back on the ground.
pub struct Landed {
    pub crew: Crew,
    /// Segments not written because of `error`, oldest first.
    pub remaining: VecDeque<Segment>,
    /// The last offset made durable by this flight, if any.
    pub durable: Option<u64>,
    pub applied: Applied,
    pub error: Option<Error>,
}

/// Writes `segments` in order, stopping at the first error.
pub async fn fly(mut crew: Crew, mut segments: VecDeque<Segment>) -> Landed {
    let mut durable = None;
    let mut applied = Applied::default();
    while let Some(segment) = segments.front() {
        match write(&mut crew, segment).await {
            Ok(a) => {
                applied.add(&a);
                durable = Some(segment.last());
                segments.pop_front();
            }
            Err(e) => return Landed { crew, remaining: segments, durable, applied, error: Some(e) },
        }
    }
    Landed { crew, remaining: segments, durable, applied, error: None }
}

async fn write(crew: &mut Crew, segment: &Segment) -> Result<Applied> {
    if crew.client.as_ref().is_none_or(|c| c.is_closed()) {
        crew.client = None;
        crew.client = Some(crew.session.open().await.map_err(|e| Error::retryable("target connection", e))?);
    }
    let client = crew.client.as_mut().expect("connected above");
    let writer = &crew.writer;
    match segment {
        Segment::Truncate { .. } => {
            let tx = client.transaction().await.map_err(|e| query_error("begin", e))?;
            writer.target.truncate(&tx).await?;
            tx.commit().await.map_err(|e| query_error("commit", e))?;
            Ok(Applied::default())
        }
        Segment::Batch { coalescer, failed, .. } => {
            for entry in failed {
                writer.dead.put(entry.clone())?;
            }
            // The segment stays whole until its transaction commits: a retry writes it again.
            let items: Vec<Item> = coalescer
                .pending()
                .map(|p: &Pending<Key, _, Record>| Item { record: p.last.clone(), write: p.write.clone() })
                .collect();
            let mut applied = writer.apply(client, &items, None).await?;
            applied.rejected += failed.len() as u64;
            Ok(applied)
        }
    }
}

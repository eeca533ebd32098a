//! The contract between the runtime and a sink.

use crate::error::Result;
use crate::log::LogRecord;

/// How far a sink has made its input durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Every log offset at or below this is durable in the target.
    pub cursor: u64,
    /// Opaque state to store atomically with the cursor (restored by the sink on start).
    pub state: Vec<u8>,
}

/// A sink takes records in log order. Accepting is not durability: only [`Sink::tick`]
/// reports what is durable, and the runtime stores that cursor, never more.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Accepts records (offsets increasing, none repeated within one run).
    async fn write(&mut self, records: Vec<LogRecord>) -> Result<()>;

    /// Finishes what is due (all of it when `flush`) and reports durable progress.
    /// A retryable error leaves accepted records in place; calling again retries.
    async fn tick(&mut self, flush: bool) -> Result<Progress>;

    /// Files and rows written so far, for status.
    fn written(&self) -> (u64, u64);
}

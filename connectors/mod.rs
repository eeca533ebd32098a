//! Sources and sinks.

pub mod hubspot;
pub mod mapped;
pub mod parquet;
pub mod pgsink;
pub mod postgres;

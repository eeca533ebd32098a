//! Sources and sinks.

pub mod parquet;
pub mod pgsink;
pub mod postgres;

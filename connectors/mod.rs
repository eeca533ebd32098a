//! Sources and sinks.

pub mod parquet;
pub mod postgres;

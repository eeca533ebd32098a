//! Sources and sinks.

pub mod aimd;
pub mod http;
pub mod hubspot;
pub mod kafka;
pub mod mapped;
pub mod mongo;
pub mod oauth;
pub mod parquet;
pub mod pgsink;
pub mod postgres;
pub mod quota;
pub mod salesforce;

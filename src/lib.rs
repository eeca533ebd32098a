//! sluice: change data capture from PostgreSQL into a durable log, then into sinks.

pub mod config;
#[path = "../connectors/mod.rs"]
pub mod connectors;
pub mod deadletter;
pub mod error;
pub mod event;
pub mod log;
pub mod mapping;
pub mod runtime;

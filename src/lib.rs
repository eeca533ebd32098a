//! sluice: change data capture from PostgreSQL into a durable log, then into sinks.

pub mod config;
pub mod error;
pub mod event;
pub mod log;

//! The Kafka transport: a publisher drains the source's local log into Debezium-compatible
//! topics, and each sink reads them through its own consumer group.
//!
//! The source still commits into a local log first (it also keeps the source's checkpoint,
//! schemas and TOAST state there); the publisher is a sink of that log whose durable cursor is
//! the in-order delivery watermark, and a PostgreSQL source acknowledges the server only up to
//! it. On the consuming side each sink keeps a small local buffer so that every sink keeps one
//! input contract; consumer offsets are committed only once the sink reports what it holds
//! durable.

pub mod debezium;
pub mod envelope;
mod feed;
mod publisher;
mod topics;
mod transactions;
mod undecodable;

pub use feed::{FeedHandle, KafkaFeed};
pub use publisher::{AckGate, KafkaPublisher, PUBLISHER};
pub use topics::Topics;

use crate::config::KafkaTransportConfig;
use crate::error::{Error, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::ClientConfig;
use std::time::Duration;

/// How long start-up waits for the brokers before it gives up with a clear error.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Header carrying the event in sluice's own encoding, so sluice consumers rebuild it exactly
/// (the JSON envelope loses types). Debezium consumers ignore headers.
pub const EVENT_HEADER: &str = "sluice.event";
/// Header carrying the table schema the event follows.
pub const SCHEMA_HEADER: &str = "sluice.schema";

/// The librdkafka settings every client of the transport shares.
pub fn client_config(cfg: &KafkaTransportConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", format!("sluice-{}", env!("CARGO_PKG_VERSION")));
    // librdkafka logs errors only, unless SLUICE_KAFKA_DEBUG names its debug contexts
    // (`cgrp,topic,msg`, ...) for a deep look at the client.
    match std::env::var("SLUICE_KAFKA_DEBUG") {
        Ok(contexts) if !contexts.is_empty() => c.set("debug", contexts).set("log_level", "7"),
        _ => c.set("log_level", "3"),
    };
    if let Some(s) = &cfg.security {
        c.set("security.protocol", &s.protocol);
        if let Some(m) = &s.mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(u) = &s.username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &s.password {
            c.set("sasl.password", p.expose());
        }
        if let Some(ca) = &s.ca_file {
            c.set("ssl.ca.location", ca.display().to_string());
        }
    }
    c
}

/// Sorts a librdkafka error into sluice's classes: authorization and unknown-topic errors are
/// configuration problems (retrying will not fix them); the rest are transient.
pub fn classify(context: &str, e: KafkaError) -> Error {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed,
        ) => Error::config(format!("{context}: {e} (check the credentials and ACLs in transport.security)")),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            Error::permanent(context, e)
        }
        _ => Error::retryable(context, e),
    }
}

/// Waits up to [`CONNECT_WAIT`] for the brokers to answer; a setup error when they do not.
pub async fn check_reachable(cfg: &KafkaTransportConfig) -> Result<()> {
    let client: rdkafka::producer::BaseProducer =
        client_config(cfg).create().map_err(|e| Error::config(format!("kafka client: {e}")))?;
    let brokers = cfg.brokers.clone();
    tokio::task::spawn_blocking(move || client.client().fetch_metadata(None, CONNECT_WAIT))
        .await
        .map_err(|e| Error::permanent("kafka", e))?
        .map(|_| ())
        .map_err(|e| match classify("kafka", e) {
            Error::Config(m) => Error::Config(m),
            other => Error::config(format!(
                "cannot reach the Kafka brokers {brokers} within {}s: {other} (are they running and reachable?)",
                CONNECT_WAIT.as_secs()
            )),
        })
}

/// This process's lasting identity in consumer groups (Kafka's static membership), kept in
/// its local directory: a member that restarts after a crash takes its partitions back
/// without a rebalance, and the others are not disturbed.
pub fn member_id(dir: &std::path::Path) -> Result<String> {
    let file = dir.join("kafka-member-id");
    match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Storage(format!("cannot create {}: {e}", dir.display())))?;
            let id = format!("sluice-{}", uuid::Uuid::new_v4());
            std::fs::write(&file, &id).map_err(|e| Error::Storage(format!("cannot write {}: {e}", file.display())))?;
            Ok(id)
        }
    }
}

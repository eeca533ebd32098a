//! Validation of `transport: { type: kafka }`.

use super::mongo::not_for;
use super::pipeline::*;
use super::raw::{RawKafkaSecurity, RawSource, RawTransport, TransportKind};
use super::secret::Secret;
use super::validate::Ctx;
use super::ConfigError;
use serde_saphyr::Spanned;
use std::path::PathBuf;
use std::time::Duration;

/// librdkafka's default `message.max.bytes`, and Kafka's default `max.message.bytes`.
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1_000_000;

/// Refuses Kafka-only keys on an embedded transport.
pub(super) fn reject_kafka_keys(cx: &Ctx, raw: &RawTransport) -> Result<(), ConfigError> {
    let spans = [
        ("brokers", raw.brokers.as_ref().map(|s| s.referenced)),
        ("topic_prefix", raw.topic_prefix.as_ref().map(|s| s.referenced)),
        ("partitions", raw.partitions.as_ref().map(|s| s.referenced)),
        ("replication_factor", raw.replication_factor.as_ref().map(|s| s.referenced)),
        ("schemas", raw.schemas.as_ref().map(|s| s.referenced)),
        ("heartbeat", raw.heartbeat.as_ref().map(|s| s.referenced)),
        ("transaction_metadata", raw.transaction_metadata.as_ref().map(|s| s.referenced)),
        ("security", raw.security.as_ref().map(|s| s.protocol.referenced)),
    ];
    for (key, at) in spans {
        if let Some(at) = at {
            let at = Spanned { value: (), referenced: at, defined: at };
            return Err(cx.err(
                &at,
                format!("transport.{key}: applies to a kafka transport only"),
                "remove it, or set `type: kafka`",
            ));
        }
    }
    if raw.producer.is_some() {
        return Err(cx.err(
            &raw.kind,
            "transport.producer: applies to a kafka transport only",
            "remove it, or set `type: kafka`",
        ));
    }
    Ok(())
}

/// Validates a Kafka transport; `default_path` holds its local buffers unless `path` is given.
pub(super) fn kafka_transport(
    cx: &Ctx,
    pipeline: &str,
    raw: RawTransport,
    default_path: PathBuf,
) -> Result<KafkaTransportConfig, ConfigError> {
    let Some(brokers) = raw.brokers.as_ref() else {
        return Err(cx.err(&raw.kind, "transport: a kafka transport needs `brokers`", "add `brokers: 127.0.0.1:9092`"));
    };
    let list = broker_list(cx, "transport.brokers", brokers)?;
    let topic_prefix = match &raw.topic_prefix {
        None => pipeline.to_string(),
        Some(p) => {
            let ok = !p.value.is_empty()
                && p.value.len() <= 200
                && p.value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(cx.err(
                    p,
                    format!("transport.topic_prefix: `{}` cannot start a topic name", p.value),
                    "use letters, digits, `.`, `_` and `-` only, e.g. `shop`",
                ));
            }
            p.value.clone()
        }
    };
    let partitions = count(cx, "partitions", raw.partitions.as_ref(), 1, 10_000)?;
    let replication_factor = count(cx, "replication_factor", raw.replication_factor.as_ref(), 1, 32)?;
    let heartbeat = match &raw.heartbeat {
        None => Duration::from_secs(10),
        Some(h) => cx.duration("transport.heartbeat", h)?,
    };
    let (mut compression, mut linger_ms, mut max_message_bytes) =
        (KafkaCompression::Zstd, 5, DEFAULT_MAX_MESSAGE_BYTES);
    if let Some(p) = &raw.producer {
        if let Some(c) = &p.compression {
            compression = match c.value.as_str() {
                "none" => KafkaCompression::None,
                "gzip" => KafkaCompression::Gzip,
                "snappy" => KafkaCompression::Snappy,
                "lz4" => KafkaCompression::Lz4,
                "zstd" => KafkaCompression::Zstd,
                other => {
                    return Err(cx.err(
                        c,
                        format!("transport.producer.compression: `{other}` is not a Kafka compression"),
                        "use none, gzip, snappy, lz4 or zstd",
                    ))
                }
            };
        }
        if let Some(l) = &p.linger_ms {
            linger_ms = count(cx, "producer.linger_ms", Some(l), 0, 900_000)? as u32;
        }
        if let Some(m) = &p.max_message_bytes {
            max_message_bytes = cx.size("transport.producer.max_message_bytes", m)?;
            if !(1_000..=1_000_000_000).contains(&max_message_bytes) {
                return Err(cx.err(
                    m,
                    "transport.producer.max_message_bytes: out of range",
                    "librdkafka accepts 1000 bytes to 1000000000 bytes",
                ));
            }
        }
    }
    let security = raw.security.map(|s| security(cx, "transport", s)).transpose()?;
    Ok(KafkaTransportConfig {
        path: raw.path.map(|p| PathBuf::from(p.value)).unwrap_or(default_path),
        brokers: list,
        topic_prefix,
        partitions,
        replication_factor,
        schemas: raw.schemas.map(|s| s.value).unwrap_or(false),
        heartbeat,
        transaction_metadata: raw.transaction_metadata.map(|t| t.value).unwrap_or(false),
        compression,
        linger_ms,
        max_message_bytes,
        security,
    })
}

/// A whole number in `min..=max`; `min` when absent.
fn count(cx: &Ctx, key: &str, value: Option<&Spanned<i64>>, min: i64, max: i64) -> Result<i32, ConfigError> {
    match value {
        None => Ok(min as i32),
        Some(v) if (min..=max).contains(&v.value) => Ok(v.value as i32),
        Some(v) => Err(cx.err(
            v,
            format!("transport.{key}: {} is out of range", v.value),
            format!("use a whole number from {min} to {max}"),
        )),
    }
}

fn security(cx: &Ctx, section: &str, raw: RawKafkaSecurity) -> Result<KafkaSecurity, ConfigError> {
    let protocol = raw.protocol.value.to_ascii_uppercase();
    let sasl = match protocol.as_str() {
        "PLAINTEXT" | "SSL" => false,
        "SASL_PLAINTEXT" | "SASL_SSL" => true,
        _ => {
            return Err(cx.err(
                &raw.protocol,
                format!("{section}.security.protocol: `{}` is not a Kafka security protocol", raw.protocol.value),
                "use PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
            ))
        }
    };
    let mechanism = match (&raw.mechanism, sasl) {
        (Some(m), true) => {
            let name = m.value.to_ascii_uppercase();
            if !matches!(name.as_str(), "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") {
                return Err(cx.err(
                    m,
                    format!("{section}.security.mechanism: `{}` is not supported", m.value),
                    "use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ));
            }
            Some(name)
        }
        (None, true) => {
            return Err(cx.err(
                &raw.protocol,
                format!("{section}.security: {protocol} needs a `mechanism`"),
                "add `mechanism: SCRAM-SHA-512` (or PLAIN, SCRAM-SHA-256)",
            ))
        }
        (Some(m), false) => {
            return Err(cx.err(
                m,
                format!("{section}.security.mechanism: applies to SASL protocols only, not {protocol}"),
                "remove it, or use SASL_SSL",
            ))
        }
        (None, false) => None,
    };
    let username = raw.username.as_ref().map(|u| cx.resolve(&format!("{section}.security.username"), u)).transpose()?;
    let password = raw.password.as_ref().map(|p| cx.resolve(&format!("{section}.security.password"), p)).transpose()?;
    if sasl && (username.is_none() || password.is_none()) {
        return Err(cx.err(
            &raw.protocol,
            format!("{section}.security: SASL needs `username` and `password`"),
            "add `username: NAME` and `password: \"${env:KAFKA_PASSWORD}\"`",
        ));
    }
    Ok(KafkaSecurity {
        protocol,
        mechanism,
        username,
        password: password.map(Secret::new),
        ca_file: raw.ca_file.map(|f| PathBuf::from(f.value)),
    })
}

/// `host:port[,host:port...]`, resolved and checked.
fn broker_list(cx: &Ctx, field: &str, brokers: &Spanned<String>) -> Result<String, ConfigError> {
    let list = cx.resolve(field, brokers)?;
    for broker in list.split(',').map(str::trim) {
        let port = broker.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        if broker.is_empty() || !matches!(port, Some(Ok(_))) || broker.contains("://") {
            return Err(cx.err(
                brokers,
                format!("{field}: `{broker}` is not host:port"),
                "list brokers as host:port, separated by commas: `kafka1:9092,kafka2:9092`",
            ));
        }
    }
    Ok(list)
}

/// Validates a `type: kafka` source. Its sinks read the topics through consumer groups, as
/// they read a kafka transport, so the source also yields the connection they use; a
/// `transport` section may only say where the local buffers live.
pub(super) fn kafka_source(
    cx: &Ctx,
    raw: RawSource,
    transport: Option<RawTransport>,
    default_path: PathBuf,
) -> Result<(KafkaSourceConfig, KafkaTransportConfig), ConfigError> {
    let fix = "remove it; the README's source reference lists the keys of each source type";
    not_for(cx, "kafka", "url", raw.url.as_ref(), "name the brokers under `brokers: host:port`")?;
    not_for(cx, "kafka", "tables", raw.tables.as_ref(), "list the topics under `topics:`")?;
    not_for(cx, "kafka", "collections", raw.collections.as_ref(), "list the topics under `topics:`")?;
    not_for(
        cx,
        "kafka",
        "snapshot",
        raw.snapshot.as_ref(),
        "remove it; the topics hold what their writer snapshotted",
    )?;
    for (key, value) in [
        ("password", &raw.password),
        ("slot", &raw.slot),
        ("publication", &raw.publication),
        ("heartbeat", &raw.heartbeat),
        ("database", &raw.database),
        ("full_document", &raw.full_document),
        ("on_history_lost", &raw.on_history_lost),
        ("json", &raw.json),
    ] {
        not_for(cx, "kafka", key, value.as_ref(), fix)?;
    }
    let Some(brokers) = raw.brokers.as_ref() else {
        return Err(cx.err(&raw.kind, "source: a kafka source needs `brokers`", "add `brokers: 127.0.0.1:9092`"));
    };
    let brokers = broker_list(cx, "source.brokers", brokers)?;
    let Some(listed) = raw.topics.as_ref().filter(|t| !t.value.is_empty()) else {
        return Err(cx.err(
            &raw.kind,
            "source: a kafka source needs `topics`",
            "list the Debezium topics to read, e.g. `topics: [dbserver1.inventory.customers]`, or a pattern such \
             as `^dbserver1\\.inventory\\..*`",
        ));
    };
    let mut topics = Vec::new();
    for t in &listed.value {
        let name = t.value.trim();
        let valid = match name.strip_prefix('^') {
            Some(pattern) => !pattern.is_empty(),
            None => !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        };
        if !valid {
            return Err(cx.err(
                t,
                format!("source.topics: `{}` is neither a topic name nor a pattern", t.value),
                "write a topic name (letters, digits, `.`, `_`, `-`) or a regular expression starting with `^`",
            ));
        }
        topics.push(name.to_string());
    }
    let security = raw.security.map(|s| security(cx, "source", s)).transpose()?;
    let path = match transport {
        None => default_path,
        Some(t) if t.kind.value == TransportKind::Kafka => {
            return Err(cx.err(
                &t.kind,
                "transport: a kafka source reads from Kafka already; it cannot also publish to a kafka transport",
                "remove `transport`, or keep `type: embedded` with a `path` for the sinks' local buffers",
            ))
        }
        Some(t) => {
            reject_kafka_keys(cx, &t)?;
            t.path.map(|p| PathBuf::from(p.value)).unwrap_or(default_path)
        }
    };
    let conn = KafkaTransportConfig {
        path,
        brokers,
        // Unused: a kafka source creates no topics and publishes nothing.
        topic_prefix: String::new(),
        partitions: 1,
        replication_factor: 1,
        schemas: false,
        heartbeat: Duration::from_secs(10),
        transaction_metadata: false,
        compression: KafkaCompression::None,
        linger_ms: 0,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        security,
    };
    Ok((KafkaSourceConfig { topics }, conn))
}

//! Topic names (as Debezium forms them) and their creation with the configured partitions.

use super::{classify, client_config};
use crate::config::KafkaTransportConfig;
use crate::error::{Error, Result};
use crate::event::TableId;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Knows each table's topic and how many partitions it has, creating topics on first use.
pub struct Topics {
    admin: AdminClient<DefaultClientContext>,
    /// For metadata requests, which block: shared with a blocking task.
    metadata: Arc<BaseProducer>,
    prefix: String,
    partitions: i32,
    replication_factor: i32,
    known: HashMap<TableId, (Arc<str>, i32)>,
}

impl Topics {
    pub fn new(cfg: &KafkaTransportConfig) -> Result<Self> {
        let admin = client_config(cfg).create().map_err(|e| Error::config(format!("kafka admin client: {e}")))?;
        let metadata: BaseProducer =
            client_config(cfg).create().map_err(|e| Error::config(format!("kafka metadata client: {e}")))?;
        Ok(Self {
            admin,
            metadata: Arc::new(metadata),
            prefix: cfg.topic_prefix.clone(),
            partitions: cfg.partitions,
            replication_factor: cfg.replication_factor,
            known: HashMap::new(),
        })
    }

    /// The topic of a table's changes: `PREFIX.SCHEMA.TABLE`.
    pub fn name_of(prefix: &str, table: &TableId) -> String {
        sanitize(&format!("{prefix}.{}.{}", table.schema, table.name))
    }

    /// Debezium's heartbeat topic for a prefix.
    pub fn heartbeat_topic(prefix: &str) -> String {
        sanitize(&format!("__debezium-heartbeat.{prefix}"))
    }

    /// Debezium's transaction metadata topic for a prefix.
    pub fn transaction_topic(prefix: &str) -> String {
        sanitize(&format!("{prefix}.transaction"))
    }

    /// The table's topic and its partition count, creating the topic if it does not exist.
    pub async fn ensure(&mut self, table: &TableId) -> Result<(Arc<str>, i32)> {
        if let Some(known) = self.known.get(table) {
            return Ok(known.clone());
        }
        let name = Self::name_of(&self.prefix, table);
        let partitions = self.create(&name, self.partitions).await?;
        let entry = (Arc::<str>::from(name), partitions);
        self.known.insert(table.clone(), entry.clone());
        Ok(entry)
    }

    /// Creates `name` (an existing topic is kept as it is) and returns its partition count.
    pub async fn create(&self, name: &str, partitions: i32) -> Result<i32> {
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(self.replication_factor));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = self.admin.create_topics([&topic], &options).await.map_err(|e| classify("create topic", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(classify(&format!("create topic {topic}"), rdkafka::error::KafkaError::AdminOp(code)))
                }
            }
        }
        // A new topic's metadata reaches every broker a moment after creation.
        let mut delay = Duration::from_millis(20);
        for _ in 0..40 {
            if let Some(count) = self.partition_count(name).await? {
                return Ok(count);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        Err(Error::retryable("create topic", format!("topic {name} has no partitions in the brokers' metadata yet")))
    }

    async fn partition_count(&self, name: &str) -> Result<Option<i32>> {
        let client = self.metadata.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let metadata = client.client().fetch_metadata(Some(&name), Duration::from_secs(10));
            let metadata = metadata.map_err(|e| classify("topic metadata", e))?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len() as i32)
                .filter(|&n| n > 0))
        })
        .await
        .map_err(|e| Error::permanent("topic metadata", e))?
    }
}

/// Kafka topic names allow `[A-Za-z0-9._-]`; Debezium replaces anything else with `_`.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_named_as_debezium_names_them() {
        assert_eq!(Topics::name_of("shop", &TableId::new("public", "orders")), "shop.public.orders");
        assert_eq!(Topics::name_of("shop", &TableId::new("sales", "order lines$")), "shop.sales.order_lines_");
        assert_eq!(Topics::heartbeat_topic("shop"), "__debezium-heartbeat.shop");
        assert_eq!(Topics::transaction_topic("shop"), "shop.transaction");
    }
}

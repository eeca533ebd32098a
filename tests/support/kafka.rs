//! Kafka helpers: a test's topics are deleted when it ends, so the shared broker (which rewrites
//! all it holds every few seconds) does not grow with every test run.

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::Duration;

/// Deletes, when dropped, every topic of `brokers` whose name contains `needle` (a test's
/// pipeline name, which its topic prefix and consumer groups carry). Declared first in a test,
/// it is dropped last, after the test's processes have stopped.
pub struct TopicCleanup {
    brokers: String,
    needle: String,
}

impl TopicCleanup {
    pub fn new(brokers: &str, needle: &str) -> Self {
        Self { brokers: brokers.to_string(), needle: needle.to_string() }
    }
}

impl TopicCleanup {
    fn delete(&self) -> Result<(), String> {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
        let meta = consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let ours: Vec<String> =
            meta.topics().iter().map(|t| t.name().to_string()).filter(|t| t.contains(&self.needle)).collect();
        if ours.is_empty() {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| e.to_string())?;
        let names: Vec<&str> = ours.iter().map(String::as_str).collect();
        // Driven by librdkafka's own thread, so no async runtime is needed here (a test's
        // runtime may be shutting down when this runs).
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in futures::executor::block_on(admin.delete_topics(&names, &options)).map_err(|e| e.to_string())? {
            result.map_err(|(topic, code)| format!("{topic}: {code}"))?;
        }
        Ok(())
    }
}

impl Drop for TopicCleanup {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("warning: could not delete the topics of {} on {}: {e}", self.needle, self.brokers);
        }
    }
}

//! Makes a deferred log durable on a timer (see `EmbeddedLog::open_deferred`): the source's
//! staging log, whose durable head it tells the Kafka acknowledgement gate (the source's changes
//! reach Kafka without waiting for an fsync, and the slot is acknowledged only up to a
//! checkpoint), and each sink's Kafka buffer (commits of consumed messages wait for no fsync).

use super::Shutdown;
use crate::connectors::kafka::AckGate;
use crate::error::Result;
use crate::log::EmbeddedLog;
use std::time::Duration;

/// How often a deferred log is checkpointed: how far the slot's acknowledgement may trail what
/// Kafka has, and about how much a crash makes the source capture and publish again. Each
/// checkpoint holds the log's writer for one fsync, so a shorter interval stalls commits more.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Checkpoints `log` every [`CHECKPOINT_EVERY`] while anything waits for it, and forwards its
/// durable head to `gate`, if any, until shutdown. (The final checkpoint is the runtime's, once
/// every task has stopped.)
pub async fn run(log: EmbeddedLog, gate: Option<AckGate>, shutdown: Shutdown) -> Result<()> {
    let mut durable = log.durable_head();
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let head = *durable.borrow_and_update();
        if let Some(gate) = &gate {
            gate.durable(head);
        }
        tokio::select! {
            _ = tick.tick() => {
                if log.needs_checkpoint() {
                    log.checkpoint().await?;
                }
            }
            changed = durable.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = shutdown.requested() => return Ok(()),
        }
    }
}

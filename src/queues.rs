//! `sluice dlq` and `sluice conflicts`: reading and working a sink's queues.

use crate::cli::{ConflictCommand, DlqCommand, QueueArgs, TakeSide};
use crate::{load, runtime};
use anyhow::{bail, Context};
use sluice::config::{Pipeline, PostgresSinkConfig, SinkConfig};
use sluice::connectors::mapped::replay::{self, Outcome};
use sluice::connectors::pgsink::queue::{self, Take};
use sluice::connectors::{hubspot, salesforce};
use sluice::deadletter::{Entry, EntryStore};
use sluice::mapping::context::convert;
use sluice::runtime::Shutdown;
use std::path::PathBuf;

/// The pipeline, the chosen mapped sink and the data directory.
fn open(args: &QueueArgs) -> anyhow::Result<(Pipeline, SinkConfig, PathBuf)> {
    let pipeline = load(&args.file)?;
    let mapped: Vec<&SinkConfig> = pipeline.sinks.iter().filter(|s| !matches!(s, SinkConfig::Parquet(_))).collect();
    let sink = match (&args.sink, mapped.as_slice()) {
        (Some(name), _) => mapped
            .iter()
            .find(|s| s.name() == name)
            .copied()
            .with_context(|| format!("pipeline {} has no mapped sink named {name}", pipeline.name))?,
        (None, [only]) => only,
        (None, []) => bail!("pipeline {} has no mapped sink (only mapped sinks have queues)", pipeline.name),
        (None, _) => bail!("pipeline {} has several mapped sinks; choose one with --sink", pipeline.name),
    };
    let sink = sink.clone();
    let dir = pipeline.transport.sink_dir(sink.name());
    Ok((pipeline, sink, dir))
}

/// Resolving conflicts reads and writes the target's records: PostgreSQL sinks only so far.
fn postgres(sink: &SinkConfig) -> anyhow::Result<&PostgresSinkConfig> {
    match sink {
        SinkConfig::Postgres(p) => Ok(p),
        other => bail!("sink {}: conflicts are parked by postgres sinks only", other.name()),
    }
}

/// Replays dead letters through the sink's own target.
fn replay(
    pipeline: &Pipeline,
    sink: &SinkConfig,
    dir: &std::path::Path,
    ids: &[u64],
) -> anyhow::Result<Vec<(u64, Outcome)>> {
    let store = EntryStore::dead_letters(dir, sink.name());
    let outcomes = runtime()?.block_on(async {
        match sink {
            SinkConfig::Postgres(p) => queue::replay(p, &pipeline.name, dir, ids).await,
            SinkConfig::Hubspot(h) => {
                replay::replay(&hubspot::connector(h.clone(), dir, Shutdown::new()), h.mapping.clone(), &store, ids)
                    .await
            }
            SinkConfig::Salesforce(c) => {
                replay::replay(&salesforce::connector(c.clone(), dir, Shutdown::new()), c.mapping.clone(), &store, ids)
                    .await
            }
            SinkConfig::Parquet(_) => unreachable!("parquet sinks have no queues"),
        }
    })?;
    Ok(outcomes)
}

pub fn dlq(action: DlqCommand) -> anyhow::Result<()> {
    match action {
        DlqCommand::List(args) => {
            let (_, sink, dir) = open(&args)?;
            list(&EntryStore::dead_letters(&dir, sink.name()))
        }
        DlqCommand::Show { queue, id } => {
            let (_, sink, dir) = open(&queue)?;
            show(&EntryStore::dead_letters(&dir, sink.name()), id)
        }
        DlqCommand::Replay { queue, ids, all } => {
            let (pipeline, sink, dir) = open(&queue)?;
            let store = EntryStore::dead_letters(&dir, sink.name());
            let ids = if all { store.ids()? } else { ids };
            if ids.is_empty() {
                bail!("no records to replay: give ids (see `sluice dlq list`) or --all");
            }
            let outcomes = replay(&pipeline, &sink, &dir, &ids)?;
            report(&outcomes, "replayed")
        }
        DlqCommand::Drop { queue, ids, all } => {
            let (_, sink, dir) = open(&queue)?;
            let store = EntryStore::dead_letters(&dir, sink.name());
            let ids = if all { store.ids()? } else { ids };
            for id in ids {
                if store.remove(id)? {
                    println!("{id}: dropped");
                } else {
                    println!("{id}: no such record");
                }
            }
            Ok(())
        }
    }
}

pub fn conflicts(action: ConflictCommand) -> anyhow::Result<()> {
    match action {
        ConflictCommand::List(args) => {
            let (_, sink, dir) = open(&args)?;
            list(&EntryStore::conflicts(&dir, sink.name()))
        }
        ConflictCommand::Show { queue, id } => {
            let (_, sink, dir) = open(&queue)?;
            show(&EntryStore::conflicts(&dir, sink.name()), id)
        }
        ConflictCommand::Resolve { queue, id, take } => {
            let (pipeline, sink, dir) = open(&queue)?;
            let sink = postgres(&sink)?;
            let take = match take {
                TakeSide::Source => Take::Source,
                TakeSide::Target => Take::Target,
                TakeSide::Merged => Take::Merged,
            };
            let outcome = runtime()?.block_on(queue::resolve(sink, &pipeline.name, &dir, id, take))?;
            report(&[(id, outcome)], "resolved")
        }
    }
}

fn list(store: &EntryStore) -> anyhow::Result<()> {
    let ids = store.ids()?;
    if ids.is_empty() {
        println!("empty ({})", store.dir().display());
    }
    for id in ids {
        let Some(e) = store.get(id)? else { continue };
        let key: Vec<String> = e.change.key.iter().map(|v| convert(v).to_string()).collect();
        println!(
            "{id}\t{:?}\tattempts={}\t{}\t{} {}\tkey=[{}]\t{}",
            e.reason,
            e.attempts,
            e.last_failed_at,
            e.change.table,
            e.change.op.as_str(),
            key.join(","),
            e.error
        );
    }
    Ok(())
}

fn show(store: &EntryStore, id: u64) -> anyhow::Result<()> {
    let Some(e) = store.get(id)? else { bail!("no record {id} in {}", store.dir().display()) };
    println!("{}", serde_json::to_string_pretty(&readable(&e))?);
    Ok(())
}

/// An entry with rows as `{column: value}` instead of the log's positional form.
fn readable(e: &Entry) -> serde_json::Value {
    let row = |r: &Option<Vec<sluice::event::Value>>| -> serde_json::Value {
        match r {
            None => serde_json::Value::Null,
            Some(values) => e
                .schema
                .columns
                .iter()
                .zip(values)
                .map(|(c, v)| (c.name.clone(), serde_json::to_value(convert(v)).unwrap_or_default()))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    };
    serde_json::json!({
        "id": e.id,
        "sink": e.sink,
        "reason": e.reason,
        "error": e.error,
        "attempts": e.attempts,
        "first_failed_at": e.first_failed_at,
        "last_failed_at": e.last_failed_at,
        "change": {
            "table": e.change.table.to_string(),
            "op": e.change.op.as_str(),
            "position": e.change.position.to_string(),
            "before": row(&e.change.before),
            "after": row(&e.change.after),
        },
        "mapped": e.mapped,
        "target": e.target,
    })
}

fn report(outcomes: &[(u64, Outcome)], done: &str) -> anyhow::Result<()> {
    let mut failed = 0;
    for (id, outcome) in outcomes {
        match outcome {
            Outcome::Done => println!("{id}: {done}"),
            Outcome::Failed(why) => {
                failed += 1;
                println!("{id}: failed again: {why}");
            }
            Outcome::Missing => {
                failed += 1;
                println!("{id}: no such record");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} records were not {done}", outcomes.len());
    }
    Ok(())
}

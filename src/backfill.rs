//! `sluice backfill`: checks and sends a backfill request to the running pipeline, then
//! follows its progress: a bar on a terminal, a line every few seconds otherwise.

use crate::cli::BackfillArgs;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sluice::connectors::postgres::backfill::request::{self, KeyRange};
use sluice::connectors::postgres::backfill::{BackfillRequest, BackfillStatus};
use sluice::event::TableId;
use sluice::runtime::{self, progress::now_ms};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often the status file is read while following.
const POLL: Duration = Duration::from_millis(250);
/// A status file older than this means the pipeline is not running.
const STALE_MS: u64 = 5_000;

pub fn run(args: BackfillArgs) -> anyhow::Result<()> {
    let pipeline = crate::load(&args.file)?;
    let mut tables = Vec::new();
    for t in &args.tables {
        tables.push(TableId::parse(t).with_context(|| format!("--table {t}: write schema.table, e.g. public.orders"))?);
    }
    let key_range = match &args.key_range {
        Some(text) => Some(KeyRange::parse(text).with_context(|| {
            format!("--key-range {text}: write FROM..TO (TO excluded), either end may be left out, e.g. 100..200")
        })?),
        None => None,
    };
    if key_range.is_some() && tables.len() > 1 {
        bail!("--key-range applies to one table; run one backfill per table");
    }
    if args.parallelism == 0 || args.chunk_rows == 0 {
        bail!("--parallelism and --chunk-rows must be at least 1");
    }
    let Some(pg) = pipeline.source.postgres() else {
        bail!("backfills read PostgreSQL tables; pipeline {}'s source is not postgres", pipeline.name);
    };
    let id = uuid::Uuid::new_v4().to_string();
    let req = BackfillRequest {
        id: id.clone(),
        pipeline: pipeline.name.clone(),
        name: "adhoc".into(),
        tables,
        filter: args.filter.clone(),
        cursor: None,
        cursor_after: Default::default(),
        slot_ms: None,
        parallelism: args.parallelism,
        chunk_rows: args.chunk_rows,
    };
    crate::runtime()?.block_on(request::submit(&pg.conn, req, key_range.as_ref()))?;
    println!("backfill {id} requested");
    if args.detach {
        return Ok(());
    }
    follow(pipeline.transport.path(), &id)
}

/// Follows job `id` in the status file until it ends.
fn follow(dir: &Path, id: &str) -> anyhow::Result<()> {
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg} (ETA {eta})")
                .expect("a valid template"),
        );
        bar
    });
    let (started, mut said_waiting, mut last_line) = (Instant::now(), false, Instant::now());
    loop {
        let report = runtime::status::read_status(dir);
        let fresh = report.as_ref().is_some_and(|r| now_ms().saturating_sub(r.updated_ms) < STALE_MS);
        let job: Option<BackfillStatus> = report.and_then(|r| r.backfills.into_iter().find(|b| b.id == id));
        match &job {
            None if !fresh && !said_waiting && started.elapsed() > Duration::from_secs(2) => {
                eprintln!("the pipeline is not running here; the backfill starts when `sluice run` does");
                said_waiting = true;
            }
            None => {}
            Some(j) => {
                let rate = j.rows as f64 / (now_ms().saturating_sub(j.started_ms).max(1) as f64 / 1000.0);
                let msg = format!("{} rows, {rate:.0} rows/s", j.rows);
                match &bar {
                    Some(bar) => {
                        bar.set_length(j.blocks_total.max(1));
                        bar.set_position(j.blocks_done);
                        bar.set_message(msg);
                    }
                    None if last_line.elapsed() >= Duration::from_secs(5) || j.state != "running" => {
                        eprintln!("backfill {id}: {msg}, {} of {} blocks", j.blocks_done, j.blocks_total);
                        last_line = Instant::now();
                    }
                    None => {}
                }
                if j.state == "done" {
                    if let Some(bar) = &bar {
                        bar.finish();
                    }
                    println!("backfill {id} done: {} rows", j.rows);
                    return Ok(());
                }
                if let Some(why) = j.state.strip_prefix("failed: ") {
                    bail!("backfill {id} failed: {why}");
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

//! Command-line interface.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Change data capture from PostgreSQL to a durable log and Parquet")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "SLUICE_LOG_FORMAT")]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a pipeline file without connecting to anything.
    Validate { file: PathBuf },
    /// Run a pipeline until SIGINT/SIGTERM (which drain and checkpoint).
    Run {
        file: PathBuf,
        /// Exit 0 once caught up, idle this long, and everything durable (e.g. 5s).
        #[arg(long, value_parser = humantime::parse_duration)]
        until_idle: Option<Duration>,
    },
    /// Records set aside by a sink: list, show, replay through the current mapping, drop.
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// Conflicts parked for review by `conflict: { strategy: manual }`.
    Conflicts {
        #[command(subcommand)]
        action: ConflictCommand,
    },
    /// Backfill tables while the pipeline streams; follows progress until done.
    Backfill(BackfillArgs),
    /// Show position, slot lag, events/s and sink progress.
    Status {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `sluice backfill`.
#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// A table to read again (schema.table); repeat for several.
    #[arg(long = "table", required = true)]
    pub tables: Vec<String>,
    /// Only rows matching this SQL condition, as after WHERE.
    #[arg(long = "where")]
    pub filter: Option<String>,
    /// Only keys from A (inclusive) to B (exclusive), e.g. 1000..2000 or ..500; needs a
    /// single-column primary key.
    #[arg(long)]
    pub key_range: Option<String>,
    /// Chunks read at once.
    #[arg(long, default_value_t = 2)]
    pub parallelism: u32,
    /// Rows per chunk, the unit of checkpointing.
    #[arg(long, default_value_t = 100_000)]
    pub chunk_rows: u64,
    /// Return once the pipeline has the request instead of following it to the end.
    #[arg(long)]
    pub detach: bool,
}

/// Which sink's queue; may be left out when the pipeline has one mapped sink.
#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// The sink whose queue to use.
    #[arg(long)]
    pub sink: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per record: id, reason, attempts, table, operation, key, error.
    List(QueueArgs),
    /// One record in full: the change, the mapped record, the error.
    Show {
        #[command(flatten)]
        queue: QueueArgs,
        id: u64,
    },
    /// Maps the records again with the pipeline file as it is now and writes them.
    Replay {
        #[command(flatten)]
        queue: QueueArgs,
        /// Record ids (see `list`).
        ids: Vec<u64>,
        /// Every record in the queue.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Deletes records from the queue without writing them.
    Drop {
        #[command(flatten)]
        queue: QueueArgs,
        ids: Vec<u64>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConflictCommand {
    /// One line per parked conflict.
    List(QueueArgs),
    /// One conflict in full: the source's change and mapped record, and the target's record.
    Show {
        #[command(flatten)]
        queue: QueueArgs,
        id: u64,
    },
    /// Applies a decision: the source's record, the target's, or the merge by field owners.
    Resolve {
        #[command(flatten)]
        queue: QueueArgs,
        id: u64,
        #[arg(long, value_enum)]
        take: TakeSide,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TakeSide {
    Source,
    Target,
    Merged,
}

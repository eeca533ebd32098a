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
    /// Show position, slot lag, events/s and sink progress.
    Status {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

//! Pipeline files: parsed into [`raw`] structs, then validated (no network, no spawning) into a
//! typed [`Pipeline`]. Every error names the file, line and column, and says how to fix it.

mod backfill;
mod crm;
mod kafka;
mod mapped;
mod mongo;
mod pipeline;
mod raw;
pub mod secret;
mod validate;

pub use pipeline::*;
pub use secret::Secret;

use std::fmt;
use std::path::{Path, PathBuf};

/// A pipeline file that cannot be used, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub at: Option<(u64, u64)>,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file.display(), self.message)?,
            None => write!(f, "{}: {}", self.file.display(), self.message)?,
        }
        write!(f, "\n  fix: {}", self.fix)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        at: None,
        message: format!("cannot read the pipeline file: {e}"),
        fix: "check the path; pipeline files usually live under pipelines/".into(),
    })?;
    parse(path, &text)
}

/// Parses and validates pipeline text; `path` is used for messages only.
pub fn parse(path: &Path, text: &str) -> Result<Pipeline, ConfigError> {
    let raw: raw::RawPipeline = serde_saphyr::from_str(text).map_err(|e| {
        let at = e.location().map(|l| (l.line(), l.column()));
        let message = first_line(&e.to_string());
        ConfigError { file: path.to_path_buf(), at, fix: fix_for_parse_error(&message), message }
    })?;
    validate::validate(path, raw)
}

/// saphyr renders `error: line N column M: message` and a snippet; the location is reported
/// separately, so keep only the message.
fn first_line(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or(rendered).trim();
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line.strip_prefix("line ").and_then(|rest| rest.split_once(": ")) {
        Some((_, message)) => message.to_string(),
        None => line.to_string(),
    }
}

fn fix_for_parse_error(message: &str) -> String {
    if message.contains("unknown field") {
        "remove the key or correct its spelling; the keys allowed here are listed in the message \
         and in the README's pipeline reference"
            .into()
    } else if message.contains("unknown variant") {
        "use one of the types listed in the message".into()
    } else if message.contains("missing field") {
        "add the missing key; see the README's pipeline reference for its meaning".into()
    } else if message.contains("invalid type") {
        "give the value the type the message expects (quote strings that look like numbers)".into()
    } else {
        "fix the YAML syntax at this position (indentation, a missing `:` or an unclosed quote)".into()
    }
}

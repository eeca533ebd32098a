//! Records a Kafka feed cannot decode (not a Debezium change record, or a sluice event of
//! another version), set aside whole with the reason so the feed goes on and nothing is lost:
//! one JSON file per record, named by its topic, partition and offset, so a record read again
//! after a crash rewrites its own file.

use crate::deadletter::{now_text, write_whole};
use crate::error::Result;
use base64::Engine;
use rdkafka::message::{BorrowedMessage, Message};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where one sink's feed sets aside the records it cannot decode.
#[derive(Debug, Clone)]
pub struct UndecodableRecords {
    dir: PathBuf,
}

/// A record as set aside: where it was, why it was refused, and its bytes (as text when they
/// are UTF-8, else base64).
#[derive(Debug, Serialize)]
struct SetAside<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    error: &'a str,
    set_aside_at: String,
    key: Option<Bytes>,
    value: Option<Bytes>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Bytes {
    Text(String),
    Base64(String),
}

impl Bytes {
    fn of(raw: &[u8]) -> Self {
        match std::str::from_utf8(raw) {
            Ok(text) => Bytes::Text(text.to_string()),
            Err(_) => Bytes::Base64(base64::engine::general_purpose::STANDARD.encode(raw)),
        }
    }
}

impl UndecodableRecords {
    /// The records a sink's feed set aside, under the sink's local `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.join("undecodable") }
    }

    /// Keeps `m` durably with `error`; returns the file it is in.
    pub fn set_aside(&self, m: &BorrowedMessage<'_>, error: &str) -> Result<PathBuf> {
        let record = SetAside {
            topic: m.topic(),
            partition: m.partition(),
            offset: m.offset(),
            error,
            set_aside_at: now_text(),
            key: m.key().map(Bytes::of),
            value: m.payload().map(Bytes::of),
        };
        let name = format!("{}-{}-{:020}.json", m.topic(), m.partition(), m.offset());
        let text = serde_json::to_vec_pretty(&record).expect("a set-aside record serializes");
        write_whole(&self.dir, &name, &text)?;
        Ok(self.dir.join(name))
    }
}

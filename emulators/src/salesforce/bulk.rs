//! Bulk API 2.0 ingest jobs: create, one CSV upload, `UploadComplete`, processing that takes
//! time on the emulator's clock, then successful / failed / unprocessed results as CSV in an
//! order that does not match the upload (as Salesforce warns).

use super::store::{Refused, SObjectType, Upserted};
use rand::seq::SliceRandom;
use serde_json::{json, Map, Value};

/// The largest upload Salesforce accepts (150 MB).
pub const MAX_UPLOAD: usize = 150 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    UploadComplete,
    InProgress,
    JobComplete,
    Failed,
    Aborted,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Open => "Open",
            State::UploadComplete => "UploadComplete",
            State::InProgress => "InProgress",
            State::JobComplete => "JobComplete",
            State::Failed => "Failed",
            State::Aborted => "Aborted",
        }
    }
}

/// One ingest job.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub operation: String,
    pub external_id: Option<String>,
    pub delimiter: u8,
    pub line_ending: String,
    pub state: State,
    pub data: Option<Vec<u8>>,
    /// When processing finishes (emulator clock, ms).
    pub ready_at: u64,
    pub processed: u64,
    pub failed: u64,
    pub error_message: Option<String>,
    pub successful: Vec<Vec<String>>,
    pub failures: Vec<Vec<String>>,
    pub header: Vec<String>,
    pub unprocessed: Vec<Vec<String>>,
    pub api_version: String,
}

impl Job {
    /// The job as `GET /jobs/ingest/{id}` shows it.
    pub fn info(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "operation": self.operation,
            "object": self.object,
            "state": self.state.name(),
            "contentType": "CSV",
            "apiVersion": self.api_version.parse::<f64>().unwrap_or(62.0),
            "concurrencyMode": "Parallel",
            "contentUrl": format!("services/data/v{}/jobs/ingest/{}/batches", self.api_version, self.id),
            "lineEnding": self.line_ending,
            "columnDelimiter": delimiter_name(self.delimiter),
            "numberRecordsProcessed": self.processed,
            "numberRecordsFailed": self.failed,
            "retries": 0,
            "jobType": "V2Ingest",
        });
        if let Some(f) = &self.external_id {
            v["externalIdFieldName"] = json!(f);
        }
        if let Some(m) = &self.error_message {
            v["errorMessage"] = json!(m);
        }
        v
    }

    /// Rows in the upload (header excluded), for the processing time.
    pub fn rows(&self) -> u64 {
        self.data.as_ref().map(|d| d.iter().filter(|&&b| b == b'\n').count().saturating_sub(1) as u64).unwrap_or(0)
    }

    /// Applies the upload to `records`; `lock_faults` rows fail with UNABLE_TO_LOCK_ROW.
    pub fn process(&mut self, records: &mut SObjectType, serial: &mut u64, lock_faults: &mut u32) {
        let data = self.data.take().unwrap_or_default();
        let mut reader = csv::ReaderBuilder::new().delimiter(self.delimiter).from_reader(data.as_slice());
        let header: Vec<String> = match reader.headers() {
            Ok(h) => h.iter().map(str::to_string).collect(),
            Err(e) => return self.fail(format!("InvalidBatch : Failed to parse CSV header: {e}")),
        };
        let key = match self.operation.as_str() {
            "upsert" => self.external_id.clone().unwrap_or_default(),
            _ => "Id".to_string(),
        };
        let Some(key_column) = header.iter().position(|h| *h == key) else {
            return self.fail(format!("InvalidBatch : Field name not found : {key}"));
        };
        if let Some(unknown) = records.unknown_field(header.iter()) {
            return self.fail(format!("InvalidBatch : Field name not found : {unknown}"));
        }
        self.header = header.clone();
        self.state = State::JobComplete;
        for row in reader.records() {
            let row: Vec<String> = match row {
                Ok(r) => r.iter().map(str::to_string).collect(),
                Err(e) => return self.fail(format!("InvalidBatch : Failed to parse CSV row: {e}")),
            };
            self.processed += 1;
            if *lock_faults > 0 {
                *lock_faults -= 1;
                self.refuse(row, "UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record:--");
                continue;
            }
            let mut fields = Map::new();
            for (name, value) in header.iter().zip(&row) {
                // Empty leaves a field as it is; #N/A clears it.
                match value.as_str() {
                    _ if *name == key => {}
                    "" => {}
                    "#N/A" => {
                        fields.insert(name.clone(), Value::Null);
                    }
                    v => {
                        fields.insert(name.clone(), json!(v));
                    }
                }
            }
            let key_value = row[key_column].clone();
            match self.operation.as_str() {
                "upsert" => match records.upsert(&self.object, &key, &key_value, fields, serial) {
                    Ok(Upserted::Created(id)) => self.succeed(id, true, row),
                    Ok(Upserted::Updated(id)) => self.succeed(id, false, row),
                    Err(Refused::Record(e)) => {
                        let fields = e.fields.join(", ");
                        self.refuse(row, &format!("{}:{}:{fields} --", e.status_code, e.message))
                    }
                    Err(Refused::MultipleMatches(_)) => self.refuse(
                        row,
                        &format!("DUPLICATE_EXTERNAL_ID:Foreign key external ID: {key_value} matched more than one record:--"),
                    ),
                    Err(Refused::NotFound) => unreachable!("upserts create"),
                },
                _ => self.refuse(row, "INVALID_OPERATION:only upsert is emulated:--"),
            }
        }
        let mut rng = rand::rng();
        self.successful.shuffle(&mut rng);
        self.failures.shuffle(&mut rng);
    }

    fn succeed(&mut self, id: String, created: bool, row: Vec<String>) {
        let mut out = vec![id, created.to_string()];
        out.extend(row);
        self.successful.push(out);
    }

    fn refuse(&mut self, row: Vec<String>, error: &str) {
        self.failed += 1;
        let mut out = vec![String::new(), error.to_string()];
        out.extend(row);
        self.failures.push(out);
    }

    fn fail(&mut self, message: String) {
        self.state = State::Failed;
        self.error_message = Some(message);
    }

    /// Aborts the job; rows never processed become `unprocessedrecords`.
    pub fn abort(&mut self) {
        if let Some(data) = self.data.take() {
            let mut reader = csv::ReaderBuilder::new().delimiter(self.delimiter).from_reader(data.as_slice());
            self.header = reader.headers().map(|h| h.iter().map(str::to_string).collect()).unwrap_or_default();
            self.unprocessed = reader.records().flatten().map(|r| r.iter().map(str::to_string).collect()).collect();
        }
        self.state = State::Aborted;
    }

    /// One of the result sets as CSV.
    pub fn results(&self, which: &str) -> Option<String> {
        let (prefix, rows): (&[&str], &[Vec<String>]) = match which {
            "successfulResults" => (&["sf__Id", "sf__Created"], &self.successful),
            "failedResults" => (&["sf__Id", "sf__Error"], &self.failures),
            "unprocessedrecords" => (&[], &self.unprocessed),
            _ => return None,
        };
        let mut w = csv::WriterBuilder::new().delimiter(self.delimiter).from_writer(Vec::new());
        let header: Vec<&str> = prefix.iter().copied().chain(self.header.iter().map(String::as_str)).collect();
        if !header.is_empty() {
            w.write_record(&header).ok()?;
        }
        for row in rows {
            w.write_record(row).ok()?;
        }
        String::from_utf8(w.into_inner().ok()?).ok()
    }
}

pub fn delimiter_name(d: u8) -> &'static str {
    match d {
        b'\t' => "TAB",
        b';' => "SEMICOLON",
        b'|' => "PIPE",
        b'^' => "CARET",
        b'`' => "BACKQUOTE",
        _ => "COMMA",
    }
}

pub fn delimiter(name: &str) -> Option<u8> {
    Some(match name {
        "COMMA" => b',',
        "TAB" => b'\t',
        "SEMICOLON" => b';',
        "PIPE" => b'|',
        "CARET" => b'^',
        "BACKQUOTE" => b'`',
        _ => return None,
    })
}

//! Large batches through a Bulk API 2.0 ingest job: create, upload the CSV, `UploadComplete`,
//! poll until the job ends, then read the failed and unprocessed records back (results come in
//! any order, so they are matched to the batch by external ID). A crash mid-job resends the
//! batch as a new job; upserts by external ID make that harmless.

use super::calls::{Api, Body};
use super::{classify, Class};
use crate::connectors::mapped::Item;
use crate::error::{Error, Result};
use crate::mapping::coalesce::Write;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

/// What a job left to do.
pub struct JobOutcome<'a> {
    pub written: u64,
    /// Records to send again (locked rows, records the job never processed).
    pub retry: Vec<&'a Item>,
    pub dead: Vec<(&'a Item, String)>,
}

/// Polls start here and back off to [`POLL_MAX`], as Salesforce asks of Bulk clients.
const POLL_FIRST: Duration = Duration::from_millis(200);
const POLL_MAX: Duration = Duration::from_secs(2);

fn csv_text(v: &minijinja::Value) -> String {
    // Empty leaves a field as it is in Bulk CSV; `#N/A` clears it.
    if v.is_none() || v.is_undefined() {
        "#N/A".into()
    } else {
        v.to_string()
    }
}

/// Upserts `items` by `external_id` in one ingest job.
pub async fn upsert<'a>(
    api: &Api,
    object: &str,
    external_id: &str,
    fields: &[String],
    items: &[&'a Item],
) -> Result<JobOutcome<'a>> {
    // The external ID goes first, so result rows can be matched by their first original column.
    let columns: Vec<usize> = (0..fields.len()).filter(|&i| fields[i] != external_id).collect();
    let mut csv = csv::Writer::from_writer(Vec::new());
    let csv_error = |e: csv::Error| Error::permanent("salesforce bulk CSV", e);
    let header = std::iter::once(external_id).chain(columns.iter().map(|&i| fields[i].as_str()));
    csv.write_record(header).map_err(csv_error)?;
    let mut by_key: HashMap<String, &'a Item> = HashMap::with_capacity(items.len());
    for item in items {
        let Write::Upsert(values) = &item.write else { unreachable!("upserts only") };
        let key = item.record.external_id();
        let row: Vec<String> =
            std::iter::once(key.clone()).chain(columns.iter().map(|&i| csv_text(&values[i]))).collect();
        csv.write_record(&row).map_err(csv_error)?;
        by_key.insert(key, item);
    }
    let data = String::from_utf8(csv.into_inner().map_err(|e| Error::permanent("salesforce bulk CSV", e))?)
        .map_err(|e| Error::permanent("salesforce bulk CSV", e))?;

    let spec = json!({
        "object": object, "operation": "upsert", "externalIdFieldName": external_id,
        "contentType": "CSV", "lineEnding": "LF", "columnDelimiter": "COMMA",
    });
    let job = api.json(reqwest::Method::POST, "jobs/ingest", &spec).await?;
    let id =
        job["id"].as_str().ok_or_else(|| Error::permanent("salesforce bulk", "the new job has no id"))?.to_string();
    let finished = run(api, &id, data).await;
    // The job's results are read (or it failed); it is no longer needed either way.
    if let Err(e) = api.send(reqwest::Method::DELETE, &format!("jobs/ingest/{id}"), Body::Empty).await {
        tracing::warn!(job = %id, error = %e, "could not delete a finished bulk job (Salesforce deletes it after 7 days)");
    }
    let (processed, failed, unprocessed) = finished?;

    let mut out = JobOutcome { written: 0, retry: Vec::new(), dead: Vec::new() };
    let mut not_written = 0u64;
    for (key, error) in failed {
        let Some(item) = by_key.remove(&key) else { continue };
        not_written += 1;
        let code = error.split(':').next().unwrap_or_default();
        match classify(code) {
            Class::Retry => out.retry.push(item),
            Class::DeadLetter => out.dead.push((item, error)),
            Class::Fatal => return Err(Error::config(format!("salesforce refused writes to {object} ({error})"))),
        }
    }
    for key in unprocessed {
        if let Some(item) = by_key.remove(&key) {
            not_written += 1;
            out.retry.push(item);
        }
    }
    out.written = items.len() as u64 - not_written;
    tracing::debug!(job = %id, processed, written = out.written, "bulk job done");
    Ok(out)
}

/// Uploads, closes and waits for job `id`: (processed, failed rows by external ID with their
/// error, unprocessed external IDs).
async fn run(api: &Api, id: &str, data: String) -> Result<(u64, Vec<(String, String)>, Vec<String>)> {
    let path = format!("jobs/ingest/{id}");
    api.send(reqwest::Method::PUT, &format!("{path}/batches"), Body::Csv(data)).await?;
    api.json(reqwest::Method::PATCH, &path, &json!({"state": "UploadComplete"})).await?;
    let mut delay = POLL_FIRST;
    let info = loop {
        tokio::time::sleep(delay).await;
        let info = api.json(reqwest::Method::GET, &path, &json!(null)).await?;
        match info["state"].as_str().unwrap_or_default() {
            "JobComplete" => break info,
            "Failed" => {
                let message = info["errorMessage"].as_str().unwrap_or("no errorMessage").to_string();
                // A refused upload (unknown field, bad CSV) will be refused again: say so.
                return Err(if message.starts_with("InvalidBatch") || message.starts_with("InvalidJob") {
                    Error::config(format!("salesforce bulk job {id} failed: {message}"))
                } else {
                    Error::retryable(format!("salesforce bulk job {id}"), message)
                });
            }
            "Aborted" => return Err(Error::retryable(format!("salesforce bulk job {id}"), "aborted by someone else")),
            _ => delay = (delay * 3 / 2).min(POLL_MAX),
        }
    };
    let processed = info["numberRecordsProcessed"].as_u64().unwrap_or(0);
    let failed = if info["numberRecordsFailed"].as_u64().unwrap_or(0) > 0 {
        let (_, text) = api.send(reqwest::Method::GET, &format!("{path}/failedResults"), Body::Empty).await?;
        rows(&text, "sf__Error")?
    } else {
        Vec::new()
    };
    let (_, text) = api.send(reqwest::Method::GET, &format!("{path}/unprocessedrecords"), Body::Empty).await?;
    let unprocessed = rows(&text, "")?.into_iter().map(|(key, _)| key).collect();
    Ok((processed, failed, unprocessed))
}

/// The external ID (the first original column after the `sf__` ones) and `column` of each row
/// of a result CSV.
fn rows(text: &str, column: &str) -> Result<Vec<(String, String)>> {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let bad = |e: csv::Error| Error::permanent("salesforce bulk results", e);
    let header = reader.headers().map_err(bad)?.clone();
    let wanted = header.iter().position(|h| h == column);
    let first_original = header.iter().position(|h| !h.starts_with("sf__")).unwrap_or(0);
    let mut out = Vec::new();
    for row in reader.records() {
        let row = row.map_err(bad)?;
        let value = wanted.and_then(|i| row.get(i)).unwrap_or_default().to_string();
        out.push((row.get(first_original).unwrap_or_default().to_string(), value));
    }
    Ok(out)
}

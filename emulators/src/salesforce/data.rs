//! The data API under `/services/data/vXX.X/`: sObject rows by external ID, sObject
//! Collections upsert, Composite, Bulk API 2.0 ingest and `/limits`.

use super::bulk::{self, Job, State as JobState};
use super::store::{self, RecordError, Refused, SObjectType, Upserted};
use super::{error, Org, Shared};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// The most records one Collections call takes.
pub const COLLECTION_LIMIT: usize = 200;
/// The most subrequests one Composite call takes.
pub const COMPOSITE_LIMIT: usize = 25;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/{version}/limits", get(limits))
        .route("/{version}/composite/sobjects/{object}/{field}", patch(collection_upsert))
        .route("/{version}/composite", post(composite))
        .route("/{version}/sobjects/{object}/{field}/{value}", get(row).patch(row).delete(row))
        .route("/{version}/jobs/ingest", post(create_job))
        .route("/{version}/jobs/ingest/{id}", get(job).patch(job).delete(job))
        .route("/{version}/jobs/ingest/{id}/batches", put(upload))
        .route("/{version}/jobs/ingest/{id}/{which}", get(results))
}

/// `v62.0` -> 62.0.
fn version(text: &str) -> Option<f64> {
    text.strip_prefix('v')?.parse().ok()
}

fn reply(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if body.is_null() {
        status.into_response()
    } else {
        (status, Json(body)).into_response()
    }
}

fn refusal(status: u16, code: &str, message: &str) -> (u16, Value) {
    (status, json!([{"message": message, "errorCode": code}]))
}

/// The object and its external ID field, or the 404 Salesforce answers.
fn object_with_key<'a>(org: &'a mut Org, object: &str, field: &str) -> Result<&'a mut SObjectType, (u16, Value)> {
    let Some(o) = org.objects.get_mut(object) else {
        return Err(refusal(404, "NOT_FOUND", "The requested resource does not exist"));
    };
    if !o.is_external_id(field) {
        return Err(refusal(
            404,
            "NOT_FOUND",
            &format!("Provided external ID field does not exist or is not accessible: {field}"),
        ));
    }
    Ok(o)
}

/// Takes one pending UNABLE_TO_LOCK_ROW fault, if any.
fn lock_fault(org: &mut Org) -> Option<RecordError> {
    (org.lock_faults > 0).then(|| {
        org.lock_faults -= 1;
        RecordError::new("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record", vec![])
    })
}

/// One sObject row by external ID: GET, PATCH (upsert) or DELETE.
fn row_op(org: &mut Org, v: f64, method: &str, object: &str, field: &str, value: &str, body: &Value) -> (u16, Value) {
    let mut serial = org.serial;
    let o = match object_with_key(org, object, field) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let url = |id: &str| format!("/services/data/v{v:.1}/sobjects/{object}/{id}");
    let outcome = match method {
        "GET" => match o.records.values().find(|r| r.get(field).and_then(Value::as_str) == Some(value)) {
            Some(r) => return (200, Value::Object(r.clone())),
            None => return refusal(404, "NOT_FOUND", "The requested resource does not exist"),
        },
        "DELETE" => o.delete(field, value).map(|_| (204, Value::Null)),
        "PATCH" => {
            let Some(fields) = body.as_object().cloned() else {
                return refusal(400, "JSON_PARSER_ERROR", "The request body must be a JSON object");
            };
            if let Some(unknown) = o.unknown_field(fields.keys()) {
                return refusal(
                    400,
                    "INVALID_FIELD",
                    &format!("No such column '{unknown}' on sobject of type {object}"),
                );
            }
            o.upsert(object, field, value, fields, &mut serial).map(|u| match u {
                Upserted::Created(id) => (201, json!({"id": id, "success": true, "errors": [], "created": true})),
                // Before v46 an update answered 204 with no body.
                Upserted::Updated(_) if v < 46.0 => (204, Value::Null),
                Upserted::Updated(id) => (200, json!({"id": id, "success": true, "errors": [], "created": false})),
            })
        }
        _ => return refusal(405, "METHOD_NOT_ALLOWED", "HTTP Method is not allowed"),
    };
    org.serial = serial;
    match outcome {
        Ok(ok) => ok,
        Err(Refused::NotFound) => refusal(404, "NOT_FOUND", "The requested resource does not exist"),
        Err(Refused::MultipleMatches(ids)) => (300, json!(ids.iter().map(|id| url(id)).collect::<Vec<_>>())),
        Err(Refused::Record(e)) => {
            (400, json!([{"message": e.message, "errorCode": e.status_code, "fields": e.fields}]))
        }
    }
}

async fn row(
    State(s): State<Arc<Shared>>,
    method: axum::http::Method,
    Path((ver, object, field, value)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Response {
    let Some(v) = version(&ver) else { return error(404, "NOT_FOUND", "The requested resource does not exist") };
    let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
    let (status, body) = row_op(&mut s.org(), v, method.as_str(), &object, &field, &value, &body);
    reply(status, body)
}

/// `PATCH /composite/sobjects/{object}/{field}`: up to 200 upserts, results in request order.
async fn collection_upsert(
    State(s): State<Arc<Shared>>,
    Path((ver, object, field)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    let mut org = s.org();
    let (status, body) = upsert_collection(&mut org, &ver, &object, &field, &body);
    reply(status, body)
}

fn upsert_collection(org: &mut Org, ver: &str, object: &str, field: &str, body: &[u8]) -> (u16, Value) {
    if version(ver).is_none_or(|v| v < 46.0) {
        return refusal(404, "NOT_FOUND", "The requested resource does not exist");
    }
    let body: Value = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return refusal(400, "JSON_PARSER_ERROR", &format!("Unexpected character: {e}")),
    };
    let all_or_none = body.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
    let Some(records) = body.get("records").and_then(Value::as_array) else {
        return refusal(400, "JSON_PARSER_ERROR", "No content to map due to end-of-input");
    };
    if records.len() > COLLECTION_LIMIT {
        return refusal(
            400,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    let o = match object_with_key(org, object, field) {
        Ok(o) => o,
        Err(e) => return e,
    };
    for r in records {
        if r.pointer("/attributes/type").and_then(Value::as_str) != Some(object) {
            return refusal(400, "INVALID_TYPE", "Each record must name its sObject type in attributes.type");
        }
        if let Some(unknown) = r.as_object().and_then(|m| o.unknown_field(m.keys())) {
            return refusal(400, "INVALID_FIELD", &format!("No such column '{unknown}' on sobject of type {object}"));
        }
    }
    let backup = all_or_none.then(|| org.objects.get(object).cloned()).flatten();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in records {
        if let Some(k) = r.get(field).and_then(store::text) {
            *counts.entry(k).or_default() += 1;
        }
    }
    let mut results = Vec::with_capacity(records.len());
    let mut failed = false;
    for r in records {
        let mut fields: Map<String, Value> = r.as_object().cloned().unwrap_or_default();
        fields.remove("attributes");
        let key = fields.remove(field).as_ref().and_then(store::text);
        let outcome = match key {
            None => {
                Err(RecordError::new("MISSING_ARGUMENT", format!("{field} not specified"), vec![field.to_string()]))
            }
            // [U] The message for a value repeated within one request.
            Some(k) if counts[&k] > 1 => {
                Err(RecordError::new("DUPLICATE_VALUE", format!("Duplicate external id specified: {k}"), vec![]))
            }
            Some(k) => match lock_fault(org) {
                Some(e) => Err(e),
                None => {
                    let mut serial = org.serial;
                    let o = org.objects.get_mut(object).expect("checked above");
                    let done = o.upsert(object, field, &k, fields, &mut serial);
                    org.serial = serial;
                    done.map_err(|e| match e {
                        Refused::Record(e) => e,
                        Refused::MultipleMatches(_) => RecordError::new(
                            "DUPLICATE_EXTERNAL_ID",
                            format!("{field}: more than one record found for external id field: {k}"),
                            vec![field.to_string()],
                        ),
                        Refused::NotFound => unreachable!("upserts create"),
                    })
                }
            },
        };
        failed |= outcome.is_err();
        results.push(match outcome {
            Ok(Upserted::Created(id)) => json!({"id": id, "success": true, "errors": [], "created": true}),
            Ok(Upserted::Updated(id)) => json!({"id": id, "success": true, "errors": [], "created": false}),
            Err(e) => json!({"id": null, "success": false, "errors": [e.to_json()]}),
        });
    }
    if let (true, Some(backup)) = (failed, backup) {
        org.objects.insert(object.to_string(), backup);
        for r in results.iter_mut().filter(|r| r["success"] == true) {
            *r = json!({"id": null, "success": false, "errors": [{
                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "message": "Record rolled back because not all records were valid and the request was using AllOrNone header",
                "fields": [],
            }]});
        }
    }
    (200, Value::Array(results))
}

/// `POST /composite`: up to 25 subrequests on sObject rows by external ID, `@{ref.field}`
/// references, `allOrNone` rollback with PROCESSING_HALTED; one API call in all.
async fn composite(State(s): State<Arc<Shared>>, Path(ver): Path<String>, body: Bytes) -> Response {
    let mut org = s.org();
    let Some(v) = version(&ver) else { return error(404, "NOT_FOUND", "The requested resource does not exist") };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "JSON_PARSER_ERROR", "The request body is not JSON");
    };
    let all_or_none = body.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
    let Some(subs) = body.get("compositeRequest").and_then(Value::as_array) else {
        return error(400, "JSON_PARSER_ERROR", "compositeRequest is required");
    };
    if subs.len() > COMPOSITE_LIMIT {
        return error(400, "LIMIT_EXCEEDED", "Composite requests cannot contain more than 25 subrequests");
    }
    for sub in subs {
        if ["method", "url", "referenceId"].iter().any(|k| sub.get(k).and_then(Value::as_str).is_none()) {
            return error(400, "JSON_PARSER_ERROR", "Each subrequest needs method, url and referenceId");
        }
    }
    let backup =
        all_or_none.then(|| org.objects.iter().map(|(k, o)| (k.clone(), o.clone())).collect::<HashMap<_, _>>());
    let mut bodies: HashMap<String, Value> = HashMap::new();
    let mut results: Vec<Value> = Vec::new();
    let mut halted = false;
    for sub in subs {
        let reference = sub["referenceId"].as_str().unwrap_or_default().to_string();
        let (status, out) = match resolve(&sub["url"], &bodies)
            .zip(resolve(sub.get("body").unwrap_or(&Value::Null), &bodies))
        {
            None => {
                refusal(400, "PROCESSING_HALTED", "Invalid reference specified. No value for a referenced field found.")
            }
            Some((url, sub_body)) => {
                let path = url.as_str().unwrap_or_default().trim_start_matches('/').split('/').collect::<Vec<_>>();
                match path.as_slice() {
                    ["services", "data", _, "sobjects", object, field, value] => {
                        row_op(&mut org, v, sub["method"].as_str().unwrap_or_default(), object, field, value, &sub_body)
                    }
                    _ => refusal(400, "NOT_SUPPORTED", "The emulator takes sObject rows by external ID in composite"),
                }
            }
        };
        if status >= 400 {
            halted = true;
        }
        if status < 300 {
            bodies.insert(reference.clone(), out.clone());
        }
        results.push(json!({"body": out, "httpHeaders": {}, "httpStatusCode": status, "referenceId": reference}));
    }
    if let (true, Some(backup)) = (halted, backup) {
        org.objects = backup;
        for r in results.iter_mut().filter(|r| r["httpStatusCode"].as_u64().is_some_and(|s| s < 400)) {
            r["httpStatusCode"] = json!(400);
            let message = "The transaction was rolled back since another operation in the same transaction failed.";
            r["body"] = json!([{"errorCode": "PROCESSING_HALTED", "message": message}]);
        }
    }
    (StatusCode::OK, Json(json!({"compositeResponse": results}))).into_response()
}

/// Replaces `@{ref.field}` in strings with the earlier subrequest's result; `None` when a
/// reference has no value.
fn resolve(v: &Value, bodies: &HashMap<String, Value>) -> Option<Value> {
    Some(match v {
        Value::String(s) => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(start) = rest.find("@{") {
                out.push_str(&rest[..start]);
                let end = rest[start..].find('}')? + start;
                let (reference, field) = rest[start + 2..end].split_once('.')?;
                out.push_str(&store::text(bodies.get(reference)?.get(field)?)?);
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| Some((k.clone(), resolve(v, bodies)?))).collect::<Option<_>>()?)
        }
        Value::Array(a) => Value::Array(a.iter().map(|v| resolve(v, bodies)).collect::<Option<_>>()?),
        other => other.clone(),
    })
}

/// `GET /limits`: the daily allocation as the real resource reports it.
async fn limits(State(s): State<Arc<Shared>>) -> Json<Value> {
    let mut org = s.org();
    let (used, max) = (org.usage(), org.config.daily_max);
    Json(json!({"DailyApiRequests": {"Max": max, "Remaining": max.saturating_sub(used)}}))
}

fn job_error(message: &str) -> Response {
    error(400, "INVALIDJOB", message)
}

/// `POST /jobs/ingest`: a new upsert job, `Open`.
async fn create_job(State(s): State<Arc<Shared>>, Path(ver): Path<String>, Json(body): Json<Value>) -> Response {
    let mut org = s.org();
    let text = |k: &str| body.get(k).and_then(Value::as_str).map(String::from);
    let (Some(object), Some(operation)) = (text("object"), text("operation")) else {
        return job_error("InvalidJob : object and operation are required");
    };
    if operation != "upsert" {
        return job_error(&format!("InvalidJob : the emulator processes upsert jobs only, not {operation}"));
    }
    let external_id = text("externalIdFieldName").unwrap_or_default();
    if !org.objects.get(&object).is_some_and(|o| o.is_external_id(&external_id)) {
        return job_error(&format!(
            "InvalidJob : Field name provided, {external_id} does not match an External ID, Salesforce Id, or indexed field for {object}"
        ));
    }
    let Some(delimiter) = bulk::delimiter(&text("columnDelimiter").unwrap_or_else(|| "COMMA".into())) else {
        return job_error("InvalidJob : columnDelimiter is not one of COMMA, TAB, SEMICOLON, PIPE, CARET, BACKQUOTE");
    };
    org.serial += 1;
    org.count("bulk_jobs");
    let id = super::store::record_id("750", org.serial);
    let job = Job {
        id: id.clone(),
        object,
        operation,
        external_id: Some(external_id),
        delimiter,
        line_ending: text("lineEnding").unwrap_or_else(|| "LF".into()),
        state: JobState::Open,
        data: None,
        ready_at: 0,
        processed: 0,
        failed: 0,
        error_message: None,
        successful: Vec::new(),
        failures: Vec::new(),
        header: Vec::new(),
        unprocessed: Vec::new(),
        api_version: ver.trim_start_matches('v').to_string(),
    };
    let info = job.info();
    org.jobs.insert(id, job);
    (StatusCode::OK, Json(info)).into_response()
}

/// `PUT /jobs/ingest/{id}/batches`: the job's one CSV upload.
async fn upload(State(s): State<Arc<Shared>>, Path((_, id)): Path<(String, String)>, body: Bytes) -> Response {
    let mut org = s.org();
    let Some(job) = org.jobs.get_mut(&id) else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    if job.state != JobState::Open || job.data.is_some() {
        return job_error("InvalidJobState : Only one upload is allowed, to a job in state Open");
    }
    if body.len() > bulk::MAX_UPLOAD {
        return job_error("InvalidBatch : The upload is larger than 150 MB");
    }
    job.data = Some(body.to_vec());
    StatusCode::CREATED.into_response()
}

/// `GET`, `PATCH` (`UploadComplete`, `Aborted`) and `DELETE` of a job.
async fn job(
    State(s): State<Arc<Shared>>,
    method: axum::http::Method,
    Path((_, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut guard = s.org();
    let org = &mut *guard;
    let now = org.now_ms();
    let rate = org.config.bulk_rows_per_second;
    let Some(job) = org.jobs.get_mut(&id) else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    match method.as_str() {
        "PATCH" => {
            let state = serde_json::from_slice::<Value>(&body).ok().and_then(|b| b["state"].as_str().map(String::from));
            match (state.as_deref(), job.state) {
                (Some("UploadComplete"), JobState::Open) if job.data.is_some() => {
                    job.state = JobState::InProgress;
                    job.ready_at = now + job.rows() * 1000 / rate;
                }
                (Some("UploadComplete"), JobState::Open) => {
                    job.state = JobState::Failed;
                    job.error_message = Some("InvalidBatch : No data was uploaded".into());
                }
                (Some("Aborted"), JobState::Open | JobState::UploadComplete | JobState::InProgress) => job.abort(),
                _ => return job_error("InvalidJobState : The job cannot move to the state asked for"),
            }
            (StatusCode::OK, Json(job.info())).into_response()
        }
        "DELETE" => {
            if !matches!(job.state, JobState::JobComplete | JobState::Failed | JobState::Aborted | JobState::Open) {
                return job_error("InvalidJobState : Only a finished job can be deleted");
            }
            org.jobs.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => {
            if job.state == JobState::InProgress && now >= job.ready_at {
                let records = org.objects.entry(job.object.clone()).or_default();
                job.process(records, &mut org.serial, &mut org.lock_faults);
            }
            (StatusCode::OK, Json(job.info())).into_response()
        }
    }
}

/// `GET /jobs/ingest/{id}/successfulResults|failedResults|unprocessedrecords`.
async fn results(State(s): State<Arc<Shared>>, Path((_, id, which)): Path<(String, String, String)>) -> Response {
    let org = s.org();
    let Some(job) = org.jobs.get(&id) else { return error(404, "NOT_FOUND", "The requested resource does not exist") };
    if !matches!(job.state, JobState::JobComplete | JobState::Aborted | JobState::Failed) {
        return job_error("InvalidJobState : Results are available once the job is complete");
    }
    match job.results(which.trim_end_matches('/')) {
        Some(csv) => ([(header::CONTENT_TYPE, "text/csv")], csv).into_response(),
        None => error(404, "NOT_FOUND", "The requested resource does not exist"),
    }
}

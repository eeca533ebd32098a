//! The Salesforce sink: records upserted by an external ID field. Batches below
//! `bulk_threshold` records go through sObject Collections (200 a call, `allOrNone=false`,
//! several calls in flight, sized by [`Adaptive`]); larger ones (snapshots, backfills) through
//! a Bulk API 2.0 ingest job ([`bulk`]). Deletes go through Composite, 25 deletes by external ID
//! a call. Per-record results are classified: row locks and rolled-back siblings are retried
//! alone, data errors are dead-lettered, and errors about the object itself stop the pipeline.
//!
//! Every response's `Sforce-Limit-Info` feeds the account's [`DailyQuota`]; when the org's
//! daily allocation is exhausted (`403 REQUEST_LIMIT_EXCEEDED`, TotalRequests) the sink parks.

mod bulk;
mod calls;

use crate::config::SalesforceSinkConfig;
use crate::connectors::aimd::{self, Adaptive};
use crate::connectors::mapped::{Applied, Connect, Item, MappedSink, Target};
use crate::connectors::oauth::Session;
use crate::connectors::quota::DailyQuota;
use crate::deadletter::{Entry, EntryStore, Reason};
use crate::error::{Error, Result};
use crate::event::Position;
use crate::log::EmbeddedLog;
use crate::mapping::coalesce::Write;
use crate::mapping::Mapper;
use crate::runtime::Shutdown;
use calls::Api;
use minijinja::Value;
use serde_json::{json, Map, Value as Json};
use std::sync::Arc;
use std::time::Duration;

/// The most records one Collections call takes.
const COLLECTION_LIMIT: usize = 200;
/// The most subrequests one Composite call takes.
const COMPOSITE_LIMIT: usize = 25;
/// Rounds of resending records that hit a transient per-record error before the batch fails.
const RECORD_RETRIES: u32 = 6;

/// The Salesforce sink.
pub type SalesforceSink = MappedSink<SalesforceConnect>;

/// Builds the Salesforce sink of `cfg`.
pub async fn build(
    cfg: SalesforceSinkConfig,
    log: EmbeddedLog,
    cursor: u64,
    shutdown: Shutdown,
) -> Result<SalesforceSink> {
    let (name, mapping, batch) = (cfg.name.clone(), cfg.mapping.clone(), cfg.batch);
    let connector = connector(cfg, log.dir(), shutdown);
    MappedSink::build(&name, mapping, batch, connector, log, cursor).await
}

/// The sink's connector, for the running sink and for `sluice dlq replay`.
pub fn connector(cfg: SalesforceSinkConfig, data_dir: &std::path::Path, shutdown: Shutdown) -> SalesforceConnect {
    SalesforceConnect {
        dead: EntryStore::dead_letters(data_dir, &cfg.name),
        quota: Arc::new(DailyQuota::open(data_dir, &cfg.name, &cfg.auth.account(&cfg.url), shutdown)),
        cfg,
    }
}

pub struct SalesforceConnect {
    cfg: SalesforceSinkConfig,
    dead: EntryStore,
    quota: Arc<DailyQuota>,
}

#[async_trait::async_trait]
impl Connect for SalesforceConnect {
    type Target = SalesforceTarget;

    async fn connect(&self, mapper: &Mapper) -> Result<SalesforceTarget> {
        let http = crate::connectors::http::client()?;
        let session =
            Session::new(http.clone(), self.cfg.auth.grant(&format!("{}/services/oauth2/token", self.cfg.url))?);
        let api = Api {
            http,
            session,
            version: self.cfg.api_version.clone(),
            quota: self.quota.clone(),
            park_probe: self.cfg.park_probe,
        };
        Ok(SalesforceTarget {
            api: Arc::new(api),
            object: self.cfg.object.clone(),
            external_id: mapper.key_names().first().cloned().unwrap_or_default(),
            fields: mapper.field_names().to_vec(),
            sink: self.cfg.name.clone(),
            bulk_threshold: self.cfg.bulk_threshold,
            adaptive: std::sync::Mutex::new(Adaptive::new(COLLECTION_LIMIT, 8, Duration::from_secs(5))),
            dead: self.dead.clone(),
        })
    }
}

pub struct SalesforceTarget {
    api: Arc<Api>,
    object: String,
    /// The external ID field (the mapping key's target).
    external_id: String,
    fields: Vec<String>,
    sink: String,
    bulk_threshold: usize,
    /// Call size and concurrency, adapted after every round of calls.
    adaptive: std::sync::Mutex<Adaptive>,
    dead: EntryStore,
}

/// How a per-record error is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Transient for this record: send it again in a later call.
    Retry,
    /// The record's data: dead-letter it, keep going.
    DeadLetter,
    /// The object or the credentials: no record can be written; stop with the reason.
    Fatal,
}

fn classify(code: &str) -> Class {
    match code {
        "UNABLE_TO_LOCK_ROW" | "ALL_OR_NONE_OPERATION_ROLLED_BACK" | "PROCESSING_HALTED" | "SERVER_UNAVAILABLE" => {
            Class::Retry
        }
        "INVALID_TYPE" | "INSUFFICIENT_ACCESS_OR_READONLY" | "API_DISABLED_FOR_ORG" | "INVALID_SESSION_ID" => {
            Class::Fatal
        }
        _ => Class::DeadLetter,
    }
}

/// What one call left to do.
#[derive(Default)]
struct Outcome<'a> {
    written: u64,
    retry: Vec<&'a Item>,
    dead: Vec<(&'a Item, String)>,
}

impl SalesforceTarget {
    /// The record as Collections takes it: the external ID and every mapped field.
    fn record(&self, item: &Item, fields: &[Value]) -> Map<String, Json> {
        let mut m = Map::new();
        m.insert("attributes".into(), json!({"type": self.object}));
        m.insert(self.external_id.clone(), json!(item.record.external_id()));
        for (name, v) in self.fields.iter().zip(fields).filter(|(name, _)| **name != self.external_id) {
            let value = if v.is_none() || v.is_undefined() {
                Json::Null
            } else {
                serde_json::to_value(v).unwrap_or(Json::Null)
            };
            m.insert(name.clone(), value);
        }
        m
    }

    fn dead_letter(&self, item: &Item, error: &str) -> Result<()> {
        tracing::warn!(sink = %self.sink, offset = item.record.offset, error, "salesforce refused a record; dead-lettered");
        let mapped = match &item.write {
            Write::Upsert(f) => Some(Json::Object(self.record(item, f))),
            Write::Delete => None,
        };
        let r = &item.record;
        self.dead.put(Entry::new(
            r.offset,
            &self.sink,
            Reason::Rejected,
            error.to_string(),
            &r.event,
            &r.schema,
            mapped,
            None,
        ))
    }

    /// One Collections upsert call.
    async fn upsert_call<'a>(&self, chunk: &[&'a Item]) -> Result<Outcome<'a>> {
        let records: Vec<Json> = chunk
            .iter()
            .map(|item| {
                let Write::Upsert(fields) = &item.write else { unreachable!("upserts only") };
                Json::Object(self.record(item, fields))
            })
            .collect();
        let path = format!("composite/sobjects/{}/{}", self.object, self.external_id);
        let body = json!({"allOrNone": false, "records": records});
        let results = self.api.json(reqwest::Method::PATCH, &path, &body).await?;
        let results = results.as_array().filter(|r| r.len() == chunk.len()).ok_or_else(|| {
            Error::permanent("salesforce collections upsert", "the answer does not have one result per record")
        })?;
        let mut out = Outcome::default();
        for (item, result) in chunk.iter().zip(results) {
            if result["success"] == true {
                out.written += 1;
                continue;
            }
            let error = result["errors"].get(0).cloned().unwrap_or(Json::Null);
            let code = error["statusCode"].as_str().unwrap_or("UNKNOWN");
            match classify(code) {
                Class::Retry => out.retry.push(item),
                Class::DeadLetter => out.dead.push((item, error.to_string())),
                Class::Fatal => {
                    return Err(Error::config(format!(
                    "salesforce refused writes to {} ({code}: {}): check the object and the integration user's access",
                    self.object, error["message"]
                )))
                }
            }
        }
        Ok(out)
    }

    /// One Composite call deleting up to 25 records by external ID.
    async fn delete_call<'a>(&self, chunk: &[&'a Item]) -> Result<Outcome<'a>> {
        let version = &self.api.version;
        let subrequests: Vec<Json> = chunk
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let value =
                    url::form_urlencoded::byte_serialize(item.record.external_id().as_bytes()).collect::<String>();
                json!({
                    "method": "DELETE",
                    "url": format!("/services/data/v{version}/sobjects/{}/{}/{value}", self.object, self.external_id),
                    "referenceId": format!("d{i}"),
                })
            })
            .collect();
        let answer = self
            .api
            .json(reqwest::Method::POST, "composite", &json!({"allOrNone": false, "compositeRequest": subrequests}))
            .await?;
        let results = answer["compositeResponse"].as_array().filter(|r| r.len() == chunk.len()).ok_or_else(|| {
            Error::permanent("salesforce composite delete", "the answer does not have one result per subrequest")
        })?;
        let mut out = Outcome::default();
        for (item, result) in chunk.iter().zip(results) {
            let status = result["httpStatusCode"].as_u64().unwrap_or(0);
            let code = result["body"][0]["errorCode"].as_str().unwrap_or("");
            match status {
                // Already gone (404 NOT_FOUND or ENTITY_IS_DELETED): a replayed delete is harmless.
                200..=299 | 404 => out.written += 1,
                300 => {
                    out.dead.push((item, format!("300: the external ID matched several records: {}", result["body"])))
                }
                _ => match classify(code) {
                    Class::Retry => out.retry.push(item),
                    Class::DeadLetter => out.dead.push((item, result["body"].to_string())),
                    Class::Fatal => {
                        return Err(Error::config(format!("salesforce refused deletes from {} ({code})", self.object)))
                    }
                },
            }
        }
        Ok(out)
    }

    /// Writes `items` in rounds of concurrent calls; records with transient errors go again in
    /// the next round. Returns (written, dead-lettered).
    async fn rounds<'a, F, Fut>(&self, items: Vec<&'a Item>, limit: usize, call: F) -> Result<(u64, u64)>
    where
        F: Fn(Vec<&'a Item>) -> Fut,
        Fut: std::future::Future<Output = Result<Outcome<'a>>>,
    {
        let (mut written, mut dead) = (0, 0);
        let mut pending = items;
        for attempt in 0..=RECORD_RETRIES {
            if pending.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
            }
            let size = self.adaptive.lock().expect("adaptive lock").size.get().min(limit);
            let calls = pending.chunks(size).map(|chunk| call(chunk.to_vec())).collect();
            let outcomes = aimd::round(&self.adaptive, calls, |o: &Outcome| !o.retry.is_empty()).await?;
            let mut retry = Vec::new();
            for o in outcomes {
                written += o.written;
                for (item, reason) in o.dead {
                    self.dead_letter(item, &reason)?;
                    dead += 1;
                }
                retry.extend(o.retry);
            }
            pending = retry;
        }
        if !pending.is_empty() {
            return Err(Error::retryable(
                "salesforce",
                format!("{} records still refused with transient errors after {RECORD_RETRIES} resends", pending.len()),
            ));
        }
        Ok((written, dead))
    }
}

#[async_trait::async_trait]
impl Target for SalesforceTarget {
    async fn write_batch(&mut self, items: Vec<Item>) -> Result<Applied> {
        let mut applied = Applied::default();
        let (upserts, deletes): (Vec<&Item>, Vec<&Item>) =
            items.iter().partition(|i| matches!(i.write, Write::Upsert(_)));
        let mut upserts = upserts;
        if upserts.len() >= self.bulk_threshold {
            let job = bulk::upsert(&self.api, &self.object, &self.external_id, &self.fields, &upserts).await?;
            for (item, reason) in job.dead {
                self.dead_letter(item, &reason)?;
                applied.rejected += 1;
            }
            applied.upserted += job.written;
            // Locked rows and rows the job never reached go through Collections.
            upserts = job.retry;
        }
        let this = &*self;
        let (written, dead) =
            this.rounds(upserts, COLLECTION_LIMIT, |chunk| async move { this.upsert_call(&chunk).await }).await?;
        applied.upserted += written;
        applied.rejected += dead;
        let (deleted, dead) =
            this.rounds(deletes, COMPOSITE_LIMIT, |chunk| async move { this.delete_call(&chunk).await }).await?;
        applied.deleted += deleted;
        applied.rejected += dead;
        Ok(applied)
    }

    async fn truncate(&mut self, _: Position) -> Result<()> {
        // As for HubSpot: emptying a CRM object because a source table was truncated is rarely
        // wanted and cannot be undone.
        tracing::warn!(sink = %self.sink, "source table truncated; Salesforce records are left as they are");
        Ok(())
    }
}

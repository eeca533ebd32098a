//! The HubSpot sink: CRM objects upserted by a unique property (`idProperty`) with
//! `batch/upsert`, and archived for deletes (`batch/read` by the property, then `batch/archive`).
//! Every input carries its log offset as `objectWriteTraceId`, so a 207 names the inputs HubSpot
//! refused: those go to the dead-letter queue and the rest of the batch stands. Requests are
//! spaced by the account's shared budget ([`budget`]) and several are kept in flight, as many
//! as latency and throttling allow ([`Adaptive`]); throttling, locks and server errors are
//! retried; an expired OAuth token is renewed once; other authentication and permission errors
//! stop the pipeline. When the daily allocation is spent the sink parks ([`DailyQuota`]) until
//! midnight UTC, or `rate.park_probe` if sooner.

pub mod budget;

use crate::config::HubSpotSinkConfig;
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
use minijinja::Value;
use serde_json::{json, Map, Value as Json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The most inputs one HubSpot batch call takes.
const BATCH_LIMIT: usize = 100;

/// The HubSpot sink.
pub type HubSpotSink = MappedSink<HubSpotConnect>;

/// Builds the HubSpot sink of `cfg`.
pub async fn build(cfg: HubSpotSinkConfig, log: EmbeddedLog, cursor: u64, shutdown: Shutdown) -> Result<HubSpotSink> {
    let (name, mapping, batch) = (cfg.name.clone(), cfg.mapping.clone(), cfg.batch);
    let connector = connector(cfg, log.dir(), shutdown);
    MappedSink::build(&name, mapping, batch, connector, log, cursor).await
}

/// The sink's connector, for the running sink and for `sluice dlq replay`.
pub fn connector(cfg: HubSpotSinkConfig, data_dir: &std::path::Path, shutdown: Shutdown) -> HubSpotConnect {
    HubSpotConnect {
        dead: EntryStore::dead_letters(data_dir, &cfg.name),
        quota: Arc::new(DailyQuota::open(data_dir, &cfg.name, &cfg.auth.account(&cfg.url), shutdown)),
        cfg,
    }
}

pub struct HubSpotConnect {
    cfg: HubSpotSinkConfig,
    dead: EntryStore,
    quota: Arc<DailyQuota>,
}

#[async_trait::async_trait]
impl Connect for HubSpotConnect {
    type Target = HubSpotTarget;

    async fn connect(&self, mapper: &Mapper) -> Result<HubSpotTarget> {
        let http = crate::connectors::http::client()?;
        let session = Session::new(http.clone(), self.cfg.auth.grant(&format!("{}/oauth/v1/token", self.cfg.url))?);
        // The budget is per account: the same base URL and credentials share one.
        let budget = budget::for_account(&self.cfg.auth.account(&self.cfg.url), self.cfg.rate);
        let id_property = mapper.key_names().first().cloned().unwrap_or_default();
        Ok(HubSpotTarget {
            http,
            base: format!("{}/crm/v3/objects/{}", self.cfg.url, self.cfg.object),
            session,
            quota: self.quota.clone(),
            park_probe: self.cfg.rate.park_probe,
            adaptive: Mutex::new(Adaptive::new(BATCH_LIMIT, 8, Duration::from_secs(5))),
            sink: self.cfg.name.clone(),
            id_property,
            fields: mapper.field_names().to_vec(),
            budget,
            dead: self.dead.clone(),
        })
    }
}

pub struct HubSpotTarget {
    http: reqwest::Client,
    /// `{url}/crm/v3/objects/{object}`.
    base: String,
    session: Session,
    quota: Arc<DailyQuota>,
    park_probe: Duration,
    /// How many calls are kept in flight, adapted after every batch.
    adaptive: Mutex<Adaptive>,
    sink: String,
    id_property: String,
    fields: Vec<String>,
    budget: Arc<budget::Budget>,
    dead: EntryStore,
}

impl HubSpotTarget {
    /// One API call within the account's budget; the status and body, or a classified error.
    async fn call(&self, op: &str, body: &Json) -> Result<(u16, Json)> {
        let context = format!("hubspot {op}");
        let mut token = self.session.token().await?;
        let mut renewed = false;
        loop {
            self.quota.ready().await?;
            self.budget.ready().await;
            let response = self
                .http
                .post(format!("{}/batch/{op}", self.base))
                .bearer_auth(token.access.expose())
                .json(body)
                .send()
                .await
                .map_err(|e| Error::retryable(&context, e))?;
            let status = response.status().as_u16();
            let header =
                |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
            let remaining = header("x-hubspot-ratelimit-remaining");
            let retry_after = header("retry-after");
            if let (Some(max), Some(left)) =
                (header("x-hubspot-ratelimit-daily"), header("x-hubspot-ratelimit-daily-remaining"))
            {
                self.quota.observe(max.saturating_sub(left), max)?;
            }
            // The window is full (by the header, or a 429): no request until it has passed. A
            // Retry-After (423, 477) holds the account's requests as long as it says.
            match (status, retry_after) {
                (_, Some(secs)) if status >= 400 => self.budget.pause(Duration::from_secs(secs), "Retry-After"),
                (429, None) => self.budget.pause(budget::INTERVAL, "429"),
                _ if remaining == Some(0) => self.budget.pause(budget::INTERVAL, "X-HubSpot-RateLimit-Remaining: 0"),
                _ => {}
            }
            let text = response.text().await.map_err(|e| Error::retryable(&context, e))?;
            let body: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
            let category = body.get("category").or(body.get("policyName")).and_then(Json::as_str).unwrap_or("");
            let detail = || {
                let message = body.get("message").and_then(Json::as_str).unwrap_or(&text);
                format!("{status} {category}: {message}")
            };
            match status {
                200..=299 | 400 => return Ok((status, body)),
                401 if !renewed && category == "EXPIRED_AUTHENTICATION" => {
                    renewed = true;
                    token = self.session.renew(&token).await?;
                }
                401 | 403 => {
                    return Err(Error::config(format!("{context}: {} (check the token and its scopes)", detail())))
                }
                404 => return Err(Error::config(format!("{context}: {} (check the object name)", detail()))),
                429 if category == "DAILY" => {
                    self.quota
                        .park(daily_reset().min(SystemTime::now() + self.park_probe), "hubspot daily limit reached")?;
                    return Err(Error::Parked(format!("{context}: {}", detail())));
                }
                429 | 423 | 477 | 500..=599 => {
                    let wait = retry_after.map(|s| format!(", Retry-After {s}s")).unwrap_or_default();
                    return Err(Error::retryable(context, format!("{}{wait}", detail())));
                }
                _ => return Err(Error::permanent(context, detail())),
            }
        }
    }

    fn dead_letter(&self, item: &Item, error: String) -> Result<()> {
        tracing::warn!(sink = %self.sink, offset = item.record.offset, %error, "hubspot refused a record; dead-lettered");
        let mapped = match &item.write {
            Write::Upsert(f) => Some(Json::Object(self.properties(f))),
            Write::Delete => None,
        };
        let r = &item.record;
        self.dead.put(Entry::new(r.offset, &self.sink, Reason::Rejected, error, &r.event, &r.schema, mapped, None))
    }

    /// Mapped fields as HubSpot property values (strings; null clears a property).
    fn properties(&self, fields: &[Value]) -> Map<String, Json> {
        self.fields
            .iter()
            .zip(fields)
            .filter(|(name, _)| **name != self.id_property)
            .map(|(name, v)| {
                let value = if v.is_none() || v.is_undefined() { String::new() } else { v.to_string() };
                (name.clone(), Json::String(value))
            })
            .collect()
    }

    async fn upsert(&self, items: &[&Item]) -> Result<u64> {
        let inputs: Vec<Json> = items
            .iter()
            .map(|item| {
                let Write::Upsert(fields) = &item.write else { unreachable!("upserts only") };
                json!({
                    "idProperty": self.id_property,
                    "id": item.record.external_id(),
                    "properties": self.properties(fields),
                    "objectWriteTraceId": item.record.offset.to_string(),
                })
            })
            .collect();
        let (status, body) = self.call("upsert", &json!({ "inputs": inputs })).await?;
        if status == 400 {
            // The whole batch was refused: nothing was written, every record carries the reason.
            let reason = format!("400 {}", body);
            for item in items {
                self.dead_letter(item, reason.clone())?;
            }
            return Ok(0);
        }
        let mut refused = 0;
        for error in body.get("errors").and_then(Json::as_array).into_iter().flatten() {
            let traces =
                error.pointer("/context/objectWriteTraceId").and_then(Json::as_array).cloned().unwrap_or_default();
            for trace in traces {
                if let Some(item) = items.iter().find(|i| Some(i.record.offset.to_string().as_str()) == trace.as_str())
                {
                    self.dead_letter(item, error.to_string())?;
                    refused += 1;
                }
            }
        }
        Ok(items.len() as u64 - refused)
    }

    async fn archive(&self, items: &[&Item]) -> Result<u64> {
        let ids: Vec<Json> = items.iter().map(|i| json!({ "id": i.record.external_id() })).collect();
        let (status, body) = self.call("read", &json!({ "idProperty": self.id_property, "inputs": ids })).await?;
        if status == 400 {
            return Err(Error::permanent("hubspot read", body.to_string()));
        }
        // Records not found are already gone: a delete's replay is harmless.
        let found: Vec<Json> = body
            .get("results")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("id").cloned())
            .map(|id| json!({ "id": id }))
            .collect();
        if !found.is_empty() {
            self.call("archive", &json!({ "inputs": found })).await?;
        }
        Ok(items.len() as u64)
    }
}

#[async_trait::async_trait]
impl Target for HubSpotTarget {
    async fn write_batch(&mut self, items: Vec<Item>) -> Result<Applied> {
        let mut applied = Applied::default();
        let (upserts, deletes): (Vec<&Item>, Vec<&Item>) =
            items.iter().partition(|i| matches!(i.write, Write::Upsert(_)));
        // Coalescing left one item per key, so ids are unique within each call, as HubSpot requires,
        // and the calls of one batch can be in flight together.
        let this = &*self;
        let calls =
            upserts.chunks(BATCH_LIMIT).map(|chunk| async move { Ok((chunk.len() as u64, this.upsert(chunk).await?)) });
        for (sent, written) in aimd::round(&self.adaptive, calls.collect(), |_| false).await? {
            applied.upserted += written;
            applied.rejected += sent - written;
        }
        for chunk in deletes.chunks(BATCH_LIMIT) {
            applied.deleted += self.archive(chunk).await?;
        }
        Ok(applied)
    }

    async fn truncate(&mut self, _: Position) -> Result<()> {
        // Emptying a CRM object because a source table was truncated is rarely wanted and cannot
        // be undone: say so and leave the records.
        tracing::warn!(sink = %self.sink, "source table truncated; HubSpot records are left as they are");
        Ok(())
    }
}

/// The next midnight UTC, when HubSpot's daily limit resets (in the account's time zone, which
/// the API does not report; parking never runs past `rate.park_probe` anyway).
fn daily_reset() -> SystemTime {
    let now = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    std::time::UNIX_EPOCH + Duration::from_secs(now - now % 86_400 + 86_400)
}

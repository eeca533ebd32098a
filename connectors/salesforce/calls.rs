//! One Salesforce API call: the session's token (renewed once on `INVALID_SESSION_ID`), the
//! org's usage read from `Sforce-Limit-Info`, and the answer's status classified into the
//! error classes the pipeline acts on.

use crate::connectors::oauth::Session;
use crate::connectors::quota::DailyQuota;
use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A request body.
pub enum Body<'a> {
    Json(&'a Json),
    Csv(String),
    Empty,
}

/// The org's data API.
pub struct Api {
    pub http: reqwest::Client,
    pub session: Session,
    /// e.g. `62.0`.
    pub version: String,
    pub quota: Arc<DailyQuota>,
    /// How long the sink parks when the daily allocation is exhausted before trying again
    /// (Salesforce's window is a rolling 24 hours: capacity comes back gradually).
    pub park_probe: Duration,
}

/// `api-usage=10018/100000` -> (10018, 100000).
fn api_usage(header: &str) -> Option<(u64, u64)> {
    let usage = header.split(',').find_map(|part| part.trim().strip_prefix("api-usage="))?;
    let (used, max) = usage.split_once('/')?;
    Some((used.trim().parse().ok()?, max.trim().parse().ok()?))
}

impl Api {
    /// A JSON call; 2xx and 300 answers are returned, other statuses become classified errors.
    pub async fn json(&self, method: reqwest::Method, path: &str, body: &Json) -> Result<Json> {
        let (_, text) = self.send(method, path, Body::Json(body)).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Json::Null))
    }

    /// A call to `{instance}/services/data/v{version}/{path}`: the status and the body's text.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Body<'_>) -> Result<(u16, String)> {
        let context = format!("salesforce {method} {path}");
        let mut renewed = false;
        let mut token = self.session.token().await?;
        loop {
            self.quota.ready().await?;
            let base = token
                .instance_url
                .clone()
                .ok_or_else(|| Error::permanent(&context, "the token answer named no instance_url"))?;
            let url = format!("{base}/services/data/v{}/{path}", self.version);
            let mut request = self.http.request(method.clone(), url).bearer_auth(token.access.expose());
            request = match &body {
                Body::Json(b) => request.json(b),
                Body::Csv(text) => request.header("Content-Type", "text/csv").body(text.clone()),
                Body::Empty => request,
            };
            let response = request.send().await.map_err(|e| Error::retryable(&context, e))?;
            let status = response.status().as_u16();
            let usage = response.headers().get("sforce-limit-info").and_then(|v| api_usage(v.to_str().ok()?));
            if let Some((used, max)) = usage {
                self.quota.observe(used, max)?;
            }
            let text = response.text().await.map_err(|e| Error::retryable(&context, e))?;
            let errors: Json = serde_json::from_str(&text).unwrap_or(Json::Null);
            let code = errors[0]["errorCode"].as_str().unwrap_or("").to_string();
            let message = errors[0]["message"].as_str().unwrap_or(&text).to_string();
            match status {
                200..=300 => return Ok((status, text)),
                401 if !renewed => {
                    // The session timed out: a new one, and this call once more.
                    renewed = true;
                    token = self.session.renew(&token).await?;
                }
                401 => {
                    return Err(Error::config(format!(
                        "{context}: {code}: {message} (a new session was refused too: check the connected app and user)"
                    )))
                }
                403 if code == "REQUEST_LIMIT_EXCEEDED" && message.contains("TotalRequests") => {
                    self.quota.park(SystemTime::now() + self.park_probe, "salesforce daily API requests exhausted")?;
                    return Err(Error::Parked(format!("{context}: {code}: {message}")));
                }
                // The concurrent long-running request limit: back off briefly.
                403 if code == "REQUEST_LIMIT_EXCEEDED" => {
                    return Err(Error::retryable(&context, format!("{code}: {message}")))
                }
                403 => {
                    return Err(Error::config(format!(
                        "{context}: {code}: {message} (check the integration user's permissions)"
                    )))
                }
                404 => {
                    return Err(Error::config(format!(
                        "{context}: {code}: {message} (check the object and its external ID field)"
                    )))
                }
                400 if matches!(code.as_str(), "INVALID_FIELD" | "INVALID_TYPE" | "INVALIDJOB") => {
                    return Err(Error::config(format!("{context}: {code}: {message} (check the mapped field names)")))
                }
                500..=599 => return Err(Error::retryable(&context, format!("{status} {code}: {message}"))),
                _ => return Err(Error::permanent(&context, format!("{status} {code}: {message}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_api_usage_among_other_limits() {
        assert_eq!(api_usage("api-usage=10018/100000"), Some((10018, 100000)));
        assert_eq!(api_usage("per-app-api-usage=17/250(appName=x), api-usage=25/15000"), Some((25, 15000)));
        assert_eq!(api_usage("api-bursts=1/750"), None);
    }
}

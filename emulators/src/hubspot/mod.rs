//! A HubSpot CRM emulator: private-app and OAuth bearer tokens (with expiry), object batch
//! upsert/read/archive under both path families (`/crm/v3/objects/...` and the date-versioned
//! `/crm/objects/{YYYY-MM}/...`), the two per-account rate-limit buckets with their headers and
//! 429 bodies, injectable faults and latency, and a control plane under `/_emu/` for tests.

pub mod objects;

use crate::ratelimit::{RateLimits, Usage};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use objects::{ObjectType, Property, PropertyType};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An OAuth app allowed to refresh tokens at `/oauth/v1/token`.
#[derive(Debug, Clone)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
}

/// How the emulated account is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Private-app tokens (no expiry).
    pub tokens: Vec<String>,
    pub oauth: Option<OAuthApp>,
    /// Lifetime of OAuth access tokens (HubSpot: 1800 s).
    pub token_ttl: Duration,
    /// Requests per rolling 10 s (Free/Starter 100, Pro/Enterprise 190).
    pub ten_second_max: u32,
    /// Requests per day (Free/Starter 250k).
    pub daily_max: u64,
    /// Added to every response.
    pub latency: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tokens: vec!["pat-na1-emulator".into()],
            oauth: None,
            token_ttl: Duration::from_secs(1800),
            ten_second_max: 100,
            daily_max: 250_000,
            latency: Duration::ZERO,
        }
    }
}

/// A fault to return instead of handling matching requests.
#[derive(Debug, Clone)]
struct Fault {
    path_contains: String,
    status: u16,
    remaining: u32,
    retry_after: Option<u64>,
}

struct Account {
    config: Config,
    objects: HashMap<String, ObjectType>,
    next_id: u64,
    limits: RateLimits,
    faults: Vec<Fault>,
    /// OAuth access tokens and when they expire (emulator clock, ms).
    access_tokens: HashMap<String, u64>,
    /// Added to the wall clock: `/_emu/clock` moves time forward (daily reset, token expiry).
    clock_offset_ms: u64,
    stats: BTreeMap<String, u64>,
}

impl Account {
    fn now_ms(&self) -> u64 {
        crate::clock_ms(self.clock_offset_ms)
    }

    fn now_text(&self) -> String {
        chrono::DateTime::from_timestamp_millis(self.now_ms() as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default()
    }

    fn count(&mut self, what: &str) {
        *self.stats.entry(what.to_string()).or_default() += 1;
    }
}

type Shared = Arc<Mutex<Account>>;

pub use crate::Emulator;

/// Starts the emulator on `addr` (port 0 picks a free one). Contacts exist from the start, with
/// `email` unique; other objects appear on first use or through `/_emu/properties/{object}`.
pub async fn start(config: Config, addr: SocketAddr) -> std::io::Result<Emulator> {
    let mut objects = HashMap::new();
    let mut contacts = ObjectType::default();
    contacts.properties.insert("email".into(), Property { ty: PropertyType::String, unique: true });
    objects.insert("contacts".to_string(), contacts);
    let account = Account {
        limits: RateLimits::new(config.ten_second_max, config.daily_max),
        config,
        objects,
        next_id: 1000,
        faults: Vec::new(),
        access_tokens: HashMap::new(),
        clock_offset_ms: 0,
        stats: BTreeMap::new(),
    };
    let state: Shared = Arc::new(Mutex::new(account));
    let app = Router::new()
        .route("/crm/v3/objects/{object}/batch/{op}", post(batch_v3))
        .route("/crm/objects/{version}/{object}/batch/{op}", post(batch_dated))
        .route("/oauth/v1/token", post(token))
        .route("/_emu/objects/{object}", get(list_objects))
        .route("/_emu/properties/{object}", post(define_properties))
        .route("/_emu/faults", post(add_fault))
        .route("/_emu/limits", post(set_limits))
        .route("/_emu/clock", post(advance_clock))
        .route("/_emu/stats", get(stats))
        .with_state(state);
    Emulator::serve(app, addr).await
}

fn envelope(message: &str, category: &str) -> Value {
    json!({"status": "error", "message": message, "correlationId": uuid(), "category": category})
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn respond(status: u16, body: Option<Value>, usage: Option<Usage>, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match body {
        Some(b) => (status, Json(b)).into_response(),
        None => status.into_response(),
    };
    let headers = response.headers_mut();
    if let Some(u) = usage {
        let mut set = |name: &'static str, value: String| {
            headers.insert(name, HeaderValue::from_str(&value).expect("ascii header"));
        };
        set("X-HubSpot-RateLimit-Daily", u.daily_max.to_string());
        set("X-HubSpot-RateLimit-Daily-Remaining", u.daily_remaining.to_string());
        set("X-HubSpot-RateLimit-Interval-Milliseconds", "10000".into());
        set("X-HubSpot-RateLimit-Max", u.interval_max.to_string());
        set("X-HubSpot-RateLimit-Remaining", u.interval_remaining.to_string());
    }
    if let Some(secs) = retry_after {
        headers.insert("Retry-After", HeaderValue::from_str(&secs.to_string()).expect("digits"));
    }
    response
}

async fn batch_v3(
    State(s): State<Shared>,
    Path((object, op)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    api(s, &format!("/crm/v3/objects/{object}/batch/{op}"), object, op, headers, body).await
}

async fn batch_dated(
    State(s): State<Shared>,
    Path((version, object, op)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let valid = version.len() == 7
        && version.as_bytes()[4] == b'-'
        && version.replace('-', "").chars().all(|c| c.is_ascii_digit());
    if !valid {
        return respond(404, Some(envelope(&format!("Unknown API version {version}"), "OBJECT_NOT_FOUND")), None, None);
    }
    api(s, &format!("/crm/objects/{version}/{object}/batch/{op}"), object, op, headers, body).await
}

/// Every API call: latency, faults, authentication, rate limits, then the operation.
async fn api(s: Shared, path: &str, object: String, op: String, headers: HeaderMap, body: Bytes) -> Response {
    let latency = s.lock().expect("account lock").config.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut a = s.lock().expect("account lock");
    a.count("requests");
    // When the first and the last API call arrived (emulator clock), for rates while writing.
    let now = a.now_ms();
    a.stats.entry("first_request_ms".into()).or_insert(now);
    a.stats.insert("last_request_ms".into(), now);
    if let Some(f) = a.faults.iter_mut().find(|f| f.remaining > 0 && path.contains(&f.path_contains)) {
        f.remaining -= 1;
        let (status, retry_after) = (f.status, f.retry_after);
        a.count(&format!("status_{status}"));
        let body = envelope("Emulated fault", if status == 423 { "LOCKED" } else { "INTERNAL_ERROR" });
        return respond(status, Some(body), None, retry_after);
    }
    if let Err(refusal) = authenticate(&a, &headers) {
        a.count("status_401");
        return respond(401, Some(refusal), None, None);
    }
    let now = a.now_ms();
    let usage = match a.limits.take(now) {
        Ok(u) => u,
        Err((policy, usage)) => {
            a.count("status_429");
            a.count(&format!("throttled_{}", policy.name()));
            let body = json!({
                "status": "error", "message": policy.message(), "errorType": "RATE_LIMIT",
                "correlationId": uuid(), "policyName": policy.name(), "requestId": uuid(),
            });
            return respond(429, Some(body), Some(usage), None);
        }
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            a.count("status_400");
            return respond(
                400,
                Some(envelope(&format!("Invalid input JSON: {e}"), "VALIDATION_ERROR")),
                Some(usage),
                None,
            );
        }
    };
    let now_text = a.now_text();
    let mut next_id = a.next_id;
    let outcome = {
        let objects = a.objects.entry(object.clone()).or_default();
        match op.as_str() {
            "upsert" => objects.upsert(&object, &body, &now_text, &mut next_id).map(|(st, b)| (st, Some(b))),
            "read" => objects.read(&object, &body).map(|(st, b)| (st, Some(b))),
            "archive" => objects.archive(&body).map(|st| (st, None)),
            other => Err((404, envelope(&format!("Unknown batch operation {other}"), "OBJECT_NOT_FOUND"))),
        }
    };
    a.next_id = next_id;
    let (status, body) = match outcome {
        Ok(ok) => ok,
        Err((status, b)) => (status, Some(b)),
    };
    a.count(&format!("status_{status}"));
    respond(status, body, Some(usage), None)
}

fn authenticate(a: &Account, headers: &HeaderMap) -> Result<(), Value> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if a.config.tokens.iter().any(|t| t == token) {
        return Ok(());
    }
    if let Some(&expires) = a.access_tokens.get(token) {
        let now = a.now_ms();
        if now < expires {
            return Ok(());
        }
        let ago = (now - expires) / 1000;
        let at = chrono::DateTime::from_timestamp_millis(expires as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        let mut body = envelope(
            &format!("The OAuth token used to make this call expired {ago} second(s) ago."),
            "EXPIRED_AUTHENTICATION",
        );
        body["context"] = json!({"expire time": [at]});
        return Err(body);
    }
    Err(envelope(
        "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
        "INVALID_AUTHENTICATION",
    ))
}

/// `POST /oauth/v1/token` with `grant_type=refresh_token`.
async fn token(State(s): State<Shared>, Form(form): Form<HashMap<String, String>>) -> Response {
    let mut a = s.lock().expect("account lock");
    a.count("token_requests");
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let ok = a.config.oauth.as_ref().is_some_and(|app| {
        get("grant_type") == "refresh_token"
            && get("client_id") == app.client_id
            && get("client_secret") == app.client_secret
            && get("refresh_token") == app.refresh_token
    });
    if !ok {
        return respond(
            400,
            Some(json!({"status": "BAD_REFRESH_TOKEN", "message": "missing or unknown refresh token"})),
            None,
            None,
        );
    }
    let access = format!("emu-{}", uuid());
    let ttl = a.config.token_ttl;
    let expires = a.now_ms() + ttl.as_millis() as u64;
    a.access_tokens.insert(access.clone(), expires);
    let refresh = a.config.oauth.as_ref().map(|o| o.refresh_token.clone()).unwrap_or_default();
    respond(
        200,
        Some(
            json!({"token_type": "bearer", "access_token": access, "refresh_token": refresh, "expires_in": ttl.as_secs()}),
        ),
        None,
        None,
    )
}

/// `GET /_emu/objects/{object}`: every record, archived ones flagged.
async fn list_objects(State(s): State<Shared>, Path(object): Path<String>) -> Json<Value> {
    let a = s.lock().expect("account lock");
    let records: Vec<Value> = a
        .objects
        .get(&object)
        .map(|o| {
            o.records
                .values()
                .map(|r| json!({"id": r.id.to_string(), "properties": r.properties, "archived": r.archived}))
                .collect()
        })
        .unwrap_or_default();
    Json(Value::Array(records))
}

/// `POST /_emu/properties/{object}` `{"strict": bool, "properties": {"name": {"type": "number", "unique": true}}}`.
async fn define_properties(State(s): State<Shared>, Path(object): Path<String>, Json(body): Json<Value>) -> StatusCode {
    let mut a = s.lock().expect("account lock");
    let o = a.objects.entry(object.clone()).or_default();
    if let Some(strict) = body.get("strict").and_then(Value::as_bool) {
        o.strict = strict;
    }
    for (name, def) in body.get("properties").and_then(Value::as_object).into_iter().flatten() {
        let ty = match def.get("type").and_then(Value::as_str) {
            Some("number") => PropertyType::Number,
            Some("bool") => PropertyType::Bool,
            _ => PropertyType::String,
        };
        let unique = def.get("unique").and_then(Value::as_bool).unwrap_or(false);
        o.properties.insert(name.clone(), Property { ty, unique });
    }
    o.reindex(&object);
    StatusCode::NO_CONTENT
}

/// `POST /_emu/faults` `{"path_contains": "batch/upsert", "status": 502, "count": 2, "retry_after": 1}`.
async fn add_fault(State(s): State<Shared>, Json(body): Json<Value>) -> StatusCode {
    let fault = Fault {
        path_contains: body.get("path_contains").and_then(Value::as_str).unwrap_or("").to_string(),
        status: body.get("status").and_then(Value::as_u64).unwrap_or(500) as u16,
        remaining: body.get("count").and_then(Value::as_u64).unwrap_or(1) as u32,
        retry_after: body.get("retry_after").and_then(Value::as_u64),
    };
    s.lock().expect("account lock").faults.push(fault);
    StatusCode::NO_CONTENT
}

/// `POST /_emu/limits` `{"ten_second_max": 100, "daily_max": 250000, "token_ttl_s": 1800, "latency_ms": 0}`.
async fn set_limits(State(s): State<Shared>, Json(body): Json<Value>) -> StatusCode {
    let mut a = s.lock().expect("account lock");
    if let Some(n) = body.get("ten_second_max").and_then(Value::as_u64) {
        a.config.ten_second_max = n as u32;
        a.limits.interval_max = n as u32;
    }
    if let Some(n) = body.get("daily_max").and_then(Value::as_u64) {
        a.config.daily_max = n;
        a.limits.daily_max = n;
    }
    if let Some(n) = body.get("token_ttl_s").and_then(Value::as_u64) {
        a.config.token_ttl = Duration::from_secs(n);
    }
    if let Some(n) = body.get("latency_ms").and_then(Value::as_u64) {
        a.config.latency = Duration::from_millis(n);
    }
    StatusCode::NO_CONTENT
}

/// `POST /_emu/clock` `{"advance_ms": 86400000}`: moves the account's clock forward.
async fn advance_clock(State(s): State<Shared>, Json(body): Json<Value>) -> StatusCode {
    let mut a = s.lock().expect("account lock");
    a.clock_offset_ms += body.get("advance_ms").and_then(Value::as_u64).unwrap_or(0);
    StatusCode::NO_CONTENT
}

/// `GET /_emu/stats`: request counts by status, throttles by policy, token requests, live
/// records per object.
async fn stats(State(s): State<Shared>) -> Json<Value> {
    let a = s.lock().expect("account lock");
    let mut out = serde_json::Map::new();
    for (k, v) in &a.stats {
        out.insert(k.clone(), json!(v));
    }
    out.insert("daily_reset_in_ms".into(), json!(a.limits.daily_reset_in(a.now_ms())));
    for (name, o) in &a.objects {
        out.insert(format!("records_{name}"), json!(o.records.values().filter(|r| !r.archived).count()));
    }
    Json(Value::Object(out))
}

pub use crate::ratelimit::Policy as RatePolicy;

//! A Salesforce emulator: the OAuth 2.0 token endpoint (JWT bearer and client credentials) with
//! session expiry, upsert and delete by external ID (one row, sObject Collections, Composite),
//! Bulk API 2.0 ingest jobs, the org's rolling 24-hour request allocation reported in
//! `Sforce-Limit-Info` and enforced with `403 REQUEST_LIMIT_EXCEEDED`, a concurrent-request
//! limit, injectable faults and latency, and a control plane under `/_emu/`.

pub mod bulk;
mod data;
pub mod store;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Form, Json, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{SObjectType, Schema};

/// The connected app and org the emulator stands for.
#[derive(Debug, Clone)]
pub struct Config {
    /// The connected app's consumer key (JWT `iss`, client-credentials `client_id`).
    pub client_id: String,
    pub client_secret: String,
    /// The integration user (JWT `sub`).
    pub username: String,
    /// The certificate's public key (PEM) JWT assertions must be signed with; none refuses JWT.
    pub jwt_public_key_pem: Option<String>,
    /// The JWT `aud` accepted.
    pub audience: String,
    /// Session lifetime (org default: 2 hours).
    pub token_ttl: Duration,
    /// API requests per rolling 24 hours.
    pub daily_max: u64,
    /// Requests served at once before `ConcurrentPerOrgLongTxn` refusals.
    pub max_concurrent: usize,
    /// Added to every data request.
    pub latency: Duration,
    /// Bulk API processing speed (rows per second of emulator time).
    pub bulk_rows_per_second: u64,
    /// Objects that exist from the start.
    pub objects: Vec<(String, Schema)>,
}

impl Default for Config {
    fn default() -> Self {
        let contact = Schema {
            external_ids: ["Ext_Id__c".to_string()].into(),
            required: vec!["LastName".into()],
            ..Default::default()
        };
        let account = Schema { external_ids: ["Ext_Id__c".to_string()].into(), ..Default::default() };
        Self {
            client_id: "3MVG9emulator".into(),
            client_secret: "emulator-secret".into(),
            username: "sync@example.com".into(),
            jwt_public_key_pem: None,
            audience: "https://login.salesforce.com".into(),
            token_ttl: Duration::from_secs(7200),
            daily_max: 100_000,
            max_concurrent: 25,
            latency: Duration::ZERO,
            bulk_rows_per_second: 200_000,
            objects: vec![("Contact".into(), contact), ("Account".into(), account)],
        }
    }
}

/// A fault returned instead of handling matching requests.
#[derive(Debug, Clone)]
struct Fault {
    method: Option<String>,
    path_contains: String,
    status: u16,
    error_code: String,
    message: String,
    remaining: u32,
}

/// The org's state.
pub(crate) struct Org {
    config: Config,
    objects: HashMap<String, SObjectType>,
    serial: u64,
    jobs: HashMap<String, bulk::Job>,
    /// Access tokens and when they expire (emulator clock, ms).
    tokens: HashMap<String, u64>,
    /// Times of the API requests of the last 24 hours.
    calls: VecDeque<u64>,
    faults: Vec<Fault>,
    /// The next this many records written fail with UNABLE_TO_LOCK_ROW.
    lock_faults: u32,
    clock_offset_ms: u64,
    stats: BTreeMap<String, u64>,
}

impl Org {
    fn now_ms(&self) -> u64 {
        crate::clock_ms(self.clock_offset_ms)
    }

    fn count(&mut self, what: &str) {
        *self.stats.entry(what.to_string()).or_default() += 1;
    }

    /// Requests in the rolling 24 hours.
    fn usage(&mut self) -> u64 {
        let horizon = self.now_ms().saturating_sub(86_400_000);
        while self.calls.front().is_some_and(|&t| t <= horizon) {
            self.calls.pop_front();
        }
        self.calls.len() as u64
    }
}

pub(crate) struct Shared {
    org: Mutex<Org>,
    in_flight: AtomicUsize,
}

impl Shared {
    fn org(&self) -> std::sync::MutexGuard<'_, Org> {
        self.org.lock().expect("org lock")
    }
}

pub use crate::Emulator;

/// A REST error: Salesforce's JSON array envelope.
pub(crate) fn error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(json!([{"message": message, "errorCode": code}]))).into_response()
}

/// Starts the emulator on `addr` (port 0 picks a free one).
pub async fn start(config: Config, addr: SocketAddr) -> std::io::Result<Emulator> {
    let objects =
        config.objects.iter().map(|(name, schema)| (name.clone(), SObjectType::new(schema.clone()))).collect();
    let org = Org {
        config,
        objects,
        serial: 0,
        jobs: HashMap::new(),
        tokens: HashMap::new(),
        calls: VecDeque::new(),
        faults: Vec::new(),
        lock_faults: 0,
        clock_offset_ms: 0,
        stats: BTreeMap::new(),
    };
    let state = Arc::new(Shared { org: Mutex::new(org), in_flight: AtomicUsize::new(0) });
    let api =
        data::routes().route_layer(axum::middleware::from_fn_with_state(state.clone(), gate)).with_state(state.clone());
    let app = Router::new()
        .nest("/services/data", api)
        .route("/services/oauth2/token", post(token))
        .route("/_emu/sobjects/{object}", get(list_records).post(define_object))
        .route("/_emu/records/{object}", post(seed_records))
        .route("/_emu/faults", post(add_fault))
        .route("/_emu/limits", post(set_limits))
        .route("/_emu/clock", post(advance_clock))
        .route("/_emu/stats", get(stats))
        .route("/_emu/tokens/expire", put(expire_tokens))
        .with_state(state);
    Emulator::serve(app, addr).await
}

/// Every data request: latency, faults, the session, the daily allocation, the concurrency
/// limit; then the handler, and `Sforce-Limit-Info` on the way out.
async fn gate(State(s): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let latency = s.org().config.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (used, max) = {
        let mut org = s.org();
        org.count("requests");
        let path = request.uri().path().to_string();
        let method = request.method().as_str().to_string();
        let fault = org.faults.iter_mut().find(|f| {
            f.remaining > 0 && path.contains(&f.path_contains) && f.method.as_ref().is_none_or(|m| *m == method)
        });
        if let Some(f) = fault {
            f.remaining -= 1;
            let (status, code, message) = (f.status, f.error_code.clone(), f.message.clone());
            org.count(&format!("status_{status}"));
            return error(status, &code, &message);
        }
        let token = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let now = org.now_ms();
        if org.tokens.get(token).is_none_or(|&expires| now >= expires) {
            org.count("status_401");
            return error(401, "INVALID_SESSION_ID", "Session expired or invalid");
        }
        let (used, max) = (org.usage(), org.config.daily_max);
        if used >= max {
            org.count("status_403");
            org.count("request_limit_exceeded");
            return with_usage(error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."), used, max);
        }
        if s.in_flight.load(Ordering::Acquire) >= org.config.max_concurrent {
            org.count("status_403");
            return error(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.");
        }
        org.calls.push_back(now);
        (used + 1, max)
    };
    s.in_flight.fetch_add(1, Ordering::AcqRel);
    let response = next.run(request).await;
    s.in_flight.fetch_sub(1, Ordering::AcqRel);
    s.org().count(&format!("status_{}", response.status().as_u16()));
    with_usage(response, used, max)
}

fn with_usage(mut response: Response, used: u64, max: u64) -> Response {
    let value = HeaderValue::from_str(&format!("api-usage={used}/{max}")).expect("ascii header");
    response.headers_mut().insert("Sforce-Limit-Info", value);
    response
}

/// `POST /services/oauth2/token`: JWT bearer or client credentials.
async fn token(
    State(s): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut org = s.org();
    org.count("token_requests");
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let grant = |description: &str| {
        (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant", "error_description": description})))
            .into_response()
    };
    match get("grant_type") {
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            if let Err(description) = check_assertion(&org.config, get("assertion")) {
                return grant(description);
            }
        }
        "client_credentials" => {
            if get("client_id") != org.config.client_id {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_client_id", "error_description": "client identifier invalid"})),
                )
                    .into_response();
            }
            if get("client_secret") != org.config.client_secret {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_client", "error_description": "invalid client credentials"})),
                )
                    .into_response();
            }
        }
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"})),
            )
                .into_response()
        }
    }
    let access = format!("00D5g00000EMUL0!AR{}", uuid::Uuid::new_v4().simple());
    let expires = org.now_ms() + org.config.token_ttl.as_millis() as u64;
    org.tokens.insert(access.clone(), expires);
    let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let instance = format!("http://{host}");
    let body = json!({
        "access_token": access,
        "scope": "api",
        "instance_url": instance,
        "id": format!("{instance}/id/00D5g00000EMUL0EAA/0055g00000EMUL0AAA"),
        "token_type": "Bearer",
        "issued_at": org.now_ms().to_string(),
        "signature": "emulated",
    });
    (StatusCode::OK, Json(body)).into_response()
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Checks a JWT bearer assertion: RS256 by the app's certificate, `iss` the consumer key, `aud`
/// the login host, `sub` the user, `exp` at most 3 minutes ahead.
fn check_assertion(config: &Config, assertion: &str) -> Result<(), &'static str> {
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
    let Some(pem) = &config.jwt_public_key_pem else { return Err("invalid assertion") };
    let key = DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| "invalid assertion")?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[config.audience.as_str()]);
    validation.set_issuer(&[config.client_id.as_str()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let claims = decode::<Claims>(assertion, &key, &validation).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidAudience => "audience is invalid",
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired authorization code",
        jsonwebtoken::errors::ErrorKind::InvalidIssuer => "invalid client credentials",
        _ => "invalid assertion",
    })?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if claims.claims.exp > now + 180 {
        return Err("invalid assertion");
    }
    if claims.claims.sub != config.username {
        return Err("user hasn't approved this consumer");
    }
    Ok(())
}

/// `GET /_emu/sobjects/{object}`: every record.
async fn list_records(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(object): axum::extract::Path<String>,
) -> Json<Value> {
    let org = s.org();
    let records: Vec<Value> = org
        .objects
        .get(&object)
        .map(|o| o.records.values().map(|r| Value::Object(r.clone())).collect())
        .unwrap_or_default();
    Json(Value::Array(records))
}

/// `POST /_emu/sobjects/{object}` `{"external_ids": [..], "required": [..], "max_length": {..},
/// "fields": [..]}`: the object's shape (its records stay).
async fn define_object(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(object): axum::extract::Path<String>,
    Json(body): Json<Value>,
) -> StatusCode {
    let strings = |key: &str| -> Vec<String> {
        body.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect()
    };
    let schema = Schema {
        external_ids: strings("external_ids").into_iter().collect(),
        required: strings("required"),
        max_length: body
            .get("max_length")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as usize)))
            .collect(),
        fields: body.get("fields").map(|_| strings("fields").into_iter().collect()),
    };
    s.org().objects.entry(object).or_default().set_schema(schema);
    StatusCode::NO_CONTENT
}

/// `POST /_emu/records/{object}` `[{..fields..}]`: inserts records as they are (duplicates allowed).
async fn seed_records(
    State(s): State<Arc<Shared>>,
    axum::extract::Path(object): axum::extract::Path<String>,
    Json(body): Json<Value>,
) -> StatusCode {
    let mut org = s.org();
    let mut serial = org.serial;
    let o = org.objects.entry(object.clone()).or_default();
    for record in body.as_array().into_iter().flatten().filter_map(Value::as_object) {
        serial += 1;
        o.seed(&object, serial, record.clone());
    }
    org.serial = serial;
    StatusCode::NO_CONTENT
}

/// `POST /_emu/faults`: `{"path_contains": "composite", "method": "PATCH", "status": 503,
/// "error_code": "SERVER_UNAVAILABLE", "count": 2}`, or `{"record_error": "UNABLE_TO_LOCK_ROW",
/// "count": 5}` for the next records written.
async fn add_fault(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> StatusCode {
    let mut org = s.org();
    let count = body.get("count").and_then(Value::as_u64).unwrap_or(1) as u32;
    if body.get("record_error").is_some() {
        org.lock_faults += count;
        return StatusCode::NO_CONTENT;
    }
    let status = body.get("status").and_then(Value::as_u64).unwrap_or(503) as u16;
    let text = |k: &str, default: &str| body.get(k).and_then(Value::as_str).unwrap_or(default).to_string();
    let fault = Fault {
        method: body.get("method").and_then(Value::as_str).map(String::from),
        path_contains: text("path_contains", ""),
        status,
        error_code: text("error_code", if status == 503 { "SERVER_UNAVAILABLE" } else { "UNKNOWN_EXCEPTION" }),
        message: text("message", "Emulated fault"),
        remaining: count,
    };
    org.faults.push(fault);
    StatusCode::NO_CONTENT
}

/// `POST /_emu/limits` `{"daily_max": 100000, "token_ttl_s": 7200, "latency_ms": 0,
/// "max_concurrent": 25, "bulk_rows_per_second": 200000}`.
async fn set_limits(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> StatusCode {
    let mut org = s.org();
    let n = |k: &str| body.get(k).and_then(Value::as_u64);
    if let Some(v) = n("daily_max") {
        org.config.daily_max = v;
    }
    if let Some(v) = n("token_ttl_s") {
        org.config.token_ttl = Duration::from_secs(v);
    }
    if let Some(v) = n("latency_ms") {
        org.config.latency = Duration::from_millis(v);
    }
    if let Some(v) = n("max_concurrent") {
        org.config.max_concurrent = v as usize;
    }
    if let Some(v) = n("bulk_rows_per_second") {
        org.config.bulk_rows_per_second = v.max(1);
    }
    StatusCode::NO_CONTENT
}

/// `PUT /_emu/tokens/expire`: every session issued so far times out now.
async fn expire_tokens(State(s): State<Arc<Shared>>) -> StatusCode {
    let mut org = s.org();
    let now = org.now_ms();
    for expires in org.tokens.values_mut() {
        *expires = now;
    }
    StatusCode::NO_CONTENT
}

/// `POST /_emu/clock` `{"advance_ms": 86400000}`.
async fn advance_clock(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> StatusCode {
    s.org().clock_offset_ms += body.get("advance_ms").and_then(Value::as_u64).unwrap_or(0);
    StatusCode::NO_CONTENT
}

/// `GET /_emu/stats`: request counts by status and kind, the rolling usage, records per object.
async fn stats(State(s): State<Arc<Shared>>) -> Json<Value> {
    let mut org = s.org();
    let mut out: serde_json::Map<String, Value> = org.stats.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    out.insert("api_usage".into(), json!(org.usage()));
    for (name, o) in &org.objects {
        out.insert(format!("records_{name}"), json!(o.records.len()));
    }
    Json(Value::Object(out))
}

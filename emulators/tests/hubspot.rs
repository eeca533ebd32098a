//! The HubSpot emulator against the contract: each behaviour a sync client depends on.

use serde_json::{json, Value};
use sluice_emulators::hubspot::{self, Config, Emulator, OAuthApp};
use std::time::Duration;

const TOKEN: &str = "pat-na1-emulator";

async fn emulator(config: Config) -> (Emulator, reqwest::Client) {
    // Built with sluice, reqwest has no default TLS provider; these calls are plain HTTP anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let e = hubspot::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    (e, reqwest::Client::new())
}

async fn post(c: &reqwest::Client, url: String, token: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = c.post(url).bearer_auth(token).json(&body).send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.unwrap();
    (status, headers, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
}

fn upsert(e: &Emulator) -> String {
    format!("{}/crm/v3/objects/contacts/batch/upsert", e.url())
}

async fn control(c: &reqwest::Client, e: &Emulator, path: &str, body: Value) {
    let r = c.post(format!("{}/_emu/{path}", e.url())).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
}

#[tokio::test]
async fn upsert_creates_then_updates_by_a_unique_property() {
    let (e, c) = emulator(Config::default()).await;
    let inputs = json!({"inputs": [
        {"idProperty": "email", "id": "Ada@Example.com", "properties": {"firstname": "Ada"}},
        {"idProperty": "email", "id": "bob@example.com", "properties": {"firstname": "Bob"}},
    ]});
    let (status, _, body) = post(&c, upsert(&e), TOKEN, inputs).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "COMPLETE");
    assert_eq!(body["results"][0]["new"], true);
    let id = body["results"][0]["id"].as_str().unwrap().to_string();
    assert!(id.chars().all(|c| c.is_ascii_digit()), "numeric ids: {id}");
    // Email matches case-insensitively: an update of the same record.
    let (_, _, body) = post(
        &c,
        upsert(&e),
        TOKEN,
        json!({"inputs": [{"idProperty": "email", "id": "ada@example.com", "properties": {"firstname": "Ada L"}}]}),
    )
    .await;
    assert_eq!((body["results"][0]["new"].clone(), body["results"][0]["id"].clone()), (json!(false), json!(id)));
    let all: Value = c.get(format!("{}/_emu/objects/contacts", e.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all[0]["properties"]["firstname"], "Ada L");
}

#[tokio::test]
async fn batch_rules_refuse_what_hubspot_refuses() {
    let (e, c) = emulator(Config::default()).await;
    // A property that is not unique cannot be an idProperty.
    let (status, _, body) =
        post(&c, upsert(&e), TOKEN, json!({"inputs": [{"idProperty": "firstname", "id": "x", "properties": {}}]}))
            .await;
    assert_eq!((status, body["category"].as_str()), (400, Some("VALIDATION_ERROR")));
    assert_eq!(body["message"], "Unable to perform update/upsert by non-unique 0-1 property firstname");
    // Duplicate ids in one batch.
    let dup = json!({"inputs": [{"idProperty": "email", "id": "a@x", "properties": {}}, {"idProperty": "email", "id": "A@x", "properties": {}}]});
    let (status, _, body) = post(&c, upsert(&e), TOKEN, dup).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("Duplicate IDs"), "{body}");
    // More than 100 inputs.
    let many: Vec<Value> =
        (0..101).map(|i| json!({"idProperty": "email", "id": format!("u{i}@x"), "properties": {}})).collect();
    let (status, _, _) = post(&c, upsert(&e), TOKEN, json!({"inputs": many})).await;
    assert_eq!(status, 400);
    let all: Value = c.get(format!("{}/_emu/objects/contacts", e.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(all, json!([]), "refused batches write nothing");
}

#[tokio::test]
async fn bad_values_fail_the_batch_or_only_themselves_with_trace_ids() {
    let (e, c) = emulator(Config::default()).await;
    control(
        &c,
        &e,
        "properties/contacts",
        json!({"strict": true, "properties": {"ltv": {"type": "number"}, "firstname": {}}}),
    )
    .await;
    let input = |email: &str, ltv: &str, trace: Option<&str>| {
        let mut v = json!({"idProperty": "email", "id": email, "properties": {"ltv": ltv}});
        if let Some(t) = trace {
            v["objectWriteTraceId"] = json!(t);
        }
        v
    };
    // Without trace ids one bad input fails the whole batch.
    let (status, _, body) =
        post(&c, upsert(&e), TOKEN, json!({"inputs": [input("a@x", "1.5", None), input("b@x", "lots", None)]})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0]["code"], "INVALID_FLOAT");
    // With a trace id on every input: 207, the good one written, the bad one named.
    let (status, _, body) = post(
        &c,
        upsert(&e),
        TOKEN,
        json!({"inputs": [input("a@x", "1.5", Some("t1")), input("b@x", "lots", Some("t2"))]}),
    )
    .await;
    assert_eq!(status, 207, "{body}");
    assert_eq!((body["numErrors"].clone(), body["results"][0]["objectWriteTraceId"].clone()), (json!(1), json!("t1")));
    assert_eq!(body["errors"][0]["context"]["objectWriteTraceId"], json!(["t2"]));
    // An unknown property on a strict object.
    let (status, _, body) = post(
        &c,
        upsert(&e),
        TOKEN,
        json!({"inputs": [{"idProperty": "email", "id": "c@x", "properties": {"nope": "1"}}]}),
    )
    .await;
    assert_eq!((status, body["errors"][0]["code"].as_str()), (400, Some("PROPERTY_DOESNT_EXIST")));
}

#[tokio::test]
async fn read_and_archive_by_external_id() {
    let (e, c) = emulator(Config::default()).await;
    control(&c, &e, "properties/contacts", json!({"properties": {"src_id": {"unique": true}}})).await;
    post(
        &c,
        upsert(&e),
        TOKEN,
        json!({"inputs": [{"idProperty": "src_id", "id": "42", "properties": {"firstname": "A"}}]}),
    )
    .await;
    let read = format!("{}/crm/objects/2026-03/contacts/batch/read", e.url());
    let (status, _, body) =
        post(&c, read.clone(), TOKEN, json!({"idProperty": "src_id", "inputs": [{"id": "42"}, {"id": "43"}]})).await;
    assert_eq!(status, 207, "{body}");
    assert_eq!(body["errors"][0]["category"], "OBJECT_NOT_FOUND");
    let id = body["results"][0]["id"].as_str().unwrap().to_string();
    let archive = format!("{}/crm/v3/objects/contacts/batch/archive", e.url());
    let (status, _, _) = post(&c, archive, TOKEN, json!({"inputs": [{"id": id}, {"id": "999999"}]})).await;
    assert_eq!(status, 204, "archive answers 204 even for unknown ids");
    let (status, _, _) = post(&c, read, TOKEN, json!({"idProperty": "src_id", "inputs": [{"id": "42"}]})).await;
    assert_eq!(status, 207, "archived records are not found");
    let (status, _, _) =
        post(&c, format!("{}/crm/objects/26-03/contacts/batch/read", e.url()), TOKEN, json!({"inputs": []})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn rate_limits_answer_429_with_the_policy_and_headers() {
    let (e, c) = emulator(Config { ten_second_max: 3, daily_max: 5, ..Default::default() }).await;
    let one = json!({"inputs": [{"idProperty": "email", "id": "a@x", "properties": {}}]});
    for remaining in [2, 1, 0] {
        let (status, headers, _) = post(&c, upsert(&e), TOKEN, one.clone()).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-hubspot-ratelimit-remaining"], remaining.to_string().as_str());
        assert_eq!(headers["x-hubspot-ratelimit-max"], "3");
        assert_eq!(headers["x-hubspot-ratelimit-interval-milliseconds"], "10000");
    }
    let (status, headers, body) = post(&c, upsert(&e), TOKEN, one.clone()).await;
    assert_eq!(
        (status, body["policyName"].as_str(), body["errorType"].as_str()),
        (429, Some("TEN_SECONDLY_ROLLING"), Some("RATE_LIMIT"))
    );
    assert_eq!(body["message"], "You have reached your ten_secondly_rolling limit.");
    assert_eq!(headers["x-hubspot-ratelimit-daily-remaining"], "2");
    // Ten seconds later the window has room again; the daily quota runs out at 5.
    control(&c, &e, "clock", json!({"advance_ms": 10_001})).await;
    for _ in 0..2 {
        assert_eq!(post(&c, upsert(&e), TOKEN, one.clone()).await.0, 200);
    }
    control(&c, &e, "clock", json!({"advance_ms": 10_001})).await;
    let (status, _, body) = post(&c, upsert(&e), TOKEN, one.clone()).await;
    assert_eq!((status, body["policyName"].as_str()), (429, Some("DAILY")));
    let stats: Value = c.get(format!("{}/_emu/stats", e.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (stats["throttled_TEN_SECONDLY_ROLLING"].clone(), stats["throttled_DAILY"].clone()),
        (json!(1), json!(1))
    );
    // Midnight resets the day.
    control(&c, &e, "clock", json!({"advance_ms": stats["daily_reset_in_ms"]})).await;
    assert_eq!(post(&c, upsert(&e), TOKEN, one).await.0, 200);
}

#[tokio::test]
async fn tokens_are_checked_and_oauth_tokens_expire() {
    let app = OAuthApp { client_id: "cid".into(), client_secret: "sec".into(), refresh_token: "rt".into() };
    let (e, c) = emulator(Config { oauth: Some(app), token_ttl: Duration::from_secs(60), ..Default::default() }).await;
    let one = json!({"inputs": [{"idProperty": "email", "id": "a@x", "properties": {}}]});
    let (status, _, body) = post(&c, upsert(&e), "wrong", one.clone()).await;
    assert_eq!((status, body["category"].as_str()), (401, Some("INVALID_AUTHENTICATION")));
    let form =
        [("grant_type", "refresh_token"), ("client_id", "cid"), ("client_secret", "sec"), ("refresh_token", "rt")];
    let t: Value =
        c.post(format!("{}/oauth/v1/token", e.url())).form(&form).send().await.unwrap().json().await.unwrap();
    assert_eq!(t["expires_in"], 60);
    let access = t["access_token"].as_str().unwrap().to_string();
    assert_eq!(post(&c, upsert(&e), &access, one.clone()).await.0, 200);
    control(&c, &e, "clock", json!({"advance_ms": 75_000})).await;
    let (status, _, body) = post(&c, upsert(&e), &access, one).await;
    assert_eq!((status, body["category"].as_str()), (401, Some("EXPIRED_AUTHENTICATION")));
    assert_eq!(body["message"], "The OAuth token used to make this call expired 15 second(s) ago.");
    assert!(body["context"]["expire time"][0].is_string());
    let bad = c
        .post(format!("{}/oauth/v1/token", e.url()))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}

#[tokio::test]
async fn faults_and_latency_are_injectable() {
    let (e, c) = emulator(Config::default()).await;
    let one = json!({"inputs": [{"idProperty": "email", "id": "a@x", "properties": {}}]});
    control(&c, &e, "faults", json!({"path_contains": "batch/upsert", "status": 477, "count": 1, "retry_after": 2}))
        .await;
    control(&c, &e, "faults", json!({"path_contains": "batch/upsert", "status": 502, "count": 1})).await;
    let (status, headers, _) = post(&c, upsert(&e), TOKEN, one.clone()).await;
    assert_eq!((status, headers.get("retry-after").map(|v| v.to_str().unwrap())), (477, Some("2")));
    assert_eq!(post(&c, upsert(&e), TOKEN, one.clone()).await.0, 502);
    assert_eq!(post(&c, upsert(&e), TOKEN, one.clone()).await.0, 200);
    control(&c, &e, "limits", json!({"latency_ms": 150})).await;
    let started = std::time::Instant::now();
    post(&c, upsert(&e), TOKEN, one).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
}

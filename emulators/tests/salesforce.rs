//! The Salesforce emulator against the contract: each behaviour a sync client depends on.

use serde_json::{json, Value};
use sluice_emulators::salesforce::{self, Config, Emulator};

const V: &str = "/services/data/v62.0";

struct Org {
    e: Emulator,
    c: reqwest::Client,
    token: String,
}

fn config() -> Config {
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/salesforce-test.pub");
    Config { jwt_public_key_pem: Some(std::fs::read_to_string(key).unwrap()), ..Default::default() }
}

async fn org(config: Config) -> Org {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let e = salesforce::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let c = reqwest::Client::new();
    let form =
        [("grant_type", "client_credentials"), ("client_id", "3MVG9emulator"), ("client_secret", "emulator-secret")];
    let r: Value =
        c.post(format!("{}/services/oauth2/token", e.url())).form(&form).send().await.unwrap().json().await.unwrap();
    assert_eq!(r["instance_url"], e.url(), "instance_url points at the emulator");
    let token = r["access_token"].as_str().unwrap().to_string();
    Org { e, c, token }
}

impl Org {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut r = self.c.request(method, format!("{}{path}", self.e.url())).bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let text = r.text().await.unwrap();
        (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn control(&self, path: &str, body: Value) {
        let r = self.c.post(format!("{}/_emu/{path}", self.e.url())).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    async fn records(&self, object: &str) -> Vec<Value> {
        let r = self.c.get(format!("{}/_emu/sobjects/{object}", self.e.url())).send().await.unwrap();
        r.json::<Value>().await.unwrap().as_array().unwrap().clone()
    }
}

fn contact(ext: &str, last: Option<&str>) -> Value {
    let mut r = json!({"attributes": {"type": "Contact"}, "Ext_Id__c": ext});
    if let Some(l) = last {
        r["LastName"] = json!(l);
    }
    r
}

#[tokio::test]
async fn jwt_bearer_needs_the_apps_key_audience_and_user() {
    let o = org(config()).await;
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("../../tests/fixtures/salesforce-test.key")).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let assertion = |aud: &str, sub: &str| {
        let claims = json!({"iss": "3MVG9emulator", "sub": sub, "aud": aud, "exp": now + 120});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256), &claims, &key).unwrap()
    };
    let token = |assertion: String| {
        let form =
            [("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".to_string()), ("assertion", assertion)];
        o.c.post(format!("{}/services/oauth2/token", o.e.url())).form(&form).send()
    };
    let ok = token(assertion("https://login.salesforce.com", "sync@example.com")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let ok: Value = ok.json().await.unwrap();
    assert!(ok["access_token"].as_str().unwrap().starts_with("00D"));
    let bad_aud: Value =
        token(assertion("https://example.com", "sync@example.com")).await.unwrap().json().await.unwrap();
    assert_eq!(bad_aud, json!({"error": "invalid_grant", "error_description": "audience is invalid"}));
    let bad_user: Value =
        token(assertion("https://login.salesforce.com", "x@example.com")).await.unwrap().json().await.unwrap();
    assert_eq!(bad_user["error_description"], "user hasn't approved this consumer");
    let form = [("grant_type", "password")];
    let r: Value =
        o.c.post(format!("{}/services/oauth2/token", o.e.url()))
            .form(&form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(r["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn an_expired_session_gets_invalid_session_id() {
    let o = org(config()).await;
    let (status, _, _) = o.call(reqwest::Method::GET, &format!("{V}/limits"), None).await;
    assert_eq!(status, 200);
    o.c.put(format!("{}/_emu/tokens/expire", o.e.url())).send().await.unwrap();
    let (status, _, body) = o.call(reqwest::Method::GET, &format!("{V}/limits"), None).await;
    assert_eq!(
        (status, body),
        (401, json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]))
    );
}

#[tokio::test]
async fn collections_upsert_reports_each_record_in_order() {
    let o = org(config()).await;
    let path = format!("{V}/composite/sobjects/Contact/Ext_Id__c");
    let body = json!({"allOrNone": false, "records": [contact("1", Some("Ada")), contact("2", None), contact("3", Some("Bob")), contact("3", Some("Dup"))]});
    let (status, headers, results) = o.call(reqwest::Method::PATCH, &path, Some(body)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["sforce-limit-info"], "api-usage=1/100000");
    assert_eq!(results[0]["success"], true);
    assert_eq!(results[0]["created"], true);
    assert!(results[0]["id"].as_str().unwrap().starts_with("003") && results[0]["id"].as_str().unwrap().len() == 18);
    assert_eq!(results[1]["errors"][0]["statusCode"], "REQUIRED_FIELD_MISSING");
    assert_eq!(results[1]["errors"][0]["fields"], json!(["LastName"]));
    assert_eq!(results[2]["errors"][0]["statusCode"], "DUPLICATE_VALUE", "a value twice in one call");
    assert_eq!(results[3]["errors"][0]["statusCode"], "DUPLICATE_VALUE");
    // Update by the same external id; a lock fault on the next record.
    o.control("faults", json!({"record_error": "UNABLE_TO_LOCK_ROW", "count": 1})).await;
    let body = json!({"records": [contact("1", Some("Ada L")), contact("4", Some("Cy"))]});
    let (_, _, results) = o.call(reqwest::Method::PATCH, &path, Some(body)).await;
    assert_eq!(results[0]["errors"][0]["statusCode"], "UNABLE_TO_LOCK_ROW");
    assert_eq!(results[1]["created"], true);
    let body = json!({"records": [contact("1", Some("Ada L"))]});
    let (_, _, results) = o.call(reqwest::Method::PATCH, &path, Some(body)).await;
    assert_eq!(results[0]["created"], false);
    let records = o.records("Contact").await;
    assert_eq!(records.len(), 2);
    assert!(records.iter().any(|r| r["Ext_Id__c"] == "1" && r["LastName"] == "Ada L"));
    // allOrNone: one bad record rolls every other back.
    let body = json!({"allOrNone": true, "records": [contact("5", Some("E")), contact("6", None)]});
    let (_, _, results) = o.call(reqwest::Method::PATCH, &path, Some(body)).await;
    assert_eq!(results[0]["errors"][0]["statusCode"], "ALL_OR_NONE_OPERATION_ROLLED_BACK");
    assert_eq!(o.records("Contact").await.len(), 2);
    // More than 200 records: the whole call is refused.
    let many: Vec<Value> = (0..201).map(|i| contact(&format!("m{i}"), Some("M"))).collect();
    let (status, _, body) = o.call(reqwest::Method::PATCH, &path, Some(json!({"records": many}))).await;
    assert_eq!((status, body[0]["errorCode"].clone()), (400, json!("EXCEEDED_ID_LIMIT")));
    // An unknown external ID field.
    let (status, _, _) = o
        .call(reqwest::Method::PATCH, &format!("{V}/composite/sobjects/Contact/Nope__c"), Some(json!({"records": []})))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn row_upsert_versions_and_multiple_matches() {
    let o = org(config()).await;
    let (status, _, body) = o
        .call(reqwest::Method::PATCH, &format!("{V}/sobjects/Contact/Ext_Id__c/9"), Some(json!({"LastName": "N"})))
        .await;
    assert_eq!((status, body["created"].clone()), (201, json!(true)));
    let (status, _, body) = o
        .call(reqwest::Method::PATCH, &format!("{V}/sobjects/Contact/Ext_Id__c/9"), Some(json!({"LastName": "M"})))
        .await;
    assert_eq!((status, body["created"].clone()), (200, json!(false)));
    let (status, _, _) = o
        .call(
            reqwest::Method::PATCH,
            "/services/data/v45.0/sobjects/Contact/Ext_Id__c/9",
            Some(json!({"LastName": "O"})),
        )
        .await;
    assert_eq!(status, 204, "before v46 an update has no body");
    o.control("records/Contact", json!([{"Ext_Id__c": "7", "LastName": "a"}, {"Ext_Id__c": "7", "LastName": "b"}]))
        .await;
    let (status, _, body) = o
        .call(reqwest::Method::PATCH, &format!("{V}/sobjects/Contact/Ext_Id__c/7"), Some(json!({"LastName": "c"})))
        .await;
    assert_eq!(status, 300);
    assert_eq!(body.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn composite_deletes_by_external_id_with_references_and_rollback() {
    let o = org(config()).await;
    for ext in ["1", "2"] {
        o.call(
            reqwest::Method::PATCH,
            &format!("{V}/sobjects/Contact/Ext_Id__c/{ext}"),
            Some(json!({"LastName": "x"})),
        )
        .await;
    }
    let sub =
        |method: &str, url: String, reference: &str| json!({"method": method, "url": url, "referenceId": reference});
    let body = json!({"allOrNone": false, "compositeRequest": [
        sub("DELETE", format!("{V}/sobjects/Contact/Ext_Id__c/1"), "a"),
        sub("DELETE", format!("{V}/sobjects/Contact/Ext_Id__c/404"), "b"),
    ]});
    let (status, _, body) = o.call(reqwest::Method::POST, &format!("{V}/composite"), Some(body)).await;
    assert_eq!(status, 200);
    let codes: Vec<u64> =
        body["compositeResponse"].as_array().unwrap().iter().map(|r| r["httpStatusCode"].as_u64().unwrap()).collect();
    assert_eq!(codes, [204, 404]);
    // allOrNone: the failure rolls the delete of 2 back; a reference resolves.
    let body = json!({"allOrNone": true, "compositeRequest": [
        {"method": "PATCH", "url": format!("{V}/sobjects/Account/Ext_Id__c/A1"), "referenceId": "acc", "body": {"Name": "Acme"}},
        {"method": "PATCH", "url": format!("{V}/sobjects/Contact/Ext_Id__c/C1"), "referenceId": "con", "body": {"LastName": "D", "AccountId": "@{acc.id}"}},
        sub("DELETE", format!("{V}/sobjects/Contact/Ext_Id__c/2"), "d"),
        sub("DELETE", format!("{V}/sobjects/Contact/Ext_Id__c/404"), "e"),
    ]});
    let (_, _, body) = o.call(reqwest::Method::POST, &format!("{V}/composite"), Some(body)).await;
    let r = body["compositeResponse"].as_array().unwrap();
    assert_eq!(r[0]["httpStatusCode"], 400);
    assert_eq!(r[0]["body"][0]["errorCode"], "PROCESSING_HALTED");
    assert_eq!(r[3]["httpStatusCode"], 404);
    let contacts = o.records("Contact").await;
    assert_eq!(contacts.len(), 1, "the delete of 2 was rolled back, C1 was not kept");
    // Without allOrNone the reference is substituted.
    let body = json!({"compositeRequest": [
        {"method": "PATCH", "url": format!("{V}/sobjects/Account/Ext_Id__c/A1"), "referenceId": "acc", "body": {"Name": "Acme"}},
        {"method": "PATCH", "url": format!("{V}/sobjects/Contact/Ext_Id__c/C1"), "referenceId": "con", "body": {"LastName": "D", "AccountId": "@{acc.id}"}},
    ]});
    let (_, _, body) = o.call(reqwest::Method::POST, &format!("{V}/composite"), Some(body)).await;
    let account_id = body["compositeResponse"][0]["body"]["id"].clone();
    let c1 = o.records("Contact").await.into_iter().find(|r| r["Ext_Id__c"] == "C1").unwrap();
    assert_eq!(c1["AccountId"], account_id);
}

#[tokio::test]
async fn bulk_ingest_job_runs_to_completion_with_failed_rows() {
    let o = org(config()).await;
    let (status, _, job) = o
        .call(
            reqwest::Method::POST,
            &format!("{V}/jobs/ingest"),
            Some(json!({"object": "Contact", "operation": "upsert", "externalIdFieldName": "Ext_Id__c", "contentType": "CSV", "lineEnding": "LF"})),
        )
        .await;
    assert_eq!((status, job["state"].clone()), (200, json!("Open")));
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("750"));
    let mut csv = String::from("Ext_Id__c,LastName,Email\n");
    for i in 0..1000 {
        let last = if i % 100 == 7 { String::new() } else { format!("L{i}") };
        csv.push_str(&format!("{i},{last},e{i}@example.com\n"));
    }
    let r =
        o.c.put(format!("{}{V}/jobs/ingest/{id}/batches", o.e.url()))
            .bearer_auth(&o.token)
            .header("Content-Type", "text/csv")
            .body(csv)
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 201);
    let (_, _, job) = o
        .call(reqwest::Method::PATCH, &format!("{V}/jobs/ingest/{id}"), Some(json!({"state": "UploadComplete"})))
        .await;
    assert_eq!(job["state"], "InProgress");
    let job = loop {
        let (_, _, job) = o.call(reqwest::Method::GET, &format!("{V}/jobs/ingest/{id}"), None).await;
        if job["state"] != "InProgress" {
            break job;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(
        (job["state"].clone(), job["numberRecordsProcessed"].clone(), job["numberRecordsFailed"].clone()),
        (json!("JobComplete"), json!(1000), json!(10))
    );
    let (_, _, failed) = o.call(reqwest::Method::GET, &format!("{V}/jobs/ingest/{id}/failedResults"), None).await;
    let failed = failed.as_str().unwrap();
    assert!(failed.starts_with("sf__Id,sf__Error,Ext_Id__c,LastName,Email\n"), "{failed}");
    assert_eq!(failed.lines().count(), 11);
    assert!(failed
        .contains(",REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --,7,,e7@example.com"));
    let (_, _, ok) = o.call(reqwest::Method::GET, &format!("{V}/jobs/ingest/{id}/successfulResults"), None).await;
    let keys: Vec<u64> =
        ok.as_str().unwrap().lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
    assert_eq!(keys.len(), 990);
    assert!(keys.windows(2).any(|w| w[0] > w[1]), "results do not come back in upload order");
    assert_eq!(o.records("Contact").await.len(), 990);
    let r = o.c.delete(format!("{}{V}/jobs/ingest/{id}", o.e.url())).bearer_auth(&o.token).send().await.unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn the_daily_allocation_runs_out_with_request_limit_exceeded() {
    // Sessions outlive the day this test moves the clock by.
    let token_ttl = std::time::Duration::from_secs(3 * 86_400);
    let o = org(Config { daily_max: 2, token_ttl, ..config() }).await;
    for used in 1..=2 {
        let (status, headers, _) = o.call(reqwest::Method::GET, &format!("{V}/limits"), None).await;
        assert_eq!(
            (status, headers["sforce-limit-info"].to_str().unwrap()),
            (200, format!("api-usage={used}/2").as_str())
        );
    }
    let (status, headers, body) = o.call(reqwest::Method::GET, &format!("{V}/limits"), None).await;
    assert_eq!(status, 403);
    assert_eq!(body, json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]));
    assert_eq!(headers["sforce-limit-info"], "api-usage=2/2");
    // The window is a rolling 24 hours.
    o.control("clock", json!({"advance_ms": 86_400_001})).await;
    let (status, _, body) = o.call(reqwest::Method::GET, &format!("{V}/limits"), None).await;
    assert_eq!((status, body["DailyApiRequests"]["Remaining"].clone()), (200, json!(1)));
}

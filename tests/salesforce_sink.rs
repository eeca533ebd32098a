//! PostgreSQL to sluice to the Salesforce emulator: a snapshot through Bulk API 2.0 and the
//! stream through sObject Collections, deletes through Composite, poison records dead-lettered
//! while the rest flows, no duplicates after kill -9, sessions renewed when they expire, row
//! locks and outages retried, a spent daily allocation parking the sink until it frees up
//! (across a stop and a restart), and a backfill landing through Bulk API 2.0.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sluice_emulators::salesforce::{self, Config, Emulator};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::{eventually, run_until_idle, seed, sluice, Running, TestDb};

const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/salesforce-test.key");
const PUBLIC_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/salesforce-test.pub");

const MAPPING: &str = "    key: { source: \"{{ after.id }}\", target: Ext_Id__c }\n\
    \x20   when: \"{{ after.status != 'test' }}\"\n\
    \x20   fields:\n\
    \x20     Email: \"{{ after.email | lower }}\"\n\
    \x20     FirstName: \"{{ after.first_name }}\"\n\
    \x20     LastName: \"{{ after.last_name }}\"\n";

const JWT: &str = "{ type: jwt, client_id: 3MVG9emulator, username: sync@example.com, private_key: \"${file:KEY}\" }";
const CLIENT_CREDENTIALS: &str =
    "{ type: client_credentials, client_id: 3MVG9emulator, client_secret: emulator-secret }";

fn sink(url: &str, auth: &str, extra: &str) -> String {
    format!(
        "  - name: crm\n    type: salesforce\n    url: {url}\n    object: Contact\n    auth: {}\n{MAPPING}{extra}",
        auth.replace("KEY", KEY)
    )
}

/// The emulator with the test key as the connected app's certificate, and Contact shaped like
/// a real org's: LastName required, Email at most 40 characters, unknown fields refused.
async fn emulator(config: Config) -> Emulator {
    // reqwest is built without a default TLS provider (sluice brings its own).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config { jwt_public_key_pem: Some(std::fs::read_to_string(PUBLIC_KEY).unwrap()), ..config };
    let e = salesforce::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let shape = json!({"external_ids": ["Ext_Id__c"], "required": ["LastName"], "max_length": {"Email": 40},
        "fields": ["Email", "FirstName", "LastName"]});
    control(&e, "sobjects/Contact", shape).await;
    e
}

async fn control(e: &Emulator, path: &str, body: Value) {
    let r = reqwest::Client::new().post(format!("{}/_emu/{path}", e.url())).json(&body).send().await.unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
}

async fn stats(e: &Emulator) -> Value {
    reqwest::get(format!("{}/_emu/stats", e.url())).await.unwrap().json().await.unwrap()
}

/// The org's contacts by external ID, failing on duplicates.
async fn contacts(e: &Emulator) -> BTreeMap<String, (String, String, String)> {
    let all: Value = reqwest::get(format!("{}/_emu/sobjects/Contact", e.url())).await.unwrap().json().await.unwrap();
    let mut out = BTreeMap::new();
    for r in all.as_array().unwrap() {
        let text = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let row = (text("Email"), text("FirstName"), text("LastName"));
        assert!(out.insert(text("Ext_Id__c"), row).is_none(), "two records for Ext_Id__c {}", text("Ext_Id__c"));
    }
    out
}

/// What the org should hold: the mapped, filtered source table.
async fn expected(db: &TestDb, except: &[i32]) -> BTreeMap<String, (String, String, String)> {
    let mut out = BTreeMap::new();
    for r in db
        .rows("SELECT id, lower(email), first_name, last_name FROM customers WHERE status <> 'test' ORDER BY id")
        .await
    {
        let v = |i: usize| r[i].clone().unwrap_or_default();
        if !except.iter().any(|x| x.to_string() == v(0)) {
            out.insert(v(0), (v(1), v(2), v(3)));
        }
    }
    out
}

async fn customers(db: &TestDb, rows: i32) {
    db.client
        .batch_execute(&format!(
            "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text, last_name text, status text);
             INSERT INTO customers SELECT g, 'U' || g || '@X.io', 'f' || g, 'l' || g,
               CASE WHEN g % 25 = 0 THEN 'test' ELSE 'live' END FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
}

fn dlq_list(file: &Path) -> String {
    let out = sluice(&["dlq", "list", file.to_str().unwrap()], file.parent().unwrap());
    String::from_utf8_lossy(&out.stdout).to_string()
}

// The emulator serves from this test's runtime while `sluice run` blocks a thread: two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_mirrors_into_salesforce_with_bulk_snapshot_dead_letters_and_no_duplicates() {
    let e = emulator(Config::default()).await;
    let db = TestDb::new("salesforce").await;
    customers(&db, 3000).await;
    // Two poison rows: one in the snapshot (Bulk API), one written while streaming (Collections).
    db.client.batch_execute("UPDATE customers SET email = repeat('x', 50) || '@x.io' WHERE id = 7").await.unwrap();
    // Row locks on the first records written: resent alone, in a later call.
    control(&e, "faults", json!({"record_error": "UNABLE_TO_LOCK_ROW", "count": 5})).await;
    let extra = "    bulk_threshold: 500\n    batch: { max_records: 1000, max_age: 200ms }\n";
    let file = db.pipeline_with_sinks(&["public.customers"], &sink(&e.url(), JWT, extra));
    let mut rng = StdRng::seed_from_u64(seed());
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let mut next = 3001;
    for round in 0..2 {
        for _ in 0..40 {
            let id = rng.random_range(1..next);
            let sql = match rng.random_range(0..6) {
                0 => {
                    next += 1;
                    format!("INSERT INTO customers VALUES ({next}, 'N{next}@X.io', 'f', 'l{next}', 'live')")
                }
                1 => format!("DELETE FROM customers WHERE id = {id}"),
                2 => format!(
                    "UPDATE customers SET status = CASE status WHEN 'test' THEN 'live' ELSE 'test' END WHERE id = {id}"
                ),
                _ => {
                    format!("UPDATE customers SET first_name = 'r{round}-{}' WHERE id = {id}", rng.random_range(1..999))
                }
            };
            db.client.batch_execute(&sql).await.unwrap();
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
        }
    }
    db.client
        .batch_execute("INSERT INTO customers VALUES (100000, repeat('y', 50) || '@x.io', 'f', 'l', 'live')")
        .await
        .unwrap();
    running.kill9();
    run_until_idle(&file);

    let actual = contacts(&e).await;
    let wanted = expected(&db, &[7, 100000]).await;
    assert_eq!(actual.len(), wanted.len());
    assert_eq!(actual, wanted);
    let listed = dlq_list(&file);
    assert!(
        listed.contains("key=[7]") && listed.contains("key=[100000]") && listed.contains("STRING_TOO_LONG"),
        "{listed}"
    );
    let stats = stats(&e).await;
    assert!(stats["bulk_jobs"].as_u64().unwrap() >= 3, "the snapshot went through Bulk API: {stats}");
    assert_eq!(stats["status_401"], Value::Null, "{stats}");

    // The org's admin widens the field: a replay of the queue now lands both records.
    let wider = json!({"external_ids": ["Ext_Id__c"], "required": ["LastName"], "max_length": {"Email": 80},
        "fields": ["Email", "FirstName", "LastName"]});
    control(&e, "sobjects/Contact", wider).await;
    let out = sluice(&["dlq", "replay", file.to_str().unwrap(), "--all"], file.parent().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dlq_list(&file).contains("key="), "the queue is empty after the replay");
    assert_eq!(contacts(&e).await, expected(&db, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_locks_and_outages_are_retried_without_loss() {
    let e = emulator(Config::default()).await;
    let db = TestDb::new("salesforce_expiry").await;
    customers(&db, 300).await;
    let file = db.pipeline_with_sinks(
        &["public.customers"],
        &sink(&e.url(), CLIENT_CREDENTIALS, "    batch: { max_records: 100, max_age: 100ms }\n"),
    );
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    eventually("the snapshot to land", Duration::from_secs(60), || async {
        (contacts(&e).await.len() == expected(&db, &[]).await.len()).then_some(())
    })
    .await;
    // The session times out mid-stream; then a storm of transient failures.
    reqwest::Client::new().put(format!("{}/_emu/tokens/expire", e.url())).send().await.unwrap();
    db.client.batch_execute("UPDATE customers SET first_name = 'after-expiry' WHERE id <= 150").await.unwrap();
    eventually("the updates after expiry to land", Duration::from_secs(60), || async {
        (contacts(&e).await["149"].1 == "after-expiry").then_some(())
    })
    .await;
    control(&e, "faults", json!({"path_contains": "composite", "status": 503, "count": 2})).await;
    let limit = json!({"path_contains": "composite", "status": 403, "error_code": "REQUEST_LIMIT_EXCEEDED",
        "message": "ConcurrentPerOrgLongTxn Limit exceeded.", "count": 1});
    control(&e, "faults", limit).await;
    control(&e, "faults", json!({"record_error": "UNABLE_TO_LOCK_ROW", "count": 7})).await;
    db.client
        .batch_execute("UPDATE customers SET last_name = 'storm' WHERE id > 150; DELETE FROM customers WHERE id <= 20")
        .await
        .unwrap();
    eventually("the storm's changes to land", Duration::from_secs(60), || async {
        (contacts(&e).await == expected(&db, &[]).await).then_some(())
    })
    .await;
    running.stop();
    let stats = stats(&e).await;
    assert_eq!(stats["token_requests"], 2, "one new session after the expiry: {stats}");
    assert!(stats["status_401"].as_u64() >= Some(1), "{stats}");
    assert_eq!(stats["status_503"], 2, "{stats}");
    let listed = dlq_list(&file);
    assert!(!listed.contains("key="), "nothing dead-lettered: {listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_allocation_parks_the_sink_across_a_restart_until_it_frees_up() {
    let e = emulator(Config { daily_max: 3, ..Default::default() }).await;
    let db = TestDb::new("salesforce_park").await;
    customers(&db, 1000).await;
    let extra = "    batch: { max_records: 200, max_age: 100ms }\n    rate: { park_probe: 10s }\n";
    let file = db.pipeline_with_sinks(&["public.customers"], &sink(&e.url(), CLIENT_CREDENTIALS, extra));
    let running = Running::start(&file);
    let quota = db.data_dir().join("quota").join("crm.json");
    let parked = || async {
        let q: Value = serde_json::from_slice(&std::fs::read(&quota).ok()?).ok()?;
        q["parked_until_ms"].as_u64().map(|until| (until, q))
    };
    let (until, q) = eventually("the sink to park", Duration::from_secs(60), parked).await;
    assert_eq!((q["used"].clone(), q["max"].clone()), (json!(3), json!(3)), "{q}");
    // The status file is rewritten every second: the first one may predate the park.
    let status = eventually("`sluice status` to show the park", Duration::from_secs(10), || async {
        let out = sluice(&["status", file.to_str().unwrap()], file.parent().unwrap());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("PARKED").then_some(text)
    })
    .await;
    assert!(status.contains("API budget: 3 of 3 requests used in the current window; PARKED"), "{status}");
    // A stop does not wait for the park (what is not written stays in the log)...
    running.stop();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(now < until, "the stop waited for the park to end");
    // ...and a restart keeps the park: the new process makes no call before the park is over.
    let requests = stats(&e).await["requests"].clone();
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(now + 500 < until, "the restart took too long to tell");
    // Waiting for a moment in time, which is what is asserted about: just before the park ends.
    tokio::time::sleep(Duration::from_millis(until - now - 300)).await;
    assert_eq!(stats(&e).await["requests"], requests, "no call while parked");
    // The window frees up: the sink resumes and everything lands once.
    control(&e, "limits", json!({"daily_max": 1000})).await;
    eventually("the table to land after the park", Duration::from_secs(90), || async {
        (contacts(&e).await == expected(&db, &[]).await).then_some(())
    })
    .await;
    running.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_reaches_salesforce_as_snapshot_reads_through_bulk_api() {
    let e = emulator(Config::default()).await;
    let db = TestDb::new("salesforce_backfill").await;
    customers(&db, 3000).await;
    let file = db.pipeline_with_sinks(&["public.customers"], &sink(&e.url(), JWT, ""));
    let yaml = std::fs::read_to_string(&file).unwrap().replace("  heartbeat:", "  snapshot: never\n  heartbeat:");
    std::fs::write(&file, yaml).unwrap();
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    assert_eq!(stats(&e).await["records_Contact"], 0, "nothing before the backfill");
    let path = file.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        sluice(&["backfill", &path, "--table", "public.customers", "--chunk-rows", "5000"], Path::new("/"))
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let wanted = expected(&db, &[]).await;
    eventually("the backfill in the org", Duration::from_secs(60), || async {
        (contacts(&e).await.len() == wanted.len()).then_some(())
    })
    .await;
    running.stop();
    assert_eq!(contacts(&e).await, wanted);
    let stats = stats(&e).await;
    assert!(stats["bulk_jobs"].as_u64().unwrap_or(0) >= 1, "backfill rows went through Bulk API 2.0: {stats}");
}

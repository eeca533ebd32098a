//! PostgreSQL to sluice to the HubSpot emulator: mapped records upserted by external id, deletes
//! archived, a poison record dead-lettered while the rest flows, no duplicates after kill -9,
//! and no request over the account's budget.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sluice_emulators::hubspot::{self, Config};
use std::collections::BTreeMap;
use std::time::Duration;
use support::{run_until_idle, seed, sluice, Running, TestDb, CUSTOMERS_MAPPING};

const TOKEN: &str = "pat-na1-test";

fn sink(url: &str, ten_second_max: u32) -> String {
    format!(
        "  - name: crm\n    type: hubspot\n    url: {url}\n    token: {TOKEN}\n    object: contacts\n{CUSTOMERS_MAPPING}\
         \x20   rate: {{ ten_second_max: {ten_second_max} }}\n    batch: {{ max_records: 20, max_age: 200ms }}\n"
    )
}

/// The emulator's live contacts by sluice_id, failing on duplicates.
async fn contacts(url: &str) -> BTreeMap<String, (String, String, String)> {
    let all: Value = reqwest::get(format!("{url}/_emu/objects/contacts")).await.unwrap().json().await.unwrap();
    let mut out = BTreeMap::new();
    for r in all.as_array().unwrap().iter().filter(|r| r["archived"] == false) {
        let p = &r["properties"];
        let id = p["sluice_id"].as_str().unwrap().to_string();
        let row = (
            p["email"].as_str().unwrap().to_string(),
            p["firstname"].as_str().unwrap().to_string(),
            p["lifetime_value"].as_str().unwrap().to_string(),
        );
        assert!(out.insert(id.clone(), row).is_none(), "two live records for sluice_id {id}");
    }
    out
}

// The emulator serves from this test's runtime while `sluice run` blocks a thread: two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_mirrors_into_hubspot_with_dead_letters_and_no_duplicates() {
    // reqwest is built without a default TLS provider (sluice brings its own).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let emulator = hubspot::start(
        Config { tokens: vec![TOKEN.into()], ten_second_max: 20, ..Default::default() },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let url = emulator.url();
    let c = reqwest::Client::new();
    let props = json!({"strict": true, "properties": {
        "sluice_id": {"unique": true}, "email": {}, "firstname": {}, "lifetime_value": {"type": "number"}}});
    c.post(format!("{url}/_emu/properties/contacts")).json(&props).send().await.unwrap();

    let db = TestDb::new("hubspot").await;
    db.client
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text, status text, ltv text);
             INSERT INTO customers SELECT g, 'U' || g || '@X.io', 'n' || g, CASE WHEN g % 25 = 0 THEN 'test' ELSE 'live' END,
               (g * 1.5)::text FROM generate_series(1, 400) g;
             UPDATE customers SET ltv = 'n/a' WHERE id = 7;",
        )
        .await
        .unwrap();
    // 20 requests per 10 s, and batches of 20 changes: the snapshot alone needs 20 calls, so
    // only the budget keeps the sink from the 429s a burst would meet.
    let file = db.pipeline_with_sinks(&["public.customers"], &sink(&url, 20));
    let mut rng = StdRng::seed_from_u64(seed());
    let mut next = 401;
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    for round in 0..2 {
        for _ in 0..15 {
            let id = rng.random_range(1..next);
            let sql = match rng.random_range(0..6) {
                0 => {
                    next += 1;
                    format!("INSERT INTO customers VALUES ({next}, 'N{next}@X.io', 'f', 'live', '2.5')")
                }
                1 => format!("DELETE FROM customers WHERE id = {id}"),
                2 => format!(
                    "UPDATE customers SET status = CASE status WHEN 'test' THEN 'live' ELSE 'test' END WHERE id = {id}"
                ),
                _ => format!(
                    "UPDATE customers SET first_name = 'r{round}', ltv = '{}' WHERE id = {id} AND id <> 7",
                    rng.random_range(1..999)
                ),
            };
            db.client.batch_execute(&sql).await.unwrap();
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
        }
    }
    running.kill9();
    run_until_idle(&file);

    let mut expected = BTreeMap::new();
    for r in db.rows("SELECT id, lower(email), first_name, ltv FROM customers WHERE status <> 'test' AND id <> 7").await
    {
        let v = |i: usize| r[i].clone().unwrap();
        expected.insert(v(0), (v(1), v(2), v(3)));
    }
    let actual = contacts(&url).await;
    assert_eq!(actual.len(), expected.len());
    assert_eq!(actual, expected);

    // The poison record is in the dead-letter queue with HubSpot's reason.
    let out = sluice(&["dlq", "list", file.to_str().unwrap()], file.parent().unwrap());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("key=[7]") && listed.contains("INVALID_FLOAT"), "{listed}");
    // The budget kept every request under the account's limit.
    let stats: Value = c.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats.get("status_429"), None, "{stats}");
}

/// A storm of 429s, locks, migrations with Retry-After and gateway errors: every one is retried,
/// and the records land exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_are_retried_without_loss() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let emulator =
        hubspot::start(Config { tokens: vec![TOKEN.into()], ..Default::default() }, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let url = emulator.url();
    let c = reqwest::Client::new();
    let props = json!({"properties": {"sluice_id": {"unique": true}}});
    c.post(format!("{url}/_emu/properties/contacts")).json(&props).send().await.unwrap();
    for (status, count, retry_after) in
        [(429, 3, None), (423, 1, None), (477, 1, Some(1)), (502, 2, None), (524, 1, None)]
    {
        let fault =
            json!({"path_contains": "batch/upsert", "status": status, "count": count, "retry_after": retry_after});
        c.post(format!("{url}/_emu/faults")).json(&fault).send().await.unwrap();
    }
    let db = TestDb::new("hubspot_storm").await;
    db.client
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text, status text, ltv text);
             INSERT INTO customers SELECT g, 'u' || g || '@x.io', 'n' || g, 'live', g::text FROM generate_series(1, 250) g;",
        )
        .await
        .unwrap();
    let file = db.pipeline_with_sinks(&["public.customers"], &sink(&url, 100));
    let f = file.clone();
    tokio::task::spawn_blocking(move || run_until_idle(&f)).await.unwrap();
    let actual = contacts(&url).await;
    assert_eq!(actual.len(), 250);
    assert_eq!(actual["77"], ("u77@x.io".to_string(), "n77".to_string(), "77".to_string()));
    let stats: Value = c.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
    for (status, count) in
        [("status_429", 3), ("status_423", 1), ("status_477", 1), ("status_502", 2), ("status_524", 1)]
    {
        assert_eq!(stats[status], count, "{status}: {stats}");
    }
}

/// An emulated account with `sluice_id` unique, and a database whose `customers` table has
/// `rows` live rows.
async fn account_and_table(config: Config, test: &str, rows: u32) -> (hubspot::Emulator, TestDb) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let emulator = hubspot::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let props = json!({"properties": {"sluice_id": {"unique": true}}});
    let r = reqwest::Client::new().post(format!("{}/_emu/properties/contacts", emulator.url())).json(&props).send();
    assert!(r.await.unwrap().status().is_success());
    let db = TestDb::new(test).await;
    db.client
        .batch_execute(&format!(
            "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text, status text, ltv text);
             INSERT INTO customers SELECT g, 'u' || g || '@x.io', 'n' || g, 'live', g::text FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
    (emulator, db)
}

/// An OAuth app's access token expires mid-stream: the sink obtains a new one with the refresh
/// token once, replays the refused call, and nothing is lost or written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_token_that_expires_mid_stream_is_renewed_once() {
    let app = hubspot::OAuthApp { client_id: "cid".into(), client_secret: "secret".into(), refresh_token: "rt".into() };
    let (emulator, db) =
        account_and_table(Config { tokens: vec![], oauth: Some(app), ..Default::default() }, "hubspot_oauth", 120)
            .await;
    let url = emulator.url();
    let c = reqwest::Client::new();
    let auth = "    auth: { type: oauth, client_id: cid, client_secret: secret, refresh_token: rt }\n";
    let yaml = sink(&url, 100).replace(&format!("    token: {TOKEN}\n"), auth);
    let file = db.pipeline_with_sinks(&["public.customers"], &yaml);
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    support::eventually("the snapshot to land", Duration::from_secs(60), || async {
        (contacts(&url).await.len() == 120).then_some(())
    })
    .await;
    // HubSpot's access tokens live 30 minutes: move the account's clock past that.
    c.post(format!("{url}/_emu/clock")).json(&json!({"advance_ms": 31 * 60 * 1000})).send().await.unwrap();
    db.client.batch_execute("UPDATE customers SET first_name = 'later' WHERE id <= 60").await.unwrap();
    support::eventually("the updates to land with a new token", Duration::from_secs(60), || async {
        let all = contacts(&url).await;
        (all.values().filter(|(_, first, _)| first == "later").count() == 60).then_some(())
    })
    .await;
    running.stop();
    let stats: Value = c.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["token_requests"], 2, "{stats}");
    assert_eq!(stats["status_401"], 1, "{stats}");
    assert_eq!(contacts(&url).await.len(), 120);
}

/// The daily limit runs out (a 429 naming the DAILY policy): the sink parks instead of
/// hammering the API, `sluice status` says so, and it resumes once the allocation is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_daily_limit_parks_the_sink_until_it_is_back() {
    let config = Config { tokens: vec![TOKEN.into()], daily_max: 2, ..Default::default() };
    let (emulator, db) = account_and_table(config, "hubspot_daily", 100).await;
    let url = emulator.url();
    let c = reqwest::Client::new();
    let yaml =
        sink(&url, 100).replace("rate: { ten_second_max: 100 }", "rate: { ten_second_max: 100, park_probe: 1s }");
    let file = db.pipeline_with_sinks(&["public.customers"], &yaml);
    let running = Running::start(&file);
    let status = support::eventually("`sluice status` to show the park", Duration::from_secs(60), || async {
        let out = sluice(&["status", file.to_str().unwrap()], file.parent().unwrap());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("PARKED").then_some(text)
    })
    .await;
    assert!(
        status.contains("API budget: 2 of 2 requests used") && status.contains("hubspot daily limit reached"),
        "{status}"
    );
    assert_eq!(contacts(&url).await.len(), 40, "two calls of 20 before the limit");
    c.post(format!("{url}/_emu/limits")).json(&json!({"daily_max": 1000})).send().await.unwrap();
    support::eventually("the rest to land", Duration::from_secs(60), || async {
        (contacts(&url).await.len() == 100).then_some(())
    })
    .await;
    running.stop();
}

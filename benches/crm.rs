//! PostgreSQL to sluice to the CRM emulators, configured with real-world limits:
//!
//! - HubSpot at 100 requests per rolling 10 s, 100 inputs per call, 150 ms per call (about what
//!   the real API takes): records/s as a fraction of the theoretical maximum (limit x batch size
//!   = 1,000 records/s), and requests throttled.
//! - Salesforce through Bulk API 2.0 (a snapshot in batches of 10,000): records/s.
//! - Salesforce through sObject Collections (200 records a call) with 100 ms of latency per
//!   call: records/s next to the ceiling of one call at a time (2,000 records/s), which only
//!   concurrency (AIMD, up to 8 calls) can pass.
//!
//!   cargo bench --bench crm            (after scripts/services.sh)
//!   SLUICE_BENCH_CRM_ROWS=50000 SLUICE_BENCH_BULK_ROWS=500000 cargo bench --bench crm
//!
//! Times run from the start of `sluice run` to the last record landing in the emulator
//! (process start-up and the snapshot's reads included). No thresholds: figures are printed.

#[path = "support/measure.rs"]
mod measure;

use measure::run_sluice;
use serde_json::{json, Value};
use sluice_emulators::{hubspot, salesforce};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

const DB: &str = "sluice_bench_crm";
const TOKEN: &str = "pat-na1-bench";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A fresh database with `rows` customers.
async fn database(rows: usize) -> tokio_postgres::Client {
    let (admin, conn) =
        tokio_postgres::connect("host=127.0.0.1 user=cdc password=cdc dbname=cdc", NoTls).await.unwrap();
    tokio::spawn(conn);
    drop_database(&admin).await;
    admin.batch_execute(&format!("CREATE DATABASE {DB}")).await.unwrap();
    let (db, conn) =
        tokio_postgres::connect(&format!("host=127.0.0.1 user=cdc password=cdc dbname={DB}"), NoTls).await.unwrap();
    tokio::spawn(conn);
    db.batch_execute(&format!(
        "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text);
         INSERT INTO customers SELECT g, 'u' || g || '@example.com', 'n' || g FROM generate_series(1, {rows}) g;"
    ))
    .await
    .unwrap();
    admin
}

async fn drop_database(admin: &tokio_postgres::Client) {
    let _ = admin
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&DB])
        .await;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await.unwrap();
}

/// A pipeline file with one sink (YAML list item).
fn pipeline(dir: &Path, name: &str, sink: &str) -> PathBuf {
    let yaml = format!(
        "name: bench_{name}\nsource:\n  type: postgres\n  url: postgres://cdc:cdc@127.0.0.1:5432/{DB}?sslmode=disable\n  tables: [public.customers]\n  heartbeat: 1s\n\
         transport:\n  type: embedded\n  path: {}\nsinks:\n{sink}",
        dir.join(format!("data-{name}")).display()
    );
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    file
}

/// Runs the pipeline to idle while polling `count` until `rows` records have landed: the time
/// to the last record, and the run's CPU seconds and peak RSS.
async fn timed<F, Fut>(file: &Path, rows: usize, count: F) -> (f64, measure::Measured)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let f = file.to_path_buf();
    let start = Instant::now();
    let run = tokio::task::spawn_blocking(move || run_sluice(&f));
    let mut landed_at = None;
    while !run.is_finished() {
        if landed_at.is_none() && count().await >= rows {
            landed_at = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = run.await.unwrap();
    let landed = landed_at.unwrap_or(m.wall);
    (landed.as_secs_f64(), m)
}

async fn bench_hubspot(dir: &Path, http: &reqwest::Client) {
    let rows = env("SLUICE_BENCH_CRM_ROWS", 20_000);
    let limit = 100u32;
    let latency = Duration::from_millis(150);
    let config = hubspot::Config { tokens: vec![TOKEN.into()], ten_second_max: limit, latency, ..Default::default() };
    let emulator = hubspot::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = emulator.url();
    http.post(format!("{url}/_emu/properties/contacts"))
        .json(&json!({"properties": {"sluice_id": {"unique": true}}}))
        .send()
        .await
        .unwrap();
    let admin = database(rows).await;
    let sink = format!(
        "  - name: crm\n    type: hubspot\n    url: {url}\n    token: {TOKEN}\n    object: contacts\n\
         \x20   key: {{ source: \"{{{{ after.id }}}}\", target: sluice_id }}\n    fields:\n      email: \"{{{{ after.email }}}}\"\n      firstname: \"{{{{ after.first_name }}}}\"\n\
         \x20   batch: {{ max_records: 5000, max_age: 1s }}\n    rate: {{ ten_second_max: {limit} }}\n"
    );
    let file = pipeline(dir, "hubspot", &sink);
    // The stats carry each object's record count: listing every record, under the account's
    // lock, would slow the run it measures.
    let count = || async {
        let r: Value = http.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
        r["records_contacts"].as_u64().unwrap_or(0) as usize
    };
    let (secs, m) = timed(&file, rows, count).await;
    let stats: Value = http.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
    let max = limit as f64 / 10.0 * 100.0;
    println!(
        "HubSpot emulator at {limit} requests/10 s, 100 inputs per call, {latency:?} per call (max {max:.0} records/s): \
         {rows} rows in {secs:.1} s = {:.0} records/s = {:.1}% of the maximum",
        rows as f64 / secs,
        rows as f64 / secs / max * 100.0
    );
    // While writing: from the first call to the last, one spacing interval per call.
    let calls = stats["requests"].as_u64().unwrap_or(0) as f64;
    let span = (stats["last_request_ms"].as_u64().unwrap_or(0) - stats["first_request_ms"].as_u64().unwrap_or(0))
        as f64
        / 1000.0;
    let steady = calls * 100.0 / (span * calls / (calls - 1.0).max(1.0));
    println!(
        "  while writing (first call to last): {steady:.0} records/s = {:.1}% of the maximum",
        steady / max * 100.0
    );
    println!(
        "  requests {}, 429s {}; sluice CPU {:.2} s, peak RSS {:.0} MiB",
        stats["requests"],
        stats.get("status_429").cloned().unwrap_or(json!(0)),
        m.cpu,
        m.peak_rss_mib
    );
    drop_database(&admin).await;
}

fn salesforce_sink(url: &str, extra: &str) -> String {
    format!(
        "  - name: crm\n    type: salesforce\n    url: {url}\n    object: Contact\n\
         \x20   auth: {{ type: client_credentials, client_id: 3MVG9emulator, client_secret: emulator-secret }}\n\
         \x20   key: {{ source: \"{{{{ after.id }}}}\", target: Ext_Id__c }}\n    fields:\n      Email: \"{{{{ after.email }}}}\"\n      LastName: \"{{{{ after.first_name }}}}\"\n{extra}"
    )
}

async fn bench_salesforce(dir: &Path, http: &reqwest::Client, name: &str, rows: usize, latency_ms: u64, extra: &str) {
    let slug: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    let config = salesforce::Config { daily_max: 10_000_000, ..Default::default() };
    let emulator = salesforce::start(config, "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let url = emulator.url();
    http.post(format!("{url}/_emu/limits")).json(&json!({"latency_ms": latency_ms})).send().await.unwrap();
    let admin = database(rows).await;
    let file = pipeline(dir, &slug, &salesforce_sink(&url, extra));
    let count = || async {
        let r: Value = http.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
        // As for HubSpot: the record count from the stats, not a listing.
        r["records_Contact"].as_u64().unwrap_or(0) as usize
    };
    let (secs, m) = timed(&file, rows, count).await;
    let stats: Value = http.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
    println!(
        "Salesforce emulator, {name} ({latency_ms} ms per call): {rows} rows in {secs:.1} s = {:.0} records/s",
        rows as f64 / secs
    );
    println!(
        "  API requests {}, bulk jobs {}; sluice CPU {:.2} s ({:.1} CPU-s per million), peak RSS {:.0} MiB",
        stats["requests"],
        stats.get("bulk_jobs").cloned().unwrap_or(json!(0)),
        m.cpu,
        m.cpu / rows as f64 * 1e6,
        m.peak_rss_mib
    );
    drop_database(&admin).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    bench_hubspot(dir.path(), &http).await;
    let bulk_rows = env("SLUICE_BENCH_BULK_ROWS", 200_000);
    let bulk = "    batch: { max_records: 10000, max_age: 1s }\n";
    bench_salesforce(dir.path(), &http, "Bulk API 2.0", bulk_rows, 0, bulk).await;
    let collections = "    bulk_threshold: 1000000\n    batch: { max_records: 2000, max_age: 1s }\n";
    bench_salesforce(dir.path(), &http, "sObject Collections", env("SLUICE_BENCH_CRM_ROWS", 20_000), 100, collections)
        .await;
}

//! PostgreSQL to sluice to the HubSpot emulator configured with a real-world limit (100 requests
//! per rolling 10 s, 100 inputs per call): records/s as a fraction of the theoretical maximum
//! (limit x batch size = 1,000 records/s), and how many requests were throttled.
//!
//!   cargo bench --bench crm            (after scripts/services.sh)
//!   SLUICE_BENCH_CRM_ROWS=50000 cargo bench --bench crm
//!
//! No thresholds: the figures are printed, not asserted.

#[path = "support/measure.rs"]
mod measure;

use measure::run_sluice;
use serde_json::{json, Value};
use sluice_emulators::hubspot::{self, Config};
use tokio_postgres::NoTls;

const DB: &str = "sluice_bench_crm";
const TOKEN: &str = "pat-na1-bench";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rows: usize = std::env::var("SLUICE_BENCH_CRM_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let limit = 100u32;
    let emulator = hubspot::start(
        Config { tokens: vec![TOKEN.into()], ten_second_max: limit, ..Default::default() },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let url = emulator.url();
    let http = reqwest::Client::new();
    http.post(format!("{url}/_emu/properties/contacts"))
        .json(&json!({"properties": {"sluice_id": {"unique": true}}}))
        .send()
        .await
        .unwrap();

    let (admin, conn) =
        tokio_postgres::connect("host=127.0.0.1 user=cdc password=cdc dbname=cdc", NoTls).await.unwrap();
    tokio::spawn(conn);
    let _ = admin
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&DB])
        .await;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await.unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: bench_crm\nsource:\n  type: postgres\n  url: postgres://cdc:cdc@127.0.0.1:5432/{DB}?sslmode=disable\n  tables: [public.customers]\n  heartbeat: 1s\n\
         transport:\n  type: embedded\n  path: {}\nsinks:\n  - name: crm\n    type: hubspot\n    url: {url}\n    token: {TOKEN}\n    object: contacts\n\
         \x20   key: {{ source: \"{{{{ after.id }}}}\", target: sluice_id }}\n    fields:\n      email: \"{{{{ after.email }}}}\"\n      firstname: \"{{{{ after.first_name }}}}\"\n\
         \x20   batch: {{ max_records: 100, max_age: 1s }}\n    rate: {{ ten_second_max: {limit} }}\n",
        dir.path().join("data").display()
    );
    let file = dir.path().join("crm.yaml");
    std::fs::write(&file, yaml).unwrap();
    let f = file.clone();
    let m = tokio::task::spawn_blocking(move || run_sluice(&f)).await.unwrap();
    // The whole run, start-up and shutdown included: the snapshot ends at once, so the idle
    // window has passed by the time the last batch lands.
    let wall = m.wall.as_secs_f64();
    let stats: Value = http.get(format!("{url}/_emu/stats")).send().await.unwrap().json().await.unwrap();
    let records: Value = http.get(format!("{url}/_emu/objects/contacts")).send().await.unwrap().json().await.unwrap();
    let landed = records.as_array().map(|a| a.len()).unwrap_or(0);
    let max = limit as f64 / 10.0 * 100.0;
    println!(
        "HubSpot emulator at {limit} requests/10 s, 100 inputs per call (max {max:.0} records/s): \
         {rows} rows in {wall:.1} s = {:.0} records/s = {:.1}% of the maximum",
        rows as f64 / wall,
        rows as f64 / wall / max * 100.0
    );
    println!(
        "  {landed} records landed; requests {}, 429s {}; sluice CPU {:.2} s, peak RSS {:.0} MiB",
        stats["requests"],
        stats.get("status_429").cloned().unwrap_or(json!(0)),
        m.cpu,
        m.peak_rss_mib
    );
    let _ = admin
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&DB])
        .await;
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await;
}

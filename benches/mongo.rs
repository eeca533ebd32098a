//! MongoDB source benchmark against the MongoDB-protocol server the services script starts,
//! with same-run baselines from the plain driver.
//!
//! Prints snapshot documents/s next to a driver `find()` that only counts the same collection,
//! and streaming changes/s next to a driver `watch()` that only counts the same changes (resumed
//! from the same point), with sluice's CPU seconds per million and peak RSS.
//!
//!   cargo bench --bench mongo               (after scripts/services.sh)
//!   SLUICE_BENCH_DOCS=20000 SLUICE_BENCH_CHANGES=20000 cargo bench --bench mongo
//!   SLUICE_BENCH_NESTED=struct cargo bench --bench mongo     (the sink's `nested` layout; default json)
//!
//! No thresholds: the figures are printed, not asserted.

#[allow(dead_code)]
#[path = "support/measure.rs"]
mod measure;

use futures::TryStreamExt;
use measure::run_sluice_logged;
use mongodb::bson::{doc, Document};
use std::time::Instant;

const DB: &str = "sluice_bench_mongo";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn url() -> String {
    std::env::var("SLUICE_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into())
}

/// The time (seconds since the epoch) of the first log event whose message is `message`.
fn logged_at(log: &str, message: &str) -> f64 {
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["fields"]["message"] == message {
            let ts = v["timestamp"].as_str().unwrap();
            return chrono::DateTime::parse_from_rfc3339(ts).unwrap().timestamp_micros() as f64 / 1e6;
        }
    }
    panic!("no `{message}` in the log:\n{log}");
}

/// Documents/s of a driver `find()` in `_id` order that only counts.
async fn count_find(coll: &mongodb::Collection<Document>) -> f64 {
    let started = Instant::now();
    // The batch size sluice's snapshot asks for.
    let mut cursor = coll.find(Document::new()).sort(doc! { "_id": 1 }).batch_size(10_000).await.unwrap();
    let mut counted = 0;
    while cursor.try_next().await.unwrap().is_some() {
        counted += 1;
    }
    counted as f64 / started.elapsed().as_secs_f64()
}

/// Sets `status` on the first `n` documents, one change each.
async fn update_first(coll: &mongodb::Collection<Document>, n: usize, status: &str) {
    for start in (0..n).step_by(1000) {
        let ids: Vec<String> = (start..(start + 1000).min(n)).map(|i| format!("o{i:09}")).collect();
        coll.update_many(doc! { "_id": { "$in": ids } }, doc! { "$set": { "status": status } }).await.unwrap();
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let docs = env_usize("SLUICE_BENCH_DOCS", 100_000);
    let changes = env_usize("SLUICE_BENCH_CHANGES", 50_000).min(docs);
    let client = mongodb::Client::with_uri_str(url()).await.unwrap();
    let db = client.database(DB);
    db.drop().await.unwrap();
    let coll = db.collection::<Document>("orders");
    println!("sluice MongoDB benchmark: {docs} documents, {changes} changes");
    let load = Instant::now();
    for start in (0..docs).step_by(10_000) {
        let batch: Vec<Document> = (start..(start + 10_000).min(docs))
            .map(|i| {
                doc! {
                    "_id": format!("o{i:09}"), "customer": (i % 10_000) as i32, "amount": i as f64 * 0.01,
                    "status": "new", "lines": [{ "sku": format!("s{}", i % 97), "qty": 1 }],
                    "ship": { "city": "Oslo", "zip": "0150" },
                }
            })
            .collect();
        coll.insert_many(batch).await.unwrap();
    }
    println!("loaded in {:.1} s", load.elapsed().as_secs_f64());

    // ---- Snapshot: a driver find() that only counts, before and after sluice's snapshot of
    // the same collection (the faster of the two is the baseline).
    let find_before = count_find(&coll).await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("bench.yaml");
    std::fs::write(
        &file,
        format!(
            "name: bench_mongo\nsource:\n  type: mongodb\n  url: \"{url}\"\n  database: {DB}\n  collections: [orders]\n\
             transport:\n  type: embedded\n  path: {data}\nsinks:\n  - name: lake\n    type: parquet\n    url: file://{lake}/\n\
             \x20   nested: {nested}\n",
            url = url(),
            nested = std::env::var("SLUICE_BENCH_NESTED").unwrap_or_else(|_| "json".into()),
            data = work.path().join("data").display(),
            lake = work.path().join("lake").display(),
        ),
    )
    .unwrap();
    let (snap, snap_log) = run_sluice_logged(&file);
    let snap_secs = logged_at(&snap_log, "snapshot done") - logged_at(&snap_log, "snapshot");
    let snap_rate = docs as f64 / snap_secs;
    let find_rate = find_before.max(count_find(&coll).await);

    // ---- Streaming: changes made while sluice is stopped, then streamed by sluice; then the same
    // number of same-sized changes read by a driver watch() that only counts. Each reader gets
    // its own changes: the test server keeps only 1,000 changes behind the newest reader.
    update_first(&coll, changes, "paid").await;
    let (stream, stream_log) = run_sluice_logged(&file);
    // The final status holds when the last change was appended to the log.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(work.path().join("data/status.json")).unwrap()).unwrap();
    let last_change = status["last_data_ms"].as_u64().unwrap() as f64 / 1000.0;
    let stream_secs = last_change - logged_at(&stream_log, "streaming changes");
    let stream_rate = changes as f64 / stream_secs;
    let token = coll.watch().await.unwrap().resume_token();
    update_first(&coll, changes, "shipped").await;
    let started = Instant::now();
    let mut watch = coll.watch().resume_after(token).await.unwrap().with_type::<mongodb::bson::RawDocumentBuf>();
    let mut seen = 0;
    while seen < changes {
        if watch.next_if_any().await.unwrap().is_some() {
            seen += 1;
        }
    }
    let watch_rate = changes as f64 / started.elapsed().as_secs_f64();
    drop(watch);

    println!();
    println!("| | sluice | driver baseline | sluice / baseline |");
    println!("|---|---|---|---|");
    println!(
        "| snapshot, documents/s into the log | {snap_rate:.0} | {find_rate:.0} (find, counting) | {:.0}% |",
        100.0 * snap_rate / find_rate
    );
    println!(
        "| streaming, changes/s into the log | {stream_rate:.0} | {watch_rate:.0} (watch, counting) | {:.0}% |",
        100.0 * stream_rate / watch_rate
    );
    println!();
    println!(
        "snapshot run: {:.2} s wall, {:.2} CPU-s ({:.2} per million documents, Parquet sink included)",
        snap.wall.as_secs_f64(),
        snap.cpu,
        snap.cpu * 1e6 / docs as f64
    );
    println!(
        "streaming run: {:.2} s wall, {:.2} CPU-s ({:.2} per million changes, Parquet sink included)",
        stream.wall.as_secs_f64(),
        stream.cpu,
        stream.cpu * 1e6 / changes as f64
    );
    println!("peak RSS of sluice: {:.0} MiB", snap.peak_rss_mib.max(stream.peak_rss_mib));
    db.drop().await.unwrap();
}

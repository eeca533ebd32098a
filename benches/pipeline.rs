//! End-to-end benchmark against the real PostgreSQL, with same-run baselines.
//!
//! Prints snapshot rows/s next to `COPY ... TO STDOUT` of the same table, streaming changes/s
//! next to `pg_recvlogical` decoding the same WAL range to /dev/null, commit-to-Parquet latency
//! percentiles at a fixed rate, CPU seconds per million changes and peak RSS of sluice.
//!
//!   cargo bench --bench pipeline            (after scripts/services.sh)
//!   SLUICE_BENCH_ROWS=100000 SLUICE_BENCH_CHANGES=100000 cargo bench --bench pipeline
//!
//! No thresholds: the figures are printed, not asserted.

#[allow(dead_code)]
#[path = "../tests/support/lake.rs"]
mod lake;
#[path = "support/measure.rs"]
mod measure;
#[path = "support/postgres.rs"]
mod postgres;

use lake::parquet_files;
use measure::run_sluice;
use postgres::{connect, copy_rate, settle_table};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DB: &str = "sluice_bench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn status(data: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data.join("status.json")).unwrap()).unwrap()
}

/// Newest modification time (ms since the epoch) of any Parquet file under `dir`.
fn newest_file_ms(dir: &Path) -> u64 {
    parquet_files(dir)
        .iter()
        .filter_map(|f| f.metadata().and_then(|m| m.modified()).ok())
        .map(|m| m.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64)
        .max()
        .unwrap_or(0)
}

/// The middle value.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    sorted[sorted.len() / 2]
}

fn pipeline_yaml(name: &str, data: &Path, lake: &Path) -> String {
    format!(
        "name: {name}\nsource:\n  type: postgres\n  url: postgres://cdc:cdc@127.0.0.1:5432/{DB}?sslmode=disable\n  tables: [public.bench_orders, public.bench_latency]\n  heartbeat: 500ms\n\
         transport:\n  type: embedded\n  path: {}\nsinks:\n  - name: lake\n    type: parquet\n    url: file://{}/\n    roll: {{ max_rows: 1000000, max_bytes: 128MiB, max_age: 1s }}\n",
        data.display(),
        lake.display()
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = env_usize("SLUICE_BENCH_ROWS", 1_000_000);
    let changes = env_usize("SLUICE_BENCH_CHANGES", 1_000_000);
    let rate = env_usize("SLUICE_BENCH_RATE", 2_000);
    let rate_secs = env_usize("SLUICE_BENCH_RATE_SECONDS", 20);
    let work = tempfile::tempdir().unwrap();
    let (data, lake) = (work.path().join("data"), work.path().join("lake"));

    let admin = connect("cdc").await;
    for slot in ["sluice_bench", "bench_recvlogical"] {
        let _ = admin.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await;
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await.unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {DB}")).await.unwrap();
    let db = connect(DB).await;
    println!("sluice benchmark: {rows} rows, {changes} changes, latency at {rate}/s for {rate_secs}s");
    db.batch_execute(&format!(
        "CREATE TABLE bench_orders (id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(12,2),
           status text, payload text, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO bench_orders SELECT g, g % 10000, g * 0.01, 'new', md5(g::text) || md5((g+1)::text) || md5((g+2)::text), now()
           FROM generate_series(1, {rows}) g;
         CREATE TABLE bench_latency (id bigserial PRIMARY KEY, note text);"
    ))
    .await
    .unwrap();
    // Both sides measured on a quiet server: the bulk load's dirty pages written out first, so
    // its background write-back does not slow sluice's fsyncs (COPY to a client has none).
    let bytes = settle_table(&db, "bench_orders").await;
    println!(
        "table: {rows} rows, {:.0} MiB on disk (about {} bytes per row)",
        bytes as f64 / 1048576.0,
        bytes / rows as i64
    );

    // ---- Snapshot into Parquet next to COPY of the same table, interleaved over several rounds
    // (this machine's speed drifts between seconds); medians of each are compared. Only the
    // last round's pipeline is kept, to stream from afterwards.
    let rounds = env_usize("SLUICE_BENCH_SNAPSHOT_ROUNDS", 3).max(1);
    let (mut copy_rates, mut snap_rates, mut snap_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let mut snap = None;
    let file = work.path().join("bench.yaml");
    for round in 0..rounds {
        copy_rates.push(copy_rate(&db, "bench_orders").await);
        let last = round + 1 == rounds;
        let (name, data, lake, round_file) = match last {
            true => ("bench".to_string(), data.clone(), lake.clone(), file.clone()),
            false => (
                format!("bench_warm{round}"),
                work.path().join(format!("data{round}")),
                work.path().join(format!("lake{round}")),
                work.path().join(format!("bench_warm{round}.yaml")),
            ),
        };
        std::fs::write(&round_file, pipeline_yaml(&name, &data, &lake)).unwrap();
        let start_ms = now_ms();
        let measured = run_sluice(&round_file);
        snap_rates.push(rows as f64 / ((newest_file_ms(&lake) - start_ms) as f64 / 1000.0));
        snap_cpu.push(measured.cpu);
        if last {
            snap = Some(measured);
        } else {
            db.execute("SELECT pg_drop_replication_slot($1)", &[&format!("sluice_{name}")]).await.unwrap();
            db.batch_execute(&format!("DROP PUBLICATION sluice_{name}")).await.unwrap();
        }
    }
    let snap = snap.expect("at least one round");
    let (copy_rate, snap_rate, snap_cpu) = (median(&copy_rates), median(&snap_rates), median(&snap_cpu));

    // ---- The same WAL range for both: a baseline slot at the same point, then the workload.
    let slot: String = db
        .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')", &[])
        .await
        .unwrap()
        .get(0);
    let per_tx = 10_000.min(changes);
    let workload = Instant::now();
    for i in 0..changes.div_ceil(per_tx) {
        let lo = (i * per_tx) % rows + 1;
        db.execute(
            "UPDATE bench_orders SET amount = amount + 1, status = 'paid' WHERE id BETWEEN $1 AND $2",
            &[&(lo as i64), &((lo + per_tx - 1) as i64)],
        )
        .await
        .unwrap();
    }
    let end_lsn: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    // A record past the end position, so pg_recvlogical stops as soon as it has decoded the
    // workload instead of waiting for a keepalive.
    db.execute("SELECT pg_logical_emit_message(false, 'bench', 'end')", &[]).await.unwrap();
    println!("workload: {changes} updates in {:.1}s, WAL {slot} .. {end_lsn}", workload.elapsed().as_secs_f64());

    let started = Instant::now();
    let recv = Command::new("pg_recvlogical")
        .args(["-h", "127.0.0.1", "-U", "cdc", "-d", DB, "--slot", "bench_recvlogical", "--start", "--no-loop"])
        .args([
            "--endpos",
            &end_lsn,
            "-o",
            "proto_version=2",
            "-o",
            "publication_names=sluice_bench",
            "-o",
            "streaming=on",
        ])
        .args(["-f", "/dev/null"])
        .env("PGPASSWORD", "cdc")
        .status()
        .expect("pg_recvlogical (postgresql-client)");
    assert!(recv.success());
    let recv_secs = started.elapsed().as_secs_f64();
    let recv_rate = changes as f64 / recv_secs;
    db.execute("SELECT pg_drop_replication_slot('bench_recvlogical')", &[]).await.unwrap();

    let stream_start = now_ms();
    let streamed = run_sluice(&file);
    let st = status(&data);
    let into_log = (st["last_data_ms"].as_u64().unwrap().saturating_sub(stream_start)) as f64 / 1000.0;
    let into_parquet = (newest_file_ms(&lake).saturating_sub(stream_start)) as f64 / 1000.0;
    let stream_rate = changes as f64 / into_parquet;

    // ---- Latency at a fixed rate: commit time to the moment a Parquet file holding it exists.
    let mut running = Command::new(measure::sluice_bin())
        .args(["run", file.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let latency_dir = lake.join("public.bench_latency");
    let seen_before = parquet_files(&latency_dir);
    let writer = tokio::spawn(async move {
        let db = connect(DB).await;
        let tick = Duration::from_millis(10);
        let per_tick = (rate / 100).max(1);
        let mut next = Instant::now();
        let end = Instant::now() + Duration::from_secs(rate_secs as u64);
        while Instant::now() < end {
            db.execute(
                &format!("INSERT INTO bench_latency (note) SELECT 'x' FROM generate_series(1, {per_tick})"),
                &[],
            )
            .await
            .unwrap();
            next += tick;
            tokio::time::sleep_until(next.into()).await;
        }
    });
    let mut latencies = Vec::new();
    let mut known = seen_before;
    let deadline = Instant::now() + Duration::from_secs(rate_secs as u64 + 10);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let seen_at = now_ms() as f64 / 1000.0;
        for f in parquet_files(&latency_dir) {
            if known.contains(&f) {
                continue;
            }
            known.push(f.clone());
            for ts in commit_times(&f) {
                latencies.push(seen_at - ts);
            }
        }
        if writer.is_finished() && latencies.len() >= rate * rate_secs {
            break;
        }
    }
    writer.await.unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(running.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    running.wait().unwrap();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());

    println!();
    println!("| measure | sluice | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| snapshot, rows/s (into Parquet, durable), median of {rounds} | {snap_rate:.0} | COPY TO STDOUT {copy_rate:.0} | {:.0}% |",
        100.0 * snap_rate / copy_rate
    );
    println!(
        "| streaming, changes/s (into Parquet, durable) | {stream_rate:.0} | pg_recvlogical {recv_rate:.0} | {:.0}% |",
        100.0 * stream_rate / recv_rate
    );
    println!("| streaming, changes/s (into the durable log) | {:.0} | | |", changes as f64 / into_log);
    if !latencies.is_empty() {
        println!(
            "| commit to Parquet latency at {rate}/s (roll.max_age 1s), {} rows | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | | |",
            latencies.len(),
            1000.0 * percentile(&latencies, 0.5),
            1000.0 * percentile(&latencies, 0.99),
            1000.0 * latencies.last().unwrap()
        );
    }
    println!("| snapshot CPU seconds per million rows | {:.2} | | |", snap_cpu * 1e6 / rows as f64);
    println!("| streaming CPU seconds per million changes | {:.2} | | |", streamed.cpu * 1e6 / changes as f64);
    println!("| peak RSS of sluice (MiB) | {:.0} | | |", streamed.peak_rss_mib.max(snap.peak_rss_mib));
    println!("(each round in order, rows/s: snapshot {snap_rates:.0?}, COPY {copy_rates:.0?})");
    println!(
        "(wall clock: last snapshot run {:.1}s, streaming run {:.1}s with a {changes}-change backlog; pg_recvlogical {recv_secs:.1}s)",
        snap.wall.as_secs_f64(),
        streamed.wall.as_secs_f64()
    );
    let _ = admin.execute("SELECT pg_drop_replication_slot('sluice_bench')", &[]).await;
}

/// Commit times (seconds since the epoch) of every row in a changelog file.
fn commit_times(file: &Path) -> Vec<f64> {
    use arrow::array::TimestampMicrosecondArray;
    let mut out = Vec::new();
    for b in lake::batches(file) {
        let ts = b
            .column_by_name("_sluice_commit_ts")
            .unwrap()
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap()
            .clone();
        out.extend(ts.values().iter().map(|&us| us as f64 / 1e6));
    }
    out
}

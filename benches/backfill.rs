//! Backfill benchmark against the real PostgreSQL, with a same-run baseline.
//!
//! Prints backfill rows/s of a table into Parquet (the pipeline streaming meanwhile) with 1, 2
//! and 4 chunks read in parallel, and the initial snapshot of the same table for comparison,
//! each next to `COPY ... TO STDOUT` of the table read by a client that only counts rows, run
//! just before; CPU seconds and peak RSS of the `sluice run` process.
//!
//!   cargo bench --bench backfill                      (after scripts/services.sh; 10M rows)
//!   SLUICE_BENCH_BACKFILL_ROWS=1000000 cargo bench --bench backfill
//!   SLUICE_BENCH_COMPRESSION=lz4 cargo bench --bench backfill   (the sink's codec; default snappy)
//!   SLUICE_BENCH_BIN=/var/tmp/sluice-target/production/sluice cargo bench --bench backfill
//!                                      (measure another build, e.g. `cargo build --profile production`)
//!
//! No thresholds: the figures are printed, not asserted.

#[allow(dead_code)]
#[path = "../tests/support/lake.rs"]
mod lake;
#[allow(dead_code)]
#[path = "support/measure.rs"]
mod measure;
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/scrape.rs"]
mod scrape;

use measure::{cpu_seconds, sluice_bin};
use postgres::{connect, copy_rate, settle_table};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use tokio_postgres::Client;

const DB: &str = "sluice_bench_backfill";

/// Newest modification time of any Parquet file under `dir`: when the last row became durable.
fn newest_file(dir: &Path) -> SystemTime {
    lake::parquet_files(dir).iter().filter_map(|f| f.metadata().and_then(|m| m.modified()).ok()).max().unwrap()
}

fn status(data: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(data.join("status.json")).ok()?).ok()
}

/// Peak resident memory (MiB) of a running process, from /proc.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() / 1024.0
}

fn sluice(args: &[&str]) -> Command {
    let mut c = Command::new(sluice_bin());
    c.args(args).env("RUST_LOG", "warn");
    c
}

struct Run {
    /// Rows/s until every row is durable in the sink.
    rate: f64,
    /// Rows/s until the job (or snapshot) was seen done in the status file (rewritten every second).
    landed_rate: f64,
    cpu: f64,
    rss: f64,
    /// Seconds the source spent in log commits and the sink in batches, from `/metrics`.
    commit_seconds: f64,
    sink_seconds: f64,
    /// Bytes of Parquet the sink wrote.
    lake_bytes: u64,
}

/// One pipeline, started fresh: with `parallelism`, streaming (no snapshot) while one backfill
/// reads the whole table; without, its initial snapshot reads the table (the same path, for
/// comparison). Ends when every row is durable in the sink.
async fn measure(work: &Path, rows: usize, parallelism: Option<u32>, compression: &str, admin: &Client) -> Run {
    let tag = parallelism.map_or("snapshot".to_string(), |p| format!("p{p}"));
    let name = format!("bf_bench_{tag}");
    let (data, lake) = (work.join(format!("data_{tag}")), work.join(format!("lake_{tag}")));
    let file: PathBuf = work.join(format!("{name}.yaml"));
    let snapshot = if parallelism.is_some() { "never" } else { "initial" };
    let metrics_port = 19460 + parallelism.unwrap_or(0) as u16;
    std::fs::write(
        &file,
        format!(
            "name: {name}\nsource:\n  type: postgres\n  url: postgres://cdc:cdc@127.0.0.1:5432/{DB}?sslmode=disable\n  tables: [public.bf_orders]\n  snapshot: {snapshot}\n  heartbeat: 500ms\n\
             transport:\n  type: embedded\n  path: {}\nsinks:\n  - name: lake\n    type: parquet\n    url: file://{}/\n    compression: {compression}\n    roll: {{ max_rows: 1000000, max_bytes: 128MiB, max_age: 1s }}\n\
             metrics:\n  listen: 127.0.0.1:{metrics_port}\n",
            data.display(),
            lake.display()
        ),
    )
    .unwrap();
    let mut started = SystemTime::now();
    let mut child: Child = sluice(&["run", file.to_str().unwrap()]).stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    let mut cpu0 = 0.0;
    if let Some(p) = parallelism {
        while !status(&data).is_some_and(|s| s["snapshot_done"] == true) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cpu0 = cpu_seconds(pid);
        started = SystemTime::now();
        let out = sluice(&["backfill", file.to_str().unwrap(), "--table", "public.bf_orders", "--detach"])
            .args(["--parallelism", &p.to_string(), "--chunk-rows", "100000"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Done when every row is read (the job is done, or the snapshot) and durable in the sink.
    let mut landed = None;
    loop {
        if let Some(s) = status(&data) {
            let job = &s["backfills"][0];
            let read = match parallelism {
                Some(_) => job["state"] == "done",
                None => s["snapshot_done"] == true,
            };
            if read && landed.is_none() {
                landed = Some(started.elapsed().unwrap());
            }
            let head = s["log_head"].as_u64().unwrap_or(0);
            let sink = &s["sinks"][0];
            if read
                && sink["rows_written"].as_u64().unwrap_or(0) >= rows as u64
                && sink["cursor"].as_u64() >= Some(head)
            {
                break;
            }
            assert!(!job["state"].as_str().unwrap_or("").starts_with("failed"), "{job}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The status file is rewritten every second; the files' times are exact.
    let elapsed = newest_file(&lake).duration_since(started).unwrap();
    let (cpu, rss) = (cpu_seconds(pid) - cpu0, peak_rss_mib(pid));
    let lake_bytes = lake::parquet_files(&lake).iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
    let page = scrape::metrics_page(metrics_port);
    let (commit_seconds, sink_seconds) = (
        scrape::summary_sum(&page, "sluice_log_commit_seconds"),
        scrape::summary_sum(&page, "sluice_sink_batch_seconds"),
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    let _ = admin.execute("SELECT pg_drop_replication_slot($1)", &[&format!("sluice_{name}")]).await;
    let _ = std::fs::remove_dir_all(&lake);
    let _ = std::fs::remove_dir_all(&data);
    let landed = landed.unwrap_or(elapsed);
    Run {
        rate: rows as f64 / elapsed.as_secs_f64(),
        landed_rate: rows as f64 / landed.as_secs_f64(),
        cpu,
        rss,
        commit_seconds,
        sink_seconds,
        lake_bytes,
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows: usize =
        std::env::var("SLUICE_BENCH_BACKFILL_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000_000);
    let compression = std::env::var("SLUICE_BENCH_COMPRESSION").unwrap_or_else(|_| "snappy".into());
    let admin = connect("cdc").await;
    for p in [1, 2, 4] {
        let _ = admin.execute("SELECT pg_drop_replication_slot($1)", &[&format!("sluice_bf_bench_p{p}")]).await;
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await.unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {DB}")).await.unwrap();
    let db = connect(DB).await;
    let loading = Instant::now();
    db.batch_execute(&format!(
        "CREATE TABLE bf_orders (id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(12,2),
           status text, payload text, created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO bf_orders SELECT g, g % 10000, g * 0.01, 'new', md5(g::text) || md5((g+1)::text), now()
           FROM generate_series(1, {rows}) g;"
    ))
    .await
    .unwrap();
    let bytes = settle_table(&db, "bf_orders").await;
    println!(
        "backfill benchmark: {rows} rows, {:.0} MiB on disk ({} bytes a row), loaded in {:.0}s; Parquet {compression}; {}",
        bytes as f64 / 1048576.0,
        bytes / rows as i64,
        loading.elapsed().as_secs_f64(),
        sluice_bin()
    );
    let work = tempfile::tempdir_in(std::env::var("SLUICE_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    for parallelism in [Some(1), Some(2), Some(4), None] {
        let copy = copy_rate(&db, "bf_orders").await;
        let run = measure(work.path(), rows, parallelism, &compression, &admin).await;
        let what =
            parallelism.map_or("initial snapshot (same path)".to_string(), |p| format!("backfill, parallelism {p}"));
        println!(
            "{what}: {:>9.0} rows/s = {:>5.1}% of COPY ({copy:.0} rows/s just before); \
             read at {:.0} rows/s; {:.2} CPU-s per million rows; peak RSS {:.0} MiB; \
             whole run {:.1} s: log commits {:.1} s, sink batches {:.1} s; {:.0} MiB of Parquet",
            run.rate,
            100.0 * run.rate / copy,
            run.landed_rate,
            run.cpu / (rows as f64 / 1e6),
            run.rss,
            rows as f64 / run.rate,
            run.commit_seconds,
            run.sink_seconds,
            run.lake_bytes as f64 / 1048576.0,
        );
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await.unwrap();
}

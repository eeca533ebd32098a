//! The mapping stage: mapped records/s per core for a 20-field mapping, and how much coalescing
//! cuts sink writes on a skewed-key workload, in process and end to end into a real PostgreSQL.
//!
//!   cargo bench --bench mapping            (after scripts/services.sh)
//!   SLUICE_BENCH_RECORDS=100000 cargo bench --bench mapping
//!
//! No thresholds: the figures are printed, not asserted.

#[path = "support/measure.rs"]
mod measure;

use measure::{run_sluice, usage};
use nix::sys::resource::UsageWho;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice::event::{ChangeEvent, Column, ColumnType, Op, Position, TableId, TableSchema, Value};
use sluice::mapping::coalesce::{Change, Coalescer};
use sluice::mapping::{Expr, Located, Mapped, Mapper, MappingConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// The allocator the `sluice` binary uses, so in-process figures match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The 20 mapped fields: plain copies, string filters, coercions, a template and PII helpers.
const FIELDS: [(&str, &str); 20] = [
    ("id", "{{ after.id }}"),
    ("email", "{{ after.email | lower }}"),
    ("first_name", "{{ after.first_name | trim }}"),
    ("last_name", "{{ after.last_name | upper }}"),
    ("full_name", "{{ after.first_name }} {{ after.last_name }}"),
    ("status", "{{ after.status }}"),
    ("ltv", "{{ after.ltv | decimal(2) }}"),
    ("score", "{{ after.score }}"),
    ("active", "{{ after.active | bool }}"),
    ("signup_date", "{{ after.created_at | date }}"),
    ("updated_at", "{{ after.updated_at | timestamptz }}"),
    ("country", "{{ after.country | default('XX') }}"),
    ("city", "{{ after.city }}"),
    ("phone", "{{ after.phone | mask }}"),
    ("ssn_hash", "{{ after.ssn | hmac_sha256('bench-key') }}"),
    ("plan", "{{ after.plan | lower }}"),
    ("seats", "{{ after.seats | int }}"),
    ("mrr", "{{ after.mrr | decimal }}"),
    ("source_ts", "{{ source.ts }}"),
    ("tier", "{{ 'gold' if after.ltv | float > 500 else 'standard' }}"),
];

fn schema() -> Arc<TableSchema> {
    let col = |name: &str, ty: ColumnType| Column { name: name.into(), ty, key: name == "id", toastable: false };
    let t = ColumnType::Text;
    Arc::new(TableSchema {
        table: TableId::new("public", "customers"),
        columns: vec![
            col("id", ColumnType::Int64),
            col("email", t.clone()),
            col("first_name", t.clone()),
            col("last_name", t.clone()),
            col("status", t.clone()),
            col("ltv", ColumnType::Numeric(Some((12, 2)))),
            col("score", ColumnType::Float64),
            col("active", ColumnType::Bool),
            col("created_at", ColumnType::Date),
            col("updated_at", ColumnType::TimestampTz),
            col("country", t.clone()),
            col("city", t.clone()),
            col("phone", t.clone()),
            col("ssn", t.clone()),
            col("plan", t.clone()),
            col("seats", ColumnType::Int32),
            col("mrr", ColumnType::Numeric(None)),
        ],
        toast_target: 0,
    })
}

fn event(rng: &mut StdRng, id: i64, op: Op) -> Arc<ChangeEvent> {
    let text = |s: String| Value::Text(s);
    let row = vec![
        Value::Int(id),
        text(format!("User{id}@Example.COM")),
        text(format!("  First{} ", id % 1000)),
        text(format!("last{}", id % 777)),
        text(["live", "trial", "churned"][rng.random_range(0..3)].into()),
        Value::Numeric(format!("{}.{:02}", rng.random_range(0..2000), rng.random_range(0..100))),
        Value::Float(rng.random::<f64>() * 100.0),
        Value::Bool(rng.random()),
        Value::Date(19_000 + rng.random_range(0..2000)),
        Value::TimestampTz(1_700_000_000_000_000 + rng.random_range(0..10_000_000_000_000i64)),
        text("DE".into()),
        text(format!("City{}", id % 321)),
        text(format!("+49 30 {:08}", id)),
        text(format!("{:03}-{:02}-{:04}", id % 1000, id % 100, id % 10000)),
        text("Business".into()),
        Value::Int(rng.random_range(1..500)),
        Value::Numeric(format!("{}.{}", rng.random_range(0..100_000), rng.random_range(0..1000))),
    ];
    Arc::new(ChangeEvent {
        table: TableId::new("public", "customers"),
        schema_id: 1,
        op,
        key: vec![Value::Int(id)],
        before: None,
        after: Some(row),
        position: Position::change(id as u64, 0),
        commit_ts_us: 1_764_000_000_000_000,
        tx_id: None,
        toast_fetched: false,
        snapshot_last: false,
        origin: None,
    })
}

fn located(text: &str) -> Located {
    Located { expr: Arc::new(Expr::compile(text).unwrap()), file: "bench".into(), line: 1, column: 1 }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Maps `n` records on one thread, in batches of 500 like the sink.
fn map_in_process(n: usize) {
    let mut mapper = Mapper::new(MappingConfig {
        table: TableId::new("public", "customers"),
        key: None,
        when: Some(located("{{ after.status != 'churned' or after.ltv | float > 0 }}")),
        fields: Some(FIELDS.iter().map(|(n, e)| (n.to_string(), located(e))).collect()),
        drop_echoes: true,
    });
    mapper.prepare(1, schema()).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let events: Vec<_> = (0..n as i64).map(|i| event(&mut rng, i, Op::Update)).collect();
    let (cpu0, _) = usage(UsageWho::RUSAGE_SELF);
    let start = Instant::now();
    let mut batch_ms = Vec::new();
    let mut mapped = 0usize;
    for chunk in events.chunks(500) {
        let t = Instant::now();
        for e in chunk {
            if let Mapped::Upsert { fields, .. } = mapper.map(e).expect("maps") {
                mapped += fields.len();
            }
        }
        batch_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let wall = start.elapsed().as_secs_f64();
    let (cpu1, rss) = usage(UsageWho::RUSAGE_SELF);
    batch_ms.sort_by(f64::total_cmp);
    println!("mapping, 20 fields, 1 thread: {n} records in {wall:.2}s = {:.0} records/s per core", n as f64 / wall);
    println!(
        "  per 500-record batch: p50 {:.2} ms, p99 {:.2} ms; CPU {:.2} s per million records; {} field values; peak RSS {rss:.0} MiB",
        percentile(&batch_ms, 0.5),
        percentile(&batch_ms, 0.99),
        (cpu1 - cpu0) / n as f64 * 1e6,
        mapped
    );
}

/// A key drawn with a heavy skew: u^4 over `keys` puts about half of all changes on the first
/// 6% of keys.
fn skewed(rng: &mut StdRng, keys: u64) -> u64 {
    let u: f64 = rng.random();
    (u.powi(4) * keys as f64) as u64
}

fn coalesce_in_process(changes: usize, keys: u64) {
    println!("coalescing, {changes} changes over {keys} keys (skewed: u^4):");
    for batch in [100usize, 500, 2000] {
        let mut rng = StdRng::seed_from_u64(11);
        let mut c: Coalescer<u64, u32, ()> = Coalescer::new(0);
        let (mut writes, mut offset) = (0usize, 0u64);
        let start = Instant::now();
        for _ in 0..changes {
            offset += 1;
            let key = skewed(&mut rng, keys);
            let change = if rng.random_range(0..20) == 0 { Change::Delete } else { Change::Upsert(offset as u32) };
            c.push(key, change, offset, ());
            if c.changes() as usize >= batch {
                writes += c.drain().len();
            }
        }
        writes += c.drain().len();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "  batch {batch:>4}: {writes} writes for {changes} changes ({:.1}% of changes, {:.2}x fewer), {:.1}M changes/s",
            writes as f64 * 100.0 / changes as f64,
            changes as f64 / writes as f64,
            changes as f64 / secs / 1e6
        );
    }
}

async fn connect(db: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(&format!("host=127.0.0.1 user=cdc password=cdc dbname={db}"), NoTls)
        .await
        .expect("PostgreSQL from scripts/services.sh");
    tokio::spawn(conn);
    c
}

/// Runs `sluice run FILE --until-idle 1s`; returns wall seconds (less the idle window), CPU
/// seconds, peak RSS MiB and the rows the sink wrote (from the status file).
fn run(file: &Path, data: &Path) -> (f64, f64, f64, u64) {
    let m = run_sluice(file);
    let wall = m.wall.saturating_sub(Duration::from_secs(1)).as_secs_f64();
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(data.join("status.json")).unwrap()).unwrap();
    (wall, m.cpu, m.peak_rss_mib, status["sinks"][0]["rows_written"].as_u64().unwrap())
}

/// PostgreSQL to sluice (20-field mapping) to PostgreSQL: a snapshot, then a backlog of
/// skewed updates drained in one run.
async fn end_to_end(rows: usize, updates: usize) {
    let admin = connect("cdc").await;
    for db in ["sluice_bench_map", "sluice_bench_map_dst"] {
        let _ = admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&db])
            .await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    }
    let src = connect("sluice_bench_map").await;
    let dst = connect("sluice_bench_map_dst").await;
    src.batch_execute(&format!(
        "CREATE TABLE customers (id bigint PRIMARY KEY, email text, first_name text, last_name text, status text,
           ltv numeric(12,2), score float8, active bool, created_at date, updated_at timestamptz, country text,
           city text, phone text, ssn text, plan text, seats int, mrr numeric);
         INSERT INTO customers SELECT g, 'User' || g || '@Example.COM', ' First' || g % 1000, 'last' || g % 777,
           (ARRAY['live','trial','churned'])[1 + g % 3], (g % 2000) + 0.25, g % 100, g % 2 = 0, date '2024-01-01' + g % 700,
           now(), 'DE', 'City' || g % 321, '+49 30 ' || g, lpad((g % 1000)::text, 3, '0') || '-00-0000', 'Business', g % 500,
           g * 1.125 FROM generate_series(1, {rows}) g;"
    ))
    .await
    .unwrap();
    let columns: Vec<String> = FIELDS
        .iter()
        .map(|(n, _)| {
            let ty = match *n {
                "id" | "seats" => "bigint",
                "ltv" | "mrr" => "numeric",
                "score" => "float8",
                "active" => "bool",
                "signup_date" => "date",
                "updated_at" | "source_ts" => "timestamptz",
                _ => "text",
            };
            format!("{n} {ty}")
        })
        .collect();
    dst.batch_execute(&format!(
        "CREATE TABLE customers ({}, _sluice_version text, PRIMARY KEY (id))",
        columns.join(", ")
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fields: String = FIELDS.iter().map(|(n, e)| format!("      {n}: \"{}\"\n", e.replace('"', "\\\""))).collect();
    let yaml = format!(
        "name: bench_map\nsource:\n  type: postgres\n  url: postgres://cdc:cdc@127.0.0.1:5432/sluice_bench_map?sslmode=disable\n  tables: [public.customers]\n\
         transport:\n  type: embedded\n  path: {}\nsinks:\n  - name: mirror\n    type: postgres\n    url: postgres://cdc:cdc@127.0.0.1:5432/sluice_bench_map_dst?sslmode=disable\n\
         \x20   table: public.customers\n    batch: {{ max_records: 2000, max_age: 1s }}\n    fields:\n{fields}",
        data.display()
    );
    let file = dir.path().join("bench.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (wall, cpu, rss, written) = run(&file, &data);
    println!(
        "end to end, snapshot of {rows} rows into PostgreSQL: {:.0} rows/s, {written} rows written, CPU {:.2} s per million, peak RSS {rss:.0} MiB",
        rows as f64 / wall,
        cpu / rows as f64 * 1e6
    );
    // A backlog of skewed updates in transactions of 1000, drained in one run.
    let mut rng = StdRng::seed_from_u64(3);
    for chunk in 0..updates / 1000 {
        let ids: Vec<String> = (0..1000).map(|_| (1 + skewed(&mut rng, rows as u64)).to_string()).collect();
        let sql: String = ids
            .iter()
            .map(|id| format!("UPDATE customers SET ltv = ltv + 1, seats = {chunk} WHERE id = {id};"))
            .collect();
        src.batch_execute(&format!("BEGIN;{sql}COMMIT;")).await.unwrap();
    }
    let (wall, cpu, rss, written) = run(&file, &data);
    println!(
        "end to end, {updates} skewed updates: {:.0} changes/s, {written} rows written ({:.1}% of changes), CPU {:.2} s per million, peak RSS {rss:.0} MiB",
        updates as f64 / wall,
        written as f64 * 100.0 / updates as f64,
        cpu / updates as f64 * 1e6
    );
    // The target server's own limit, same run (after the streaming run: its WAL would otherwise
    // be read through by the source's walsender, both databases sharing one server): the mirrored rows upserted from a local table in
    // one statement (no client, no mapping), onto themselves as a changed-row update.
    let started = Instant::now();
    let set: Vec<String> =
        FIELDS.iter().filter(|(n, _)| *n != "id").map(|(n, _)| format!("{n} = EXCLUDED.{n}")).collect();
    dst.batch_execute(&format!(
        "CREATE TABLE baseline (LIKE customers INCLUDING ALL); INSERT INTO baseline SELECT * FROM customers;
         INSERT INTO baseline SELECT * FROM customers ON CONFLICT (id) DO UPDATE SET {}",
        set.join(", ")
    ))
    .await
    .unwrap();
    println!(
        "  baseline, same run: the target inserting then upserting those {rows} rows server-side: {:.0} rows/s per statement",
        2.0 * rows as f64 / started.elapsed().as_secs_f64()
    );
    let (src_sum, dst_sum): (String, String) = (
        src.query_one("SELECT sum(ltv)::text FROM customers", &[]).await.unwrap().get(0),
        dst.query_one("SELECT sum(ltv)::text FROM customers", &[]).await.unwrap().get(0),
    );
    println!("  check: sum(ltv) source {src_sum}, target {dst_sum}");
    drop((src, dst));
    for db in ["sluice_bench_map", "sluice_bench_map_dst"] {
        let _ = admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&db])
            .await;
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
    }
}

fn main() {
    // End to end first: a child forked later would count this process's in-process records in
    // its peak RSS (ru_maxrss includes the memory it shared before exec).
    let rows = env_usize("SLUICE_BENCH_ROWS", 200_000);
    if rows > 0 {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(end_to_end(rows, env_usize("SLUICE_BENCH_UPDATES", 200_000)));
    }
    map_in_process(env_usize("SLUICE_BENCH_RECORDS", 300_000));
    coalesce_in_process(1_000_000, 50_000);
}

//! Backfills while the pipeline streams: concurrent writers, a kill -9 mid-backfill, bad
//! clauses, and scheduled incremental runs, all against real PostgreSQL and the real binary.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice::connectors::postgres::backfill::{Book, JobState, BOOK_KEY};
use sluice::log::EmbeddedLog;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::lake::{changelog, replay, ChangeRow};
use support::{append_yaml, connect, eventually, seed, serve_metrics, sluice, table_state, Running, TestDb};

type Table = BTreeMap<String, BTreeMap<String, Option<String>>>;

const ORDERS: &str = "CREATE TABLE orders (id int PRIMARY KEY, v int NOT NULL, note text);";

/// Random transactions of 1 to 4 updates, deletes and upserts over keys `1..=keys` until
/// `stop`; returns how many committed.
async fn write_until(db: String, keys: i32, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut client = connect(&db).await;
    let mut committed = 0;
    while !stop.load(Ordering::Acquire) {
        let tx = client.transaction().await.unwrap();
        for _ in 0..rng.random_range(1..=4) {
            let id: i32 = rng.random_range(1..=keys);
            let sql = match rng.random_range(0..10) {
                0 => "DELETE FROM orders WHERE id = $1",
                1..=3 => "INSERT INTO orders VALUES ($1, 0, 'new') ON CONFLICT (id) DO UPDATE SET v = orders.v + 1000",
                _ => "UPDATE orders SET v = v + 1, note = md5(random()::text) WHERE id = $1",
            };
            tx.execute(sql, &[&id]).await.unwrap();
        }
        tx.commit().await.unwrap();
        committed += 1;
    }
    committed
}

fn backfill_rows(rows: &[ChangeRow]) -> usize {
    rows.iter().filter(|r| r.op == "read").count()
}

async fn book(db: &TestDb) -> Book {
    let log = EmbeddedLog::open(&db.data_dir()).unwrap();
    log.meta(BOOK_KEY).await.unwrap().map(|raw| postcard::from_bytes(&raw).unwrap()).unwrap_or_default()
}

/// Waits until the lake, replayed in position order, is exactly the table.
async fn await_parity(db: &TestDb, table: &str, sql: &str) -> Vec<ChangeRow> {
    let expected: Table = table_state(&db.client, sql).await;
    let lake = db.lake_dir();
    let mut last = None;
    let outcome = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            let rows = changelog(&lake, table);
            if replay(&rows, "id") == expected {
                return rows;
            }
            last = Some(rows);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    match outcome {
        Ok(rows) => rows,
        Err(_) => {
            let actual = replay(&last.unwrap_or_default(), "id");
            let wrong: Vec<_> = expected.iter().filter(|(k, v)| actual.get(*k) != Some(v)).collect();
            let extra: Vec<_> = actual.keys().filter(|k| !expected.contains_key(*k)).collect();
            let (n, total) = (wrong.len(), expected.len());
            panic!("no parity: {n} of {total} rows differ, e.g. {:?}; extra keys {extra:?}", &wrong[..n.min(5)]);
        }
    }
}

/// A database with `rows` orders and a pipeline streaming it without a snapshot (so the
/// table's rows reach the lake only through backfills), running.
async fn streaming_orders(test: &str, rows: u32) -> (TestDb, std::path::PathBuf, Running) {
    let db = TestDb::new(test).await;
    db.client
        .batch_execute(&format!(
            "{ORDERS} INSERT INTO orders SELECT g, 0, md5(g::text) FROM generate_series(1, {rows}) g; ANALYZE orders;"
        ))
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.orders"], "  snapshot: never\n", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    (db, file, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_during_concurrent_writes_ends_in_exact_parity() {
    let (db, file, running) = streaming_orders("bf_concurrent", 20_000).await;

    let stop = Arc::new(AtomicBool::new(false));
    let s = seed();
    let writers: Vec<_> =
        (0..3).map(|i| tokio::spawn(write_until(db.name.clone(), 21_000, s + i, stop.clone()))).collect();
    let path = file.to_str().unwrap().to_string();
    let cwd = db.dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        sluice(&["backfill", &path, "--table", "public.orders", "--parallelism", "3", "--chunk-rows", "700"], &cwd)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Release);
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "backfill failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(" done: "), "{stdout}");
    assert!(committed > 50, "the writers ran during the backfill ({committed} transactions)");

    let rows = await_parity(&db, "public.orders", "SELECT id, v, note FROM orders").await;
    let read = backfill_rows(&rows);
    assert!(read > 15_000, "the backfill delivered the untouched rows ({read})");
    running.stop();
    let book = book(&db).await;
    assert_eq!(book.jobs.len(), 1);
    assert_eq!(book.jobs[0].state, JobState::Done);
    let plan = book.jobs[0].tables[0].plan.as_ref().unwrap();
    assert!(plan.done.len() > 20 && plan.done.iter().all(|d| *d), "{} chunks", plan.done.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_mid_backfill_resumes_and_redoes_at_most_the_chunks_in_flight() {
    let (db, file, running) = streaming_orders("bf_crash", 30_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(db.name.clone(), 31_000, seed(), stop.clone()));
    // pg_sleep slows each row down (0.3 ms) so the kill lands while chunks remain.
    let path = file.to_str().unwrap().to_string();
    let out = sluice(
        &[
            "backfill",
            &path,
            "--table",
            "public.orders",
            "--where",
            "pg_sleep(0.0003 * (id > 0)::int)::text = ''",
            "--parallelism",
            "2",
            "--chunk-rows",
            "1000",
            "--detach",
        ],
        db.dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = db.data_dir().join("status.json");
    eventually("a quarter of the backfill to land", Duration::from_secs(60), || async {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&status).ok()?).ok()?;
        let job = &v["backfills"][0];
        (job["blocks_done"].as_u64()? * 4 >= job["blocks_total"].as_u64()?.max(1)).then_some(())
    })
    .await;
    running.kill9();
    let at_kill = book(&db).await;
    let plan = at_kill.jobs[0].tables[0].plan.clone().unwrap();
    let done_at_kill = plan.done.iter().filter(|d| **d).count();
    assert_eq!(at_kill.jobs[0].state, JobState::Running, "killed mid-backfill");
    assert!(done_at_kill > 0 && done_at_kill < plan.done.len(), "{done_at_kill} of {} chunks", plan.done.len());
    let rows_at_kill = at_kill.jobs[0].tables[0].rows;

    let running = Running::start(&file);
    eventually("the resumed backfill to finish", Duration::from_secs(120), || async {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&status).ok()?).ok()?;
        (v["pid"].as_u64()? == running.child.id() as u64 && v["backfills"][0]["state"] == "done").then_some(())
    })
    .await;
    stop.store(true, Ordering::Release);
    writer.await.unwrap();
    let rows = await_parity(&db, "public.orders", "SELECT id, v, note FROM orders").await;
    running.stop();
    let done = book(&db).await;
    let table = &done.jobs[0].tables[0];
    // Rows landed before the kill stay landed; after it, only the unfinished chunks are read.
    let chunk_rows_max = 1000 * 3 / 2;
    let in_flight_rows = 2 * chunk_rows_max as u64;
    assert!(
        table.rows <= 30_000 + in_flight_rows && table.rows >= rows_at_kill,
        "{} rows landed in all, {rows_at_kill} before the kill",
        table.rows
    );
    let read = backfill_rows(&rows);
    assert!(read as u64 <= table.rows + in_flight_rows, "{read} rows read into the lake, {} landed", table.rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_where_clause_is_refused_before_any_row_moves() {
    let db = TestDb::new("bf_bad_where").await;
    db.client.batch_execute(&format!("{ORDERS} INSERT INTO orders VALUES (1, 1, 'a');")).await.unwrap();
    let file = db.pipeline_file(&["public.orders"], "  snapshot: never\n", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let path = file.to_str().unwrap();
    let out = sluice(&["backfill", path, "--table", "public.orders", "--where", "no_such_column > 1"], db.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the where clause `no_such_column > 1` does not work on public.orders: column \"no_such_column\" does not exist (42703)"),
        "{stderr}"
    );
    let out = sluice(&["backfill", path, "--table", "public.orders", "--key-range", "5"], db.dir.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key-range 5: write FROM..TO"));
    let out = sluice(&["backfill", path, "--table", "public.nope"], db.dir.path());
    assert!(String::from_utf8_lossy(&out.stderr).contains("table public.nope does not exist"));
    running.stop();
    assert!(book(&db).await.jobs.is_empty(), "no job started");
    assert_eq!(backfill_rows(&changelog(&db.lake_dir(), "public.orders")), 0);

    // A schedule's clause is checked when the pipeline starts, pointing into the file.
    append_yaml(
        &file,
        "backfills:\n  - name: nightly\n    schedule: \"0 2 * * *\"\n    tables: [public.orders]\n    where: \"v >>> 2\"\n",
    );
    let out = sluice(&["run", path, "--until-idle", "1s"], db.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = std::fs::read_to_string(&file).unwrap().lines().position(|l| l.contains("where:")).unwrap() + 1;
    assert!(stderr.contains(&format!("pipeline.yaml:{line}:12: backfill nightly: the where clause `v >>> 2` does not work on public.orders: operator does not exist")), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_incremental_backfill_reads_only_rows_whose_cursor_grew() {
    let db = TestDb::new("bf_schedule").await;
    // `ledger` is not captured (no CDC): only scheduled incremental runs bring its rows.
    db.client
        .batch_execute(&format!(
            "{ORDERS} CREATE TABLE ledger (id int PRIMARY KEY, amount int NOT NULL, updated_at timestamptz NOT NULL);
             INSERT INTO ledger SELECT g, g, '2026-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, 500) g;"
        ))
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.orders"], "  snapshot: never\n", "");
    append_yaml(
        &file,
        "backfills:\n  - name: ledger-sync\n    schedule: \"*/2 * * * * *\"\n    time_zone: Europe/Berlin\n    \
         tables: [public.ledger]\n    mode: incremental\n    cursor: updated_at\n    where: \"amount > 10\"\n",
    );
    let running = Running::start(&file);
    let first = eventually("the first scheduled run", Duration::from_secs(60), || async {
        let rows = changelog(&db.lake_dir(), "public.ledger");
        (rows.len() >= 490).then_some(rows)
    })
    .await;
    assert_eq!(first.len(), 490, "rows 11..=500 once");
    db.client
        .batch_execute("UPDATE ledger SET amount = amount + 1, updated_at = '2027-01-01' WHERE id IN (3, 20, 400)")
        .await
        .unwrap();
    let next = eventually("a later run with the changed rows", Duration::from_secs(60), || async {
        let rows = changelog(&db.lake_dir(), "public.ledger");
        (rows.len() > 490).then_some(rows)
    })
    .await;
    running.stop();
    let rows = changelog(&db.lake_dir(), "public.ledger");
    assert_eq!(rows.len(), 492, "only ids 20 and 400 again (3 is filtered by the where clause): {next:?}");
    let state = replay(&rows, "id");
    assert_eq!(state["20"]["amount"].as_deref(), Some("21"));
    assert_eq!(state["400"]["amount"].as_deref(), Some("401"));
    assert!(!state.contains_key("3"));
    let book = book(&db).await;
    assert!(book.jobs.iter().all(|j| j.state == JobState::Done));
    assert!(book.marks["ledger-sync"].cursors["public.ledger"].starts_with("2027-01-01"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_range_backfill_reads_only_its_keys_and_reports_progress() {
    let db = TestDb::new("bf_key_range").await;
    db.client
        .batch_execute(&format!("{ORDERS} INSERT INTO orders SELECT g, g, 'n' FROM generate_series(1, 300) g;"))
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.orders"], "  snapshot: never\n", "");
    let port = serve_metrics(&file);
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let path = file.to_str().unwrap();
    let out = sluice(&["backfill", path, "--table", "public.orders", "--key-range", "100..150"], db.dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("done: 50 rows"));
    let rows = eventually("the range in the lake", Duration::from_secs(30), || async {
        let rows = changelog(&db.lake_dir(), "public.orders");
        (rows.len() >= 50).then_some(rows)
    })
    .await;
    let mut ids: Vec<i32> = rows.iter().map(|r| r.columns["id"].as_deref().unwrap().parse().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (100..150).collect::<Vec<_>>());
    assert!(rows.iter().all(|r| r.op == "read"));

    let status = sluice(&["status", path], db.dir.path());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("backfill adhoc (") && text.contains("public.orders: done, 50 rows"), "{text}");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    let line =
        |name: &str| metrics.lines().find(|l| l.starts_with(name)).map(|l| l.rsplit(' ').next().unwrap().to_string());
    assert_eq!(line("sluice_backfill_rows{").as_deref(), Some("50"), "{metrics}");
    assert_eq!(line("sluice_backfill_running{").as_deref(), Some("0"), "{metrics}");
    assert_eq!(line("sluice_backfill_rows_total{").as_deref(), Some("50"), "{metrics}");
    assert_eq!(line("sluice_backfill_blocks_done{"), line("sluice_backfill_blocks_total{"));
    running.stop();
}

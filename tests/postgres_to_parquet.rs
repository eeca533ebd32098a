//! PostgreSQL to Parquet through the embedded log, against the real server.

mod support;

use arrow::array::*;
use arrow::datatypes::{i256, DataType};
use std::time::Duration;
use support::lake::{batches, changelog, duplicate_positions, files, replay};
use support::{eventually, run_until_idle, seed, slot_confirmed, table_state, Running, TestDb};

const ALL_TYPES: &str = "
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE all_types (
  id int PRIMARY KEY, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
  n_bounded numeric(12,3), n_wide numeric(60,10), n_free numeric,
  t text, vc varchar(10), bp char(3), by bytea, j json, jb jsonb, j_null jsonb,
  u uuid, d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, iv interval,
  arr_i int4[], arr_t text[], e mood, ip inet
);";

const ROW: &str = "true, -32768, 2147483647, 9223372036854775807, 1.5, 1234.5678901234567,
  12345.678, 12345678901234567890123456789012345678901234567890.0123456789,
  123456789012345678901234567890.123456789012345678901234567890,
  'héllo\tworld\n', 'short', 'ab', '\\x00ff10', '{\"a\": [1, 2.50]}', '{\"b\": null}', 'null',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '23:59:59.999999', '10:00:00-03:30',
  '2024-02-29 12:34:56.123456', '2024-02-29 12:34:56.654321+02', '1 year 2 mons -3 days 04:05:06.000007',
  '{1,NULL,3}', '{\"a b\",\"c\\\"d\",NULL}', 'happy', '192.168.0.1/24'";

fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).as_any().downcast_ref::<T>().unwrap()
}

/// Asserts the exact typed values of row `r` (the ROW literal above).
fn assert_row(batch: &RecordBatch, r: usize) {
    assert!(col::<BooleanArray>(batch, "b").value(r));
    assert_eq!(col::<Int16Array>(batch, "i2").value(r), -32768);
    assert_eq!(col::<Int32Array>(batch, "i4").value(r), 2147483647);
    assert_eq!(col::<Int64Array>(batch, "i8").value(r), 9223372036854775807);
    assert_eq!(col::<Float32Array>(batch, "f4").value(r), 1.5);
    assert_eq!(col::<Float64Array>(batch, "f8").value(r), 1234.5678901234567);
    let nb = col::<Decimal128Array>(batch, "n_bounded");
    assert_eq!((nb.value(r), nb.precision(), nb.scale()), (12345678, 12, 3));
    let nw = col::<Decimal256Array>(batch, "n_wide");
    assert_eq!((nw.precision(), nw.scale()), (60, 10));
    assert_eq!(nw.value(r), i256::from_string("123456789012345678901234567890123456789012345678900123456789").unwrap());
    assert_eq!(
        col::<StringArray>(batch, "n_free").value(r),
        "123456789012345678901234567890.123456789012345678901234567890"
    );
    assert_eq!(col::<StringArray>(batch, "t").value(r), "héllo\tworld\n");
    assert_eq!(col::<StringArray>(batch, "vc").value(r), "short");
    assert_eq!(col::<StringArray>(batch, "bp").value(r), "ab ");
    assert_eq!(col::<BinaryArray>(batch, "by").value(r), &[0x00, 0xff, 0x10]);
    assert_eq!(col::<StringArray>(batch, "j").value(r), "{\"a\": [1, 2.50]}");
    assert_eq!(col::<StringArray>(batch, "jb").value(r), "{\"b\": null}");
    // JSON null is a value, not SQL NULL.
    let j_null = col::<StringArray>(batch, "j_null");
    assert!(!j_null.is_null(r));
    assert_eq!(j_null.value(r), "null");
    assert_eq!(
        col::<FixedSizeBinaryArray>(batch, "u").value(r),
        uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap().as_bytes()
    );
    assert_eq!(col::<Date32Array>(batch, "d").value(r), 19782);
    assert_eq!(col::<Time64MicrosecondArray>(batch, "tm").value(r), 86_399_999_999);
    assert_eq!(col::<StringArray>(batch, "tmtz").value(r), "10:00:00.000000-03:30");
    assert_eq!(col::<TimestampMicrosecondArray>(batch, "ts").value(r), 1_709_210_096_123_456);
    assert_eq!(col::<TimestampMicrosecondArray>(batch, "tstz").value(r), 1_709_202_896_654_321);
    let iv = col::<StructArray>(batch, "iv");
    assert_eq!(iv.column(0).as_any().downcast_ref::<Int32Array>().unwrap().value(r), 14);
    assert_eq!(iv.column(1).as_any().downcast_ref::<Int32Array>().unwrap().value(r), -3);
    assert_eq!(iv.column(2).as_any().downcast_ref::<Int64Array>().unwrap().value(r), 14_706_000_007);
    let arr_i = col::<ListArray>(batch, "arr_i").value(r);
    let arr_i = arr_i.as_any().downcast_ref::<Int32Array>().unwrap();
    assert_eq!(arr_i.iter().collect::<Vec<_>>(), vec![Some(1), None, Some(3)]);
    let arr_t = col::<ListArray>(batch, "arr_t").value(r);
    let arr_t = arr_t.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(arr_t.iter().collect::<Vec<_>>(), vec![Some("a b"), Some("c\"d"), None]);
    assert_eq!(col::<StringArray>(batch, "e").value(r), "happy");
    assert_eq!(col::<StringArray>(batch, "ip").value(r), "192.168.0.1/24");
}

#[tokio::test]
async fn every_type_round_trips_exactly_from_snapshot_and_stream() {
    let db = TestDb::new("types").await;
    db.client.batch_execute(ALL_TYPES).await.unwrap();
    db.client
        .batch_execute(&format!("INSERT INTO all_types VALUES (1, {ROW}); INSERT INTO all_types (id) VALUES (2);"))
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.all_types"], "", "");
    run_until_idle(&file);
    db.client.batch_execute(&format!("INSERT INTO all_types VALUES (3, {ROW})")).await.unwrap();
    run_until_idle(&file);

    let rows = changelog(&db.lake_dir(), "public.all_types");
    let ops: Vec<(&str, &str)> = rows.iter().map(|r| (r.op.as_str(), r.columns["id"].as_deref().unwrap())).collect();
    assert_eq!(ops, vec![("read", "1"), ("read", "2"), ("insert", "3")]);
    let mut seen = 0;
    for f in files(&db.lake_dir(), "public.all_types") {
        for batch in batches(&f) {
            let ids = col::<Int32Array>(&batch, "id");
            for r in 0..batch.num_rows() {
                if ids.value(r) == 2 {
                    // Every column of the all-NULL row is NULL, JSON included.
                    for (i, field) in batch.schema().fields().iter().enumerate() {
                        if field.name() != "id" && !field.name().starts_with("_sluice_") {
                            assert!(batch.column(i).is_null(r), "{} should be NULL", field.name());
                        }
                    }
                } else {
                    assert_row(&batch, r);
                    seen += 1;
                }
            }
            let schema = batch.schema();
            assert_eq!(
                schema.field_with_name("tstz").unwrap().data_type(),
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()))
            );
            assert_eq!(
                schema.field_with_name("_sluice_commit_ts").unwrap().data_type(),
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()))
            );
        }
    }
    assert_eq!(seen, 2, "the snapshot row and the streamed row");

    // An independent reader (pyarrow and DuckDB) sees the same values and logical types.
    let python = format!(
        "{}/venv/bin/python",
        std::env::var("SLUICE_SERVICES").unwrap_or_else(|_| "/var/tmp/sluice-services".into())
    );
    let script = r#"
import sys, json, glob, duckdb, pyarrow.parquet as pq
files = sorted(glob.glob(sys.argv[1] + '/public.all_types/*/*.parquet'))
t = pq.read_table(files).sort_by('id').to_pylist()
r = t[0]
print(json.dumps({
  'n_bounded': str(r['n_bounded']), 'n_wide': str(r['n_wide']), 'n_free': r['n_free'],
  'tstz': r['tstz'].isoformat(), 'ts': r['ts'].isoformat(), 'd': r['d'].isoformat(), 'tm': r['tm'].isoformat(),
  'u': str(r['u']) if not isinstance(r['u'], bytes) else r['u'].hex(), 'j_null': r['j_null'], 'arr_t': r['arr_t'],
  'json_logical': str(pq.ParquetFile(files[0]).schema.column(14).logical_type),
  'duck': duckdb.sql("select count(*), sum(i4), max(n_bounded)::varchar from read_parquet('%s/public.all_types/*/*.parquet')" % sys.argv[1]).fetchall()[0],
}))
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(db.lake_dir())
        .output()
        .expect("python from scripts/services.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n_bounded"], "12345.678");
    assert_eq!(v["n_wide"], "12345678901234567890123456789012345678901234567890.0123456789");
    assert_eq!(v["n_free"], "123456789012345678901234567890.123456789012345678901234567890");
    assert_eq!(v["tstz"], "2024-02-29T10:34:56.654321+00:00");
    assert_eq!(v["ts"], "2024-02-29T12:34:56.123456");
    assert_eq!(v["d"], "2024-02-29");
    assert_eq!(v["tm"], "23:59:59.999999");
    assert_eq!(v["j_null"], "null");
    assert_eq!(v["arr_t"], serde_json::json!(["a b", "c\"d", null]));
    assert!(v["json_logical"].as_str().unwrap().contains("JSON"), "{}", v["json_logical"]);
    assert_eq!(v["duck"], serde_json::json!([3, 4294967294i64, "12345.678"]));
}

#[tokio::test]
async fn random_workload_with_toast_replays_to_the_final_table() {
    let db = TestDb::new("workload").await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, version int NOT NULL, val text, big text, amount numeric(20,4));
         -- Out of line and uncompressed, so updates that leave `big` alone omit it from WAL.
         ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO items SELECT g, 1, 'v' || g, CASE WHEN g % 3 = 0 THEN repeat(md5(g::text), 300) END, g * 1.5
           FROM generate_series(1, 300) g;",
    )
    .await
    .unwrap();
    let file = db.pipeline_file(&["public.items"], "", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut next_id = 301;
    for round in 0..60 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.random_range(1..8) {
            let id = rng.random_range(1..next_id);
            match rng.random_range(0..11) {
                0..=2 => {
                    sql += &format!(
                        "INSERT INTO items VALUES ({next_id}, 1, 'n{next_id}', repeat('z', {}), {});",
                        rng.random_range(0..5000),
                        rng.random_range(0..100000)
                    );
                    next_id += 1;
                }
                // Updates that leave the TOASTed column alone.
                3..=6 => sql += &format!("UPDATE items SET version = version + 1, val = 'u{round}' WHERE id = {id};"),
                7 => {
                    sql += &format!(
                        "UPDATE items SET version = version + 1, big = repeat(md5('{round}'), 200) WHERE id = {id};"
                    )
                }
                8 => {
                    sql += &format!("UPDATE items SET version = version + 1, amount = amount + 0.0001 WHERE id = {id};")
                }
                9 => sql += &format!("DELETE FROM items WHERE id = {id};"),
                // A key change, leaving the TOASTed column alone: the old key's delete, then
                // the new key's insert, with the value the old key had.
                _ => {
                    sql += &format!("UPDATE items SET id = {next_id}, version = version + 1 WHERE id = {id};");
                    next_id += 1;
                }
            }
        }
        // Now and then: a savepoint rolled back, and a whole transaction rolled back.
        if round % 7 == 0 {
            sql += "SAVEPOINT s; UPDATE items SET val = 'never' WHERE id % 2 = 0; ROLLBACK TO SAVEPOINT s;";
        }
        sql += if round % 11 == 5 { "ROLLBACK;" } else { "COMMIT;" };
        c.batch_execute(&sql).await.unwrap();
    }
    // A transaction large enough to be streamed while in progress (protocol v2).
    c.batch_execute("UPDATE items SET version = version + 1, val = repeat('L', 200) WHERE id <= 250").await.unwrap();
    running.stop();
    run_until_idle(&file);

    let rows = changelog(&db.lake_dir(), "public.items");
    assert!(duplicate_positions(&rows).is_empty(), "duplicates: {:?}", duplicate_positions(&rows));
    let expected = table_state(c, "SELECT id, version, val, big, amount FROM items").await;
    let actual = replay(&rows, "id");
    assert_eq!(actual.len(), expected.len());
    for (id, row) in &expected {
        assert_eq!(actual.get(id), Some(row), "row {id}");
    }
    // No value had to be fetched from the source: every one was known since the snapshot.
    for f in files(&db.lake_dir(), "public.items") {
        for b in batches(&f) {
            assert_eq!(col::<BooleanArray>(&b, "_sluice_toast_fetched").true_count(), 0);
        }
    }
}

#[tokio::test]
async fn schema_changes_mid_stream_start_new_files() {
    let db = TestDb::new("ddl").await;
    let c = &db.client;
    c.batch_execute("CREATE TABLE s (id int PRIMARY KEY, a text, b int); INSERT INTO s VALUES (1, 'x', 1);")
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.s"], "", "    roll: { max_rows: 1000, max_age: 1h }\n");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    c.batch_execute(
        "INSERT INTO s VALUES (2, 'y', 2), (5, 'y', 5);
         ALTER TABLE s ADD COLUMN c jsonb; INSERT INTO s VALUES (3, 'z', 3, '{\"k\": 1}'), (6, 'z', 6, NULL);
         ALTER TABLE s DROP COLUMN a; UPDATE s SET b = 20 WHERE id IN (2, 5);
         ALTER TABLE s ALTER COLUMN b TYPE bigint; INSERT INTO s VALUES (4, 4, 'null'), (7, 7, NULL);",
    )
    .await
    .unwrap();
    running.stop();
    run_until_idle(&file);
    let rows = changelog(&db.lake_dir(), "public.s");
    let summary: Vec<(String, String, Vec<String>)> = rows
        .iter()
        .map(|r| (r.op.clone(), r.columns["id"].clone().unwrap(), r.columns.keys().cloned().collect()))
        .collect();
    let row = |op: &str, id: &str, c: &[&str]| {
        (op.to_string(), id.to_string(), c.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    };
    assert_eq!(
        summary,
        vec![
            row("read", "1", &["a", "b", "id"]),
            row("insert", "2", &["a", "b", "id"]),
            row("insert", "5", &["a", "b", "id"]),
            row("insert", "3", &["a", "b", "c", "id"]),
            row("insert", "6", &["a", "b", "c", "id"]),
            row("update", "2", &["b", "c", "id"]),
            row("update", "5", &["b", "c", "id"]),
            row("insert", "4", &["b", "c", "id"]),
            row("insert", "7", &["b", "c", "id"]),
        ]
    );
    // One file per schema version, each holding both of its changes.
    let change_files: Vec<usize> = files(&db.lake_dir(), "public.s")
        .iter()
        .map(|f| batches(f).iter().map(|b| b.num_rows()).sum::<usize>())
        .collect();
    assert_eq!(change_files, vec![1, 2, 2, 2, 2], "rows per file, in name order");
    let last = batches(files(&db.lake_dir(), "public.s").last().unwrap()).remove(0);
    assert_eq!(last.schema().field_with_name("b").unwrap().data_type(), &DataType::Int64);
    assert_eq!(col::<StringArray>(&last, "c").value(0), "null");
    assert!(col::<StringArray>(&last, "c").is_null(1));
}

#[tokio::test]
async fn an_idle_publication_does_not_pin_wal_while_another_database_writes() {
    let db = TestDb::new("idle").await;
    db.client.batch_execute("CREATE TABLE quiet (id int PRIMARY KEY)").await.unwrap();
    let file = db.pipeline_file(&["public.quiet"], "", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let slot = db.slot();
    // Another database writes a lot of WAL; nothing of it is in the publication.
    let other = TestDb::new("idle_other").await;
    other.client.batch_execute("CREATE TABLE noise (id int, pad text); INSERT INTO noise SELECT g, repeat('n', 200) FROM generate_series(1, 20000) g;").await.unwrap();
    let target: i64 =
        other.client.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[]).await.unwrap().get(0);
    eventually("the idle slot to move past the other database's WAL", Duration::from_secs(30), || async {
        slot_confirmed(&db.client, &slot).await.filter(|&c| c >= target as u64)
    })
    .await;
    running.stop();
}

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test]
async fn streamed_transactions_commit_abort_and_roll_back_savepoints() {
    let db = TestDb::new("streamed").await;
    let c = &db.client;
    c.batch_execute("CREATE TABLE st (id int PRIMARY KEY, pad text)").await.unwrap();
    let file = db.pipeline_file(&["public.st"], "", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    // Each of these transactions is far above logical_decoding_work_mem (64kB in the test
    // server), so the server streams it while in progress.
    c.batch_execute(
        "BEGIN;
         INSERT INTO st SELECT g, repeat('a', 100) FROM generate_series(1, 3000) g;
         SAVEPOINT s1;
         INSERT INTO st SELECT g, repeat('b', 100) FROM generate_series(10001, 13000) g;
         ROLLBACK TO SAVEPOINT s1;
         INSERT INTO st VALUES (5000, 'after savepoint');
         COMMIT;
         BEGIN;
         INSERT INTO st SELECT g, repeat('c', 100) FROM generate_series(20001, 23000) g;
         ROLLBACK;
         UPDATE st SET pad = 'u' WHERE id <= 3000;",
    )
    .await
    .unwrap();
    let slot = db.slot();
    eventually("the changes to be durable", Duration::from_secs(30), || async {
        let pos: i64 = c.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[]).await.unwrap().get(0);
        slot_confirmed(c, &slot).await.filter(|&l| l >= pos as u64 - 1024 * 1024)
    })
    .await;
    let streamed: i64 = c
        .query_one("SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert!(streamed >= 2, "the server streamed {streamed} transactions in progress");
    running.stop();
    run_until_idle(&file);
    let rows = changelog(&db.lake_dir(), "public.st");
    let count = |op: &str, f: &dyn Fn(i64) -> bool| {
        rows.iter().filter(|r| r.op == op && f(r.columns["id"].as_deref().unwrap().parse().unwrap())).count()
    };
    assert_eq!(count("insert", &|id| id <= 3000), 3000);
    assert_eq!(count("insert", &|id| id == 5000), 1);
    assert_eq!(count("insert", &|id| id > 10000), 0, "rolled-back work never reaches the lake");
    assert_eq!(count("update", &|id| id <= 3000), 3000);
    assert!(duplicate_positions(&rows).is_empty());
    let expected = table_state(c, "SELECT id, pad FROM st").await;
    assert_eq!(replay(&rows, "id"), expected);
}

#[tokio::test]
async fn without_a_snapshot_unknown_toast_values_are_fetched_and_flagged() {
    let db = TestDb::new("toast_fetch").await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, 't' || g, repeat(md5(g::text), 400) FROM generate_series(1, 3) g;",
    )
    .await
    .unwrap();
    let file = db.pipeline_file(&["public.docs"], "  snapshot: never\n", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    // The first update leaves the TOASTed body out and sluice has never seen it: fetched.
    // The second one finds it in sluice's own state: not fetched.
    c.batch_execute("UPDATE docs SET title = 'first' WHERE id = 1; UPDATE docs SET title = 'second' WHERE id = 1;")
        .await
        .unwrap();
    running.stop();
    run_until_idle(&file);
    let body: String = c.query_one("SELECT body FROM docs WHERE id = 1", &[]).await.unwrap().get(0);
    let mut seen = Vec::new();
    for f in files(&db.lake_dir(), "public.docs") {
        for b in batches(&f) {
            for r in 0..b.num_rows() {
                assert_eq!(col::<StringArray>(&b, "body").value(r), body, "never NULL, never a placeholder");
                seen.push((
                    col::<StringArray>(&b, "title").value(r).to_string(),
                    col::<BooleanArray>(&b, "_sluice_toast_fetched").value(r),
                ));
            }
        }
    }
    assert_eq!(seen, vec![("first".to_string(), true), ("second".to_string(), false)]);
}

#[tokio::test]
async fn metrics_status_and_a_draining_sigterm() {
    let db = TestDb::new("observe").await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE m (id int PRIMARY KEY, v int); INSERT INTO m SELECT g, g FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    let file = db.pipeline_file(&["public.m"], "", "    roll: { max_rows: 100000, max_age: 1h }\n");
    let port = support::serve_metrics(&file);
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    c.batch_execute("UPDATE m SET v = v + 1 WHERE id <= 10").await.unwrap();
    let body = eventually("metrics with the streamed changes", Duration::from_secs(30), || async {
        let body = http_get(port, "/metrics").await?;
        body.contains("sluice_events_in_total 110").then_some(body)
    })
    .await;
    for name in [
        "sluice_events_out_total{sink=\"lake\"}",
        "sluice_source_lag_bytes",
        "sluice_source_lag_seconds",
        "sluice_log_commit_seconds",
        "sluice_sink_batch_seconds",
        "sluice_retries_total{stage=\"source\"} 0",
        "sluice_snapshot_rows_total{table=\"public.m\"} 100",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    // With max_age 1h only the snapshot's file (closed by the snapshot's end) is in the lake;
    // SIGTERM closes the file of streamed changes and checkpoints.
    let before_stop = changelog(&db.lake_dir(), "public.m");
    assert_eq!((files(&db.lake_dir(), "public.m").len(), before_stop.len()), (1, 100));
    assert!(before_stop.iter().all(|r| r.op == "read"));
    running.stop();
    let rows = changelog(&db.lake_dir(), "public.m");
    assert_eq!(rows.len(), 110);
    let out = support::sluice(&["status", file.to_str().unwrap()], file.parent().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("slot {}: confirmed", db.slot())), "{text}");
    assert!(text.contains("snapshot done: true"), "{text}");
    assert!(text.contains("sink lake: cursor 110, 0 behind, 2 files, 110 rows"), "{text}");
    let json = support::sluice(&["status", "--json", file.to_str().unwrap()], file.parent().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["log_head"], 110);
    assert_eq!(v["sinks"][0]["cursor"], 110);
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The codec of every column chunk of a Parquet file.
fn codecs(file: &std::path::Path) -> Vec<parquet::basic::Compression> {
    use parquet::file::reader::FileReader;
    let reader = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(file).unwrap()).unwrap();
    let meta = reader.metadata();
    meta.row_groups().iter().flat_map(|g| g.columns().iter().map(|c| c.compression())).collect()
}

#[tokio::test]
async fn the_end_of_a_snapshot_closes_its_file_without_waiting_for_max_age() {
    let db = TestDb::new("snapend").await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    // Neither the age nor the row bound can close the file: only the snapshot's end can.
    let file =
        db.pipeline_file(&["public.t"], "", "    roll: { max_rows: 1000000, max_age: 1h }\n    compression: lz4\n");
    let running = Running::start(&file);
    let rows = eventually("the snapshot's file", Duration::from_secs(60), || async {
        let rows = changelog(&db.lake_dir(), "public.t");
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    running.stop();
    assert_eq!(rows.len(), 3000);
    assert!(rows.iter().all(|r| r.op == "read"));
    assert_eq!(replay(&rows, "id"), table_state(c, "SELECT id, v FROM t").await);
    // The configured codec (LZ4_RAW, not the deprecated framed LZ4) on every column.
    let written = files(&db.lake_dir(), "public.t");
    assert_eq!(written.len(), 1);
    let columns = codecs(&written[0]);
    assert!(!columns.is_empty());
    assert!(columns.iter().all(|&c| c == parquet::basic::Compression::LZ4_RAW), "{columns:?}");
}

#[tokio::test]
async fn a_table_added_later_is_snapshotted_then_streamed() {
    let db = TestDb::new("added").await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE first (id int PRIMARY KEY, v text); INSERT INTO first VALUES (1, 'a');
         CREATE TABLE later (id int PRIMARY KEY, v text); INSERT INTO later SELECT g, 'old' FROM generate_series(1, 100) g;",
    )
    .await
    .unwrap();
    run_until_idle(&db.pipeline_file(&["public.first"], "", ""));
    // Rows written while `later` is not captured must still arrive, through its snapshot.
    c.batch_execute("INSERT INTO later VALUES (101, 'before added'); UPDATE later SET v = 'changed' WHERE id = 1;")
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.first", "public.later"], "", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    c.batch_execute("INSERT INTO later VALUES (102, 'after added'); UPDATE later SET v = 'streamed' WHERE id = 2;")
        .await
        .unwrap();
    running.stop();
    run_until_idle(&file);

    let rows = changelog(&db.lake_dir(), "public.later");
    let ops = |op: &str| rows.iter().filter(|r| r.op == op).count();
    assert_eq!((ops("read"), ops("insert"), ops("update")), (101, 1, 1));
    assert!(duplicate_positions(&rows).is_empty());
    assert_eq!(replay(&rows, "id"), table_state(c, "SELECT id, v FROM later").await);
    // The first table was not read again.
    assert_eq!(changelog(&db.lake_dir(), "public.first").len(), 1);
}

#[tokio::test]
async fn a_sink_added_after_the_log_moved_on_is_refused_not_left_with_a_gap() {
    let db = TestDb::new("new_sink").await;
    db.client.batch_execute("CREATE TABLE n (id int PRIMARY KEY); INSERT INTO n VALUES (1);").await.unwrap();
    let file = db.pipeline_file(&["public.n"], "", "");
    run_until_idle(&file);
    let second = format!("  - name: late\n    type: parquet\n    url: file://{}/late/\n", db.dir.path().display());
    std::fs::write(&file, std::fs::read_to_string(&file).unwrap() + &second).unwrap();
    let out = support::sluice(&["run", file.to_str().unwrap()], file.parent().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("sink late is new to pipeline"), "{err}");
    assert!(err.contains("would miss them"), "{err}");
}

/// A result column's binary form, whatever its type.
struct Binary(Vec<u8>);

impl<'a> postgres_types::FromSql<'a> for Binary {
    fn from_sql(_: &postgres_types::Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Binary(raw.to_vec()))
    }

    fn accepts(_: &postgres_types::Type) -> bool {
        true
    }
}

/// The snapshot reads numerics in binary: every shape decodes to exactly the server's own text.
#[tokio::test]
async fn binary_numerics_decode_to_the_servers_text() {
    use sluice::connectors::postgres::copy_binary::numeric;
    let db = TestDb::new("numeric_binary").await;
    let mut values: Vec<String> = [
        "0",
        "-0",
        "0.0001",
        "-12.50",
        "10000",
        "9999.9999",
        "1e-30",
        "-1e30",
        "0.5",
        "100000000.00000001",
        "123456789012345678901234567890.123456789012345678901234567890",
        "NaN",
        "Infinity",
        "-Infinity",
    ]
    .map(String::from)
    .to_vec();
    let mut rng = StdRng::seed_from_u64(seed());
    for _ in 0..500 {
        let digits: String =
            (0..rng.random_range(1..45)).map(|_| char::from(b'0' + rng.random_range(0..10u8))).collect();
        let (int, frac) = digits.split_at(rng.random_range(0..=digits.len()));
        let sign = if rng.random_bool(0.5) { "-" } else { "" };
        values.push(format!("{sign}{}.{frac}", if int.is_empty() { "0" } else { int }));
    }
    // numeric(30,7) as well: a declared scale pads or rounds (NULL where it would overflow).
    let rows = db
        .client
        .query(
            "SELECT n, n::text, b, b::text FROM unnest($1::text[]) WITH ORDINALITY u(v, i),
               LATERAL (SELECT v::numeric AS n) x,
               LATERAL (SELECT CASE WHEN abs(n) < 1e23 THEN n::numeric(30,7) END AS b) y ORDER BY i",
            &[&values],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), values.len());
    for (row, input) in rows.iter().zip(&values) {
        for (binary, text) in [(0, 1), (2, 3)] {
            let text: Option<String> = row.get(text);
            let Some(text) = text else { continue };
            assert_eq!(numeric(&row.get::<_, Binary>(binary).0).unwrap(), text, "{input}");
        }
    }
}

/// Members of one pipeline starting at the same moment all find the publication missing and
/// create it; each must go on with the one that won, not stop with a duplicate-name error.
#[tokio::test]
async fn members_starting_together_share_one_publication() {
    use sluice::connectors::postgres::Catalog;
    use sluice::event::TableId;

    let db = TestDb::new("pub_race").await;
    db.client.batch_execute("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)").await.unwrap();
    let tables = [TableId::new("public", "a"), TableId::new("public", "b")];
    for round in 0..5 {
        let name = format!("race_{round}");
        let mut catalogs = Vec::new();
        for _ in 0..8 {
            catalogs.push(Catalog::new(support::connect(&db.name).await));
        }
        let attempts = catalogs.iter().map(|c| c.ensure_publication(&name, &tables));
        for outcome in futures::future::join_all(attempts).await {
            outcome.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let published = db
            .rows(&format!("SELECT tablename::text FROM pg_publication_tables WHERE pubname = '{name}' ORDER BY 1"))
            .await;
        assert_eq!(published, vec![vec![Some("a".to_string())], vec![Some("b".to_string())]]);
    }
}

//! kill -9 at random points, restart, and still: exact parity, no gaps, no duplicates.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice::connectors::postgres::snapshot::{SnapshotProgress, PROGRESS_KEY};
use sluice::log::EmbeddedLog;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use support::lake::{changelog, duplicate_positions, replay, ChangeRow};
use support::{run_until_idle, seed, table_state, Running, TestDb};

fn assert_parity(rows: &[ChangeRow], expected: &BTreeMap<String, BTreeMap<String, Option<String>>>) {
    assert!(duplicate_positions(rows).is_empty(), "duplicate positions: {:?}", duplicate_positions(rows));
    let actual = replay(rows, "id");
    let missing: Vec<&String> = expected.keys().filter(|k| !actual.contains_key(*k)).collect();
    let extra: Vec<&String> = actual.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
    for (id, row) in expected {
        assert_eq!(&actual[id], row, "row {id}");
    }
}

/// Snapshot progress as the log holds it (the process must have exited).
async fn snapshot_progress(db: &TestDb) -> Option<SnapshotProgress> {
    let log = EmbeddedLog::open(&db.data_dir()).ok()?;
    let raw = log.meta(PROGRESS_KEY).await.unwrap()?;
    Some(postcard::from_bytes(&raw).unwrap())
}

#[tokio::test]
async fn kill_during_snapshot_resumes_without_starting_over() {
    let db = TestDb::new("kill_snap").await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, version int NOT NULL, payload text);
         INSERT INTO big SELECT g, 1, repeat(md5(g::text), 3) FROM generate_series(1, 300000) g;
         UPDATE big SET version = 1 WHERE id <= 100000;",
    )
    .await
    .unwrap();
    // The update leaves the first third of the table dead and its live versions packed at the
    // end: chunks planned over the dead blocks meet dense ones and are cut into pieces, so
    // kills land between pieces of one chunk as well as between chunks.
    let file = db.pipeline_file(&["public.big"], "", "");
    let mut rng = StdRng::seed_from_u64(seed());
    let mut killed_mid_snapshot = 0;
    for round in 0..4 {
        let running = Running::start(&file);
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..900))).await;
        running.kill9();
        if let Some(p) = snapshot_progress(&db).await {
            if !p.done() && p.tables[0].rows > 0 {
                killed_mid_snapshot += 1;
            }
        }
        // Changes while sluice is down: updates across the key range, inserts, deletes.
        c.batch_execute(&format!(
            "UPDATE big SET version = version + 1 WHERE id % 997 = {round};
             INSERT INTO big VALUES ({}, 1, 'new');
             DELETE FROM big WHERE id = {};",
            400_000 + round,
            rng.random_range(1..300_000)
        ))
        .await
        .unwrap();
    }
    assert!(killed_mid_snapshot > 0, "no kill landed during the snapshot; the table is too small for this machine");
    run_until_idle(&file);
    let rows = changelog(&db.lake_dir(), "public.big");
    // Resumed, not restarted: the only keys read twice are rows updated while sluice was down,
    // whose new versions landed in blocks the resumed snapshot had still to read.
    let mut reads: HashMap<&str, usize> = HashMap::new();
    for r in rows.iter().filter(|r| r.op == "read") {
        *reads.entry(r.columns["id"].as_deref().unwrap()).or_default() += 1;
    }
    let changed_while_down = |id: i64| id % 997 < 4;
    let twice: Vec<_> = reads.iter().filter(|(id, n)| **n > 1 && !changed_while_down(id.parse().unwrap())).collect();
    assert!(twice.is_empty(), "unchanged keys read twice: {:?}", &twice[..twice.len().min(5)]);
    let snapshot_lsns: std::collections::BTreeSet<&str> =
        rows.iter().filter(|r| r.op == "read").map(|r| &r.position[..16]).collect();
    assert!(snapshot_lsns.len() >= 2, "a resumed snapshot reads the rest at a new snapshot LSN");
    assert_parity(&rows, &table_state(c, "SELECT id, version, payload FROM big").await);
}

#[tokio::test]
async fn kill_during_streaming_loses_and_duplicates_nothing() {
    let db = TestDb::new("kill_stream").await;
    db.client
        .batch_execute(
            "CREATE TABLE acct (id int PRIMARY KEY, version int NOT NULL, bal bigint, note text);
             ALTER TABLE acct ALTER COLUMN note SET STORAGE EXTERNAL;
             INSERT INTO acct SELECT g, 1, g * 10, CASE WHEN g % 10 = 0 THEN repeat(md5(g::text), 200) END FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.acct"], "", "");
    let running = Running::start(&file);
    db.await_streaming(&running).await;
    let seed = seed();
    let name = db.name.clone();
    let workload = tokio::spawn(async move {
        let c = support::connect(&name).await;
        let mut rng = StdRng::seed_from_u64(seed ^ 1);
        let mut next = 1001;
        for i in 0..300 {
            let mut sql = String::from("BEGIN;");
            for _ in 0..rng.random_range(1..6) {
                let id = rng.random_range(1..next);
                match rng.random_range(0..10) {
                    0..=1 => {
                        sql += &format!("INSERT INTO acct VALUES ({next}, 1, 0, NULL);");
                        next += 1;
                    }
                    2 => sql += &format!("DELETE FROM acct WHERE id = {id};"),
                    _ => {
                        sql += &format!(
                            "UPDATE acct SET version = version + 1, bal = bal + {} WHERE id = {id};",
                            rng.random_range(-50..50)
                        )
                    }
                }
            }
            if i % 50 == 25 {
                // Large enough to be streamed in progress, and killed somewhere inside, perhaps.
                sql += "UPDATE acct SET version = version + 1 WHERE id % 3 = 0;";
            }
            sql += "COMMIT;";
            c.batch_execute(&sql).await.unwrap();
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
        }
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let mut running = Some(running);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1800))).await;
        running.take().unwrap().kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        running = Some(Running::start(&file));
    }
    workload.await.unwrap();
    running.take().unwrap().stop();
    run_until_idle(&file);

    let rows = changelog(&db.lake_dir(), "public.acct");
    assert_parity(&rows, &table_state(&db.client, "SELECT id, version, bal, note FROM acct").await);
    // No gap: every key's versions step by exactly one from its first appearance on.
    let mut last: HashMap<String, i64> = HashMap::new();
    for r in rows.iter().filter(|r| r.op != "delete") {
        let id = r.columns["id"].clone().unwrap();
        let v: i64 = r.columns["version"].as_deref().unwrap().parse().unwrap();
        if let Some(prev) = last.insert(id.clone(), v) {
            assert_eq!(v, prev + 1, "key {id}: version {prev} followed by {v} at {}", r.position);
        }
    }
}

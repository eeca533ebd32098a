//! PostgreSQL to sluice to PostgreSQL: mapping, coalescing, conflicts, dead letters, echoes,
//! all against real servers (a source database and a target database per test).

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;
use support::{run_until_idle, seed, sluice, Running, TestDb, CUSTOMERS_MAPPING};

/// The sink block of a mapped mirror of `customers` into `contacts`.
fn crm_sink(target: &TestDb, extra: &str) -> String {
    format!(
        "  - name: crm\n    type: postgres\n    url: {url}\n    table: public.contacts\n{CUSTOMERS_MAPPING}\
         \x20     status: \"{{{{ after.status }}}}\"\n{extra}",
        url = target.url()
    )
}

const CUSTOMERS: &str = "CREATE TABLE customers (id int PRIMARY KEY, email text, first_name text, \
                         status text NOT NULL, ltv numeric(12,2), code text)";
const CONTACTS: &str = "CREATE TABLE contacts (sluice_id bigint PRIMARY KEY, email text, firstname text, \
                        lifetime_value numeric(14,2), status text, code text, _sluice_version text)";

/// The source as the mapping should make it.
const EXPECTED: &str = "SELECT id::bigint, lower(email), first_name, ltv::numeric(14,2), status \
                        FROM customers WHERE status <> 'test' ORDER BY id";
const ACTUAL: &str = "SELECT sluice_id, email, firstname, lifetime_value, status FROM contacts ORDER BY sluice_id";

fn sluice_ok(args: &[&str], cwd: &Path) -> String {
    let out = sluice(args, cwd);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "sluice {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test]
async fn random_workload_with_kills_mirrors_exactly() {
    let src = TestDb::new("pgs_rand").await;
    let dst = TestDb::new("pgs_rand_dst").await;
    dst.client.batch_execute(CONTACTS).await.unwrap();
    src.client.batch_execute(CUSTOMERS).await.unwrap();
    src.client
        .batch_execute(
            "INSERT INTO customers SELECT g, 'User' || g || '@Example.COM', 'n' || g, \
             CASE WHEN g % 10 = 0 THEN 'test' ELSE 'live' END, g * 1.25, NULL FROM generate_series(1, 3000) g",
        )
        .await
        .unwrap();
    let file = src.pipeline_with_sinks(
        &["public.customers"],
        &crm_sink(&dst, "    batch: { max_records: 200, max_age: 100ms }\n"),
    );
    let mut rng = StdRng::seed_from_u64(seed());
    let mut next_id = 3001;
    for round in 0..3 {
        let running = Running::start(&file);
        src.await_streaming(&running).await;
        for tx in 0..20 {
            if tx == 10 && round == 1 {
                // The target drops the sink's connection mid-stream: the sink reconnects and
                // writes the batch again.
                let killed = dst
                    .rows(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'sluice {} sink crm'",
                        src.pipeline()
                    ))
                    .await;
                assert!(!killed.is_empty(), "the sink holds a connection to the target");
            }
            let mut sql = String::from("BEGIN;");
            for _ in 0..rng.random_range(1..30) {
                let id = rng.random_range(1..next_id);
                sql += &match rng.random_range(0..10) {
                    0..=2 => {
                        next_id += 1;
                        format!("INSERT INTO customers VALUES ({next_id}, 'New{next_id}@X.io', 'f', 'live', 1.5, NULL);")
                    }
                    3..=5 => format!("UPDATE customers SET email = 'U{}@Y.io', ltv = ltv + 1 WHERE id = {id};", rng.random::<u16>()),
                    6 => format!("UPDATE customers SET status = CASE status WHEN 'test' THEN 'live' ELSE 'test' END WHERE id = {id};"),
                    7 => format!("DELETE FROM customers WHERE id = {id};"),
                    // A key change: the old key's record must go, the new one appear.
                    8 => {
                        next_id += 1;
                        format!("UPDATE customers SET id = {next_id} WHERE id = {id};")
                    }
                    // Many changes to one key in one batch: coalesced to the last.
                    _ => format!(
                        "INSERT INTO customers VALUES ({n}, 'c@c', 'c', 'live', 1, NULL); UPDATE customers SET ltv = 2 WHERE id = {n}; \
                         UPDATE customers SET ltv = 3 WHERE id = {n}; DELETE FROM customers WHERE id = {n};",
                        n = { next_id += 1; next_id }
                    ),
                };
            }
            sql += "COMMIT;";
            src.client.batch_execute(&sql).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        eprintln!("round {round}: kill -9");
        running.kill9();
    }
    run_until_idle(&file);
    let expected = src.rows(EXPECTED).await;
    let actual = dst.rows(ACTUAL).await;
    assert!(expected.len() > 2000, "the workload keeps most rows ({})", expected.len());
    assert_eq!(actual.len(), expected.len(), "row count");
    assert_eq!(actual, expected);
}

#[tokio::test]
async fn poison_records_go_to_the_dlq_and_replay_after_the_fix() {
    let src = TestDb::new("pgs_dlq").await;
    let dst = TestDb::new("pgs_dlq_dst").await;
    // lifetime_value numeric(8,2) cannot hold 12345678.90: the target refuses that record.
    dst.client.batch_execute(&CONTACTS.replace("numeric(14,2)", "numeric(8,2)")).await.unwrap();
    src.client.batch_execute(CUSTOMERS).await.unwrap();
    src.client
        .batch_execute(
            "INSERT INTO customers SELECT g, 'u' || g || '@x', 'n', 'live', g, g::text FROM generate_series(1, 200) g;
             UPDATE customers SET ltv = 12345678.90 WHERE id = 77;
             UPDATE customers SET code = 'abc' WHERE id = 88;",
        )
        .await
        .unwrap();
    // `code | decimal` fails to map for 'abc'.
    let sink = |code: &str| crm_sink(&dst, &format!("      code: \"{code}\"\n"));
    let file = src.pipeline_with_sinks(&["public.customers"], &sink("{{ after.code | decimal }}"));
    run_until_idle(&file);
    let ids: Vec<Option<String>> =
        dst.rows("SELECT sluice_id FROM contacts ORDER BY 1").await.into_iter().map(|r| r[0].clone()).collect();
    assert_eq!(ids.len(), 198, "everything but the two poison records");
    assert!(!ids.contains(&Some("77".into())) && !ids.contains(&Some("88".into())));
    let listed = sluice_ok(&["dlq", "list", file.to_str().unwrap()], file.parent().unwrap());
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        listed.contains("Rejected") && listed.contains("numeric field overflow") && listed.contains("key=[77]"),
        "{listed}"
    );
    assert!(
        listed.contains("Mapping") && listed.contains("`abc` is not a decimal") && listed.contains("key=[88]"),
        "{listed}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&sluice_ok(&["status", "--json", file.to_str().unwrap()], file.parent().unwrap()))
            .unwrap();
    assert_eq!(status["sinks"][0]["dead_letters"], 2, "{status}");
    assert_eq!(status["sinks"][0]["conflicts_parked"], 0, "{status}");
    let id77: &str = lines.iter().find(|l| l.contains("key=[77]")).unwrap().split('\t').next().unwrap();
    let shown = sluice_ok(&["dlq", "show", file.to_str().unwrap(), id77], file.parent().unwrap());
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["change"]["after"]["ltv"], "12345678.90");
    assert_eq!(shown["mapped"]["lifetime_value"], "12345678.90");
    assert_eq!(shown["attempts"], 1);

    // The pipeline keeps running: a later change to 77 fits and is written.
    src.client.batch_execute("UPDATE customers SET ltv = 5 WHERE id = 77").await.unwrap();
    run_until_idle(&file);
    assert_eq!(
        dst.rows("SELECT lifetime_value FROM contacts WHERE sluice_id = 77").await,
        vec![vec![Some("5.00".into())]]
    );

    // Fix the mapping and widen the target, then replay: 88 is written through the new mapping;
    // 77's old change is older than what the target holds, so the guard keeps 5.00.
    dst.client.batch_execute("ALTER TABLE contacts ALTER lifetime_value TYPE numeric(14,2)").await.unwrap();
    let file = src.pipeline_with_sinks(&["public.customers"], &sink("{{ after.code }}"));
    let out = sluice_ok(&["dlq", "replay", file.to_str().unwrap(), "--all"], file.parent().unwrap());
    assert_eq!(out.lines().filter(|l| l.ends_with(": replayed")).count(), 2, "{out}");
    let empty = sluice_ok(&["dlq", "list", file.to_str().unwrap()], file.parent().unwrap());
    assert!(empty.starts_with("empty"), "{empty}");
    assert_eq!(
        dst.rows("SELECT lifetime_value FROM contacts WHERE sluice_id = 77").await,
        vec![vec![Some("5.00".into())]]
    );
    assert_eq!(dst.rows("SELECT code FROM contacts WHERE sluice_id = 88").await, vec![vec![Some("abc".into())]]);
    assert_eq!(dst.rows("SELECT count(*) FROM contacts").await, vec![vec![Some("200".into())]]);
}

const PEOPLE_SRC: &str = "CREATE TABLE people (id int PRIMARY KEY, email text, phone text, updated_at timestamptz)";
const PEOPLE_DST: &str = "CREATE TABLE people (id int PRIMARY KEY, email text, phone text, updated_at timestamptz, \
                          _sluice_version text, _sluice_hash text)";
const PEOPLE: &str = "SELECT id, email, phone, updated_at FROM people ORDER BY id";

/// A source and a target database with their `people` tables; `insert` fills the source.
async fn people(name: &str, insert: &str) -> (TestDb, TestDb) {
    let src = TestDb::new(name).await;
    let dst = TestDb::new(&format!("{name}_dst")).await;
    src.client.batch_execute(PEOPLE_SRC).await.unwrap();
    dst.client.batch_execute(PEOPLE_DST).await.unwrap();
    src.client.batch_execute(insert).await.unwrap();
    (src, dst)
}

fn row(id: &str, email: &str, phone: &str, ts: &str) -> Vec<Option<String>> {
    vec![Some(id.into()), Some(email.into()), Some(phone.into()), Some(ts.into())]
}

/// Syncs two rows, edits one on the target (as a CRM user would), updates both at the source,
/// syncs again, and returns the pipeline file and the target for the strategy's checks.
async fn conflict_round(strategy: &str) -> (TestDb, TestDb, std::path::PathBuf) {
    let (src, dst) = people(
        &format!("cf_{strategy}"),
        "INSERT INTO people VALUES (1, 'a@s', 's1', '2026-01-01 00:00+00'), (2, 'b@s', 's2', '2026-01-01 00:00+00')",
    )
    .await;
    let conflict = match strategy {
        "newest_wins" => "{ strategy: newest_wins, source_field: after.updated_at, target_field: updated_at }",
        "merge" => "{ strategy: merge, owners: { phone: target, email: source } }",
        other => &format!("{{ strategy: {other} }}"),
    };
    let sink = format!(
        "  - name: mirror\n    type: postgres\n    url: {}\n    table: public.people\n    conflict: {conflict}\n",
        dst.url()
    );
    let file = src.pipeline_with_sinks(&["public.people"], &sink);
    run_until_idle(&file);
    assert_eq!(dst.rows(PEOPLE).await[0], row("1", "a@s", "s1", "2026-01-01 00:00:00+00"));
    dst.client
        .batch_execute("UPDATE people SET email = 'a@t', phone = 't1', updated_at = '2026-06-01 00:00+00' WHERE id = 1")
        .await
        .unwrap();
    src.client
        .batch_execute(
            "UPDATE people SET email = 'a@s2', phone = 's1b', updated_at = '2026-03-01 00:00+00' WHERE id = 1;
             UPDATE people SET email = 'b@s2' WHERE id = 2;",
        )
        .await
        .unwrap();
    run_until_idle(&file);
    // Row 2 was not edited on the target: every strategy writes it.
    assert_eq!(dst.rows(PEOPLE).await[1], row("2", "b@s2", "s2", "2026-01-01 00:00:00+00"), "{strategy}");
    (src, dst, file)
}

#[tokio::test]
async fn each_conflict_strategy_against_target_edits() {
    let source_row = row("1", "a@s2", "s1b", "2026-03-01 00:00:00+00");
    let target_row = row("1", "a@t", "t1", "2026-06-01 00:00:00+00");

    let (_s, dst, _) = conflict_round("source_wins").await;
    assert_eq!(dst.rows(PEOPLE).await[0], source_row, "source_wins");

    let (_s, dst, _) = conflict_round("target_wins").await;
    assert_eq!(dst.rows(PEOPLE).await[0], target_row, "target_wins");

    let (src, dst, file) = conflict_round("newest_wins").await;
    assert_eq!(dst.rows(PEOPLE).await[0], target_row, "newest_wins: the target's edit is newer");
    src.client
        .batch_execute("UPDATE people SET email = 'a@s3', updated_at = '2026-09-01 00:00+00' WHERE id = 1")
        .await
        .unwrap();
    run_until_idle(&file);
    assert_eq!(
        dst.rows(PEOPLE).await[0],
        row("1", "a@s3", "s1b", "2026-09-01 00:00:00+00"),
        "newest_wins: now the source's"
    );

    let (_s, dst, _) = conflict_round("merge").await;
    assert_eq!(
        dst.rows(PEOPLE).await[0],
        row("1", "a@s2", "t1", "2026-03-01 00:00:00+00"),
        "merge: phone is the target's"
    );

    let (_s, dst, file) = conflict_round("manual").await;
    assert_eq!(dst.rows(PEOPLE).await[0], target_row, "manual: parked, the target untouched");
    let cwd = file.parent().unwrap();
    let listed = sluice_ok(&["conflicts", "list", file.to_str().unwrap()], cwd);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let id = listed.split('\t').next().unwrap().to_string();
    let shown: serde_json::Value =
        serde_json::from_str(&sluice_ok(&["conflicts", "show", file.to_str().unwrap(), &id], cwd)).unwrap();
    assert_eq!(shown["target"]["email"], "a@t");
    assert_eq!(shown["mapped"]["email"], "a@s2");
    sluice_ok(&["conflicts", "resolve", file.to_str().unwrap(), &id, "--take", "source"], cwd);
    assert_eq!(dst.rows(PEOPLE).await[0], source_row, "manual: resolved with the source's record");
    assert!(sluice_ok(&["conflicts", "list", file.to_str().unwrap()], cwd).starts_with("empty"));
}

/// A status file's rows written by its one sink.
fn rows_written(db: &TestDb) -> u64 {
    let raw = std::fs::read(db.data_dir().join("status.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    v["sinks"][0]["rows_written"].as_u64().unwrap()
}

#[tokio::test]
async fn a_two_way_mirror_drops_its_own_echoes() {
    let a = TestDb::new("echo_a").await;
    let b = TestDb::new("echo_b").await;
    let table = "CREATE TABLE people (id int PRIMARY KEY, email text, _sluice_version text)";
    a.client.batch_execute(table).await.unwrap();
    b.client.batch_execute(table).await.unwrap();
    let sink = |to: &TestDb| {
        format!("  - name: mirror\n    type: postgres\n    url: {}\n    table: public.people\n", to.url())
    };
    let a_to_b = a.pipeline_with_sinks(&["public.people"], &sink(&b));
    let b_to_a = b.pipeline_with_sinks(&["public.people"], &sink(&a));
    run_until_idle(&a_to_b);
    run_until_idle(&b_to_a);

    a.client.batch_execute("INSERT INTO people (id, email) VALUES (1, 'from-a')").await.unwrap();
    run_until_idle(&a_to_b);
    assert_eq!(b.rows("SELECT id, email FROM people").await, vec![vec![Some("1".into()), Some("from-a".into())]]);
    assert_eq!(rows_written(&a), 1);
    // B's change is sluice's write: B to A drops it rather than writing it back.
    let log = run_until_idle(&b_to_a);
    assert_eq!(rows_written(&b), 0, "the echo was not written back:\n{log}");

    b.client.batch_execute("UPDATE people SET email = 'from-b' WHERE id = 1").await.unwrap();
    run_until_idle(&b_to_a);
    assert_eq!(a.rows("SELECT id, email FROM people").await, vec![vec![Some("1".into()), Some("from-b".into())]]);
    assert_eq!(rows_written(&b), 1);
    run_until_idle(&a_to_b);
    assert_eq!(rows_written(&a), 0, "after restart, the echo of B's write was dropped");
    assert_eq!(b.rows("SELECT id, email FROM people").await, vec![vec![Some("1".into()), Some("from-b".into())]]);
}

/// Edits on the target race a running pipeline that keeps writing the same rows: an edit is
/// never overwritten by a change the sink decided on before the edit (the sink reads and locks
/// the target's rows in the transaction that writes them).
#[tokio::test]
async fn target_edits_racing_a_running_pipeline_are_never_overwritten() {
    for (strategy, conflict) in [
        ("target_wins", "{ strategy: target_wins }"),
        ("merge", "{ strategy: merge, owners: { phone: target } }"),
        ("newest_wins", "{ strategy: newest_wins, source_field: after.updated_at, target_field: updated_at }"),
        ("manual", "{ strategy: manual }"),
    ] {
        let (src, dst) = people(
            &format!("race_{strategy}"),
            "INSERT INTO people SELECT g, 's0', 'sp0', now() FROM generate_series(1, 200) g",
        )
        .await;
        let sink = format!(
            "  - name: mirror\n    type: postgres\n    url: {}\n    table: public.people\n    conflict: {conflict}\n    batch: {{ max_records: 20, max_age: 20ms }}\n",
            dst.url()
        );
        let file = src.pipeline_with_sinks(&["public.people"], &sink);
        run_until_idle(&file);
        let running = Running::start(&file);
        src.await_streaming(&running).await;
        let mut rng = StdRng::seed_from_u64(seed());
        let plan: Vec<(Vec<i32>, i32)> = (0..60)
            .map(|_| ((0..10).map(|_| rng.random_range(1..=200)).collect(), rng.random_range(1..=100)))
            .collect();
        let source = async {
            for (n, (ids, _)) in plan.iter().enumerate() {
                let sql: String = ids
                    .iter()
                    .map(|id| {
                        format!(
                            "UPDATE people SET email = 's{n}', phone = 'sp{n}', updated_at = clock_timestamp() WHERE id = {id};"
                        )
                    })
                    .collect();
                src.client.batch_execute(&format!("BEGIN;{sql}COMMIT;")).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let target = async {
            let mut last = std::collections::BTreeMap::new();
            for (n, (_, id)) in plan.iter().enumerate() {
                let at = dst
                    .rows(&format!(
                        "UPDATE people SET email = 't{n}', phone = 'tp{n}', updated_at = clock_timestamp() \
                         WHERE id = {id} RETURNING (extract(epoch FROM updated_at) * 1e6)::bigint"
                    ))
                    .await;
                let at: i64 = at[0][0].as_deref().unwrap().parse().unwrap();
                last.insert(*id, (n, at));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last
        };
        let ((), edited) = tokio::join!(source, target);
        running.stop();
        run_until_idle(&file);
        let final_source: std::collections::BTreeMap<String, Vec<Option<String>>> =
            src.rows(PEOPLE).await.into_iter().map(|r| (r[0].clone().unwrap(), r)).collect();
        let source_at: std::collections::BTreeMap<i32, i64> = src
            .rows("SELECT id, (extract(epoch FROM updated_at) * 1e6)::bigint FROM people")
            .await
            .into_iter()
            .map(|r| (r[0].as_deref().unwrap().parse().unwrap(), r[1].as_deref().unwrap().parse().unwrap()))
            .collect();
        for r in dst.rows(PEOPLE).await {
            let id: i32 = r[0].as_deref().unwrap().parse().unwrap();
            let source_row = &final_source[&id.to_string()];
            let edit = |n: usize| (Some(format!("t{n}")), Some(format!("tp{n}")));
            let mine = (r[1].clone(), r[2].clone());
            match (strategy, edited.get(&id)) {
                ("target_wins" | "manual", Some((n, _))) => assert_eq!(mine, edit(*n), "{strategy} row {id}"),
                ("merge", Some((n, _))) => assert_eq!(r[2], edit(*n).1, "{strategy} row {id}: phone is the target's"),
                // The later of the two sides' last writes wins.
                ("newest_wins", Some((n, at))) if *at > source_at[&id] => {
                    assert_eq!(mine, edit(*n), "{strategy} row {id}: the target's edit is newer")
                }
                (_, Some(_)) => assert_eq!(&r, source_row, "{strategy} row {id}: the source is newer"),
                ("merge", None) => {
                    // The target owns phone: sluice wrote it only when it created the record.
                    assert_eq!((&r[1], r[2].as_deref()), (&source_row[1], Some("sp0")), "{strategy} row {id}")
                }
                (_, None) => assert_eq!(&r, source_row, "{strategy} row {id}: never edited on the target"),
            }
        }
        if strategy == "manual" {
            let parked =
                std::fs::read_dir(src.data_dir().join("conflicts").join("mirror")).map(|d| d.count()).unwrap_or(0);
            assert!(parked > 0, "source changes to edited rows were parked for review");
        }
    }
}

/// `version: field:updated_at`: the target takes a change only if its timestamp is not older
/// than the record's, whatever the order changes arrive in.
#[tokio::test]
async fn a_field_version_guard_keeps_the_newer_record() {
    let (src, dst) = people(
        "vguard",
        "INSERT INTO people VALUES (1, 'a', 'p', '2026-05-01 00:00+00'), (2, 'b', 'p', '2026-05-01 00:00+00')",
    )
    .await;
    let sink = format!(
        "  - name: mirror\n    type: postgres\n    url: {}\n    table: public.people\n    version: field:updated_at\n",
        dst.url()
    );
    let file = src.pipeline_with_sinks(&["public.people"], &sink);
    run_until_idle(&file);
    // A newer version reaches the target another way (a backfill, another writer).
    dst.client
        .batch_execute("UPDATE people SET email = 'newer', updated_at = '2026-07-01 00:00+00' WHERE id = 1")
        .await
        .unwrap();
    // Older source changes arrive afterwards: row 1's is older than the target's, row 2's newer.
    src.client
        .batch_execute(
            "UPDATE people SET email = 'older', updated_at = '2026-06-01 00:00+00' WHERE id = 1;
             UPDATE people SET email = 'b2', updated_at = '2026-06-01 00:00+00' WHERE id = 2;",
        )
        .await
        .unwrap();
    run_until_idle(&file);
    assert_eq!(
        dst.rows(PEOPLE).await,
        vec![row("1", "newer", "p", "2026-07-01 00:00:00+00"), row("2", "b2", "p", "2026-06-01 00:00:00+00")]
    );
}

/// The position guard's law, tombstones included: changes to a key applied in any order, some
/// twice, leave what applying them in position order leaves. The newest change wins, a delete
/// stays a delete against every older upsert, and a truncate is a delete of every key. A member
/// that lost its Kafka partitions while its sink was still writing them produces such orders.
#[tokio::test]
async fn changes_in_any_order_leave_the_newest_and_a_delete_stays_deleted() {
    use rand::seq::SliceRandom;
    use sluice::config::VersionGuard;
    use sluice::connectors::pgsink::target::{Fields, Row, Target};
    use sluice::event::{Position, TableId};

    /// One source change: a key's upsert (`Some` value) or delete (`None`), or a truncate.
    #[derive(Debug, Clone)]
    enum Change {
        Key(i32, Option<String>),
        Truncate,
    }

    let mut dst = TestDb::new("tombstones").await;
    dst.client.batch_execute("CREATE TABLE kv (id int PRIMARY KEY, val text, _sluice_version text)").await.unwrap();
    let guard = VersionGuard::Position { column: "_sluice_version".into() };
    let kv = TableId::new("public", "kv");
    let target = Target::introspect(&dst.client, &kv, &["id".into()], &["val".into()], &guard, false).await.unwrap();
    let mut rng = StdRng::seed_from_u64(seed());
    for round in 0..16 {
        dst.client.batch_execute("TRUNCATE kv, sluice_tombstones").await.unwrap();
        // 40 changes over 5 keys, in position order; half the rounds have truncates too.
        let truncates = round % 2 == 1;
        let changes: Vec<(Position, Change)> = (0..40u64)
            .map(|i| {
                let change = if truncates && rng.random_bool(0.05) {
                    Change::Truncate
                } else {
                    Change::Key(rng.random_range(1..=5), rng.random_bool(0.6).then(|| format!("v{i}")))
                };
                (Position::change(100 + i, 0), change)
            })
            .collect();
        let mut order = changes.clone();
        order.extend((0..10).map(|_| changes[rng.random_range(0..changes.len())].clone()));
        order.shuffle(&mut rng);
        for (position, change) in &order {
            let mut tx = dst.client.transaction().await.unwrap();
            let version = position.to_string();
            let refused = match change {
                Change::Truncate => {
                    target.truncate(&tx, &version).await.unwrap();
                    Vec::new()
                }
                Change::Key(id, val) => {
                    let row = Row {
                        key: vec![Some(id.to_string())],
                        fields: val.iter().map(|v| Some(v.clone())).collect(),
                        version: Some(version),
                    };
                    match val {
                        Some(_) => target.upsert(&mut tx, &[row], Fields::All).await.unwrap(),
                        None => target.delete(&mut tx, &[row]).await.unwrap(),
                    }
                }
            };
            assert!(refused.is_empty(), "{refused:?}");
            tx.commit().await.unwrap();
        }
        // The newest change of each key decides; a truncate is a delete of every key.
        let mut newest = std::collections::BTreeMap::new();
        for (position, change) in &changes {
            match change {
                Change::Key(id, val) => {
                    newest.insert(*id, (position.to_string(), val.clone()));
                }
                Change::Truncate => newest.values_mut().for_each(|v| *v = (position.to_string(), None)),
            }
        }
        let want: Vec<Vec<Option<String>>> = newest
            .iter()
            .filter_map(|(id, (p, v))| v.as_ref().map(|v| vec![Some(id.to_string()), Some(v.clone()), Some(p.clone())]))
            .collect();
        let got = dst.rows("SELECT id, val, _sluice_version FROM kv ORDER BY id").await;
        assert_eq!(got, want, "round {round}, applied in the order {order:?}");
        if truncates {
            // The whole table's tombstone is at the newest truncate; a key's tombstone is kept
            // only while the key is deleted.
            let newest_truncate = changes.iter().filter(|(_, c)| matches!(c, Change::Truncate)).map(|(p, _)| p).max();
            let table = dst.rows("SELECT version FROM sluice_tombstones WHERE key = '{}'").await;
            assert_eq!(table, newest_truncate.map(|p| vec![Some(p.to_string())]).into_iter().collect::<Vec<_>>());
            let alive = dst.rows("SELECT x.key::text FROM sluice_tombstones x JOIN kv ON x.key[1]::int = kv.id").await;
            assert_eq!(alive, Vec::<Vec<Option<String>>>::new(), "round {round}");
        } else {
            // Tombstones are kept for exactly the keys that are deleted now, at their delete.
            let deleted: Vec<Vec<Option<String>>> = newest
                .iter()
                .filter(|(_, (_, v))| v.is_none())
                .map(|(id, (p, _))| vec![Some(format!("{{{id}}}")), Some(p.clone())])
                .collect();
            let keys = dst.rows("SELECT key::text, version FROM sluice_tombstones ORDER BY key[1]::int").await;
            assert_eq!(keys, deleted, "round {round}");
        }
    }
}

/// Two members writing one key at once: one deletes it while the other, still finishing
/// partitions it lost, upserts an older change. The upsert must not bring the key back. The
/// delete is held up behind a row lock until the upsert is also waiting, so both are in flight
/// together (the order in which a member handing over partitions can produce them). Twice: in a
/// batch of one key (locked by key), and in one of 1,001 (over the limit: the table is locked).
#[tokio::test]
async fn an_older_upsert_racing_a_delete_of_its_key_does_not_bring_it_back() {
    use sluice::config::VersionGuard;
    use sluice::connectors::pgsink::target::{Fields, Row, Target};
    use sluice::event::{Position, TableId};

    let dst = TestDb::new("tombstone_race").await;
    dst.client.batch_execute("CREATE TABLE kv (id int PRIMARY KEY, val text, _sluice_version text)").await.unwrap();
    let guard = VersionGuard::Position { column: "_sluice_version".into() };
    let kv = TableId::new("public", "kv");
    let target = std::sync::Arc::new(
        Target::introspect(&dst.client, &kv, &["id".into()], &["val".into()], &guard, false).await.unwrap(),
    );
    let row = |val: Option<&str>, lsn: u64| Row {
        key: vec![Some("1".into())],
        fields: val.iter().map(|v| Some(v.to_string())).collect(),
        version: Some(Position::change(lsn, 0).to_string()),
    };
    let waiting = || async {
        let row = dst
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    for batch_keys in [1, 1_001] {
        dst.client.batch_execute("TRUNCATE kv, sluice_tombstones").await.unwrap();
        // Key 1 and the batch's other keys, which are not written.
        let keys: Vec<Vec<Option<String>>> = (1..=batch_keys).map(|id| vec![Some(id.to_string())]).collect();
        let mut setup = support::connect(&dst.name).await;
        let mut tx = target.begin(&mut setup, &keys).await.unwrap();
        target.upsert(&mut tx, &[row(Some("first"), 100)], Fields::All).await.unwrap();
        tx.commit().await.unwrap();

        // Someone else holds the row: whatever reaches it next waits.
        let mut holder = support::connect(&dst.name).await;
        let held = holder.transaction().await.unwrap();
        held.batch_execute("SELECT * FROM kv WHERE id = 1 FOR UPDATE").await.unwrap();
        let write = |val: Option<&'static str>, lsn: u64| {
            let (target, keys, name) = (target.clone(), keys.clone(), dst.name.clone());
            tokio::spawn(async move {
                let mut client = support::connect(&name).await;
                let mut tx = target.begin(&mut client, &keys).await.unwrap();
                let refused = match val {
                    Some(_) => target.upsert(&mut tx, &[row(val, lsn)], Fields::All).await.unwrap(),
                    None => target.delete(&mut tx, &[row(None, lsn)]).await.unwrap(),
                };
                assert!(refused.is_empty(), "{refused:?}");
                tx.commit().await.unwrap();
            })
        };
        let delete = write(None, 300);
        support::eventually("the delete to wait for the row", Duration::from_secs(30), || async {
            (waiting().await == 1).then_some(())
        })
        .await;
        let upsert = write(Some("second"), 200);
        support::eventually("the upsert to wait too", Duration::from_secs(30), || async {
            (waiting().await == 2).then_some(())
        })
        .await;
        held.commit().await.unwrap();
        delete.await.unwrap();
        upsert.await.unwrap();
        assert_eq!(dst.rows("SELECT id, val FROM kv").await, Vec::<Vec<Option<String>>>::new(), "{batch_keys} keys");
        assert_eq!(
            dst.rows("SELECT key::text, version FROM sluice_tombstones").await,
            vec![vec![Some("{1}".to_string()), Some(Position::change(300, 0).to_string())]],
            "{batch_keys} keys"
        );
    }
}

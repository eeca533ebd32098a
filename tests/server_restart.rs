//! PostgreSQL restarts under a running pipeline: sluice reconnects with backoff and resumes
//! from its durable position, losing and duplicating nothing. Its own test binary, because it
//! restarts the shared server (cargo runs test binaries one at a time).

mod support;

use std::time::Duration;
use support::lake::{changelog, duplicate_positions, replay};
use support::{eventually, run_until_idle, table_state, Running, TestDb};

fn restart_postgres() {
    let status =
        std::process::Command::new("pg_ctlcluster").args(["15", "main", "restart"]).status().expect("pg_ctlcluster");
    assert!(status.success(), "restarting PostgreSQL failed");
}

#[tokio::test]
async fn a_server_restart_mid_stream_resumes_without_loss() {
    let db = TestDb::new("restart").await;
    db.client.batch_execute("CREATE TABLE r (id int PRIMARY KEY, v int NOT NULL)").await.unwrap();
    let file = db.pipeline_file(&["public.r"], "", "");
    let mut running = Running::start(&file);
    db.await_streaming(&running).await;
    db.client.batch_execute("INSERT INTO r SELECT g, 0 FROM generate_series(1, 1000) g").await.unwrap();
    restart_postgres();
    let client = eventually("PostgreSQL back", Duration::from_secs(60), || async {
        let (c, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 user=cdc password=cdc dbname={}", db.name),
            tokio_postgres::NoTls,
        )
        .await
        .ok()?;
        tokio::spawn(conn);
        Some(c)
    })
    .await;
    client.batch_execute("UPDATE r SET v = v + 1 WHERE id % 2 = 0; DELETE FROM r WHERE id > 990;").await.unwrap();
    // sluice is still running: it reconnected instead of exiting.
    let slot = db.slot();
    let target: i64 = client.query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[]).await.unwrap().get(0);
    eventually("the changes after the restart to be acknowledged", Duration::from_secs(90), || async {
        support::slot_confirmed(&client, &slot).await.filter(|&c| c >= target as u64)
    })
    .await;
    assert!(running.child.try_wait().unwrap().is_none(), "sluice exited instead of reconnecting");
    let log = running.log_text();
    assert!(log.contains("source interrupted; reconnecting"), "{log}");
    assert!(log.matches("streaming changes").count() >= 2, "{log}");
    running.stop();
    run_until_idle(&file);
    let rows = changelog(&db.lake_dir(), "public.r");
    assert!(duplicate_positions(&rows).is_empty());
    assert_eq!(replay(&rows, "id"), table_state(&client, "SELECT id, v FROM r").await);
    assert_eq!(rows.iter().filter(|r| r.op == "insert").count(), 1000);
}

//! Servers stop under a running pipeline: sluice retries with backoff and resumes from its
//! durable positions, losing and duplicating nothing. Its own test binary, because it stops
//! shared servers (cargo runs test binaries one at a time, and the tests here take turns).

mod support;

use std::time::Duration;
use support::lake::{changelog, duplicate_positions, replay};
use support::{eventually, run_until_idle, table_state, Running, TestDb};

/// The tests here stop shared servers, so they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn restart_postgres() {
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["15", "main", "restart", "-m", "fast"])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "restarting PostgreSQL failed");
}

#[tokio::test]
async fn a_server_restart_mid_stream_resumes_without_loss() {
    let _serial = SERIAL.lock().await;
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

/// Brings the S3 server back (through the project's services script) even if the test fails.
struct RestartS3OnDrop;

impl Drop for RestartS3OnDrop {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
        let status = std::process::Command::new("bash").arg(script).stdout(std::process::Stdio::null()).status();
        assert!(status.is_ok_and(|s| s.success()), "restarting the test services failed");
    }
}

fn s3_listening() -> bool {
    std::net::TcpStream::connect(("127.0.0.1", 9000)).is_ok()
}

#[tokio::test]
async fn uploads_are_retried_while_the_object_store_is_down() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::new("s3_down").await;
    db.client.batch_execute("CREATE TABLE o (id int PRIMARY KEY, v text)").await.unwrap();
    let bucket = format!("retry-{}", std::process::id());
    let file = db.pipeline_file(&["public.o"], "", "");
    let yaml = std::fs::read_to_string(&file).unwrap().replace(
        &format!("url: file://{}/", db.lake_dir().display()),
        &format!(
            "url: s3://{bucket}/cdc/\n    s3: {{ endpoint: \"http://127.0.0.1:9000\", path_style: true, access_key_id: test, secret_access_key: testtest }}"
        ),
    );
    std::fs::write(&file, yaml).unwrap();
    let mut running = Running::start(&file);
    db.await_streaming(&running).await;

    // Stop the S3 server the services script started (by its PID file), then change rows.
    let services = std::env::var("SLUICE_SERVICES").unwrap_or_else(|_| "/var/tmp/sluice-services".into());
    let pid: i32 = std::fs::read_to_string(format!("{services}/pids/s3.pid")).unwrap().trim().parse().unwrap();
    let _restart = RestartS3OnDrop;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually("the S3 server to stop", Duration::from_secs(30), || async { (!s3_listening()).then_some(()) }).await;
    db.client.batch_execute("INSERT INTO o SELECT g, 'while down' FROM generate_series(1, 500) g").await.unwrap();
    eventually("an upload to fail and be retried", Duration::from_secs(60), || async {
        running.log_text().contains("sink write failed; retrying").then_some(())
    })
    .await;
    assert!(running.child.try_wait().is_ok_and(|s| s.is_none()), "sluice must keep running while S3 is down");

    drop(_restart);
    assert!(s3_listening());
    db.client.batch_execute("UPDATE o SET v = 'after' WHERE id <= 10").await.unwrap();
    running.stop();
    // Whatever the stopped process had not received is still in the slot.
    run_until_idle(&file);

    // Everything landed once: read the objects back.
    let s3 = support::s3_client();
    let listed = s3.list_objects_v2().bucket(&bucket).prefix("cdc/").send().await.unwrap();
    for obj in listed.contents() {
        let key = obj.key().unwrap();
        let body =
            s3.get_object().bucket(&bucket).key(key).send().await.unwrap().body.collect().await.unwrap().into_bytes();
        let local = db.lake_dir().join(key.trim_start_matches("cdc/"));
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        std::fs::write(local, body).unwrap();
    }
    let rows = changelog(&db.lake_dir(), "public.o");
    assert!(duplicate_positions(&rows).is_empty());
    assert_eq!(replay(&rows, "id"), table_state(&db.client, "SELECT id, v FROM o").await);
    assert_eq!(rows.iter().filter(|r| r.op == "insert").count(), 500);
    support::drop_bucket(&s3, &bucket).await;
}

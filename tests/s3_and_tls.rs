//! The Parquet sink on a real S3 server (multipart upload included) and TLS to PostgreSQL.

mod support;

use support::lake::{batches, changelog};
use support::{drop_bucket, run_until_idle, s3_client, TestDb};

fn s3_endpoint() -> String {
    std::env::var("SLUICE_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9000".into())
}

fn ca_file() -> String {
    format!("{}/tls/ca.crt", std::env::var("SLUICE_SERVICES").unwrap_or_else(|_| "/var/tmp/sluice-services".into()))
}

#[tokio::test]
async fn parquet_on_s3_with_multipart_upload() {
    let db = TestDb::new("s3").await;
    // About 12 MB of Parquet: above the 5 MiB multipart threshold set below.
    db.client
        .batch_execute(
            "CREATE TABLE events (id int PRIMARY KEY, body text);
             INSERT INTO events SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) || md5((g * 31)::text) FROM generate_series(1, 120000) g;",
        )
        .await
        .unwrap();
    let bucket = format!("lake-{}", std::process::id());
    let yaml = format!(
        "name: {name}\nsource:\n  type: postgres\n  url: {url}\n  tables: [public.events]\n  heartbeat: 200ms\n\
         transport:\n  type: embedded\n  path: {data}\nsinks:\n  - name: lake\n    type: parquet\n    url: s3://{bucket}/raw/\n\
         \x20   s3:\n      endpoint: {endpoint}\n      path_style: true\n      access_key_id: ${{env:SLUICE_TEST_S3_KEY}}\n      secret_access_key: ${{env:SLUICE_TEST_S3_SECRET}}\n      multipart_threshold: 5MiB\n\
         \x20   roll: {{ max_rows: 1000000, max_bytes: 1GiB, max_age: 1h }}\n",
        name = db.pipeline(),
        url = db.url(),
        data = db.data_dir().display(),
        endpoint = s3_endpoint(),
    );
    let file = db.dir.path().join("s3.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = std::process::Command::new(support::sluice_bin())
        .args(["run", file.to_str().unwrap(), "--until-idle", "1s"])
        .env("SLUICE_TEST_S3_KEY", "test")
        .env("SLUICE_TEST_S3_SECRET", "testtest")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let s3 = s3_client();
    let listed = s3.list_objects_v2().bucket(&bucket).prefix("raw/").send().await.unwrap();
    let keys: Vec<(String, i64)> =
        listed.contents().iter().map(|o| (o.key().unwrap().to_string(), o.size().unwrap())).collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (key, size) = &keys[0];
    assert!(key.starts_with("raw/public.events/date="), "{key}");
    assert!(*size > 5 * 1024 * 1024, "{size} bytes is below the multipart threshold");
    let head = s3.head_object().bucket(&bucket).key(key).send().await.unwrap();
    assert!(head.e_tag().unwrap().contains('-'), "a multipart object's ETag ends in -<parts>: {:?}", head.e_tag());

    // Download and read back: every row, exact values.
    let body =
        s3.get_object().bucket(&bucket).key(key).send().await.unwrap().body.collect().await.unwrap().into_bytes();
    let local = db.lake_dir().join("public.events").join("x");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("f.parquet"), &body).unwrap();
    let rows = changelog(&db.lake_dir(), "public.events");
    assert_eq!(rows.len(), 120_000);
    assert_eq!(rows[41].columns["id"].as_deref(), Some("42"));
    let expected: String = db.client.query_one("SELECT body FROM events WHERE id = 42", &[]).await.unwrap().get(0);
    assert_eq!(rows[41].columns["body"].as_deref(), Some(expected.as_str()));
    assert!(batches(&local.join("f.parquet")).len() > 1, "row groups bound the writer's memory");
    drop_bucket(&s3, &bucket).await;
}

#[tokio::test]
async fn tls_verify_full_against_the_local_ca() {
    let db = TestDb::new("tls").await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'secure');")
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.t"], "", "");
    let secure = db.url().replace("sslmode=disable", &format!("sslmode=verify-full&sslrootcert={}", ca_file()));
    let text = std::fs::read_to_string(&file).unwrap().replace(&db.url(), &secure);
    std::fs::write(&file, text).unwrap();
    let running = support::Running::start(&file);
    db.await_streaming(&running).await;
    db.client.batch_execute("INSERT INTO t VALUES (2, 'streamed over tls')").await.unwrap();
    // Both the replication session (found through its slot) and the catalog connection are
    // encrypted.
    let rows = db
        .client
        .query(
            "SELECT a.backend_type, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = $1 AND (a.application_name LIKE 'sluice%' \
               OR a.pid = (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $2))",
            &[&db.name, &db.slot()],
        )
        .await
        .unwrap();
    let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(sessions.iter().any(|(t, _)| t == "walsender"), "{sessions:?}");
    assert!(sessions.iter().any(|(t, _)| t == "client backend"), "{sessions:?}");
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    running.stop();
    run_until_idle(&file);
    let rows = changelog(&db.lake_dir(), "public.t");
    let vals: Vec<_> = rows.iter().map(|r| (r.op.as_str(), r.columns["v"].clone().unwrap())).collect();
    assert_eq!(vals, vec![("read", "secure".to_string()), ("insert", "streamed over tls".to_string())]);
}

#[tokio::test]
async fn tls_verify_full_refuses_an_untrusted_server() {
    let db = TestDb::new("tls_bad").await;
    db.client.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await.unwrap();
    let file = db.pipeline_file(&["public.t"], "", "");
    // The system's web roots do not trust the test server's private CA.
    let text = std::fs::read_to_string(&file).unwrap().replace("sslmode=disable", "sslmode=verify-full");
    std::fs::write(&file, text).unwrap();
    let out = support::sluice(&["run", file.to_str().unwrap()], file.parent().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot connect to"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

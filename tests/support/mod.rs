//! Shared helpers for the integration tests: real PostgreSQL, a fresh database per test, the
//! real `sluice` binary, and a changelog reader that replays Parquet files in position order.
#![allow(dead_code)]

pub mod kafka;
pub mod lake;
pub mod mongo;
pub mod mongo_proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

/// The mapping the sink tests share: `customers` rows keyed by id, test rows filtered out,
/// email lower-cased, as YAML lines of a sink block.
pub const CUSTOMERS_MAPPING: &str = "    key: { source: \"{{ after.id }}\", target: sluice_id }\n\
    \x20   when: \"{{ after.status != 'test' }}\"\n\
    \x20   fields:\n\
    \x20     email: \"{{ after.email | lower }}\"\n\
    \x20     firstname: \"{{ after.first_name }}\"\n\
    \x20     lifetime_value: \"{{ after.ltv }}\"\n";

/// The server the services script starts; override with SLUICE_TEST_PG_HOST/PORT.
pub fn pg_host() -> String {
    std::env::var("SLUICE_TEST_PG_HOST").unwrap_or_else(|_| "127.0.0.1".into())
}

pub fn pg_port() -> u16 {
    std::env::var("SLUICE_TEST_PG_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(5432)
}

pub const PG_USER: &str = "cdc";
pub const PG_PASSWORD: &str = "cdc";

pub async fn connect(db: &str) -> Client {
    let conn = format!("host={} port={} user={PG_USER} password={PG_PASSWORD} dbname={db}", pg_host(), pg_port());
    let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.unwrap_or_else(|e| {
        panic!("cannot reach PostgreSQL at {}:{} ({e}); run scripts/services.sh first", pg_host(), pg_port())
    });
    tokio::spawn(connection);
    client
}

/// A database of its own for one test, dropped (with the test's slots) when the test ends.
pub struct TestDb {
    pub name: String,
    pub client: Client,
    pub dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(test: &str) -> Self {
        let name = format!("t_{test}_{}", std::process::id());
        let admin = connect("cdc").await;
        drop_db(&admin, &name).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let client = connect(&name).await;
        Self { name, client, dir: tempfile::tempdir().unwrap() }
    }

    /// The pipeline name (and so slot name) this test uses.
    pub fn pipeline(&self) -> String {
        self.name.clone()
    }

    /// The replication slot sluice creates for this test's pipeline.
    pub fn slot(&self) -> String {
        format!("sluice_{}", self.name)
    }

    /// Waits until `running` has finished its snapshot and streams, so later writes are
    /// captured as changes rather than read by the snapshot. Only a status written by that very
    /// process counts: an earlier run's status file says nothing about this one.
    pub async fn await_streaming(&self, running: &Running) {
        let status = self.data_dir().join("status.json");
        let pid = running.child.id() as u64;
        eventually("the pipeline to stream", Duration::from_secs(60), || async {
            let raw = std::fs::read(&status).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
            v["pid"].as_u64().filter(|p| *p == pid)?;
            v["snapshot_done"].as_bool().filter(|d| *d)?;
            slot_confirmed(&self.client, &self.slot()).await
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("postgres://{PG_USER}:{PG_PASSWORD}@{}:{}/{}?sslmode=disable", pg_host(), pg_port(), self.name)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn lake_dir(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// Writes a pipeline file capturing `tables` into a file:// lake; `extra_source` and
    /// `extra_sink` are YAML lines added to the source and sink blocks (a `roll:` line in
    /// `extra_sink` replaces the default one).
    pub fn pipeline_file(&self, tables: &[&str], extra_source: &str, extra_sink: &str) -> PathBuf {
        let roll = if extra_sink.contains("roll:") { "" } else { "    roll: { max_rows: 2000, max_age: 1s }\n" };
        let yaml = format!(
            "name: {name}\nsource:\n  type: postgres\n  url: {url}\n  tables: [{tables}]\n  heartbeat: 200ms\n  snapshot_chunk_rows: 500\n{extra_source}\
             transport:\n  type: embedded\n  path: {data}\nsinks:\n  - name: lake\n    type: parquet\n    url: file://{lake}/\n{roll}{extra_sink}",
            name = self.pipeline(),
            url = self.url(),
            tables = tables.join(", "),
            data = self.data_dir().display(),
            lake = self.lake_dir().display(),
        );
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }
}

impl TestDb {
    /// Writes a pipeline file capturing `tables` into the given `sinks:` list (YAML items).
    pub fn pipeline_with_sinks(&self, tables: &[&str], sinks: &str) -> PathBuf {
        let yaml = format!(
            "name: {name}\nsource:\n  type: postgres\n  url: {url}\n  tables: [{tables}]\n  heartbeat: 200ms\n  snapshot_chunk_rows: 500\n\
             transport:\n  type: embedded\n  path: {data}\nsinks:\n{sinks}",
            name = self.pipeline(),
            url = self.url(),
            tables = tables.join(", "),
            data = self.data_dir().display(),
        );
        let path = self.dir.path().join("pipeline.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Rows of `sql` as text, in the query's order.
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let mut out = Vec::new();
        for m in self.client.simple_query(sql).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                out.push((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect());
            }
        }
        out
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Best effort, on a fresh runtime: the test's runtime may be gone.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let admin = connect("cdc").await;
                drop_db(&admin, &name).await;
            })
        })
        .join();
    }
}

async fn drop_db(admin: &Client, name: &str) {
    let _ = admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
            &[&name],
        )
        .await;
    let _ = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await;
    let _ = admin
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&name])
        .await;
    let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    // Origins of the test's PostgreSQL sinks: cluster-wide, each holding a replication state
    // slot (max_replication_slots) once used.
    let _ = admin
        .execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname LIKE 'sluice:' || $1 || ':%'",
            &[&name],
        )
        .await;
}

pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// Runs `sluice ARGS` to completion.
pub fn sluice(args: &[&str], cwd: &Path) -> Output {
    Command::new(sluice_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info,sluice=debug")
        .output()
        .expect("sluice runs")
}

/// `sluice run FILE --until-idle 1s`, asserting success; returns stderr.
pub fn run_until_idle(file: &Path) -> String {
    let out = sluice(&["run", file.to_str().unwrap(), "--until-idle", "1s"], file.parent().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "sluice run failed ({}):\n{stderr}", out.status);
    stderr
}

/// A `sluice run` in the background, logging to its own file.
pub struct Running {
    pub child: Child,
    pub log: PathBuf,
}

impl Running {
    pub fn start(file: &Path) -> Self {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log_path = file.with_extension(format!("run{n}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(sluice_bin())
            .args(["run", file.to_str().unwrap()])
            .current_dir(file.parent().unwrap())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Running { child, log: log_path }
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to drain or checkpoint.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and assert a clean exit (showing the process's log if not).
    pub fn stop(self) {
        let log = self.log.clone();
        let status = self.terminate();
        assert!(status.success(), "sluice exited with {status}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
    }

    /// SIGTERM, then wait for the exit. Waits first for the "starting" line, before which the
    /// process has not yet installed its handler and the signal would simply kill it.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log_text().contains("starting") && self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "sluice did not start within 30 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds top-level YAML (a `backfills:` or `metrics:` section) to the end of a pipeline file.
pub fn append_yaml(file: &Path, yaml: &str) {
    let text = std::fs::read_to_string(file).unwrap() + yaml;
    std::fs::write(file, text).unwrap();
}

/// Has the pipeline serve `/metrics` on a free loopback port, and returns the port.
pub fn serve_metrics(file: &Path) -> u16 {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    append_yaml(file, &format!("metrics:\n  listen: 127.0.0.1:{port}\n"));
    port
}

/// Polls `check` until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The random seed of a randomized test: SLUICE_TEST_SEED to replay one, printed either way.
pub fn seed() -> u64 {
    let s = std::env::var("SLUICE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("SLUICE_TEST_SEED={s}");
    s
}

/// A table as text (column name to value), keyed by its `id` column, for comparison with a
/// replayed changelog.
pub async fn table_state(
    client: &Client,
    sql: &str,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, Option<String>>> {
    let mut out = std::collections::BTreeMap::new();
    for m in client.simple_query(sql).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
            let cols: std::collections::BTreeMap<String, Option<String>> = row
                .columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_string(), row.get(i).map(str::to_string)))
                .collect();
            out.insert(cols["id"].clone().unwrap(), cols);
        }
    }
    out
}

/// A client for the test S3 server (s3s-fs from the services script).
pub fn s3_client() -> aws_sdk_s3::Client {
    let endpoint = std::env::var("SLUICE_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9000".into());
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "testtest", None, None, "tests"))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .build(),
    )
}

/// Deletes a test's bucket and everything in it, like a test's database is dropped.
pub async fn drop_bucket(s3: &aws_sdk_s3::Client, bucket: &str) {
    if let Ok(listed) = s3.list_objects_v2().bucket(bucket).send().await {
        for obj in listed.contents() {
            let _ = s3.delete_object().bucket(bucket).key(obj.key().unwrap_or_default()).send().await;
        }
    }
    let _ = s3.delete_bucket().bucket(bucket).send().await;
}

/// The slot's confirmed flush LSN as a number.
pub async fn slot_confirmed(client: &Client, slot: &str) -> Option<u64> {
    let row = client
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()?;
    row.get::<_, Option<i64>>(0).map(|v| v as u64)
}

//! The Kafka transport against the Kafka-protocol broker the services script starts (and, for
//! the broker restart, one this test starts and stops itself): Debezium envelopes read back
//! with kcat and with an rdkafka consumer, scale-out and failover across processes, a broker
//! restart, and a broker that is not there.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::kafka::TopicCleanup;
use support::{eventually, run_until_idle, seed, sluice, Running, TestDb};

const BROKER: &str = "127.0.0.1:9092";

/// A pipeline of `src`'s `tables` through Kafka at `brokers` into the `sinks` list (empty: it
/// only publishes), keeping its local state in `data`.
fn kafka_pipeline(src: &TestDb, tables: &[&str], brokers: &str, partitions: u32, data: &Path, sinks: &str) -> PathBuf {
    let yaml = format!(
        "name: {name}\nsource:\n  type: postgres\n  url: {url}\n  tables: [{tables}]\n  heartbeat: 200ms\n\
         transport:\n  type: kafka\n  brokers: {brokers}\n  topic_prefix: {name}\n  partitions: {partitions}\n  \
         path: {data}\n  producer: {{ compression: zstd, linger_ms: 5 }}\nsinks:{sinks}",
        name = src.pipeline(),
        url = src.url(),
        tables = tables.join(", "),
        sinks = if sinks.is_empty() { " []\n".to_string() } else { format!("\n{sinks}") },
        data = data.display(),
    );
    let path = data.with_extension("yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Every record of `topic` as kcat prints it: (partition, key, value), `None` for a tombstone.
fn kcat_records(topic: &str, brokers: &str) -> Vec<(i32, String, Option<serde_json::Value>)> {
    let out = Command::new("kcat")
        .args(["-b", brokers, "-C", "-t", topic, "-e", "-o", "beginning", "-q", "-Z", "-f", "%p\t%k\t%s\n"])
        .output()
        .expect("kcat runs (the services script installs it)");
    assert!(out.status.success(), "kcat: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, '\t');
            let partition = parts.next().unwrap().parse().unwrap();
            let key = parts.next().unwrap().to_string();
            let value = parts.next().unwrap();
            (partition, key, (value != "NULL").then(|| serde_json::from_str(value).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn every_op_lands_as_a_debezium_envelope() {
    let src = TestDb::new("kt_envelope").await;
    let _topics = TopicCleanup::new(BROKER, &src.pipeline());
    src.client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text, amount numeric(10,2), at timestamptz, \
             tags text[], doc jsonb, day date);
             ALTER TABLE items REPLICA IDENTITY FULL;
             INSERT INTO items VALUES (1, 'one', 1.50, '2026-01-02 03:04:05.25+00', '{a,b}', '{\"x\": 1}', '2026-01-02'),
                                      (2, 'two', NULL, NULL, NULL, NULL, NULL);",
        )
        .await
        .unwrap();
    let data = src.dir.path().join("data");
    let sink = format!("  - name: lake\n    type: parquet\n    url: file://{}/\n", src.lake_dir().display());
    let file = kafka_pipeline(&src, &["public.items"], BROKER, 3, &data, &sink);
    run_until_idle(&file);
    src.client
        .batch_execute(
            "INSERT INTO items (id, name) VALUES (3, 'three');
             UPDATE items SET name = 'uno', amount = 2.25 WHERE id = 1;
             DELETE FROM items WHERE id = 2;
             TRUNCATE items;",
        )
        .await
        .unwrap();
    run_until_idle(&file);

    let topic = format!("{}.public.items", src.pipeline());
    let records = kcat_records(&topic, BROKER);
    let mut by_key: BTreeMap<String, Vec<(String, Option<serde_json::Value>)>> = BTreeMap::new();
    let mut truncates = Vec::new();
    for (partition, key, value) in &records {
        let Some(value) = value else {
            by_key.entry(key.clone()).or_default().push(("tombstone".into(), None));
            continue;
        };
        let op = value["op"].as_str().unwrap().to_string();
        if op == "t" {
            truncates.push(*partition);
        } else {
            by_key.entry(key.clone()).or_default().push((op, Some(value.clone())));
        }
    }
    let ops = |key: &str| by_key[key].iter().map(|(op, _)| op.as_str()).collect::<Vec<_>>();
    assert_eq!(ops(r#"{"id":1}"#), ["r", "u"]);
    assert_eq!(ops(r#"{"id":2}"#), ["r", "d", "tombstone"]);
    assert_eq!(ops(r#"{"id":3}"#), ["c"]);
    // A truncate reaches every partition, so it is ordered after every key's earlier changes.
    truncates.sort();
    assert_eq!(truncates, [0, 1, 2]);

    let read = by_key[r#"{"id":1}"#][0].1.clone().unwrap();
    assert_eq!(
        read["after"],
        serde_json::json!({"id": 1, "name": "one", "amount": "1.50", "at": "2026-01-02T03:04:05.250Z",
            "tags": ["a", "b"], "doc": "{\"x\": 1}", "day": 20455})
    );
    assert_eq!(read["before"], serde_json::Value::Null);
    let source = &read["source"];
    assert_eq!(
        (&source["connector"], &source["name"], &source["db"], &source["schema"], &source["table"]),
        (
            &serde_json::json!("postgresql"),
            &serde_json::json!(src.pipeline()),
            &serde_json::json!(src.name),
            &serde_json::json!("public"),
            &serde_json::json!("items")
        )
    );
    assert!(source["snapshot"] == "true" || source["snapshot"] == "last");
    let update = by_key[r#"{"id":1}"#][1].1.clone().unwrap();
    assert_eq!(update["before"]["name"], "one");
    assert_eq!(update["after"]["name"], "uno");
    assert_eq!(update["after"]["amount"], "2.25");
    assert_eq!(update["source"]["snapshot"], "false");
    assert!(update["source"]["lsn"].as_u64().unwrap() > 0);
    assert!(update["source"]["txId"].as_u64().unwrap() > 0);
    let delete = by_key[r#"{"id":2}"#][1].1.clone().unwrap();
    assert_eq!(delete["before"]["name"], "two");
    assert_eq!(delete["after"], serde_json::Value::Null);
    assert_eq!(by_key[r#"{"id":3}"#][0].1.as_ref().unwrap()["after"]["name"], "three");

    // An rdkafka consumer reads the same records, each change with sluice's own copy in headers.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("group.id", format!("{}-reader", src.pipeline()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic.as_str()]).unwrap();
    let mut seen = 0;
    let mut with_headers = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen < records.len() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            seen += 1;
            let headers = m.headers().map(|h| h.iter().map(|h| h.key.to_string()).collect::<Vec<_>>());
            if m.payload().is_some() {
                assert_eq!(headers.unwrap(), ["sluice.event", "sluice.schema"]);
                with_headers += 1;
            }
        }
    }
    assert_eq!(seen, records.len());
    assert_eq!(with_headers, records.len() - 1, "all but the one tombstone");

    // The lake behind Kafka holds the same history.
    let rows = support::lake::changelog(&src.lake_dir(), "public.items");
    let ops: Vec<&str> = rows.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "read").count(), 2);
    assert_eq!(ops.iter().filter(|o| **o == "truncate").count(), 3, "one per partition");
    assert_eq!(ops.len(), 2 + 3 + 3);

    // Each of the two runs sent Debezium's heartbeat at its start.
    let beats = kcat_records(&format!("__debezium-heartbeat.{}", src.pipeline()), BROKER);
    assert!(beats.len() >= 2, "{beats:?}");
    for (_, key, value) in beats {
        assert_eq!(key, format!("{{\"serverName\":\"{}\"}}", src.pipeline()));
        assert!(value.unwrap()["ts_ms"].as_i64().unwrap() > 1_700_000_000_000);
    }
}

const ACCOUNTS: &str = "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text)";
/// The mirror's table: the source's columns and the PostgreSQL sink's version guard.
const MIRROR: &str =
    "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text, _sluice_version text)";
const ACCOUNTS_STATE: &str = "SELECT id, balance, note FROM accounts ORDER BY id";

/// Random inserts, updates and deletes over 300 keys.
async fn write_round(db: &TestDb, rng: &mut StdRng, writes: usize) {
    for _ in 0..writes {
        let id = rng.random_range(0..300);
        let b = rng.random_range(0..1_000_000);
        let sql = if rng.random_bool(0.2) {
            format!("DELETE FROM accounts WHERE id = {id}")
        } else {
            format!(
                "INSERT INTO accounts VALUES ({id}, {b}, 'n{b}') ON CONFLICT (id) DO UPDATE SET balance = {b}, note = 'n{b}'"
            )
        };
        db.client.batch_execute(&sql).await.unwrap();
    }
}

async fn await_parity(src: &TestDb, dst: &TestDb, limit: Duration) {
    let want = src.rows(ACCOUNTS_STATE).await;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let got = dst.rows(ACCOUNTS_STATE).await;
        if got == want {
            return;
        }
        if std::time::Instant::now() >= deadline {
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).collect();
            panic!("the mirror does not match the source after {limit:?}:\nmissing {missing:?}\nextra {extra:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_processes_share_the_partitions_and_a_killed_one_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(seed());
    let src = TestDb::new("kt_scale").await;
    let _topics = TopicCleanup::new(BROKER, &src.pipeline());
    let dst = TestDb::new("kt_scale_dst").await;
    src.client.batch_execute(ACCOUNTS).await.unwrap();
    dst.client.batch_execute(MIRROR).await.unwrap();
    write_round(&src, &mut rng, 200).await;
    let sink = format!("  - name: mirror\n    type: postgres\n    url: {}\n    table: public.accounts\n", dst.url());
    let a_file = kafka_pipeline(&src, &["public.accounts"], BROKER, 4, &src.dir.path().join("a"), &sink);
    let b_file = kafka_pipeline(&src, &["public.accounts"], BROKER, 4, &src.dir.path().join("b"), &sink);
    let a = Running::start(&a_file);
    await_parity(&src, &dst, Duration::from_secs(90)).await;
    let b = Running::start(&b_file);
    // B joins the group: the partitions are split between the two processes.
    eventually("both processes to hold partitions", Duration::from_secs(120), || async {
        let assigned = |log: String| log.lines().any(|l| l.contains("partitions assigned") && l.contains("accounts["));
        (assigned(b.log_text()) && a.log_text().contains("partitions handed over")).then_some(())
    })
    .await;
    for _ in 0..3 {
        write_round(&src, &mut rng, 100).await;
        await_parity(&src, &dst, Duration::from_secs(60)).await;
    }
    // A holds the slot and half the partitions; kill it mid-stream and keep writing.
    write_round(&src, &mut rng, 150).await;
    a.kill9();
    write_round(&src, &mut rng, 150).await;
    eventually("B to take over capture", Duration::from_secs(60), || async {
        b.log_text().contains("streaming changes").then_some(())
    })
    .await;
    // A comes back as the same group member and finishes its partitions.
    let a = Running::start(&a_file);
    await_parity(&src, &dst, Duration::from_secs(120)).await;
    write_round(&src, &mut rng, 100).await;
    await_parity(&src, &dst, Duration::from_secs(60)).await;
    b.stop();
    a.stop();
}

/// A Kafka-protocol broker of this test's own, so stopping it disturbs no other test.
struct OwnBroker {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl OwnBroker {
    fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = OwnBroker { child: None, port, dir: dir.to_path_buf() };
        broker.restart();
        broker
    }

    fn restart(&mut self) {
        let root = std::env::var("SLUICE_SERVICES").unwrap_or_else(|_| "/var/tmp/sluice-services".into());
        let noida = Command::new(format!("{root}/venv/bin/python"))
            .args(["-c", "import noida_db,os;print(os.path.join(os.path.dirname(noida_db.__file__),'noida-db'))"])
            .output()
            .unwrap();
        let noida = String::from_utf8(noida.stdout).unwrap().trim().to_string();
        let child = Command::new(noida)
            .args(["start", "--data-dir", self.dir.to_str().unwrap(), "--only", "kafka", "--kafka-port"])
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the test broker did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the broker as an operator would (SIGTERM); it keeps its data.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let mut rng = StdRng::seed_from_u64(seed());
    let src = TestDb::new("kt_restart").await;
    let dst = TestDb::new("kt_restart_dst").await;
    src.client.batch_execute(ACCOUNTS).await.unwrap();
    dst.client.batch_execute(MIRROR).await.unwrap();
    let mut broker = OwnBroker::start(&src.dir.path().join("broker"));
    write_round(&src, &mut rng, 100).await;
    let sink = format!("  - name: mirror\n    type: postgres\n    url: {}\n    table: public.accounts\n", dst.url());
    let file = kafka_pipeline(&src, &["public.accounts"], &broker.address(), 2, &src.dir.path().join("data"), &sink);
    let running = Running::start(&file);
    await_parity(&src, &dst, Duration::from_secs(90)).await;
    write_round(&src, &mut rng, 100).await;
    // The broker stops once what it acknowledged reached the mirror: the test broker, stopped
    // while a produce request is in flight, can acknowledge records it then does not keep (seen
    // as an offset out of range for the consumer and OutOfOrderSequenceNumber for the producer
    // after its restart): a loss on the broker's side, which the producer learns of only afterwards.
    await_parity(&src, &dst, Duration::from_secs(90)).await;
    broker.stop();
    write_round(&src, &mut rng, 200).await;
    // While the broker is down nothing reaches Kafka, so the slot is not acknowledged past it.
    let confirmed = support::slot_confirmed(&src.client, &src.slot()).await.unwrap();
    let current: String = src.client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    assert!(confirmed < sluice::event::parse_lsn(&current).unwrap());
    broker.restart();
    await_parity(&src, &dst, Duration::from_secs(120)).await;
    write_round(&src, &mut rng, 50).await;
    await_parity(&src, &dst, Duration::from_secs(60)).await;
    running.stop();
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_setup_error() {
    let src = TestDb::new("kt_down").await;
    src.client.batch_execute(ACCOUNTS).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sink = format!("  - name: lake\n    type: parquet\n    url: file://{}/\n", src.lake_dir().display());
    let data = src.dir.path().join("data");
    let file = kafka_pipeline(&src, &["public.accounts"], &format!("127.0.0.1:{port}"), 1, &data, &sink);
    let started = std::time::Instant::now();
    let out = sluice(&["run", file.to_str().unwrap()], src.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the Kafka brokers 127.0.0.1:{port}")), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "bounded wait, not a crash loop");
}

/// A Debezium PostgreSQL-connector record for `inventory.customers` as Kafka Connect's
/// JsonConverter writes it with schemas: (key, value); `None` rows are JSON null.
fn debezium_customer(
    op: &str,
    before: Option<(i32, &str, &str)>,
    after: Option<(i32, &str, &str)>,
    lsn: u64,
) -> (String, String) {
    let fields = r#"[{"type":"int32","optional":false,"field":"id"},{"type":"string","optional":true,"field":"name"},{"type":"string","optional":true,"field":"email"}]"#;
    let row = |r: Option<(i32, &str, &str)>| match r {
        Some((id, name, email)) => serde_json::json!({"id": id, "name": name, "email": email}),
        None => serde_json::Value::Null,
    };
    let id = after.or(before).map(|r| r.0).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&format!(
        r#"{{"type":"struct","optional":false,"name":"dbserver1.inventory.customers.Envelope","fields":[
            {{"type":"struct","optional":true,"name":"dbserver1.inventory.customers.Value","field":"before","fields":{fields}}},
            {{"type":"struct","optional":true,"name":"dbserver1.inventory.customers.Value","field":"after","fields":{fields}}},
            {{"type":"struct","optional":false,"name":"io.debezium.connector.postgresql.Source","field":"source","fields":[]}},
            {{"type":"string","optional":false,"field":"op"}},{{"type":"int64","optional":true,"field":"ts_ms"}}]}}"#
    ))
    .unwrap();
    let snapshot = if op == "r" { "true" } else { "false" };
    let value = serde_json::json!({"schema": schema, "payload": {
        "before": row(before), "after": row(after), "op": op, "ts_ms": 1_700_000_000_000u64 + lsn,
        "source": {"version": "2.5.4.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": 1_700_000_000_000u64 + lsn,
            "snapshot": snapshot, "db": "inventory", "schema": "inventory", "table": "customers", "txId": lsn, "lsn": lsn}}});
    let key = serde_json::json!({"schema": {"type": "struct", "optional": false, "name": "dbserver1.inventory.customers.Key",
        "fields": [{"type": "int32", "optional": false, "field": "id"}]}, "payload": {"id": id}});
    (key.to_string(), value.to_string())
}

/// Produces `records` in order (a `None` value is a tombstone), each delivered before the next.
async fn produce(topic: &str, records: &[(String, Option<String>)]) {
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", BROKER).create().unwrap();
    for (key, value) in records {
        let mut r = rdkafka::producer::FutureRecord::<str, str>::to(topic).key(key);
        if let Some(v) = value {
            r = r.payload(v);
        }
        producer.send(r, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
}

#[tokio::test]
async fn a_kafka_source_feeds_debezium_topics_to_a_sink() {
    let dst = TestDb::new("kt_dbz_dst").await;
    dst.client
        .batch_execute("CREATE TABLE customers (id int PRIMARY KEY, name text, email text, _sluice_version text)")
        .await
        .unwrap();
    let topic = format!("dbserver1.inventory.customers_{}", std::process::id());
    let _topics = TopicCleanup::new(BROKER, &topic);
    let admin: rdkafka::admin::AdminClient<_> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", BROKER).create().unwrap();
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(&topic, 2, rdkafka::admin::TopicReplication::Fixed(1))],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .unwrap();
    let record = |op, before, after, lsn| {
        let (k, v) = debezium_customer(op, before, after, lsn);
        (k, Some(v))
    };
    let tombstone = |id: i32| (serde_json::json!({"schema": null, "payload": {"id": id}}).to_string(), None);
    produce(
        &topic,
        &[
            record("r", None, Some((1, "Anne", "anne@x")), 100),
            record("r", None, Some((2, "Bob", "bob@x")), 100),
            record("r", None, Some((3, "Cy", "cy@x")), 100),
            record("c", None, Some((4, "Dee", "dee@x")), 200),
            record("u", Some((1, "Anne", "anne@x")), Some((1, "Anne", "anne2@x")), 300),
            record("d", Some((2, "Bob", "bob@x")), None, 400),
            tombstone(2),
            record("u", Some((3, "Cy", "cy@x")), Some((3, "Cy One", "cy@x")), 500),
            record("u", Some((3, "Cy One", "cy@x")), Some((3, "Cy Two", "cy@x")), 600),
        ],
    )
    .await;
    let yaml = format!(
        "name: {name}\nsource:\n  type: kafka\n  brokers: {BROKER}\n  topics: [{topic}]\n\
         transport:\n  type: embedded\n  path: {data}\nsinks:\n  - name: mirror\n    type: postgres\n    url: {url}\n    \
         table: public.customers\n    from: inventory.customers\n",
        name = dst.pipeline(),
        data = dst.data_dir().display(),
        url = dst.url(),
    );
    let file = dst.dir.path().join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    let state = "SELECT id::text, name, email FROM customers ORDER BY id";
    let row =
        |id: &str, name: &str, email: &str| vec![Some(id.to_string()), Some(name.to_string()), Some(email.to_string())];
    run_until_idle(&file);
    assert_eq!(
        dst.rows(state).await,
        vec![row("1", "Anne", "anne2@x"), row("3", "Cy Two", "cy@x"), row("4", "Dee", "dee@x")]
    );

    // A second run resumes from the committed offsets; a record that is not a change record
    // is set aside with its reason, and the rest goes on.
    let malformed =
        (serde_json::json!({"schema": null, "payload": {"id": 6}}).to_string(), Some("not json".to_string()));
    produce(
        &topic,
        &[
            record("u", Some((4, "Dee", "dee@x")), Some((4, "Dee", "dee2@x")), 700),
            malformed,
            record("d", Some((3, "Cy Two", "cy@x")), None, 800),
            tombstone(3),
            record("c", None, Some((5, "Eve", "eve@x")), 900),
        ],
    )
    .await;
    let stderr = run_until_idle(&file);
    let final_rows = vec![row("1", "Anne", "anne2@x"), row("4", "Dee", "dee2@x"), row("5", "Eve", "eve@x")];
    assert_eq!(dst.rows(state).await, final_rows);
    assert_eq!(stderr.matches("undecodable record set aside").count(), 1, "{stderr}");
    let set_aside = dst.data_dir().join("sinks").join("mirror").join("undecodable");
    let files: Vec<_> = std::fs::read_dir(&set_aside).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(kept["topic"], topic.as_str());
    assert_eq!(kept["value"], serde_json::json!({"text": "not json"}));
    assert_eq!(kept["key"]["text"], serde_json::json!({"schema": null, "payload": {"id": 6}}).to_string());
    assert!(kept["error"].as_str().unwrap().contains("not a Debezium change record"), "{kept}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .ends_with(&format!("{:020}.json", kept["offset"].as_i64().unwrap())));

    // Its offset was committed with the rest: a third run does not meet it again.
    let stderr = run_until_idle(&file);
    assert_eq!(dst.rows(state).await, final_rows);
    assert!(!stderr.contains("undecodable"), "{stderr}");
}

/// A MongoDB collection through the Kafka transport: the topic holds the MongoDB connector's
/// envelope (key `{"id": <_id as Extended JSON>}`, `after` as Extended JSON text, `source` with
/// db and collection), each key's changes in order, a delete followed by its tombstone; and the
/// Parquet sink behind Kafka lands the same documents the collection has.
#[tokio::test]
async fn a_mongodb_collection_lands_as_the_mongodb_connectors_envelope() {
    use mongodb::bson::{doc, DateTime, Document};
    let m = support::mongo::TestMongo::new("kt_mongo").await;
    let _topics = TopicCleanup::new(BROKER, &m.name);
    let orders = m.db.collection::<Document>("orders");
    orders
        .insert_many([
            doc! { "_id": "a", "n": 1, "at": DateTime::from_millis(1_700_000_000_123), "lines": [{ "sku": "x" }] },
            doc! { "_id": "b", "n": 2 },
            doc! { "_id": "d", "n": 4 },
        ])
        .await
        .unwrap();
    let data = m.dir.path().join("data");
    let yaml = format!(
        "name: {name}\nsource:\n  type: mongodb\n  url: \"{url}\"\n  database: {name}\n  collections: [orders]\n\
         transport:\n  type: kafka\n  brokers: {BROKER}\n  topic_prefix: {name}\n  partitions: 2\n  path: {data}\n\
         sinks:\n  - name: lake\n    type: parquet\n    url: file://{lake}/\n",
        name = m.name,
        url = support::mongo::mongo_url(),
        data = data.display(),
        lake = m.lake_dir().display(),
    );
    let file = m.dir.path().join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    run_until_idle(&file);
    // The test server returns a looked-up document's dates as text, so the updated one has none.
    orders.update_one(doc! { "_id": "d" }, doc! { "$set": { "n": 5 } }).await.unwrap();
    orders.delete_one(doc! { "_id": "b" }).await.unwrap();
    orders.insert_one(doc! { "_id": "c", "n": 3 }).await.unwrap();
    run_until_idle(&file);

    let records = kcat_records(&format!("{0}.{0}.orders", m.name), BROKER);
    let mut by_key: BTreeMap<String, Vec<Option<serde_json::Value>>> = BTreeMap::new();
    for (_, key, value) in records {
        by_key.entry(key).or_default().push(value);
    }
    let ops = |key: &str| -> Vec<String> {
        by_key[key]
            .iter()
            .map(|v| v.as_ref().map_or("tombstone".into(), |v| v["op"].as_str().unwrap().into()))
            .collect()
    };
    let keys = [r#"{"id":"\"a\""}"#, r#"{"id":"\"b\""}"#, r#"{"id":"\"c\""}"#, r#"{"id":"\"d\""}"#];
    assert_eq!(by_key.keys().collect::<Vec<_>>(), keys);
    assert_eq!(ops(r#"{"id":"\"a\""}"#), ["r"]);
    assert_eq!(ops(r#"{"id":"\"d\""}"#), ["r", "u"]);
    assert_eq!(ops(r#"{"id":"\"b\""}"#), ["r", "d", "tombstone"]);
    assert_eq!(ops(r#"{"id":"\"c\""}"#), ["c"]);
    let read = by_key[r#"{"id":"\"a\""}"#][0].as_ref().unwrap();
    let update = by_key[r#"{"id":"\"d\""}"#][1].as_ref().unwrap();
    let parsed = |v: &serde_json::Value| serde_json::from_str::<serde_json::Value>(v.as_str().unwrap()).unwrap();
    assert_eq!(
        parsed(&read["after"]),
        serde_json::json!({"_id": "a", "n": 1, "at": {"$date": "2023-11-14T22:13:20.123Z"}, "lines": [{"sku": "x"}]})
    );
    assert_eq!(parsed(&update["after"]), serde_json::json!({"_id": "d", "n": 5}));
    assert_eq!(read["before"], serde_json::Value::Null);
    // The snapshot reads a, b, then d (its last).
    for (v, snapshot) in [(read, "true"), (update, "false")] {
        let source = &v["source"];
        assert_eq!(source["connector"], "mongodb");
        assert_eq!(source["name"], m.name.as_str());
        assert_eq!(source["db"], m.name.as_str());
        assert_eq!(source["collection"], "orders");
        assert!(source["ts_ms"].as_i64().unwrap() > 0, "{source}");
        assert_eq!(source["snapshot"], snapshot);
    }
    let delete = by_key[r#"{"id":"\"b\""}"#][1].as_ref().unwrap();
    assert_eq!((&delete["after"], &delete["op"]), (&serde_json::Value::Null, &serde_json::json!("d")));

    let rows = support::lake::changelog(&m.lake_dir(), &format!("{}.orders", m.name));
    assert_eq!(support::mongo::lake_documents(&rows), m.documents("orders").await);
}

/// `transaction_metadata: true`: each transaction has a BEGIN and an END in `PREFIX.transaction`
/// (the END counting its changes per table), and each change's envelope carries its place in
/// its transaction; snapshot reads belong to none. The last transaction ends without another
/// one following it.
#[tokio::test]
async fn transactions_are_bounded_in_the_transaction_topic() {
    let src = TestDb::new("kt_txmeta").await;
    let _topics = TopicCleanup::new(BROKER, &src.pipeline());
    src.client
        .batch_execute(
            "CREATE TABLE items (id bigint PRIMARY KEY, name text);
             CREATE TABLE notes (id bigint PRIMARY KEY, body text);
             INSERT INTO items VALUES (1, 'one');",
        )
        .await
        .unwrap();
    let data = src.dir.path().join("data");
    // Publishing only: the transaction topic is what is checked.
    let file = kafka_pipeline(&src, &["public.items", "public.notes"], BROKER, 2, &data, "");
    let yaml =
        std::fs::read_to_string(&file).unwrap().replace("  producer:", "  transaction_metadata: true\n  producer:");
    std::fs::write(&file, yaml).unwrap();
    run_until_idle(&file);
    src.client
        .batch_execute(
            "BEGIN; INSERT INTO items VALUES (2, 'two'), (3, 'three'); INSERT INTO notes VALUES (1, 'n'); COMMIT;
             UPDATE items SET name = 'uno' WHERE id = 1;",
        )
        .await
        .unwrap();
    run_until_idle(&file);

    let prefix = src.pipeline();
    let markers: Vec<serde_json::Value> = kcat_records(&format!("{prefix}.transaction"), BROKER)
        .into_iter()
        .map(|(partition, key, value)| {
            let value = value.unwrap();
            assert_eq!(partition, 0);
            assert_eq!(serde_json::from_str::<serde_json::Value>(&key).unwrap()["id"], value["id"]);
            value
        })
        .collect();
    let shape: Vec<(String, serde_json::Value, serde_json::Value)> = markers
        .iter()
        .map(|m| (m["status"].as_str().unwrap().to_string(), m["event_count"].clone(), m["data_collections"].clone()))
        .collect();
    assert_eq!(
        shape,
        [
            ("BEGIN".into(), serde_json::Value::Null, serde_json::Value::Null),
            (
                "END".into(),
                serde_json::json!(3),
                serde_json::json!([{"data_collection": "public.items", "event_count": 2},
                                   {"data_collection": "public.notes", "event_count": 1}])
            ),
            ("BEGIN".into(), serde_json::Value::Null, serde_json::Value::Null),
            (
                "END".into(),
                serde_json::json!(1),
                serde_json::json!([{"data_collection": "public.items", "event_count": 1}])
            ),
        ]
    );
    let (first, second) = (markers[0]["id"].as_str().unwrap(), markers[2]["id"].as_str().unwrap());
    assert_ne!(first, second);
    assert_eq!(markers[1]["id"], markers[0]["id"]);

    let changes = |table: &str| -> BTreeMap<String, Vec<serde_json::Value>> {
        let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for (_, key, value) in kcat_records(&format!("{prefix}.public.{table}"), BROKER) {
            out.entry(key).or_default().push(value.unwrap());
        }
        out
    };
    let items = changes("items");
    let notes = changes("notes");
    let block = |v: &serde_json::Value| v["transaction"].clone();
    let place = |id: &str, total: u32, in_table: u32| serde_json::json!({"id": id, "total_order": total, "data_collection_order": in_table});
    assert_eq!(block(&items[r#"{"id":1}"#][0]), serde_json::Value::Null, "a snapshot read");
    assert_eq!(block(&items[r#"{"id":2}"#][0]), place(first, 1, 1));
    assert_eq!(block(&items[r#"{"id":3}"#][0]), place(first, 2, 2));
    assert_eq!(block(&notes[r#"{"id":1}"#][0]), place(first, 3, 1));
    assert_eq!(block(&items[r#"{"id":1}"#][1]), place(second, 1, 1));
    let tx_id = items[r#"{"id":2}"#][0]["source"]["txId"].as_i64().unwrap();
    let lsn = items[r#"{"id":2}"#][0]["source"]["lsn"].as_i64().unwrap();
    assert_eq!(first, format!("{tx_id}:{lsn}"));
}

//! PostgreSQL to Kafka benchmark against the Kafka-protocol broker the services script starts,
//! next to a `kcat` produce of the same number of same-sized messages in the same run.
//!
//! Prints changes/s from the slot into Kafka (the time until every change is readable), CPU
//! seconds per million changes and peak RSS of sluice, the kcat rate, and PostgreSQL's own
//! decoding rate of the same changes (the ceiling of any pgoutput client); the consuming side's
//! scale-out (one and two processes of a new group draining the topic into Parquet); then, on
//! topics of their own, the latency from source commit to readable in Kafka at a fixed rate,
//! split at the moment sluice produces, next to the broker's own send-to-acknowledged latency
//! at that rate and the filesystem's fsync latency meanwhile.
//!
//!   cargo bench --bench kafka               (after scripts/services.sh)
//!   SLUICE_BENCH_CHANGES=50000 SLUICE_BENCH_RATE=5000 cargo bench --bench kafka
//!
//! No thresholds: the figures are printed, not asserted.

#[allow(dead_code)]
#[path = "support/measure.rs"]
mod measure;
#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/scrape.rs"]
mod scrape;
#[path = "../tests/support/kafka.rs"]
mod topics;

use measure::{cpu_seconds, usage};
use nix::sys::resource::UsageWho;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use topics::TopicCleanup;

const DB: &str = "sluice_bench_kafka";
const BROKER: &str = "127.0.0.1:9092";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Where the measured pipeline serves `/metrics`.
const METRICS_PORT: u16 = 19470;

/// A pipeline named `name` publishing to topics prefixed `prefix`, its data under `dir`, with a
/// Parquet sink reading the topics back when `sink` (without one, it only publishes); `metrics`
/// for the one process whose metrics are read.
fn pipeline(dir: &Path, name: &str, prefix: &str, sink: bool, metrics: bool) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let yaml = format!(
        "name: {name}\nsource:\n  type: postgres\n  url: postgres://cdc:cdc@127.0.0.1:5432/{DB}?sslmode=disable\n  \
         tables: [public.events]\n  snapshot: never\n  heartbeat: 1s\ntransport:\n  type: kafka\n  brokers: {BROKER}\n  \
         topic_prefix: {prefix}\n  partitions: 4\n  path: {data}\n  producer: {{ compression: zstd, linger_ms: 5 }}\n",
        data = dir.join("data").display(),
    ) + &if sink {
        format!(
            "sinks:\n  - name: lake\n    type: parquet\n    url: file://{}/\n    roll: {{ max_age: 1s }}\n",
            dir.join("lake").display()
        )
    } else {
        "sinks: []\n".to_string()
    } + &if metrics { format!("metrics:\n  listen: 127.0.0.1:{METRICS_PORT}\n") } else { String::new() };
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

/// Messages readable in `topic` now: the sum of its partitions' high watermarks.
fn readable(consumer: &BaseConsumer, topic: &str) -> i64 {
    let Ok(meta) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else { return 0 };
    let Some(t) = meta.topics().iter().find(|t| t.name() == topic) else { return 0 };
    t.partitions()
        .iter()
        .filter_map(|p| consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5)).ok())
        .map(|(_, high)| high)
        .sum()
}

async fn insert(db: &tokio_postgres::Client, from: usize, n: usize) {
    insert_into(db, "events", from, n).await
}

async fn insert_into(db: &tokio_postgres::Client, table: &str, from: usize, n: usize) {
    db.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, g % 1000, (g % 100000) / 100.0, 'note ' || g, now() \
         FROM generate_series({from}, {}) g",
        from + n - 1
    ))
    .await
    .unwrap();
}

/// Inserts `per_batch` rows into `table` every 10 ms, `batches` times, ids from `from`; returns
/// each INSERT's round trip in microseconds (PostgreSQL's commit, WAL flush included).
async fn write_every_10ms(
    db: &tokio_postgres::Client,
    table: &str,
    from: usize,
    per_batch: usize,
    batches: usize,
) -> Vec<i64> {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut round_trips = Vec::with_capacity(batches);
    for i in 0..batches {
        tick.tick().await;
        let started = Instant::now();
        insert_into(db, table, from + i * per_batch, per_batch).await;
        round_trips.push(started.elapsed().as_micros() as i64);
    }
    round_trips
}

/// Bytes a process has caused to be written to storage, from /proc.
fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")?.parse().ok()).unwrap()
}

/// `sluice run FILE` in the background, logging warnings only.
fn start_sluice(file: &Path) -> std::process::Child {
    Command::new(measure::sluice_bin())
        .args(["run", file.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGTERM, and wait for the clean stop.
fn stop_sluice(mut child: std::process::Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().unwrap();
}

fn client(group: &str) -> BaseConsumer {
    rdkafka::ClientConfig::new().set("bootstrap.servers", BROKER).set("group.id", group).create().unwrap()
}

/// Offsets the group has committed in `topic`, summed over its partitions: a sink's group
/// commits only what the sink holds durable.
fn committed(consumer: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let Ok(done) = consumer.committed_offsets(list, Duration::from_secs(5)) else { return 0 };
    done.elements().iter().filter_map(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None }).sum()
}

/// Scale-out: `processes` members of a fresh pipeline's group drain `topic` into their Parquet
/// sinks; messages per second from their start until the group has committed every message,
/// and their CPU seconds per million messages.
async fn drain(work: &Path, prefix: &str, topic: &str, processes: usize, admin: &tokio_postgres::Client) -> (f64, f64) {
    let name = format!("{prefix}_drain{processes}");
    let probe = client(&format!("sluice.{name}.lake"));
    let total = readable(&probe, topic);
    let files: Vec<_> =
        (0..processes).map(|i| pipeline(&work.join(format!("{name}_{i}")), &name, prefix, true, false)).collect();
    let (cpu0, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let started = Instant::now();
    let children: Vec<_> = files.iter().map(|f| start_sluice(f)).collect();
    while committed(&probe, topic, 4) < total {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    children.into_iter().for_each(stop_sluice);
    let (cpu1, _) = usage(UsageWho::RUSAGE_CHILDREN);
    drop_slot(admin, &format!("sluice_{name}")).await;
    (total as f64 / took, (cpu1 - cpu0) / total as f64 * 1e6)
}

/// Writes 4 KiB and fdatasyncs it every 20 ms until `stop`; the milliseconds each sync took.
fn fsync_latencies(file: &Path, stop: &AtomicBool) -> Vec<i64> {
    let mut f = std::fs::File::create(file).unwrap();
    let mut took = Vec::new();
    while !stop.load(Ordering::Acquire) {
        f.write_all(&[b'x'; 4096]).unwrap();
        let started = Instant::now();
        f.sync_data().unwrap();
        took.push(started.elapsed().as_millis() as i64);
        std::thread::sleep(Duration::from_millis(20));
    }
    took
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let changes = env_usize("SLUICE_BENCH_CHANGES", 200_000);
    let rate = env_usize("SLUICE_BENCH_RATE", 5_000);
    let admin = postgres::connect("cdc").await;
    // An earlier run's slot would keep the database from being dropped.
    admin
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{DB}' AND NOT active"
        ))
        .await
        .unwrap();
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {DB} WITH (FORCE)")).await.unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {DB}")).await.unwrap();
    let db = postgres::connect(DB).await;
    db.batch_execute(
        "CREATE TABLE events (id bigint PRIMARY KEY, account int, amount numeric(12,2), note text, at timestamptz)",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run_name = format!("bench_kafka_{}", std::process::id());
    // Deleted at the end, so the broker's data does not grow from run to run (the test broker
    // rewrites all of it every few seconds, and a later run would wait on that).
    let _all_topics = TopicCleanup::new(BROKER, &run_name);
    let name = format!("{run_name}_tp");
    // The throughput phase's topics go before the latency phase: that broker rewriting them
    // would otherwise load the disk PostgreSQL's commits wait on, and be measured as latency.
    let throughput_topics = TopicCleanup::new(BROKER, &name);
    let file = pipeline(dir.path(), &name, &name, false, true);
    let topic = format!("{name}.public.events");
    let consumer: BaseConsumer = client(&name);

    // The slot and the topic exist before the changes are made; so do two more slots: on one
    // PostgreSQL decodes the same changes with nobody downstream, from the other its own client
    // pg_recvlogical receives them.
    measure::run_sluice(&file);
    let ceiling_slot = format!("{name}_ceiling");
    let recv_slot = format!("{name}_recv");
    // Separate statements: a slot cannot be created in a transaction that has written.
    db.batch_execute(&format!("CREATE PUBLICATION {ceiling_slot} FOR TABLE events")).await.unwrap();
    for slot in [&ceiling_slot, &recv_slot] {
        db.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")).await.unwrap();
    }
    insert(&db, 1, changes).await;
    let end: String = db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0);
    println!("PostgreSQL -> Kafka, {changes} inserts (one transaction), 4 partitions, zstd, linger 5 ms");
    let backend = db.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get::<_, i32>(0) as u32;
    let decode_cpu0 = cpu_seconds(backend);
    let decoded = Instant::now();
    db.batch_execute(&format!(
        "SELECT count(*) FROM pg_logical_slot_get_binary_changes('{ceiling_slot}', NULL, NULL, \
         'proto_version', '2', 'streaming', 'on', 'publication_names', '{ceiling_slot}')"
    ))
    .await
    .unwrap();
    let ceiling = changes as f64 / decoded.elapsed().as_secs_f64();
    let decode_cpu = cpu_seconds(backend) - decode_cpu0;
    println!(
        "  PostgreSQL's own decoding of them (pgoutput v2 as sluice asks for it, inside the server, \
         nothing sent): {ceiling:.0} changes/s"
    );
    let (recv_cpu0, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let received = Instant::now();
    let out = Command::new("pg_recvlogical")
        .args(["-h", "127.0.0.1", "-U", "cdc", "-d", DB, "--slot", &recv_slot, "--start", "-f", "/dev/null"])
        .args(["-o", "proto_version=2", "-o", "streaming=on", "-o", &format!("publication_names={ceiling_slot}")])
        .arg(format!("--endpos={end}"))
        .env("PGPASSWORD", "cdc")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let recv_rate = changes as f64 / received.elapsed().as_secs_f64();
    let (recv_cpu1, _) = usage(UsageWho::RUSAGE_CHILDREN);
    println!(
        "  PostgreSQL's own client pg_recvlogical receiving them over replication into /dev/null: \
         {recv_rate:.0} changes/s, its CPU {:.2} s per million",
        (recv_cpu1 - recv_cpu0) / changes as f64 * 1e6
    );
    for slot in [&ceiling_slot, &recv_slot] {
        drop_slot(&admin, slot).await;
    }
    db.batch_execute(&format!("DROP PUBLICATION {ceiling_slot}")).await.unwrap();
    let broker = broker_pid();
    let broker_cpu0 = broker.map(cpu_seconds);
    let (cpu0, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let started = Instant::now();
    let child = start_sluice(&file);
    let mut first_readable = None;
    let mut walsender = None;
    loop {
        if walsender.is_none() {
            walsender = active_pid(&admin, &format!("sluice_{name}")).await;
        }
        let n = readable(&consumer, &topic);
        if n > 0 && first_readable.is_none() {
            first_readable = Some((started.elapsed().as_secs_f64(), n));
        }
        if n >= changes as i64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed().as_secs_f64();
    // The walsender started with this process: its whole CPU time is this stream's.
    let walsender_cpu = walsender.map(cpu_seconds);
    let broker_cpu_sluice = broker.zip(broker_cpu0).map(|(pid, before)| cpu_seconds(pid) - before);
    let (first_at, first_n) = first_readable.expect("set before the loop ends");
    stop_sluice(child);
    let (cpu1, rss) = usage(UsageWho::RUSAGE_CHILDREN);
    let sluice_rate = changes as f64 / took;
    println!(
        "  sluice: {sluice_rate:.0} changes/s ({took:.2} s from start to every change readable), \
         CPU {:.2} s per million (the whole process, which only publishes), peak RSS {rss:.0} MiB",
        (cpu1 - cpu0) / changes as f64 * 1e6
    );
    if first_n < changes as i64 {
        println!(
            "    of which start-up until the first {first_n} changes were readable: {first_at:.2} s; from then on {:.0} changes/s",
            (changes as i64 - first_n) as f64 / (took - first_at)
        );
    }

    // kcat: the same number of messages of the same key and value sizes, same producer settings.
    let sample = Command::new("kcat")
        .args(["-b", BROKER, "-C", "-t", &topic, "-c", "1", "-e", "-q", "-f", "%k\t%s\n"])
        .output()
        .unwrap();
    let sample = String::from_utf8(sample.stdout).unwrap();
    let (key, value) = sample.trim_end().split_once('\t').unwrap();
    let input = dir.path().join("kcat.txt");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    for i in 0..changes {
        // Distinct keys of the sample's length, so partitioning spreads them as sluice's do.
        let k = format!("{{\"id\":{:0width$}}}", i, width = key.len().saturating_sub(7).max(1));
        writeln!(f, "{k}\t{value}").unwrap();
    }
    drop(f);
    let kcat_topic = format!("{name}.kcat");
    Command::new("kcat").args(["-b", BROKER, "-L", "-t", &kcat_topic]).output().unwrap();
    let broker_cpu0 = broker.map(cpu_seconds);
    let (kcat_cpu0, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let started = Instant::now();
    let out = Command::new("kcat")
        .args(["-b", BROKER, "-P", "-t", &kcat_topic, "-K", "\t", "-l", input.to_str().unwrap()])
        .args(["-X", "enable.idempotence=true", "-X", "compression.type=zstd", "-X", "linger.ms=5"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let kcat_took = started.elapsed().as_secs_f64();
    let (kcat_cpu1, _) = usage(UsageWho::RUSAGE_CHILDREN);
    let broker_cpu_kcat = broker.zip(broker_cpu0).map(|(pid, before)| cpu_seconds(pid) - before);
    let kcat_rate = changes as f64 / kcat_took;
    println!("  kcat -P: {kcat_rate:.0} messages/s ({kcat_took:.2} s, key {} B, value {} B)", key.len(), value.len());
    println!(
        "  sluice / kcat: {:.0}%; pg_recvlogical / kcat: {:.0}%; PostgreSQL's in-server decoding / kcat: {:.0}%",
        sluice_rate / kcat_rate * 100.0,
        recv_rate / kcat_rate * 100.0,
        ceiling / kcat_rate * 100.0
    );
    let per_change = |cpu: f64| cpu / changes as f64 * 1e6;
    let shown = |cpu: Option<f64>| cpu.map_or("?".to_string(), |c| format!("{:.2}", per_change(c)));
    let kcat_cpu = kcat_cpu1 - kcat_cpu0;
    println!(
        "  CPU µs per change: sluice {:.2}; PostgreSQL's walsender streaming them to sluice {}, decoding them \
         in-server {:.2}; the broker {} under sluice, {} under kcat; kcat {:.2}",
        per_change(cpu1 - cpu0),
        shown(walsender_cpu),
        per_change(decode_cpu),
        shown(broker_cpu_sluice),
        shown(broker_cpu_kcat),
        per_change(kcat_cpu)
    );
    // The walsender is one process: whatever the client, it sends no faster than one core
    // allows at its CPU cost per change.
    if let Some(ws) = walsender_cpu {
        let most = 1e6 / per_change(ws);
        println!(
            "  one walsender at that cost sends at most {most:.0} changes/s on a whole core: {:.0}% of kcat",
            most / kcat_rate * 100.0
        );
    }

    // Scale-out of the consuming side: the topic now holds every change above; one, then two
    // processes of a new pipeline (its own group) read it into Parquet.
    println!("scale-out: a new group drains the topic ({} messages) into Parquet", readable(&consumer, &topic));
    for processes in [1, 2] {
        let (rate, cpu) = drain(dir.path(), &name, &topic, processes, &admin).await;
        println!(
            "  {processes} process(es): {rate:.0} messages/s until the group committed all; CPU {cpu:.1} s per million"
        );
    }
    drop_slot(&admin, &format!("sluice_{name}")).await;
    drop(throughput_topics);

    // Latency at a fixed rate: commit time (source.ts_ms) to readable by a consumer.
    let seconds = env_usize("SLUICE_BENCH_SECONDS", 20);
    let name = format!("{run_name}_lat");
    let file = pipeline(&dir.path().join("latency"), &name, &name, false, true);
    let topic = format!("{name}.public.events");
    let kcat_topic = format!("{name}.alone");
    measure::run_sluice(&file);
    println!("latency at {rate} changes/s for {seconds} s (batches of {} every 10 ms)", rate / 100);
    // PostgreSQL alone at the same rate first (into a table no pipeline captures): its commit
    // round trip with nothing else writing.
    db.batch_execute("CREATE TABLE events_alone (LIKE events INCLUDING ALL)").await.unwrap();
    let mut alone = write_every_10ms(&db, "events_alone", 1, rate / 100, 500).await;
    alone.sort_unstable();
    println!(
        "  PostgreSQL alone for 5 s (INSERT of {} rows every 10 ms, round trip): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        rate / 100,
        percentile(&alone, 0.50) as f64 / 1000.0,
        percentile(&alone, 0.99) as f64 / 1000.0,
        *alone.last().unwrap() as f64 / 1000.0
    );
    let child = start_sluice(&file);
    let reader: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("group.id", format!("{name}-latency"))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    reader.subscribe(&[topic.as_str()]).unwrap();
    // Joined and positioned at the end before the timed writes start.
    while reader.assignment().map(|a| a.count()).unwrap_or(0) == 0 {
        reader.poll(Duration::from_millis(100));
    }
    // Timed writes start once sluice streams: a change made while it is still starting waits
    // for its start-up, which is not commit-to-readable latency. One row at a time until one
    // is read back (a row written before the reader has resolved `latest` is never seen).
    let mut first_timed = changes + 1;
    'warm: loop {
        insert(&db, first_timed, 1).await;
        first_timed += 1;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if let Some(Ok(_)) = reader.poll(Duration::from_millis(100)) {
                break 'warm;
            }
        }
    }
    // The disk under this load, which PostgreSQL's commits (and the broker) wait on.
    let probe_stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (stop, file) = (probe_stop.clone(), dir.path().join("fsync-probe"));
        std::thread::spawn(move || fsync_latencies(&file, &stop))
    };
    let per_batch = rate / 100;
    let total = per_batch * 100 * seconds;
    let written_before = write_bytes(child.id());
    // Each write's round trip: PostgreSQL's own commit, WAL flush included, which a change
    // waits for (from its commit timestamp) before the server sends it to any replica.
    let writer =
        tokio::spawn(async move { write_every_10ms(&db, "events", first_timed, per_batch, 100 * seconds).await });
    let mut latencies = Vec::with_capacity(total);
    // The two halves: commit to the envelope's `ts_ms` (sluice encodes it as it produces),
    // and from then until the reader has it (producer batching, broker, fetch).
    let (mut to_produce, mut to_read) = (Vec::with_capacity(total), Vec::with_capacity(total));
    let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 60);
    while latencies.len() < total && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let Some(payload) = m.payload() else { continue };
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            if v["after"]["id"].as_i64().is_some_and(|id| id < first_timed as i64) {
                continue;
            }
            let (committed, produced) = (v["source"]["ts_ms"].as_i64().unwrap(), v["ts_ms"].as_i64().unwrap());
            latencies.push(now_ms - committed);
            to_produce.push(produced - committed);
            to_read.push(now_ms - produced);
        }
    }
    let mut round_trips = writer.await.unwrap();
    probe_stop.store(true, Ordering::Release);
    let mut fsyncs = probe.join().unwrap();
    let page = scrape::metrics_page(METRICS_PORT);
    let written = write_bytes(child.id()) - written_before;
    stop_sluice(child);
    for part in [&mut latencies, &mut to_produce, &mut to_read, &mut fsyncs, &mut round_trips] {
        part.sort_unstable();
    }
    println!(
        "  {} changes read back: p50 {} ms, p99 {} ms, max {} ms (commit to readable, incl. the reader's fetch wait)",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
    println!(
        "    of which commit to produced: p50 {} ms, p99 {} ms; produced to read: p50 {} ms, p99 {} ms",
        percentile(&to_produce, 0.50),
        percentile(&to_produce, 0.99),
        percentile(&to_read, 0.50),
        percentile(&to_read, 0.99)
    );
    println!(
        "  fdatasync of 4 KiB on the same filesystem meanwhile (every 20 ms): p50 {} ms, p99 {} ms, max {} ms",
        percentile(&fsyncs, 0.50),
        percentile(&fsyncs, 0.99),
        fsyncs.last().unwrap()
    );
    println!(
        "  PostgreSQL's own commit meanwhile (the writer's INSERT of {per_batch} rows, round trip): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&round_trips, 0.50) as f64 / 1000.0,
        percentile(&round_trips, 0.99) as f64 / 1000.0,
        *round_trips.last().unwrap() as f64 / 1000.0
    );
    println!(
        "  sluice wrote {:.1} MiB/s to disk meanwhile (its logs, the Kafka buffer and the Parquet files)",
        written as f64 / 1048576.0 / seconds as f64
    );
    let quantile = |q| scrape::summary_quantile(&page, "sluice_log_commit_seconds", q).unwrap_or(f64::NAN) * 1000.0;
    println!(
        "  sluice's log commits (no fsync; checkpointed every second): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        quantile("0.5"),
        quantile("0.99"),
        quantile("1")
    );

    // The broker's own latency at the same rate: an rdkafka producer with sluice's settings,
    // from send to delivery report (acks=all), sample-sized messages.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", BROKER)
        .set("enable.idempotence", "true")
        .set("compression.type", "zstd")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // Connected, with its producer id, before the timed sends.
    producer.send(FutureRecord::to(&kcat_topic).key("warm-up").payload(value), Duration::from_secs(30)).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut acks = Vec::with_capacity(total);
    for i in 0..(100 * seconds) {
        tick.tick().await;
        for j in 0..per_batch {
            let k = format!("{{\"id\":{}}}", i * per_batch + j);
            let sent = Instant::now();
            let delivery = producer.send_result(FutureRecord::to(&kcat_topic).key(&k).payload(value)).unwrap();
            acks.push(tokio::spawn(async move {
                delivery.await.unwrap().unwrap();
                sent.elapsed().as_millis() as i64
            }));
        }
    }
    let mut broker = Vec::with_capacity(total);
    for a in acks {
        broker.push(a.await.unwrap());
    }
    broker.sort_unstable();
    println!(
        "  the broker alone at {rate}/s (rdkafka producer, same settings): send to acknowledged p50 {} ms, p99 {} ms, max {} ms",
        percentile(&broker, 0.50),
        percentile(&broker, 0.99),
        broker.last().unwrap()
    );

    drop_slot(&admin, &format!("sluice_{name}")).await;
}

/// The process streaming from `slot` (its walsender), once the slot is active.
async fn active_pid(admin: &tokio_postgres::Client, slot: &str) -> Option<u32> {
    let row = admin.query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await;
    row.unwrap()?.get::<_, Option<i32>>(0).map(|p| p as u32)
}

/// The test broker's process, from the services script's pid file, if it runs.
fn broker_pid() -> Option<u32> {
    let root = std::env::var("SLUICE_SERVICES").unwrap_or_else(|_| "/var/tmp/sluice-services".into());
    let pid: u32 = std::fs::read_to_string(format!("{root}/pids/kafka.pid")).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Drops a stopped pipeline's slot (an inactive slot would hold WAL), once its walsender is gone.
async fn drop_slot(admin: &tokio_postgres::Client, slot: &str) {
    for _ in 0..100 {
        let active = admin
            .query_opt("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .unwrap()
            .map(|r| r.get::<_, bool>(0));
        match active {
            None => return,
            Some(false) => {
                admin.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
                return;
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("slot {slot} is still active after its process stopped");
}

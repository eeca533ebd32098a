//! A bad pipeline file, a missing secret, a table without a primary key or a partitioned one, and
//! an unreachable server each stop sluice with a clear message and exit code 2, before anything
//! moves.

mod support;

use std::path::Path;
use std::process::Command;
use support::{sluice, TestDb};

fn write(dir: &Path, yaml: &str) -> std::path::PathBuf {
    let path = dir.join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Each file is refused by `sluice validate` (exit 2) with its message and fix, at a place in it.
fn refused_with_fixes(dir: &Path, cases: &[(String, &str, &str)]) {
    for (yaml, message, fix) in cases {
        let (code, err) = validate(&write(dir, yaml));
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(message), "expected `{message}` in:\n{err}");
        assert!(err.contains(fix), "expected fix `{fix}` in:\n{err}");
        assert!(err.contains("bad.yaml:"), "{err}");
    }
}

/// Runs `sluice validate` and returns (exit code, stderr).
fn validate(path: &Path) -> (i32, String) {
    let out = sluice(&["validate", path.to_str().unwrap()], path.parent().unwrap());
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

/// Runs `sluice run`, which must refuse to start with exit code 2; returns stderr.
fn run_refused(path: &Path) -> String {
    let out = sluice(&["run", path.to_str().unwrap()], path.parent().unwrap());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    err
}

const GOOD: &str = "name: ok\nsource:\n  type: postgres\n  url: postgres://cdc@127.0.0.1/cdc\n  tables: [public.t]\nsinks:\n  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n";

#[test]
fn a_valid_file_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["validate", write(dir.path(), GOOD).to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok: pipeline ok"), "{stdout}");
    assert!(stdout.contains("sink lake: parquet file:///tmp/lake/"), "{stdout}");
}

#[test]
fn unknown_key_names_file_line_column_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &GOOD.replace("  tables: [public.t]\n", "  tables: [public.t]\n  tabels: [x]\n"));
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{}:6:3:", path.display())), "{err}");
    assert!(err.contains("unknown field `tabels`"), "{err}");
    assert!(err.contains("fix: remove the key or correct its spelling"), "{err}");
}

#[test]
fn wrong_value_points_at_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &GOOD.replace("url: file:///tmp/lake/\n", "url: file:///tmp/lake/\n    roll: { max_age: soon }\n"),
    );
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{}:10:22: roll.max_age: `soon` is not a duration", path.display())), "{err}");
    assert!(err.contains("fix: write it like 500ms, 5s, 2m or 1h"), "{err}");
}

#[test]
fn the_nested_layout_is_named_and_only_parquet_sinks_take_it() {
    let dir = tempfile::tempdir().unwrap();
    let with = |layout: &str| {
        GOOD.replace("url: file:///tmp/lake/\n", &format!("url: file:///tmp/lake/\n    nested: {layout}\n"))
    };
    let out = sluice(&["validate", write(dir.path(), &with("struct")).to_str().unwrap()], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sink lake: parquet file:///tmp/lake/, snappy, JSON as structs\n"), "{stdout}");
    let path = write(dir.path(), &with("yaml"));
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{}:10:13: nested: `yaml` is not a layout", path.display())), "{err}");
    assert!(err.contains("fix: use `json` (JSON text, the default) or `struct` (typed structs and lists)"), "{err}");
    let pg_sink = "  - name: mirror\n    type: postgres\n    url: postgres://cdc@127.0.0.1/cdc\n    table: public.t\n    nested: struct\n";
    let path =
        write(dir.path(), &GOOD.replace("  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n", pg_sink));
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:11:13: sink mirror: `nested` does not apply to postgres sinks", path.display())),
        "{err}"
    );
    assert!(err.contains("fix: remove `nested`"), "{err}");
}

#[test]
fn the_parquet_codec_is_named_and_only_parquet_sinks_take_it() {
    let dir = tempfile::tempdir().unwrap();
    let with = |codec: &str| {
        GOOD.replace("url: file:///tmp/lake/\n", &format!("url: file:///tmp/lake/\n    compression: {codec}\n"))
    };
    for codec in ["snappy", "zstd", "lz4", "none"] {
        let out = sluice(&["validate", write(dir.path(), &with(codec)).to_str().unwrap()], dir.path());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("sink lake: parquet file:///tmp/lake/, {codec}\n")), "{stdout}");
    }
    let path = write(dir.path(), &with("gzip"));
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:10:18: compression: `gzip` is not a Parquet codec sluice writes", path.display())),
        "{err}"
    );
    assert!(err.contains("fix: use `snappy` (the default), `zstd` (about half the size), `lz4` or `none`"), "{err}");
    let pg_sink = "  - name: mirror\n    type: postgres\n    url: postgres://cdc@127.0.0.1/cdc\n    table: public.t\n    compression: zstd\n";
    let path =
        write(dir.path(), &GOOD.replace("  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n", pg_sink));
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:11:18: sink mirror: `compression` does not apply to postgres sinks", path.display())),
        "{err}"
    );
}

#[test]
fn bad_table_name_and_unknown_sink_type() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = validate(&write(dir.path(), &GOOD.replace("[public.t]", "[a.b.c]")));
    assert_eq!(code, 2);
    assert!(err.contains(":5:12: source.tables: `a.b.c` is not a table name"), "{err}");
    let (code, err) = validate(&write(dir.path(), &GOOD.replace("type: parquet", "type: parqet")));
    assert_eq!(code, 2);
    assert!(err.contains("unknown variant `parqet`"), "{err}");
    assert!(err.contains(":8:11: unknown variant"), "{err}");
}

#[test]
fn malformed_yaml_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = validate(&write(dir.path(), "name: x\nsource: [unclosed\n"));
    assert_eq!(code, 2);
    assert!(err.contains("bad.yaml:"), "{err}");
    assert!(err.contains("fix:"), "{err}");
}

#[test]
fn missing_secret_is_named_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        GOOD.replace("postgres://cdc@127.0.0.1/cdc", "postgres://cdc:${env:SLUICE_TEST_NO_SUCH_VAR}@127.0.0.1/cdc");
    let (code, err) = validate(&write(dir.path(), &yaml));
    assert_eq!(code, 2);
    assert!(err.contains(":4:8: source.url: environment variable SLUICE_TEST_NO_SUCH_VAR is not set"), "{err}");
    assert!(err.contains("fix: export SLUICE_TEST_NO_SUCH_VAR="), "{err}");

    // A resolved secret appears nowhere in validate's output.
    let path = write(dir.path(), &yaml.replace("SLUICE_TEST_NO_SUCH_VAR", "SLUICE_TEST_SECRET_PW"));
    let out = std::process::Command::new(support::sluice_bin())
        .args(["validate", path.to_str().unwrap()])
        .env("SLUICE_TEST_SECRET_PW", "hunter2-very-secret")
        .output()
        .unwrap();
    assert!(out.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("hunter2"), "{all}");
}

#[tokio::test]
async fn table_without_primary_key_is_refused() {
    let db = TestDb::new("nopk").await;
    db.client.batch_execute("CREATE TABLE logs (at timestamptz, line text)").await.unwrap();
    let file = db.pipeline_file(&["public.logs"], "", "");
    let err = run_refused(&file);
    assert!(err.contains("table public.logs has no primary key"), "{err}");
    assert!(err.contains("ADD PRIMARY KEY"), "{err}");
    assert!(!db.data_dir().join("lake").exists());
}

#[tokio::test]
async fn partitioned_table_is_refused_with_its_partitions_named_as_the_fix() {
    let db = TestDb::new("parted").await;
    db.client
        .batch_execute(
            "CREATE TABLE events (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
        )
        .await
        .unwrap();
    let file = db.pipeline_file(&["public.events"], "", "");
    let err = run_refused(&file);
    assert!(err.contains("public.events is a partitioned table; list its partitions"), "{err}");
    assert!(err.contains("pg_partition_tree('public.events')"), "{err}");
}

#[tokio::test]
async fn missing_table_is_refused() {
    let db = TestDb::new("notable").await;
    let file = db.pipeline_file(&["public.nowhere"], "", "");
    let err = run_refused(&file);
    assert!(err.contains("table public.nowhere does not exist"), "{err}");
}

#[test]
fn unreachable_server_fails_fast_and_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there.
    let path = write(dir.path(), &GOOD.replace("127.0.0.1/cdc", "127.0.0.1:1/cdc"));
    let started = std::time::Instant::now();
    let err = run_refused(&path);
    assert!(err.contains("cannot connect to cdc@127.0.0.1:1/cdc"), "{err}");
    assert!(err.contains("is the server running and reachable?"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn every_shipped_pipeline_file_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = std::process::Command::new(support::sluice_bin())
            .args(["validate", path.to_str().unwrap()])
            .env("PGPASSWORD", "example")
            .env("S3_ACCESS_KEY_ID", "example")
            .env("S3_SECRET_ACCESS_KEY", "example")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        checked += 1;
    }
    assert!(checked >= 2, "expected the quickstart and the example pipeline");
}

const MAPPED: &str = "name: ok\nsource:\n  type: postgres\n  url: postgres://cdc@127.0.0.1/cdc\n  tables: [public.t]\nsinks:\n  - name: crm\n    type: postgres\n    url: postgres://cdc@127.0.0.1/other\n    table: public.contacts\n    fields:\n      email: \"{{ after.email | lower }}\"\n";

const HUBSPOT: &str = "name: ok\nsource:\n  type: postgres\n  url: postgres://cdc@127.0.0.1/cdc\n  tables: [public.t]\nsinks:\n  - name: crm\n    type: hubspot\n    url: https://api.hubapi.com\n    token: pat-x\n    object: contacts\n    key: { source: \"{{ after.id }}\", target: sluice_id }\n";

/// A Salesforce sink signing in with the test key (`${file:...}` is resolved at validation).
fn salesforce(auth: &str) -> String {
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/salesforce-test.key");
    let auth = auth.replace("KEY", key);
    format!(
        "name: ok\nsource:\n  type: postgres\n  url: postgres://cdc@127.0.0.1/cdc\n  tables: [public.t]\nsinks:\n  - name: crm\n    type: salesforce\n    url: https://acme.my.salesforce.com\n    object: Contact\n    auth: {auth}\n    key: {{ source: \"{{{{ after.id }}}}\", target: Ext_Id__c }}\n"
    )
}

const SF_JWT: &str = "{ type: jwt, client_id: app, username: u@x.com, private_key: \"${file:KEY}\" }";

#[test]
fn a_salesforce_sink_validates_and_names_its_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["validate", write(dir.path(), &salesforce(SF_JWT)).to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sink crm: salesforce https://acme.my.salesforce.com object Contact from public.t, API v62.0, Bulk API from 2000 records a batch"), "{stdout}");
    let cases = [
        (
            salesforce("{ type: jwt, client_id: app, username: u@x.com, private_key: not-a-key }"),
            "auth.private_key: not an RSA private key in PEM",
            "BEGIN PRIVATE KEY",
        ),
        (
            salesforce("{ type: oauth, client_id: a, client_secret: b, refresh_token: c }"),
            "auth type `oauth` is not one salesforce sinks take",
            "`jwt` or `client_credentials`",
        ),
        (
            salesforce("{ type: client_credentials, client_id: a }"),
            "auth type `client_credentials` needs auth.client_secret",
            "add `client_secret:`",
        ),
        (
            salesforce("{ type: client_credentials, client_id: a, client_secret: b, username: u }"),
            "auth.username does not apply to auth type `client_credentials`",
            "remove auth.username",
        ),
        (
            format!("{}    rate: {{ ten_second_max: 100 }}\n", salesforce(SF_JWT)),
            "Salesforce has no per-second limit",
            "rate.daily_max",
        ),
        (
            format!("{}    api_version: \"45.0\"\n", salesforce(SF_JWT)),
            "api_version `45.0` is not a version from 46.0 on",
            "\"62.0\"",
        ),
        (
            format!("{}    token: x\n", salesforce(SF_JWT)),
            "salesforce sinks sign in with `auth:`, not `token:`",
            "type: jwt",
        ),
        (
            format!("{HUBSPOT}    bulk_threshold: 10\n"),
            "`bulk_threshold` does not apply to hubspot sinks",
            "remove `bulk_threshold`",
        ),
    ];
    refused_with_fixes(dir.path(), &cases);
}

#[test]
fn a_hubspot_sink_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["validate", write(dir.path(), HUBSPOT).to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .contains("sink crm: hubspot https://api.hubapi.com object contacts from public.t, 100 requests per 10 s"),
        "{stdout}"
    );
}

#[test]
fn a_mapped_sink_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["validate", write(dir.path(), MAPPED).to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "sink crm: postgres cdc@127.0.0.1:5432/other table public.contacts from public.t, conflict source_wins"
        ),
        "{stdout}"
    );
}

#[test]
fn a_bad_expression_points_at_the_character() {
    let dir = tempfile::tempdir().unwrap();
    // Line 12: `      email: "{{ after.email | }}"`; the value's quote is at column 14.
    let path = write(dir.path(), &MAPPED.replace("{{ after.email | lower }}", "{{ after.email | }}"));
    let (code, err) = validate(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{}:12:", path.display())), "{err}");
    assert!(err.contains("fields.email: syntax error"), "{err}");
    assert!(err.contains("fix: write an expression like"), "{err}");
    let col: u64 =
        err.split(&format!("{}:12:", path.display())).nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
    assert!((29..=33).contains(&col), "column {col} should point at the missing filter name: {err}");
}

#[test]
fn mapped_sink_mistakes_are_named_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            MAPPED.replace(
                "{{ after.email | lower }}",
                "{{ after.ssn | hmac_sha256(secret('SLUICE_TEST_NO_SUCH_KEY')) }}",
            ),
            "secret('SLUICE_TEST_NO_SUCH_KEY') names an environment variable that is not set",
            "export SLUICE_TEST_NO_SUCH_KEY",
        ),
        (
            format!("{MAPPED}    conflict: {{ strategy: newest }}\n"),
            "conflict strategy `newest` is not known",
            "use source_wins, target_wins, newest_wins, merge or manual",
        ),
        (
            format!("{MAPPED}    conflict: {{ strategy: newest_wins }}\n"),
            "newest_wins needs conflict.source_field and conflict.target_field",
            "source_field: after.updated_at",
        ),
        (
            format!("{MAPPED}    conflict: {{ strategy: merge, owners: {{ phone: target }} }}\n"),
            "conflict.owners names `phone`, which is not a mapped field",
            "list only fields",
        ),
        (
            format!("{MAPPED}    roll: {{ max_rows: 5 }}\n"),
            "`s3` and `roll` apply to parquet sinks only",
            "remove them",
        ),
        (
            MAPPED.replace("    table: public.contacts\n", ""),
            "a postgres sink needs `table:`",
            "table: public.customers",
        ),
        (
            format!("{MAPPED}    from: public.nope\n"),
            "from `public.nope` is not a source table",
            "use one of the source's tables: public.t",
        ),
        (format!("{MAPPED}    version: sometimes\n"), "version `sometimes` is not a guard", "field:<mapped field>"),
        (format!("{MAPPED}    batch: {{ max_records: 0 }}\n"), "batch.max_records: must be at least 1", "500"),
        (
            GOOD.replace("url: file:///tmp/lake/\n", "url: file:///tmp/lake/\n    when: \"{{ true }}\"\n"),
            "`when` does not apply to parquet sinks",
            "remove `when`",
        ),
        (HUBSPOT.replace("    token: pat-x\n", ""), "a hubspot sink needs `token:`", "HUBSPOT_TOKEN"),
        (
            HUBSPOT.replace("https://api.hubapi.com", "http://crm.example.com"),
            "is neither https:// nor a loopback http:// address",
            "https://api.hubapi.com",
        ),
        (
            format!("{HUBSPOT}    conflict: {{ strategy: merge }}\n"),
            "conflict strategy `merge` is not supported for hubspot sinks yet",
            "source_wins",
        ),
        (
            HUBSPOT.replace("    key: { source: \"{{ after.id }}\", target: sluice_id }\n", ""),
            "needs `key:` naming the unique property",
            "sluice_id must be a unique property",
        ),
        (
            format!("{HUBSPOT}    rate: {{ ten_second_max: 0 }}\n"),
            "rate.ten_second_max: must be at least 1",
            "100 or 190",
        ),
        (format!("{MAPPED}    token: x\n"), "`token` does not apply to postgres sinks", "remove `token`"),
    ];
    refused_with_fixes(dir.path(), &cases);
}

#[tokio::test]
async fn a_mapping_naming_a_missing_column_stops_the_run() {
    let db = TestDb::new("cfg_map_col").await;
    db.client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, email text); INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    db.client
        .batch_execute("CREATE TABLE contacts (id int PRIMARY KEY, email text, _sluice_version text)")
        .await
        .unwrap();
    let sink = format!(
        "  - name: crm\n    type: postgres\n    url: {}\n    table: public.contacts\n    fields:\n      email: \"{{{{ after.emial }}}}\"\n",
        db.url()
    );
    let file = db.pipeline_with_sinks(&["public.t"], &sink);
    let err = run_refused(&file);
    assert!(err.contains("pipeline.yaml:17:15"), "{err}");
    assert!(err.contains("`after.emial` names no column of public.t (its columns: email, id)"), "{err}");

    let sink = format!("  - name: crm\n    type: postgres\n    url: {}\n    table: public.contacts\n    conflict: {{ strategy: manual }}\n", db.url());
    let file = db.pipeline_with_sinks(&["public.t"], &sink);
    let err = run_refused(&file);
    assert!(
        err.contains(
            "sink crm: target table public.contacts needs a text column `_sluice_hash` for conflict detection"
        ),
        "{err}"
    );
    assert!(err.contains(r#"ALTER TABLE "public"."contacts" ADD COLUMN "_sluice_hash" text"#), "{err}");
}

#[test]
fn backfill_schedule_mistakes_are_named_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let with = |block: &str| format!("{GOOD}backfills:\n  - name: nightly\n    tables: [public.t]\n{block}");
    refused_with_fixes(
        dir.path(),
        &[
            (
                with("    schedule: \"0 25 * * *\"\n"),
                "backfills[nightly].schedule: `0 25 * * *` is not a cron expression",
                "minute hour day-of-month",
            ),
            (
                with("    schedule: \"0 2 * * *\"\n    time_zone: Mars/Olympus\n"),
                "backfills[nightly].time_zone: `Mars/Olympus` is not a time zone",
                "IANA name",
            ),
            (
                with("    schedule: \"0 2 * * *\"\n    mode: incremental\n"),
                "backfills[nightly].mode: incremental needs a cursor column",
                "cursor: updated_at",
            ),
            (
                with("    schedule: \"0 2 * * *\"\n    cursor: updated_at\n"),
                "a cursor applies to incremental backfills only",
                "mode: incremental",
            ),
            (
                with("    schedule: \"0 2 * * *\"\n    mode: sometimes\n"),
                "`sometimes` is not a backfill mode",
                "`full` or `incremental`",
            ),
            (
                with("    schedule: \"0 2 * * *\"\n    parallelism: 0\n"),
                "backfills[nightly].parallelism: must be 1 to 64",
                "2 or 4",
            ),
            (with("    schedule: \"0 2 * * *\"\n    wher: x > 1\n"), "unknown field `wher`", "remove the key"),
        ],
    );
    let good = with(
        "    schedule: \"0 2 * * *\"\n    time_zone: Europe/Berlin\n    mode: incremental\n    cursor: updated_at\n",
    );
    let out = sluice(&["validate", write(dir.path(), &good).to_str().unwrap()], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("backfill nightly: `0 2 * * *` in Europe/Berlin, tables [public.t], incremental by updated_at"),
        "{stdout}"
    );
}

const MONGO: &str = "name: mg\nsource:\n  type: mongodb\n  url: mongodb://sync:${env:SLUICE_TEST_MONGO_PW}@127.0.0.1:27017/?replicaSet=rs0\n  database: shop\n  collections: [orders, customers]\nsinks:\n  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n";

#[test]
fn a_mongodb_source_validates_without_printing_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), MONGO);
    let out = Command::new(support::sluice_bin())
        .args(["validate", path.to_str().unwrap()])
        .env("SLUICE_TEST_MONGO_PW", "hunter2-mongo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("source: mongodb 127.0.0.1:27017 database shop collections [orders, customers]"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

#[test]
fn mongodb_source_mistakes_are_named_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let good = MONGO.replace("${env:SLUICE_TEST_MONGO_PW}", "pw");
    let cases = [
        (good.replace("  database: shop\n", ""), "source: a mongodb source needs `database`", "add `database: NAME`"),
        (
            good.replace("  collections: [orders, customers]\n", "  tables: [public.orders]\n"),
            "source.tables: does not apply to mongodb sources",
            "list collections under `collections:`",
        ),
        (
            good.replace("  database: shop\n", "  database: shop\n  full_document: always\n"),
            "source.full_document: `always` is not a full-document mode",
            "use update_lookup, when_available or required",
        ),
        (
            good.replace("  database: shop\n", "  database: shop\n  on_history_lost: skip\n"),
            "source.on_history_lost: `skip` is not a policy",
            "use `fail` (stop with an error) or `resnapshot`",
        ),
        (
            good.replace("[orders, customers]", "[orders, orders]"),
            "source.collections: `orders` is listed twice",
            "list each once",
        ),
        (good.replace("mongodb://", "mongo://"), "source.url: the scheme is not mongodb://", "write it as mongodb://"),
        (
            good.replace("  database: shop\n", "  database: shop\n  slot: s\n"),
            "source.slot: does not apply to mongodb sources",
            "the README's source reference",
        ),
        (
            GOOD.replace("  tables: [public.t]\n", "  tables: [public.t]\n  collections: [x]\n"),
            "source.collections: does not apply to postgres sources",
            "list tables under `tables:`",
        ),
        (
            good.clone() + "backfills:\n  - { name: nightly, schedule: \"0 2 * * *\", tables: [public.t] }\n",
            "backfills: scheduled backfills read PostgreSQL tables; this pipeline's source is not postgres",
            "remove `backfills`",
        ),
    ];
    refused_with_fixes(dir.path(), &cases);
}

const KAFKA: &str = "transport:\n  type: kafka\n  brokers: 127.0.0.1:9092\n  topic_prefix: shop\n  partitions: 12\n  \
                     security: { protocol: SASL_SSL, mechanism: SCRAM-SHA-512, username: sync, password: \"${env:SLUICE_TEST_KAFKA_PW}\" }\n";

#[test]
fn a_kafka_transport_validates_without_printing_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &format!("{GOOD}{KAFKA}"));
    let out = Command::new(support::sluice_bin())
        .args(["validate", path.to_str().unwrap()])
        .env("SLUICE_TEST_KAFKA_PW", "hunter2-kafka")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("transport: kafka 127.0.0.1:9092 topics shop.* (12 partitions, replication 1), zstd compression, security SASL_SSL"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

#[test]
fn kafka_transport_mistakes_are_named_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let good = format!("{GOOD}{}", KAFKA.replace("${env:SLUICE_TEST_KAFKA_PW}", "pw"));
    let cases = [
        (
            good.replace("  brokers: 127.0.0.1:9092\n", ""),
            "transport: a kafka transport needs `brokers`",
            "add `brokers: 127.0.0.1:9092`",
        ),
        (
            good.replace("127.0.0.1:9092", "kafka://127.0.0.1"),
            "transport.brokers: `kafka://127.0.0.1` is not host:port",
            "list brokers as host:port",
        ),
        (
            good.replace("partitions: 12", "partitions: 0"),
            "transport.partitions: 0 is out of range",
            "use a whole number from 1 to 10000",
        ),
        (
            good.replace("topic_prefix: shop", "topic_prefix: \"shop/x\""),
            "transport.topic_prefix: `shop/x` cannot start a topic name",
            "use letters, digits",
        ),
        (
            good.replace("SCRAM-SHA-512", "GSSAPI"),
            "transport.security.mechanism: `GSSAPI` is not supported",
            "use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
        ),
        (
            good.replace("mechanism: SCRAM-SHA-512, ", ""),
            "transport.security: SASL_SSL needs a `mechanism`",
            "add `mechanism: SCRAM-SHA-512`",
        ),
        (
            good.replace("username: sync, ", ""),
            "transport.security: SASL needs `username` and `password`",
            "add `username: NAME`",
        ),
        (
            good.clone() + "  producer: { compression: brotli }\n",
            "transport.producer.compression: `brotli` is not a Kafka compression",
            "use none, gzip, snappy, lz4 or zstd",
        ),
        (
            format!("{GOOD}transport:\n  type: embedded\n  brokers: 127.0.0.1:9092\n"),
            "transport.brokers: applies to a kafka transport only",
            "set `type: kafka`",
        ),
    ];
    refused_with_fixes(dir.path(), &cases);
}

#[test]
fn only_a_pipeline_that_publishes_to_kafka_may_have_no_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let sinkless =
        GOOD.replace("sinks:\n  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n", "sinks: []\n");
    let publisher = format!("{sinkless}{}", KAFKA.replace("${env:SLUICE_TEST_KAFKA_PW}", "pw"));
    let out = sluice(&["validate", write(dir.path(), &publisher).to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("transport: kafka 127.0.0.1:9092 topics shop.*"));
    let fix = "only a pipeline that publishes to Kafka, `transport: { type: kafka }`, may have none";
    refused_with_fixes(
        dir.path(),
        &[
            (sinkless.clone(), "bad.yaml:6:8: sinks: the list is empty", fix),
            (
                KAFKA_SOURCE
                    .replace("sinks:\n  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n", "sinks: []\n"),
                "sinks: the list is empty",
                fix,
            ),
        ],
    );
}

const KAFKA_SOURCE: &str =
    "name: mirror\nsource:\n  type: kafka\n  brokers: 127.0.0.1:9092\n  topics: [dbserver1.inventory.customers]\n\
    sinks:\n  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n";

#[test]
fn transaction_metadata_is_refused_where_it_cannot_apply() {
    let dir = tempfile::tempdir().unwrap();
    let mongo = "name: ok\nsource:\n  type: mongodb\n  url: mongodb://127.0.0.1:27017/\n  database: shop\n\
                 transport:\n  type: kafka\n  brokers: 127.0.0.1:9092\n  transaction_metadata: true\n\
                 sinks:\n  - name: lake\n    type: parquet\n    url: file:///tmp/lake/\n";
    let embedded = GOOD.replace("sinks:\n", "transport:\n  type: embedded\n  transaction_metadata: true\nsinks:\n");
    let cases = [
        (
            mongo.to_string(),
            "bad.yaml:9:25: transport.transaction_metadata: applies to PostgreSQL sources only",
            "fix: remove it; a MongoDB source publishes no transaction boundaries",
        ),
        (
            embedded,
            "bad.yaml:8:25: transport.transaction_metadata: applies to a kafka transport only",
            "fix: remove it, or set `type: kafka`",
        ),
    ];
    refused_with_fixes(dir.path(), &cases);
}

#[test]
fn a_kafka_source_validates_and_its_mistakes_are_named_with_their_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(&["validate", write(dir.path(), KAFKA_SOURCE).to_str().unwrap()], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("source: kafka topics [dbserver1.inventory.customers] (Debezium envelope)"), "{stdout}");
    let good = KAFKA_SOURCE;
    refused_with_fixes(
        dir.path(),
        &[
            (
                good.replace("  topics: [dbserver1.inventory.customers]\n", ""),
                "source: a kafka source needs `topics`",
                "topics: [dbserver1.inventory.customers]",
            ),
            (
                good.replace("  brokers: 127.0.0.1:9092\n", ""),
                "source: a kafka source needs `brokers`",
                "add `brokers: 127.0.0.1:9092`",
            ),
            (
                good.replace("[dbserver1.inventory.customers]", "[\"a topic\"]"),
                "source.topics: `a topic` is neither a topic name nor a pattern",
                "starting with `^`",
            ),
            (
                good.replace("  topics:", "  tables: [public.t]\n  topics:"),
                "source.tables: does not apply to kafka sources",
                "list the topics under `topics:`",
            ),
            (
                format!("{good}transport:\n  type: kafka\n  brokers: 127.0.0.1:9092\n"),
                "a kafka source reads from Kafka already",
                "keep `type: embedded`",
            ),
            (
                GOOD.replace("  tables: [public.t]\n", "  tables: [public.t]\n  topics: [x]\n"),
                "source.topics: does not apply to postgres sources",
                "a kafka source reads topics",
            ),
            (
                GOOD.replace("  url: postgres://cdc@127.0.0.1/cdc\n", ""),
                "source: a postgres source needs `url`",
                "add the connection string as `url:`",
            ),
        ],
    );
}

//! MongoDB change streams into the lake, against the MongoDB-protocol server the services
//! script starts. Event shapes that server cannot produce are decoding tests in the source.

mod support;

use mongodb::bson::{doc, oid::ObjectId, Binary, Bson, DateTime, Document};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use support::lake::{changelog, duplicate_positions};
use support::mongo::{lake_documents, TestMongo};
use support::mongo_proxy::MongoProxy;
use support::{eventually, run_until_idle, seed, sluice, Running, TestDb};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test]
async fn snapshot_then_stream_lands_documents_exactly_and_in_order() {
    let m = TestMongo::new("mg_shapes").await;
    let orders = m.db.collection::<Document>("orders");
    let oid = ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap();
    orders
        .insert_one(doc! {
            "_id": oid,
            "total": 12.5,
            "qty": 3,
            "paid": true,
            "note": Bson::Null,
            "at": DateTime::from_millis(1_700_000_000_123),
            "blob": Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![0, 1, 254] },
            "lines": [{ "sku": "a", "n": 1 }, { "sku": "b", "n": 2 }],
            "ship": { "city": "Oslo", "geo": [10.75, 59.91] },
        })
        .await
        .unwrap();
    let many: Vec<Document> = (0..250).map(|i| doc! { "_id": format!("k{i:04}"), "n": i, "tags": ["x"] }).collect();
    orders.insert_many(many).await.unwrap();
    let file = m.pipeline_file(&["orders"], "");
    run_until_idle(&file);

    let rows = changelog(&m.lake_dir(), &format!("{}.orders", m.name));
    assert_eq!(rows.len(), 251);
    assert!(rows.iter().all(|r| r.op == "read"), "only snapshot reads so far");
    let first = rows.iter().find(|r| r.columns["_id"].as_deref() == Some(r#"{"$oid":"64b7f0c2a1b2c3d4e5f60718"}"#));
    assert_eq!(
        json(first.expect("the ObjectId document").columns["document"].as_deref().unwrap()),
        json(concat!(
            r#"{"_id":{"$oid":"64b7f0c2a1b2c3d4e5f60718"},"total":12.5,"qty":3,"paid":true,"note":null,"#,
            r#""at":{"$date":"2023-11-14T22:13:20.123Z"},"blob":{"$binary":{"base64":"AAH+","subType":"00"}},"#,
            r#""lines":[{"sku":"a","n":1},{"sku":"b","n":2}],"ship":{"city":"Oslo","geo":[10.75,59.91]}}"#
        ))
    );
    assert_eq!(lake_documents(&rows), m.documents("orders").await);

    let running = Running::start(&file);
    m.await_streaming(&running).await;
    orders.insert_one(doc! { "_id": "new", "n": 1 }).await.unwrap();
    orders.update_one(doc! { "_id": "new" }, doc! { "$set": { "n": 2 } }).await.unwrap();
    orders.update_one(doc! { "_id": "k0001" }, doc! { "$set": { "n": -1, "tags": ["y", "z"] } }).await.unwrap();
    orders.replace_one(doc! { "_id": "k0002" }, doc! { "replaced": true }).await.unwrap();
    orders.delete_one(doc! { "_id": "k0003" }).await.unwrap();
    orders.delete_one(doc! { "_id": "new" }).await.unwrap();
    let lake = m.lake_dir();
    let table = format!("{}.orders", m.name);
    let changes = eventually("six changes in the lake", Duration::from_secs(30), || {
        let rows = changelog(&lake, &table);
        let changes: Vec<_> = rows.into_iter().filter(|r| r.op != "read").collect();
        async move { (changes.len() >= 6).then_some(changes) }
    })
    .await;
    running.stop();
    let seen: Vec<(&str, &str)> =
        changes.iter().map(|r| (r.op.as_str(), r.columns["_id"].as_deref().unwrap())).collect();
    assert_eq!(
        seen,
        [
            ("insert", r#""new""#),
            ("update", r#""new""#),
            ("update", r#""k0001""#),
            ("update", r#""k0002""#),
            ("delete", r#""k0003""#),
            ("delete", r#""new""#),
        ]
    );
    assert_eq!(json(changes[1].columns["document"].as_deref().unwrap()), json(r#"{"_id":"new","n":2}"#));
    assert_eq!(
        json(changes[2].columns["document"].as_deref().unwrap()),
        json(r#"{"_id":"k0001","n":-1,"tags":["y","z"]}"#)
    );
    assert_eq!(json(changes[3].columns["document"].as_deref().unwrap()), json(r#"{"_id":"k0002","replaced":true}"#));
    assert_eq!(changes[4].columns["document"], None);
    let all = changelog(&lake, &table);
    assert!(duplicate_positions(&all).is_empty());
    assert_eq!(lake_documents(&all), m.documents("orders").await);
}

/// SIGKILL once part of a snapshot has landed: the restart reads on after the last landed
/// `_id`, so every document is read exactly once. (String ids only: the test server sorts
/// ObjectIds before strings, unlike MongoDB, so mixed-type resumption is a unit test.)
#[tokio::test]
async fn kill9_mid_snapshot_resumes_after_the_last_landed_document() {
    let m = TestMongo::new("mg_kill_snap").await;
    let coll = m.db.collection::<Document>("items");
    let docs: Vec<Document> = (0..20_000).map(|i| doc! { "_id": format!("s{i:05}"), "v": i }).collect();
    coll.insert_many(docs).await.unwrap();
    let file = m.pipeline_file(&["items"], "");
    let table = format!("{}.items", m.name);
    let lake = m.lake_dir();
    let running = Running::start(&file);
    eventually("part of the snapshot in the lake", Duration::from_secs(60), || {
        let n = changelog(&lake, &table).len();
        async move { (n > 0).then_some(()) }
    })
    .await;
    running.kill9();
    let state = snapshot_rows(&m, "items").await;
    assert!(state.is_some_and(|rows| rows > 0 && rows < 20_000), "killed mid-snapshot: {state:?}");
    run_until_idle(&file);
    let rows = changelog(&lake, &table);
    assert!(duplicate_positions(&rows).is_empty(), "{:?}", duplicate_positions(&rows));
    assert_eq!(rows.len(), 20_000, "every document read exactly once");
    assert_eq!(lake_documents(&rows), m.documents("items").await);
}

/// How many rows the stored snapshot of `collection` has landed (`None`: no snapshot running).
async fn snapshot_rows(m: &TestMongo, collection: &str) -> Option<u64> {
    let log = sluice::log::EmbeddedLog::open(&m.data_dir()).unwrap();
    let raw = log.meta(&format!("mongo.collection.{collection}")).await.unwrap()?;
    sluice::connectors::mongo::snapshot_rows(&raw)
}

/// Random inserts, updates and deletes across two collections while sluice streams and is
/// killed with SIGKILL at random points, and while it is down: every change lands exactly once.
#[tokio::test]
async fn kill9_while_streaming_resumes_from_the_stored_token_exactly_once() {
    let m = TestMongo::new("mg_kill").await;
    let names = ["accounts", "events"];
    for name in names {
        let docs: Vec<Document> = (0..300).map(|i| doc! { "_id": format!("{name}-{i:05}"), "v": 0 }).collect();
        m.db.collection::<Document>(name).insert_many(docs).await.unwrap();
    }
    let file = m.pipeline_file(&names, "");
    let running = Running::start(&file);
    m.await_streaming(&running).await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut next_id = 300;
    let mut changes = 0;
    let mut running = Some(running);
    for round in 0..6 {
        let run = running.take().unwrap_or_else(|| Running::start(&file));
        let writes = rng.random_range(20..80);
        for _ in 0..writes {
            changes += mutate(&m, &mut rng, &names, &mut next_id).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        run.kill9();
        for _ in 0..rng.random_range(0..40) {
            changes += mutate(&m, &mut rng, &names, &mut next_id).await;
        }
        eprintln!("round {round}: {writes} writes while running, {changes} changes so far");
    }
    run_until_idle(&file);
    let mut landed = 0;
    for name in names {
        let rows = changelog(&m.lake_dir(), &format!("{}.{name}", m.name));
        assert!(duplicate_positions(&rows).is_empty(), "{name}: {:?}", duplicate_positions(&rows));
        assert_eq!(rows.iter().filter(|r| r.op == "read").count(), 300, "{name}: the snapshot, once");
        landed += rows.iter().filter(|r| r.op != "read").count();
        assert_eq!(lake_documents(&rows), m.documents(name).await, "{name}");
    }
    assert_eq!(landed, changes, "every change exactly once: none lost, none replayed");
}

/// One random write; returns how many documents it changed (0 or 1).
async fn mutate(m: &TestMongo, rng: &mut StdRng, names: &[&str], next_id: &mut u32) -> usize {
    let name = names[rng.random_range(0..names.len())];
    let coll = m.db.collection::<Document>(name);
    let id = format!("{name}-{:05}", rng.random_range(0..*next_id));
    match rng.random_range(0..4) {
        0 => {
            *next_id += 1;
            coll.insert_one(doc! { "_id": format!("{name}-{:05}", *next_id - 1), "v": 1 }).await.unwrap();
            1
        }
        1 => coll.delete_one(doc! { "_id": id }).await.unwrap().deleted_count as usize,
        _ => {
            let v: i32 = rng.random_range(0..1_000_000);
            let r = coll.update_one(doc! { "_id": id }, doc! { "$set": { "v": v, "seen": [v, v + 1] } }).await.unwrap();
            r.modified_count as usize
        }
    }
}

#[tokio::test]
async fn a_missing_collection_or_an_unreachable_server_stops_the_run_with_a_clear_error() {
    let m = TestMongo::new("mg_errors").await;
    m.db.collection::<Document>("present").insert_one(doc! { "_id": 1 }).await.unwrap();
    let file = m.pipeline_file(&["present", "absent"], "");
    let out = sluice(&["run", file.to_str().unwrap(), "--until-idle", "1s"], m.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("collection {}.absent does not exist on 127.0.0.1:27017 (it has: present)", m.name)),
        "{stderr}"
    );
    assert!(
        !m.data_dir().join("log.redb").exists() || changelog(&m.lake_dir(), &format!("{}.present", m.name)).is_empty()
    );

    // Nothing listens on this port: the run gives up after its bounded server selection.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let text = std::fs::read_to_string(&file).unwrap().replace("127.0.0.1:27017", &format!("127.0.0.1:{port}"));
    std::fs::write(&file, text).unwrap();
    let out = sluice(&["run", file.to_str().unwrap(), "--until-idle", "1s"], m.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("cannot connect to 127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("is the server running and reachable?"), "{stderr}");
    assert!(stderr.contains("Server selection timeout"), "{stderr}");
}

#[tokio::test]
async fn without_a_collection_list_every_collection_is_captured() {
    let m = TestMongo::new("mg_all").await;
    let file = m.pipeline_file(&[], "");
    let out = sluice(&["run", file.to_str().unwrap(), "--until-idle", "1s"], m.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("database {} on 127.0.0.1:27017 has no collections to capture", m.name)),
        "{stderr}"
    );

    for (name, n) in [("a", 5), ("b", 3)] {
        let docs: Vec<Document> = (0..n).map(|i| doc! { "_id": format!("{name}{i}"), "n": i }).collect();
        m.db.collection::<Document>(name).insert_many(docs).await.unwrap();
    }
    run_until_idle(&file);
    for (name, n) in [("a", 5), ("b", 3)] {
        let rows = changelog(&m.lake_dir(), &format!("{}.{name}", m.name));
        assert_eq!(rows.len(), n, "{name}");
        assert_eq!(lake_documents(&rows), m.documents(name).await, "{name}");
    }
}

/// A collection mirrored into a PostgreSQL table through a mapping that reads the documents'
/// fields (`| json`), with an update and a delete following.
#[tokio::test]
async fn a_collection_mirrors_into_postgres_through_a_mapping() {
    let m = TestMongo::new("mg_mirror").await;
    let target = TestDb::new("mg_mirror_target").await;
    target
        .client
        .batch_execute("CREATE TABLE contacts (mongo_id text PRIMARY KEY, email text, city text, _sluice_version text)")
        .await
        .unwrap();
    let people = m.db.collection::<Document>("people");
    people
        .insert_many([
            doc! { "_id": "p1", "email": "Ada@X.org", "ship": { "city": "Oslo" } },
            doc! { "_id": "p2", "email": "Bo@Y.org", "ship": { "city": "Bergen" } },
            doc! { "_id": "p3", "email": "Cy@Z.org" },
        ])
        .await
        .unwrap();
    let sink = format!(
        "  - name: crm\n    type: postgres\n    url: {}\n    table: public.contacts\n\
         \x20   key: {{ source: \"{{{{ key._id | json }}}}\", target: mongo_id }}\n\
         \x20   fields:\n\
         \x20     email: \"{{{{ (after.document | json).email | lower }}}}\"\n\
         \x20     city: \"{{{{ ((after.document | json).ship | default({{}})).city | default(none) }}}}\"\n",
        target.url()
    );
    let file = m.pipeline_with_sinks(&["people"], &sink);
    run_until_idle(&file);
    let contacts = "SELECT mongo_id, email, city FROM contacts ORDER BY mongo_id";
    let row =
        |id: &str, email: &str, city: Option<&str>| vec![Some(id.into()), Some(email.into()), city.map(Into::into)];
    assert_eq!(
        target.rows(contacts).await,
        vec![row("p1", "ada@x.org", Some("Oslo")), row("p2", "bo@y.org", Some("Bergen")), row("p3", "cy@z.org", None)]
    );
    people.update_one(doc! { "_id": "p2" }, doc! { "$set": { "email": "BO@NEW.org" } }).await.unwrap();
    people.delete_one(doc! { "_id": "p3" }).await.unwrap();
    run_until_idle(&file);
    assert_eq!(
        target.rows(contacts).await,
        vec![row("p1", "ada@x.org", Some("Oslo")), row("p2", "bo@new.org", Some("Bergen"))]
    );
}

/// `nested: struct`: documents land as typed Parquet structs and lists. A field first seen
/// after the file's first 8,192 rows closes that file and the next file has the new column;
/// an `_id` that is an ObjectId in one document and a string in others keeps each value's
/// Extended JSON text. A second run streams an update into the same layout.
#[tokio::test]
async fn documents_land_as_typed_structs_under_nested_struct() {
    let m = TestMongo::new("mg_struct").await;
    let orders = m.db.collection::<Document>("orders");
    orders
        .insert_one(doc! {
            "_id": ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap(),
            "total": 12.5,
            "at": DateTime::from_millis(1_700_000_000_123),
            "blob": Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![0, 1, 254] },
            "lines": [{ "sku": "a", "n": 1 }, { "sku": "b", "n": 2 }],
        })
        .await
        .unwrap();
    // Sorted after the ObjectId; from k08200 on each has a field the first 8,192 rows lack.
    let many: Vec<Document> = (0..8300)
        .map(|i| match i {
            0..8200 => doc! { "_id": format!("k{i:05}"), "n": i, "tags": ["x"] },
            _ => doc! { "_id": format!("k{i:05}"), "n": i, "tags": [], "extra": { "deep": true } },
        })
        .collect();
    orders.insert_many(many).await.unwrap();
    let sink = format!(
        "  - name: lake\n    type: parquet\n    url: file://{}/\n    nested: struct\n    roll: {{ max_rows: 100000, max_age: 1s }}\n",
        m.lake_dir().display()
    );
    let file = m.pipeline_with_sinks(&["orders"], &sink);
    run_until_idle(&file);

    let table = format!("{}.orders", m.name);
    let files = support::lake::files(&m.lake_dir(), &table);
    assert_eq!(files.len(), 2, "{files:?}");
    let fields = |f: &std::path::Path| {
        let schema = support::lake::batches(f)[0].schema();
        format!("{}", schema.field_with_name("document").unwrap().data_type())
    };
    assert_eq!(
        fields(&files[0]),
        "Struct(\"_id\": Utf8, metadata: {\"ARROW:extension:metadata\": \"\", \"ARROW:extension:name\": \"arrow.json\"}, \
         \"total\": Float64, \"at\": Timestamp(ms, \"UTC\"), \"blob\": Binary, \
         \"lines\": List(Struct(\"sku\": Utf8, \"n\": Int32)), \"n\": Int32, \"tags\": List(Utf8))"
    );
    // The second file starts with the union of the first file's shapes and the new ones.
    assert_eq!(
        fields(&files[1]),
        "Struct(\"_id\": Utf8, metadata: {\"ARROW:extension:metadata\": \"\", \"ARROW:extension:name\": \"arrow.json\"}, \
         \"total\": Float64, \"at\": Timestamp(ms, \"UTC\"), \"blob\": Binary, \
         \"lines\": List(Struct(\"sku\": Utf8, \"n\": Int32)), \"n\": Int32, \"tags\": List(Utf8), \
         \"extra\": Struct(\"deep\": Boolean))"
    );
    let rows = changelog(&m.lake_dir(), &table);
    assert_eq!(rows.len(), 8301);
    let by_id = |id: &str| rows.iter().find(|r| r.columns["_id"].as_deref() == Some(id)).expect(id).clone();
    let doc = |id: &str| by_id(id).columns["document"].clone().unwrap();
    assert_eq!(
        doc(r#"{"$oid":"64b7f0c2a1b2c3d4e5f60718"}"#),
        r#"{_id: {"$oid":"64b7f0c2a1b2c3d4e5f60718"}, total: 12.5, at: 2023-11-14T22:13:20.123Z, blob: 0001fe, lines: [{sku: a, n: 1}, {sku: b, n: 2}], n: , tags: }"#
    );
    assert_eq!(doc(r#""k00001""#), r#"{_id: "k00001", total: , at: , blob: , lines: , n: 1, tags: [x]}"#);
    assert_eq!(by_id(r#""k08190""#).file, files[0]);
    // The second file begins where the first file's rows end: every row is in exactly one.
    assert_eq!(by_id(r#""k08191""#).file, files[1]);
    assert_eq!(doc(r#""k08191""#), r#"{_id: "k08191", total: , at: , blob: , lines: , n: 8191, tags: [x], extra: }"#);
    assert_eq!(
        doc(r#""k08299""#),
        r#"{_id: "k08299", total: , at: , blob: , lines: , n: 8299, tags: [], extra: {deep: true}}"#
    );
    assert!(duplicate_positions(&rows).is_empty());

    orders.update_one(doc! { "_id": "k00001" }, doc! { "$set": { "n": -1, "tags": ["y", "z"] } }).await.unwrap();
    run_until_idle(&file);
    let rows = changelog(&m.lake_dir(), &table);
    let updates: Vec<_> = rows.iter().filter(|r| r.op == "update").collect();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].columns["document"].as_deref(), Some("{_id: k00001, n: -1, tags: [y, z]}"));
}

/// A resume point the oplog has rolled past. MongoDB then answers the resumed change stream with
/// `ChangeStreamHistoryLost`, which the test server never does, so a wire-protocol proxy in
/// front of it gives that answer. `on_history_lost: fail` stops the run naming the collection
/// and the fix, and lands nothing; `resnapshot` reads the collection again, after which the lake
/// equals the collection and streaming goes on.
#[tokio::test]
async fn a_lost_resume_point_fails_or_resnapshots_as_declared() {
    let m = TestMongo::new("mg_lost").await;
    let orders = m.db.collection::<Document>("orders");
    orders.insert_many((0..3).map(|i| doc! { "_id": format!("k{i}"), "n": i })).await.unwrap();
    let upstream = support::mongo::mongo_url();
    let upstream = upstream.trim_start_matches("mongodb://").split(['/', '?']).next().unwrap().to_string();
    let proxy = MongoProxy::start(&upstream);
    let file = m.pipeline_file(&["orders"], "  on_history_lost: fail\n");
    let through_proxy =
        std::fs::read_to_string(&file).unwrap().replace(&upstream, &format!("127.0.0.1:{}", proxy.port));
    std::fs::write(&file, &through_proxy).unwrap();
    run_until_idle(&file);
    let table = format!("{}.orders", m.name);
    assert_eq!(changelog(&m.lake_dir(), &table).len(), 3);

    orders.update_one(doc! { "_id": "k1" }, doc! { "$set": { "n": 10 } }).await.unwrap();
    orders.insert_one(doc! { "_id": "k3", "n": 3 }).await.unwrap();
    proxy.lose_history();
    let out = sluice(&["run", file.to_str().unwrap(), "--until-idle", "1s"], m.dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("collection {table}: the stored resume point is no longer in the oplog")),
        "{stderr}"
    );
    assert!(stderr.contains("Set `on_history_lost: resnapshot` to read the collection again"), "{stderr}");
    assert_eq!(proxy.times_lost(), 1);
    let rows = changelog(&m.lake_dir(), &table);
    assert_eq!(rows.iter().map(|r| r.op.as_str()).collect::<Vec<_>>(), ["read"; 3]);

    std::fs::write(&file, through_proxy.replace("on_history_lost: fail", "on_history_lost: resnapshot")).unwrap();
    proxy.lose_history();
    run_until_idle(&file);
    assert_eq!(proxy.times_lost(), 2);
    let rows = changelog(&m.lake_dir(), &table);
    // The first snapshot's three reads, then the collection read again: four more.
    assert_eq!(rows.iter().filter(|r| r.op == "read").count(), 7, "{rows:?}");
    assert_eq!(lake_documents(&rows), m.documents("orders").await);
    assert!(duplicate_positions(&rows).is_empty());

    orders.update_one(doc! { "_id": "k0" }, doc! { "$set": { "n": -1 } }).await.unwrap();
    run_until_idle(&file);
    let rows = changelog(&m.lake_dir(), &table);
    let updates: Vec<_> = rows.iter().filter(|r| r.op == "update").map(|r| r.columns["_id"].clone().unwrap()).collect();
    assert_eq!(updates, [r#""k0""#]);
    assert_eq!(lake_documents(&rows), m.documents("orders").await);
}

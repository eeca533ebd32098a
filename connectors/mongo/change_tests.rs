//! Event documents as MongoDB's change-events reference shows them, one per shape, including
//! the shapes the test server cannot produce (update descriptions, replace, pre-images, drop,
//! rename, invalidate, transactions, split events).

use super::*;
use mongodb::bson::{doc, oid::ObjectId, DateTime, Timestamp};

fn token() -> Document {
    doc! { "_data": "8262A371AF000000012B022C0100296E5A1004" }
}

fn oid() -> ObjectId {
    ObjectId::parse_str("599af247bb69cd89961c986d").unwrap()
}

fn at() -> Timestamp {
    Timestamp { time: 1_654_878_543, increment: 1 }
}

fn wall() -> DateTime {
    DateTime::parse_rfc3339_str("2022-06-10T16:29:03.704Z").unwrap()
}

#[test]
fn insert() {
    let event = doc! {
        "_id": token(), "operationType": "insert", "clusterTime": at(), "wallTime": wall(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": oid() },
        "fullDocument": { "_id": oid(), "userName": "alice123", "name": "Alice" },
    };
    let c = decode(event).unwrap();
    assert_eq!(c.token, token());
    assert_eq!(c.cluster_time, Some(at()));
    assert_eq!(c.wall_ms, Some(1_654_878_543_704));
    assert_eq!(c.txn, None);
    assert_eq!(
        c.kind,
        ChangeKind::Document {
            op: Op::Insert,
            id: Bson::ObjectId(oid()),
            after: Some(doc! { "_id": oid(), "userName": "alice123", "name": "Alice" }),
            before: None,
            update: None,
        }
    );
}

#[test]
fn update_with_description_and_lookup() {
    let description = doc! {
        "updatedFields": { "email": "alice@10gen.com" },
        "removedFields": ["phoneNumber"],
        "truncatedArrays": [{ "field": "vacation_time", "newSize": 36 }],
        "disambiguatedPaths": {},
    };
    let event = doc! {
        "_id": token(), "operationType": "update", "clusterTime": at(), "wallTime": wall(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": oid() },
        "updateDescription": description.clone(),
        "fullDocument": { "_id": oid(), "name": "Alice", "email": "alice@10gen.com" },
    };
    let ChangeKind::Document { op, after, update, before, .. } = decode(event).unwrap().kind else { panic!() };
    assert_eq!(op, Op::Update);
    assert_eq!(update, Some(description));
    assert_eq!(after, Some(doc! { "_id": oid(), "name": "Alice", "email": "alice@10gen.com" }));
    assert_eq!(before, None);
}

#[test]
fn update_whose_document_was_deleted_before_the_lookup() {
    // updateLookup finds nothing when the document is gone: fullDocument is null.
    let event = doc! {
        "_id": token(), "operationType": "update", "clusterTime": at(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": oid() },
        "updateDescription": { "updatedFields": { "n": 2 }, "removedFields": [], "truncatedArrays": [] },
        "fullDocument": Bson::Null,
    };
    let ChangeKind::Document { after, update, .. } = decode(event).unwrap().kind else { panic!() };
    assert_eq!(after, None);
    assert!(update.is_some());
}

#[test]
fn replace_is_an_update_with_the_whole_document() {
    let event = doc! {
        "_id": token(), "operationType": "replace", "clusterTime": at(), "wallTime": wall(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": oid() },
        "fullDocument": { "_id": oid(), "userName": "alice123", "name": "Alice" },
    };
    let ChangeKind::Document { op, after, update, .. } = decode(event).unwrap().kind else { panic!() };
    assert_eq!(op, Op::Update);
    assert_eq!(after, Some(doc! { "_id": oid(), "userName": "alice123", "name": "Alice" }));
    assert_eq!(update, None);
}

#[test]
fn delete_with_pre_image() {
    let event = doc! {
        "_id": token(), "operationType": "delete", "clusterTime": at(), "wallTime": wall(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": oid() },
        "fullDocumentBeforeChange": { "_id": oid(), "name": "Alice" },
    };
    let ChangeKind::Document { op, id, after, before, .. } = decode(event).unwrap().kind else { panic!() };
    assert_eq!((op, id), (Op::Delete, Bson::ObjectId(oid())));
    assert_eq!(after, None);
    assert_eq!(before, Some(doc! { "_id": oid(), "name": "Alice" }));
}

#[test]
fn sharded_document_key_keeps_the_id() {
    let event = doc! {
        "_id": token(), "operationType": "delete", "clusterTime": at(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "region": "eu", "_id": 42_i64 },
    };
    let ChangeKind::Document { id, .. } = decode(event).unwrap().kind else { panic!() };
    assert_eq!(id, Bson::Int64(42));
}

#[test]
fn transaction_events_carry_the_transaction_number() {
    let event = doc! {
        "_id": token(), "operationType": "insert", "clusterTime": at(),
        "lsid": { "id": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Uuid, bytes: vec![7; 16] } },
        "txnNumber": 12_i64,
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": 1_i32 },
        "fullDocument": { "_id": 1_i32 },
    };
    assert_eq!(decode(event).unwrap().txn, Some(12));
}

#[test]
fn drop_rename_invalidate_and_others() {
    let base = |op: &str| doc! { "_id": token(), "operationType": op, "clusterTime": at(), "wallTime": wall() };
    let mut drop = base("drop");
    drop.insert("ns", doc! { "db": "engineering", "coll": "users" });
    assert_eq!(decode(drop).unwrap().kind, ChangeKind::Dropped);
    assert_eq!(decode(base("dropDatabase")).unwrap().kind, ChangeKind::Dropped);
    let mut rename = base("rename");
    rename.insert("ns", doc! { "db": "engineering", "coll": "users" });
    rename.insert("to", doc! { "db": "engineering", "coll": "people" });
    assert_eq!(decode(rename).unwrap().kind, ChangeKind::Renamed { to: "engineering.people".into() });
    assert_eq!(decode(base("invalidate")).unwrap().kind, ChangeKind::Invalidate);
    assert_eq!(decode(base("createIndexes")).unwrap().kind, ChangeKind::Other("createIndexes".into()));
}

#[test]
fn malformed_events_say_what_is_wrong() {
    let no_token = doc! { "operationType": "insert" };
    assert!(decode(no_token).unwrap_err().what.contains("no _id"));
    let no_key = doc! { "_id": token(), "operationType": "delete", "clusterTime": at() };
    assert_eq!(decode(no_key).unwrap_err().to_string(), "change event delete: has no documentKey");
    let no_doc = doc! { "_id": token(), "operationType": "insert", "documentKey": { "_id": 1 } };
    assert_eq!(decode(no_doc).unwrap_err().to_string(), "change event insert: has no fullDocument");
}

#[test]
fn split_fragments_join_into_one_event_with_the_last_token() {
    let big = "x".repeat(64);
    let first = doc! {
        "_id": { "_data": "frag1" }, "splitEvent": { "fragment": 1, "of": 3 },
        "operationType": "update", "clusterTime": at(),
        "ns": { "db": "engineering", "coll": "users" },
        "documentKey": { "_id": oid() },
        "fullDocumentBeforeChange": { "_id": oid(), "blob": big.clone() },
    };
    let second = doc! {
        "_id": { "_data": "frag2" }, "splitEvent": { "fragment": 2, "of": 3 },
        "updateDescription": { "updatedFields": { "blob": "y" }, "removedFields": [], "truncatedArrays": [] },
    };
    let third = doc! {
        "_id": { "_data": "frag3" }, "splitEvent": { "fragment": 3, "of": 3 },
        "fullDocument": { "_id": oid(), "blob": "y" },
    };
    let mut r = Reassembly::default();
    assert_eq!(r.push(first).unwrap(), None);
    assert_eq!(r.push(second).unwrap(), None);
    let whole = r.push(third).unwrap().expect("complete");
    let c = decode(whole).unwrap();
    assert_eq!(c.token, doc! { "_data": "frag3" });
    let ChangeKind::Document { after, before, update, .. } = c.kind else { panic!() };
    assert_eq!(after, Some(doc! { "_id": oid(), "blob": "y" }));
    assert_eq!(before, Some(doc! { "_id": oid(), "blob": big }));
    assert_eq!(update.unwrap().get_document("updatedFields").unwrap(), &doc! { "blob": "y" });
    // Whole events pass straight through.
    assert!(r.push(doc! { "_id": token(), "operationType": "drop" }).unwrap().is_some());
}

#[test]
fn fragments_out_of_order_are_an_error() {
    let mut r = Reassembly::default();
    let second = doc! { "_id": { "_data": "f2" }, "splitEvent": { "fragment": 2, "of": 2 } };
    assert!(r.push(second).unwrap_err().what.contains("fragment 1 was due"));
}

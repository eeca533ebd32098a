use super::*;
use crate::event::{Column, Position, TableId};

fn column(name: &str, ty: ColumnType, key: bool) -> Column {
    Column { name: name.into(), ty, key, toastable: false }
}

fn orders() -> TableSchema {
    TableSchema {
        table: TableId::new("public", "orders"),
        columns: vec![
            column("id", ColumnType::Int64, true),
            column("amount", ColumnType::Numeric(Some((12, 2))), false),
            column("placed", ColumnType::TimestampTz, false),
            column("day", ColumnType::Date, false),
            column("tags", ColumnType::Array(Box::new(ColumnType::Text)), false),
            column("doc", ColumnType::Json, false),
            column("raw", ColumnType::Bytes, false),
            column("at", ColumnType::TimeTz, false),
            column("wait", ColumnType::Interval, false),
            column("ratio", ColumnType::Float64, false),
        ],
        toast_target: 0,
    }
}

fn event(op: Op, before: Option<Vec<Value>>, after: Option<Vec<Value>>, position: Position) -> ChangeEvent {
    ChangeEvent {
        table: TableId::new("public", "orders"),
        schema_id: 1,
        op,
        key: if op == Op::Truncate { vec![] } else { vec![Value::Int(7)] },
        before,
        after,
        position,
        commit_ts_us: 1_700_000_000_123_456,
        tx_id: Some(812),
        toast_fetched: false,
        snapshot_last: false,
        origin: None,
    }
}

fn row() -> Vec<Value> {
    vec![
        Value::Int(7),
        Value::Numeric("1234.50".into()),
        Value::TimestampTz(1_700_000_000_123_456),
        Value::Date(19_675),
        Value::Array(vec![Value::Text("a\"b".into()), Value::Null]),
        Value::Json("{\"k\": [1, 2]}".into()),
        Value::Bytes(vec![0, 255, 16]),
        Value::TimeTz(3_600_000_000, 3600),
        Value::Interval(Interval { months: 1, days: 2, micros: 3 }),
        Value::Float(f64::NAN),
    ]
}

fn writer(flavor: Flavor, schemas: bool) -> EnvelopeWriter {
    EnvelopeWriter { flavor, name: "shop".into(), db: "cdc".into(), schemas }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

#[test]
fn an_insert_is_debeziums_create_with_every_type_in_its_default_form() {
    let w = writer(Flavor::Postgres, false);
    let e = event(Op::Insert, None, Some(row()), Position::change(0x1_6B37_4D48, 0));
    assert_eq!(String::from_utf8(w.key(&orders(), &e).unwrap()).unwrap(), r#"{"id":7}"#);
    let value = String::from_utf8(w.value(&orders(), &e, 1_700_000_001_000)).unwrap();
    assert_eq!(
        value,
        concat!(
            r#"{"before":null,"after":{"id":7,"amount":"1234.50","placed":"2023-11-14T22:13:20.123456Z","#,
            r#""day":19675,"tags":["a\"b",null],"doc":"{\"k\": [1, 2]}","raw":"AP8Q","at":"00:00:00Z","#,
            r#""wait":2802600000003,"ratio":"NaN"},"source":{"version":"sluice-"#,
            env!("CARGO_PKG_VERSION"),
            r#"","connector":"postgresql","name":"shop","ts_ms":1700000000123,"snapshot":"false","#,
            r#""db":"cdc","schema":"public","table":"orders","txId":812,"lsn":6093753672,"xmin":null},"#,
            r#""op":"c","ts_ms":1700000001000,"transaction":null}"#
        )
    );
    // 1 month (30.4375 days) + 2 days + 3 µs, as Debezium's MicroDuration counts it.
    assert_eq!(((30.4375 + 2.0) * 86_400_000_000.0) as i64 + 3, 2_802_600_000_003);
}

#[test]
fn updates_deletes_reads_and_truncates_carry_their_op_and_images() {
    let w = writer(Flavor::Postgres, false);
    let value = |e: &ChangeEvent| json(&w.value(&orders(), e, 0));
    let update = event(Op::Update, Some(row()), Some(row()), Position::change(10, 1));
    assert_eq!(value(&update)["op"], "u");
    assert_eq!(value(&update)["before"]["id"], 7);
    let delete = event(Op::Delete, Some(row()), None, Position::change(10, 2));
    assert_eq!(value(&delete)["op"], "d");
    assert_eq!(value(&delete)["after"], serde_json::Value::Null);
    assert_eq!(value(&delete)["before"]["amount"], "1234.50");
    let mut read = event(Op::Read, None, Some(row()), Position::snapshot(10, 5));
    assert_eq!(value(&read)["op"], "r");
    assert_eq!(value(&read)["source"]["snapshot"], "true");
    read.snapshot_last = true;
    assert_eq!(value(&read)["source"]["snapshot"], "last");
    let truncate = event(Op::Truncate, None, None, Position::change(11, 0));
    assert_eq!(value(&truncate)["op"], "t");
    assert_eq!(w.key(&orders(), &truncate), None);
}

#[test]
fn embedded_schemas_describe_key_and_value_as_kafka_connect_does() {
    let w = writer(Flavor::Postgres, true);
    let e = event(Op::Insert, None, Some(row()), Position::change(10, 0));
    let key = json(&w.key(&orders(), &e).unwrap());
    assert_eq!(key["payload"], serde_json::json!({"id": 7}));
    assert_eq!(
        key["schema"],
        serde_json::json!({"type": "struct", "fields": [{"type": "int64", "optional": false, "field": "id"}],
            "optional": false, "name": "shop.public.orders.Key"})
    );
    let value = json(&w.value(&orders(), &e, 0));
    assert_eq!(value["payload"]["after"]["id"], 7);
    let schema = &value["schema"];
    assert_eq!(schema["name"], "shop.public.orders.Envelope");
    let after = &schema["fields"][1];
    assert_eq!(after["field"], "after");
    assert_eq!(after["name"], "shop.public.orders.Value");
    let field = |name: &str| after["fields"].as_array().unwrap().iter().find(|f| f["field"] == name).unwrap().clone();
    assert_eq!(field("placed")["name"], "io.debezium.time.ZonedTimestamp");
    assert_eq!(field("day")["name"], "io.debezium.time.Date");
    assert_eq!(field("tags")["type"], "array");
    assert_eq!(field("amount")["type"], "string");
    assert_eq!(field("id")["optional"], false);
    assert_eq!(schema["fields"][2]["name"], "io.debezium.connector.postgresql.Source");
}

#[test]
fn mongodb_documents_follow_the_mongodb_connector() {
    let w = EnvelopeWriter { flavor: Flavor::Mongo, name: "shop".into(), db: "shop".into(), schemas: false };
    let schema = crate::connectors::mongo::document::collection_schema(TableId::new("shop", "orders"));
    let id = Value::Json(r#"{"$oid":"5f1d7e1b2c9a4b0001a1b2c3"}"#.into());
    let e = ChangeEvent {
        table: TableId::new("shop", "orders"),
        schema_id: 1,
        op: Op::Update,
        key: vec![id.clone()],
        before: None,
        after: Some(vec![
            id,
            Value::Json(r#"{"_id":{"$oid":"5f1d7e1b2c9a4b0001a1b2c3"},"qty":3}"#.into()),
            Value::Json(r#"{"updatedFields":{"qty":3},"removedFields":["old"],"truncatedArrays":[]}"#.into()),
        ]),
        position: Position::change((1_700_000_000 << 32) | 4, 0),
        commit_ts_us: 1_700_000_000_000_000,
        tx_id: None,
        toast_fetched: false,
        snapshot_last: false,
        origin: None,
    };
    assert_eq!(
        String::from_utf8(w.key(&schema, &e).unwrap()).unwrap(),
        r#"{"id":"{\"$oid\":\"5f1d7e1b2c9a4b0001a1b2c3\"}"}"#
    );
    let value = json(&w.value(&schema, &e, 5));
    assert_eq!(value["after"], r#"{"_id":{"$oid":"5f1d7e1b2c9a4b0001a1b2c3"},"qty":3}"#);
    assert_eq!(value["updateDescription"]["updatedFields"], r#"{"qty":3}"#);
    assert_eq!(value["updateDescription"]["removedFields"], serde_json::json!(["old"]));
    assert_eq!(value["op"], "u");
    assert_eq!(value["source"]["connector"], "mongodb");
    assert_eq!(value["source"]["collection"], "orders");
    assert_eq!(value["source"]["ord"], 4);
}

use super::*;
use crate::connectors::kafka::envelope::{EnvelopeWriter, Flavor};
use crate::event::Phase;

fn origin(offset: i64) -> Origin<'static> {
    Origin { topic: "dbserver1.inventory.customers", partition: 0, offset }
}

fn decode(d: &mut DebeziumDecoder, key: &str, value: &str) -> (ChangeEvent, TableSchema) {
    d.decode(&origin(41), Some(key.as_bytes()), Some(value.as_bytes())).unwrap().unwrap()
}

/// The create event of Debezium's PostgreSQL connector documentation, with its schema.
const CREATE_WITH_SCHEMA: &str = r#"{
  "schema": {"type": "struct", "optional": false, "name": "dbserver1.inventory.customers.Envelope", "fields": [
    {"type": "struct", "optional": true, "name": "dbserver1.inventory.customers.Value", "field": "before", "fields": [
      {"type": "int32", "optional": false, "field": "id"},
      {"type": "string", "optional": false, "field": "first_name"},
      {"type": "string", "optional": false, "field": "last_name"},
      {"type": "string", "optional": false, "field": "email"}]},
    {"type": "struct", "optional": true, "name": "dbserver1.inventory.customers.Value", "field": "after", "fields": [
      {"type": "int32", "optional": false, "field": "id"},
      {"type": "string", "optional": false, "field": "first_name"},
      {"type": "string", "optional": false, "field": "last_name"},
      {"type": "string", "optional": false, "field": "email"}]},
    {"type": "struct", "optional": false, "name": "io.debezium.connector.postgresql.Source", "field": "source", "fields": []},
    {"type": "string", "optional": false, "field": "op"},
    {"type": "int64", "optional": true, "field": "ts_ms"}]},
  "payload": {
    "before": null,
    "after": {"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"},
    "source": {"version": "2.5.4.Final", "connector": "postgresql", "name": "PostgreSQL_server",
      "ts_ms": 1559033904863, "snapshot": "false", "db": "postgres", "sequence": "[\"24023119\",\"24023128\"]",
      "schema": "public", "table": "customers", "txId": 555, "lsn": 24023128, "xmin": null},
    "op": "c",
    "ts_ms": 1559033904863
  }
}"#;

#[test]
fn reads_the_documented_create_event_with_its_schema() {
    let mut d = DebeziumDecoder::default();
    let key = r#"{"schema":{"type":"struct","name":"dbserver1.inventory.customers.Key","optional":false,"fields":[{"field":"id","type":"int32","optional":false}]},"payload":{"id":1}}"#;
    let (event, schema) = decode(&mut d, key, CREATE_WITH_SCHEMA);
    assert_eq!(event.table, TableId::new("public", "customers"));
    assert_eq!(event.op, Op::Insert);
    assert_eq!(event.key, vec![Value::Int(1)]);
    assert_eq!(
        event.after,
        Some(vec![
            Value::Int(1),
            Value::Text("Anne".into()),
            Value::Text("Kretchmar".into()),
            Value::Text("annek@noanswer.org".into())
        ])
    );
    assert_eq!(event.before, None);
    assert_eq!(event.position, Position { lsn: 24023128, phase: Phase::Change, seq: 41 });
    assert_eq!(event.commit_ts_us, 1_559_033_904_863_000);
    assert_eq!(event.tx_id, Some(555));
    let types: Vec<(&str, &ColumnType, bool)> =
        schema.columns.iter().map(|c| (c.name.as_str(), &c.ty, c.key)).collect();
    assert_eq!(
        types,
        vec![
            ("id", &ColumnType::Int32, true),
            ("first_name", &ColumnType::Text, false),
            ("last_name", &ColumnType::Text, false),
            ("email", &ColumnType::Text, false)
        ]
    );
}

#[test]
fn reads_schemaless_updates_deletes_and_tombstones() {
    let mut d = DebeziumDecoder::default();
    let update = r#"{"before":{"id":1,"email":"a@x","score":1.5,"vip":null},"after":{"id":1,"email":"b@x","score":2.5,"vip":true},
        "source":{"connector":"postgresql","schema":"public","table":"customers","lsn":900,"txId":7,"ts_ms":1000,"snapshot":"false"},
        "op":"u","ts_ms":1001}"#;
    let (event, schema) = decode(&mut d, r#"{"id":1}"#, update);
    assert_eq!(event.op, Op::Update);
    assert_eq!(event.key, vec![Value::Int(1)]);
    assert_eq!(event.after, Some(vec![Value::Int(1), Value::Text("b@x".into()), Value::Float(2.5), Value::Bool(true)]));
    assert_eq!(event.before, Some(vec![Value::Int(1), Value::Text("a@x".into()), Value::Float(1.5), Value::Null]));
    assert_eq!(schema.columns[3].ty, ColumnType::Bool);
    // A delete whose columns are null keeps the types the table had.
    let delete = r#"{"before":{"id":1,"email":null,"score":null,"vip":null},"after":null,
        "source":{"schema":"public","table":"customers","lsn":950,"snapshot":"last"},"op":"d","ts_ms":1002}"#;
    let (event, schema) = decode(&mut d, r#"{"id":1}"#, delete);
    assert_eq!(event.op, Op::Delete);
    assert_eq!(event.key, vec![Value::Int(1)]);
    assert_eq!(event.after, None);
    assert!(event.snapshot_last);
    assert_eq!(event.commit_ts_us, 1_002_000);
    let types: Vec<&ColumnType> = schema.columns.iter().map(|c| &c.ty).collect();
    assert_eq!(types, vec![&ColumnType::Int64, &ColumnType::Text, &ColumnType::Float64, &ColumnType::Bool]);
    assert!(d.decode(&origin(43), Some(br#"{"id":1}"#), None).unwrap().is_none());
}

#[test]
fn reads_logical_types_from_the_schema() {
    let mut d = DebeziumDecoder::default();
    let value = r#"{"schema":{"type":"struct","fields":[{"type":"struct","field":"after","fields":[
        {"type":"int64","field":"id"},
        {"type":"bytes","name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2"},"field":"price"},
        {"type":"struct","name":"io.debezium.data.VariableScaleDecimal","field":"ratio"},
        {"type":"int32","name":"io.debezium.time.Date","field":"day"},
        {"type":"int64","name":"io.debezium.time.Timestamp","field":"ms"},
        {"type":"int64","name":"io.debezium.time.NanoTimestamp","field":"ns"},
        {"type":"string","name":"io.debezium.time.ZonedTimestamp","field":"at"},
        {"type":"string","name":"io.debezium.data.Uuid","field":"uid"},
        {"type":"bytes","field":"raw"},
        {"type":"array","items":{"type":"int32"},"field":"ints"}]}]},
      "payload":{"before":null,"after":{"id":5,"price":"PIw=","ratio":{"scale":3,"value":"/w=="},
        "day":19675,"ms":1700000000123,"ns":1700000000123456789,"at":"2023-11-14T22:13:20.123456Z",
        "uid":"67e55044-10b1-426f-9247-bb680e5fe0c8","raw":"AP8Q","ints":[1,null,3]},
        "source":{"schema":"public","table":"items"},"op":"r","ts_ms":5}}"#;
    let (event, _) = decode(&mut d, r#"{"id":5}"#, value);
    assert_eq!(event.op, Op::Read);
    assert_eq!(event.position.phase, Phase::Snapshot);
    let after = event.after.unwrap();
    assert_eq!(after[1], Value::Numeric("155.00".into()));
    assert_eq!(after[2], Value::Numeric("-0.001".into()));
    assert_eq!(after[3], Value::Date(19675));
    assert_eq!(after[4], Value::Timestamp(1_700_000_000_123_000));
    assert_eq!(after[5], Value::Timestamp(1_700_000_000_123_456));
    assert_eq!(after[6], Value::TimestampTz(1_700_000_000_123_456));
    assert_eq!(
        after[7],
        Value::Uuid(*uuid::Uuid::parse_str("67e55044-10b1-426f-9247-bb680e5fe0c8").unwrap().as_bytes())
    );
    assert_eq!(after[8], Value::Bytes(vec![0, 255, 16]));
    assert_eq!(after[9], Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]));
}

#[test]
fn decimal_bytes_in_the_schema_parameters_scale() {
    assert_eq!(numeric(&serde_json::json!({"scale": 0, "value": "AQ=="}), Unit::Micros).unwrap(), "1");
    assert_eq!(numeric(&serde_json::json!("AQ=="), Unit::Scale(4)).unwrap(), "0.0001");
    assert_eq!(numeric(&serde_json::json!("gAA="), Unit::Scale(1)).unwrap(), "-3276.8");
    assert_eq!(numeric(&serde_json::json!("12.50"), Unit::Micros).unwrap(), "12.50");
}

#[test]
fn reads_back_what_sluice_writes_with_schemas() {
    let schema = TableSchema {
        table: TableId::new("public", "orders"),
        columns: vec![
            Column { name: "id".into(), ty: ColumnType::Int64, key: true, toastable: false },
            Column { name: "placed".into(), ty: ColumnType::TimestampTz, key: false, toastable: false },
            Column { name: "day".into(), ty: ColumnType::Date, key: false, toastable: false },
            Column { name: "doc".into(), ty: ColumnType::Json, key: false, toastable: false },
            Column { name: "raw".into(), ty: ColumnType::Bytes, key: false, toastable: false },
            Column {
                name: "tags".into(),
                ty: ColumnType::Array(Box::new(ColumnType::Text)),
                key: false,
                toastable: false,
            },
        ],
        toast_target: 0,
    };
    let row = vec![
        Value::Int(7),
        Value::TimestampTz(1_700_000_000_123_456),
        Value::Date(19_675),
        Value::Json("{\"k\": [1, 2]}".into()),
        Value::Bytes(vec![0, 255, 16]),
        Value::Array(vec![Value::Text("a\"b".into()), Value::Null]),
    ];
    let written = ChangeEvent {
        table: schema.table.clone(),
        schema_id: 1,
        op: Op::Update,
        key: vec![Value::Int(7)],
        before: None,
        after: Some(row.clone()),
        position: Position::change(0x1_0000_0000, 3),
        commit_ts_us: 1_700_000_000_123_000,
        tx_id: Some(812),
        toast_fetched: false,
        snapshot_last: false,
        origin: None,
    };
    let writer = EnvelopeWriter { flavor: Flavor::Postgres, name: "shop".into(), db: "cdc".into(), schemas: true };
    let key = writer.key(&schema, &written).unwrap();
    let value = writer.value(&schema, &written, 1_700_000_000_200);
    let mut d = DebeziumDecoder::default();
    let (read, read_schema) = d.decode(&origin(9), Some(&key), Some(&value)).unwrap().unwrap();
    assert_eq!(read_schema.columns, schema.columns);
    assert_eq!(read.after, Some(row));
    assert_eq!(read.key, written.key);
    assert_eq!(read.tx_id, Some(812));
    assert_eq!(read.commit_ts_us, written.commit_ts_us);
}

#[test]
fn refuses_what_is_not_an_envelope() {
    let mut d = DebeziumDecoder::default();
    let err = d.decode(&origin(3), None, Some(b"hello")).unwrap_err().to_string();
    assert!(err.contains("dbserver1.inventory.customers[0] offset 3: not a Debezium change record"), "{err}");
    let err = d.decode(&origin(4), None, Some(br#"{"after":{}}"#)).unwrap_err().to_string();
    assert!(err.contains("it has no `op`"), "{err}");
}

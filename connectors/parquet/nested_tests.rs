use super::{parse, Shape};
use arrow::array::*;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Decimal128, Regex, Timestamp};
use std::str::FromStr;

/// Each row of an array as text, the way a reader of the file shows it.
fn shown(array: &ArrayRef) -> Vec<String> {
    let f = ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default().with_null("null")).unwrap();
    (0..array.len()).map(|i| f.value(i).to_string()).collect()
}

fn written(shape: &Shape, values: &[Bson]) -> Vec<String> {
    let refs: Vec<Option<&Bson>> = values.iter().map(Some).collect();
    shown(&shape.array(&refs).unwrap())
}

#[test]
fn every_bson_type_gets_its_own_column_type_and_exact_value() {
    let d = doc! {
        "_id": ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap(),
        "price": Decimal128::from_str("12345678901234567890.123456789").unwrap(),
        "i32": 7_i32,
        "i64": 9_007_199_254_740_993_i64,
        "f64": 1.5_f64,
        "at": DateTime::from_millis(1_700_000_000_123),
        "ts": Timestamp { time: 1_700_000_000, increment: 3 },
        "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 254, 255] },
        "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: vec![0x11; 16] },
        "re": Regex { pattern: "^a.c$".into(), options: "i".into() },
        "ok": true,
        "nested": { "list": [1_i32, 2_i32], "name": "x" },
    };
    let shape = Shape::of(&Bson::Document(d.clone()));
    let Shape::Struct(fields) = &shape else { panic!("{shape:?}") };
    let types: Vec<(&str, DataType)> =
        fields.iter().map(|(n, s)| (n.as_str(), s.field(n).data_type().clone())).collect();
    assert_eq!(
        types.iter().map(|(n, t)| format!("{n}:{t}")).collect::<Vec<_>>(),
        [
            "_id:Utf8",
            "price:Utf8",
            "i32:Int32",
            "i64:Int64",
            "f64:Float64",
            "at:Timestamp(ms, \"UTC\")",
            "ts:Struct(\"time\": non-null UInt32, \"increment\": non-null UInt32)",
            "bin:Binary",
            "uuid:FixedSizeBinary(16)",
            "re:Struct(\"pattern\": non-null Utf8, \"options\": non-null Utf8)",
            "ok:Boolean",
            "nested:Struct(\"list\": List(Int32), \"name\": Utf8)",
        ]
    );
    assert_eq!(
        written(&shape, &[Bson::Document(d)]),
        ["{_id: 64b7f0c2a1b2c3d4e5f60718, price: 12345678901234567890.123456789, i32: 7, i64: 9007199254740993, \
          f64: 1.5, at: 2023-11-14T22:13:20.123Z, ts: {time: 1700000000, increment: 3}, bin: 0001feff, \
          uuid: 11111111111111111111111111111111, re: {pattern: ^a.c$, options: i}, ok: true, \
          nested: {list: [1, 2], name: x}}"]
    );
}

#[test]
fn shapes_widen_only_where_no_value_changes() {
    use Shape::*;
    assert_eq!(Int32.unify(Int64), Int64);
    assert_eq!(Int32.unify(Double), Double);
    // An Int64 above 2^53 is not exact as a double: the field keeps each value's own text.
    assert_eq!(Int64.unify(Double), Json);
    assert_eq!(Text.unify(Int32), Json);
    assert_eq!(Null.unify(Text), Text);
    assert_eq!(List(Box::new(Null)).unify(List(Box::new(Int32))), List(Box::new(Int32)));
    let a = Struct(vec![("a".into(), Int32), ("b".into(), Text)]);
    let b = Struct(vec![("c".into(), Bool), ("a".into(), Int64)]);
    assert_eq!(a.unify(b), Struct(vec![("a".into(), Int64), ("b".into(), Text), ("c".into(), Bool)]));
}

#[test]
fn conflicting_values_keep_their_extended_json_text() {
    let values = [Bson::Int32(1), Bson::String("one".into()), Bson::Int64(9_007_199_254_740_993), Bson::Double(0.5)];
    let shape = values.iter().fold(Shape::Null, |acc, v| acc.unify(Shape::of(v)));
    assert_eq!(shape, Shape::Json);
    assert_eq!(written(&shape, &values), ["1", "\"one\"", "9007199254740993", "0.5"]);
}

#[test]
fn missing_fields_and_nulls_are_null_and_empty_documents_stay_text() {
    let rows =
        [Bson::Document(doc! { "a": 1_i32, "e": {} }), Bson::Document(doc! { "b": "x", "a": Bson::Null }), Bson::Null];
    let shape = rows.iter().fold(Shape::Null, |acc, v| acc.unify(Shape::of(v)));
    assert_eq!(written(&shape, &rows), ["{a: 1, e: {}, b: null}", "{a: null, e: null, b: x}", "null"]);
}

#[test]
fn extended_json_is_read_back_as_bson_and_plain_json_as_plain() {
    let text = r#"{"_id":{"$oid":"64b7f0c2a1b2c3d4e5f60718"},"n":{"$numberDecimal":"1.10"},"at":{"$date":"2023-11-14T22:13:20.123Z"},"i":5}"#;
    let bson = parse(text, true).unwrap();
    assert_eq!(
        bson,
        Bson::Document(doc! {
            "_id": ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap(),
            "n": Decimal128::from_str("1.10").unwrap(),
            "at": DateTime::from_millis(1_700_000_000_123),
            "i": 5_i32,
        })
    );
    // PostgreSQL JSON: `$` keys are ordinary keys, every integer an Int64.
    assert_eq!(parse(r#"{"$oid":"x","i":5}"#, false).unwrap(), Bson::Document(doc! { "$oid": "x", "i": 5_i64 }));
    assert!(parse("{not json", true).unwrap_err().starts_with("not JSON"));
}

/// Small JSON documents: scalars of every JSON kind, arrays and objects over a few keys.
fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i32>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (-1e6f64..1e6).prop_map(serde_json::Value::from),
        "[a-z]{0,3}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map("[abc]", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    /// The union of any values' shapes holds each of them, and all of them can be written in it.
    #[test]
    fn a_unified_shape_holds_and_writes_every_value(values in proptest::collection::vec(json_value(), 1..6)) {
        let values: Vec<Bson> = values.into_iter().map(|v| parse(&v.to_string(), true).unwrap()).collect();
        let shape = values.iter().fold(Shape::Null, |acc, v| acc.unify(Shape::of(v)));
        for v in &values {
            proptest::prop_assert!(shape.holds(&Shape::of(v)), "{:?} does not hold {:?}", shape, v);
        }
        let refs: Vec<Option<&Bson>> = values.iter().map(Some).collect();
        let array = shape.array(&refs).map_err(proptest::test_runner::TestCaseError::fail)?;
        proptest::prop_assert_eq!(array.len(), values.len());
    }
}

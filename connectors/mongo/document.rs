//! BSON documents as rows of the change-event model.
//!
//! A collection has no fixed schema, so every collection maps to the same three columns:
//! `_id` (the key), `document` and `update_description`, each Extended JSON v2 text. That is
//! the layout Debezium's MongoDB connector emits (`after` as a JSON string), and it keeps every
//! BSON type exactly: Decimal128 as its decimal text, dates, timestamps, binary, UUID, regex and
//! nested documents and arrays as their Extended JSON forms. `json: canonical` also keeps Int32,
//! Int64 and Double apart (`{"$numberInt": "1"}`); relaxed writes them as JSON numbers.

use crate::config::JsonMode;
use crate::event::{Column, ColumnType, TableId, TableSchema, Value};
use mongodb::bson::{Bson, Document};

/// Column positions in every collection's schema.
pub const ID: usize = 0;
pub const DOCUMENT: usize = 1;
pub const UPDATE_DESCRIPTION: usize = 2;

/// The schema of a captured collection.
pub fn collection_schema(table: TableId) -> TableSchema {
    let column = |name: &str, key: bool| Column { name: name.into(), ty: ColumnType::Json, key, toastable: false };
    TableSchema {
        table,
        columns: vec![column("_id", true), column("document", false), column("update_description", false)],
        toast_target: 0,
    }
}

/// Writes BSON as Extended JSON text in one mode.
#[derive(Debug, Clone, Copy)]
pub struct JsonWriter(pub JsonMode);

impl JsonWriter {
    /// A value as Extended JSON text. Field order is kept.
    pub fn text(self, value: Bson) -> String {
        let json = match self.0 {
            JsonMode::Relaxed => value.into_relaxed_extjson(),
            JsonMode::Canonical => value.into_canonical_extjson(),
        };
        json.to_string()
    }

    /// The key of a document: its `_id`, always relaxed so that an Int32 and an Int64 `_id` of
    /// the same number (one key to MongoDB) are one key here too.
    pub fn key(self, id: Bson) -> Value {
        Value::Json(id.into_relaxed_extjson().to_string())
    }

    /// A row: the `_id`, the whole document (when known) and, for an update, what changed.
    pub fn row(self, id: &Bson, document: Option<Document>, update: Option<Document>) -> Vec<Value> {
        let json = |d: Option<Document>| d.map(|d| Value::Json(self.text(Bson::Document(d)))).unwrap_or(Value::Null);
        vec![self.key(id.clone()), json(document), json(update)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, DateTime, Decimal128, Regex, Timestamp};
    use std::str::FromStr;

    fn every_type() -> Document {
        doc! {
            "_id": ObjectId::parse_str("64b7f0c2a1b2c3d4e5f60718").unwrap(),
            "price": Decimal128::from_str("12345678901234567890.123456789").unwrap(),
            "i32": 7_i32,
            "i64": 9_007_199_254_740_993_i64,
            "f64": 1.0_f64,
            "at": DateTime::from_millis(1_700_000_000_123),
            "ts": Timestamp { time: 1_700_000_000, increment: 3 },
            "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 254, 255] },
            "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: vec![0x11; 16] },
            "re": Regex { pattern: "^a.c$".into(), options: "i".into() },
            "nested": { "list": [1_i32, { "deep": "x" }, []], "empty": {} },
        }
    }

    #[test]
    fn relaxed_text_keeps_every_bson_value_exactly() {
        let text = JsonWriter(JsonMode::Relaxed).text(Bson::Document(every_type()));
        assert_eq!(
            text,
            concat!(
                r#"{"_id":{"$oid":"64b7f0c2a1b2c3d4e5f60718"},"#,
                r#""price":{"$numberDecimal":"12345678901234567890.123456789"},"#,
                r#""i32":7,"i64":9007199254740993,"f64":1.0,"#,
                r#""at":{"$date":"2023-11-14T22:13:20.123Z"},"#,
                r#""ts":{"$timestamp":{"t":1700000000,"i":3}},"#,
                r#""bin":{"$binary":{"base64":"AAH+/w==","subType":"00"}},"#,
                r#""uuid":{"$binary":{"base64":"EREREREREREREREREREREQ==","subType":"04"}},"#,
                r#""re":{"$regularExpression":{"pattern":"^a.c$","options":"i"}},"#,
                r#""nested":{"list":[1,{"deep":"x"},[]],"empty":{}}}"#
            )
        );
    }

    #[test]
    fn canonical_text_tells_the_number_types_apart() {
        let text = JsonWriter(JsonMode::Canonical).text(Bson::Document(every_type()));
        assert!(text.contains(r#""i32":{"$numberInt":"7"}"#), "{text}");
        assert!(text.contains(r#""i64":{"$numberLong":"9007199254740993"}"#), "{text}");
        assert!(text.contains(r#""f64":{"$numberDouble":"1.0"}"#), "{text}");
        assert!(text.contains(r#""at":{"$date":{"$numberLong":"1700000000123"}}"#), "{text}");
        // Round trip: canonical Extended JSON parses back to the same document.
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(Bson::try_from(parsed).unwrap(), Bson::Document(every_type()));
    }

    #[test]
    fn int32_and_int64_ids_of_one_number_are_one_key() {
        let w = JsonWriter(JsonMode::Canonical);
        assert_eq!(w.key(Bson::Int32(5)), w.key(Bson::Int64(5)));
        assert_ne!(w.key(Bson::Int32(5)), w.key(Bson::String("5".into())));
    }
}

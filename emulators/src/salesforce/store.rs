//! sObject records of one Salesforce org: upsert and delete by an external ID field, with the
//! per-record validation results of the real API (`statusCode`, `message`, `fields`; see
//! `shared/reference/crm-erp-contracts.md`, section 1).

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A per-record failure, as sObject Collections and Bulk API 2.0 report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub status_code: String,
    pub message: String,
    pub fields: Vec<String>,
}

impl RecordError {
    pub fn new(status_code: &str, message: impl Into<String>, fields: Vec<String>) -> Self {
        Self { status_code: status_code.into(), message: message.into(), fields }
    }

    /// The Collections envelope: `statusCode`, not `errorCode`.
    pub fn to_json(&self) -> Value {
        json!({"statusCode": self.status_code, "message": self.message, "fields": self.fields})
    }
}

/// How an upsert matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upserted {
    Created(String),
    Updated(String),
}

/// Why an upsert or delete by external ID did not happen (beyond field validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Record(RecordError),
    /// The external ID matched several records (REST: 300 with their URLs).
    MultipleMatches(Vec<String>),
    NotFound,
}

/// The declared shape of an object: what the org's field definitions would refuse.
#[derive(Debug, Default, Clone)]
pub struct Schema {
    /// Fields usable as external IDs (Unique + External ID).
    pub external_ids: BTreeSet<String>,
    /// Fields a created record must have.
    pub required: Vec<String>,
    /// Maximum lengths of text fields.
    pub max_length: HashMap<String, usize>,
    /// When set, the only writable fields; others are refused with INVALID_FIELD.
    pub fields: Option<BTreeSet<String>>,
}

/// One sObject type.
#[derive(Debug, Default, Clone)]
pub struct SObjectType {
    pub schema: Schema,
    /// Records by Id.
    pub records: BTreeMap<String, Map<String, Value>>,
    /// (external ID field, value) -> Ids; more than one only for seeded duplicates.
    index: HashMap<(String, String), Vec<String>>,
}

/// The three-letter key prefix of standard objects; custom objects get `a0X`.
fn key_prefix(object: &str) -> &'static str {
    match object {
        "Account" => "001",
        "Contact" => "003",
        "Lead" => "00Q",
        "Opportunity" => "006",
        _ => "a0X",
    }
}

/// An 18-character Id: prefix, a 12-character serial and the case-safe checksum Salesforce
/// appends to 15-character Ids (one letter per 5-character chunk, a bit per uppercase letter).
pub fn record_id(prefix: &str, serial: u64) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut body = vec![b'0'; 12];
    let mut n = serial;
    for slot in body.iter_mut().rev() {
        *slot = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    let id15 = format!("{prefix}{}", String::from_utf8(body).expect("ascii"));
    let suffix: String = id15
        .as_bytes()
        .chunks(5)
        .map(|chunk| {
            let bits = chunk.iter().enumerate().fold(0, |acc, (i, c)| acc | (usize::from(c.is_ascii_uppercase()) << i));
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits] as char
        })
        .collect();
    format!("{id15}{suffix}")
}

/// A field value as the text it would have in Salesforce (for external ID matching).
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

impl SObjectType {
    /// An empty object of this shape.
    pub fn new(schema: Schema) -> Self {
        Self { schema, ..Default::default() }
    }

    /// Replaces the object's shape, keeping its records.
    pub fn set_schema(&mut self, schema: Schema) {
        self.schema = schema;
        self.index.clear();
        let records: Vec<(String, Map<String, Value>)> =
            self.records.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (id, record) in &records {
            self.reindex(id, None, Some(record));
        }
    }

    /// Checks `fields` against the schema; `creating` adds the required-field check.
    fn validate(&self, fields: &Map<String, Value>, creating: bool) -> Result<(), RecordError> {
        if creating {
            let missing: Vec<String> =
                self.schema.required.iter().filter(|f| fields.get(*f).is_none_or(Value::is_null)).cloned().collect();
            if !missing.is_empty() {
                return Err(RecordError::new(
                    "REQUIRED_FIELD_MISSING",
                    format!("Required fields are missing: [{}]", missing.join(", ")),
                    missing,
                ));
            }
        }
        for (name, value) in fields {
            if let (Some(max), Some(s)) = (self.schema.max_length.get(name), value.as_str()) {
                if s.chars().count() > *max {
                    return Err(RecordError::new(
                        "STRING_TOO_LONG",
                        format!("{name}: data value too large: {s} (max length={max})"),
                        vec![name.clone()],
                    ));
                }
            }
        }
        Ok(())
    }

    /// The first field not in a strict schema, for the request-level INVALID_FIELD.
    pub fn unknown_field<'a>(&self, fields: impl Iterator<Item = &'a String>) -> Option<String> {
        let allowed = self.schema.fields.as_ref()?;
        fields
            .filter(|f| *f != "attributes")
            .find(|f| !allowed.contains(*f) && !self.schema.external_ids.contains(*f))
            .cloned()
    }

    pub fn is_external_id(&self, field: &str) -> bool {
        self.schema.external_ids.contains(field)
    }

    fn matches(&self, field: &str, value: &str) -> &[String] {
        self.index.get(&(field.to_string(), value.to_string())).map(Vec::as_slice).unwrap_or(&[])
    }

    fn reindex(&mut self, id: &str, old: Option<&Map<String, Value>>, new: Option<&Map<String, Value>>) {
        for field in self.schema.external_ids.clone() {
            if let Some(v) = old.and_then(|o| o.get(&field)).and_then(text) {
                if let Some(ids) = self.index.get_mut(&(field.clone(), v.clone())) {
                    ids.retain(|i| i != id);
                    if ids.is_empty() {
                        self.index.remove(&(field.clone(), v));
                    }
                }
            }
            if let Some(v) = new.and_then(|n| n.get(&field)).and_then(text) {
                self.index.entry((field.clone(), v)).or_default().push(id.to_string());
            }
        }
    }

    /// Inserts a record as is (the control plane's seeding; duplicates allowed).
    pub fn seed(&mut self, object: &str, serial: u64, mut fields: Map<String, Value>) -> String {
        let id = record_id(key_prefix(object), serial);
        fields.insert("Id".into(), json!(id));
        self.reindex(&id, None, Some(&fields));
        self.records.insert(id.clone(), fields);
        id
    }

    /// Upserts by `field = value`. `fields` must not carry the external ID or `Id`.
    pub fn upsert(
        &mut self,
        object: &str,
        field: &str,
        value: &str,
        mut fields: Map<String, Value>,
        serial: &mut u64,
    ) -> Result<Upserted, Refused> {
        if fields.contains_key("Id") {
            return Err(Refused::Record(RecordError::new(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                "Unable to create/update fields: Id. Please check the security settings of this field and verify that it is read/write for your profile or permission set.",
                vec!["Id".into()],
            )));
        }
        match self.matches(field, value) {
            [] => {
                self.validate(&fields, true).map_err(Refused::Record)?;
                fields.insert(field.to_string(), json!(value));
                *serial += 1;
                Ok(Upserted::Created(self.seed(object, *serial, fields)))
            }
            [id] => {
                self.validate(&fields, false).map_err(Refused::Record)?;
                let id = id.clone();
                let old = self.records.get(&id).cloned();
                let record = self.records.get_mut(&id).expect("indexed records exist");
                for (k, v) in fields {
                    record.insert(k, v);
                }
                let new = record.clone();
                self.reindex(&id, old.as_ref(), Some(&new));
                Ok(Upserted::Updated(id))
            }
            several => Err(Refused::MultipleMatches(several.to_vec())),
        }
    }

    /// Deletes the record whose `field` is `value`.
    pub fn delete(&mut self, field: &str, value: &str) -> Result<String, Refused> {
        match self.matches(field, value) {
            [] => Err(Refused::NotFound),
            [id] => {
                let id = id.clone();
                let old = self.records.remove(&id);
                self.reindex(&id, old.as_ref(), None);
                Ok(id)
            }
            several => Err(Refused::MultipleMatches(several.to_vec())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_case_safe_suffix() {
        let id = record_id("001", 1);
        assert_eq!(id.len(), 18);
        assert_eq!(&id[..15], "001000000000001");
        // No uppercase letters in any chunk: every suffix letter is 'A'.
        assert_eq!(&id[15..], "AAA");
        // "0000A", the last chunk, has an uppercase letter at its position 4 -> bit 4 -> 'Q'.
        assert_eq!(record_id("001", 10), "00100000000000AAAQ");
    }

    #[test]
    fn upsert_creates_updates_and_refuses_multiple_matches() {
        let mut o = SObjectType::default();
        o.schema.external_ids.insert("Ext__c".into());
        o.schema.required.push("LastName".into());
        let mut serial = 0;
        let fields = |v: Value| v.as_object().unwrap().clone();
        let missing = o.upsert("Contact", "Ext__c", "1", fields(json!({"FirstName": "A"})), &mut serial);
        assert!(matches!(missing, Err(Refused::Record(e)) if e.status_code == "REQUIRED_FIELD_MISSING"));
        let created = o.upsert("Contact", "Ext__c", "1", fields(json!({"LastName": "L"})), &mut serial).unwrap();
        let Upserted::Created(id) = created else { panic!("created") };
        let again = o.upsert("Contact", "Ext__c", "1", fields(json!({"FirstName": "B"})), &mut serial).unwrap();
        assert_eq!(again, Upserted::Updated(id.clone()));
        assert_eq!(o.records[&id]["FirstName"], "B");
        o.seed("Contact", 99, fields(json!({"Ext__c": "1", "LastName": "Dup"})));
        assert!(matches!(o.delete("Ext__c", "1"), Err(Refused::MultipleMatches(ids)) if ids.len() == 2));
    }
}

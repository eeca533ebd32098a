//! CRM records of one HubSpot account: batch upsert by a unique property, batch read by it,
//! batch archive, with the validation rules of the real API (see
//! `shared/reference/crm-erp-contracts.md`, section 2).

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};

/// The most inputs one batch call takes.
pub const BATCH_LIMIT: usize = 100;

/// How a property's values are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyType {
    String,
    Number,
    Bool,
}

/// A property definition.
#[derive(Debug, Clone)]
pub struct Property {
    pub ty: PropertyType,
    /// `hasUniqueValue`: usable as `idProperty`.
    pub unique: bool,
}

/// One record.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: u64,
    pub properties: Map<String, Value>,
    pub created_at: String,
    pub updated_at: String,
    pub archived: bool,
}

/// One object type (contacts, companies, a custom object).
#[derive(Debug, Default)]
pub struct ObjectType {
    pub properties: HashMap<String, Property>,
    pub records: BTreeMap<u64, Record>,
    /// When true, properties not in `properties` are refused (PROPERTY_DOESNT_EXIST).
    pub strict: bool,
    /// Live records by (unique property, value as matched): lookups in O(1), so the emulator
    /// stays fast when an account holds 100k+ records.
    index: HashMap<(String, String), u64>,
}

/// A request error: HTTP status and the HubSpot error envelope.
pub type Refusal = (u16, Value);

fn validation(message: String, errors: Vec<Value>) -> Refusal {
    (
        400,
        json!({"status": "error", "message": message, "category": "VALIDATION_ERROR", "errors": errors, "context": {}, "links": {}}),
    )
}

/// HubSpot's type id, used in some messages (`0-1` is contacts).
fn type_id(object: &str) -> &str {
    match object {
        "contacts" => "0-1",
        "companies" => "0-2",
        "deals" => "0-3",
        "tickets" => "0-5",
        _ => "2-1",
    }
}

impl ObjectType {
    fn unique(&self, object: &str, property: &str) -> bool {
        (object == "contacts" && property == "email") || self.properties.get(property).is_some_and(|p| p.unique)
    }

    /// A value as unique properties match it (email case-insensitively).
    fn matched(property: &str, value: &str) -> String {
        if property == "email" {
            value.to_ascii_lowercase()
        } else {
            value.to_string()
        }
    }

    fn find(&self, property: &str, value: &str) -> Option<u64> {
        self.index.get(&(property.to_string(), Self::matched(property, value))).copied()
    }

    /// Rebuilds the index (after a property became unique).
    pub fn reindex(&mut self, object: &str) {
        let mut index = HashMap::new();
        for r in self.records.values().filter(|r| !r.archived) {
            for (k, v) in &r.properties {
                if let (true, Some(v)) = (self.unique(object, k), v.as_str()) {
                    index.insert((k.clone(), Self::matched(k, v)), r.id);
                }
            }
        }
        self.index = index;
    }

    /// Sets one property of a live record, keeping the index current.
    fn set(&mut self, object: &str, record_id: u64, name: String, value: Value) {
        let unique = self.unique(object, &name);
        let record = self.records.get_mut(&record_id).expect("the record exists");
        let old = record.properties.insert(name.clone(), value.clone());
        if unique {
            if let Some(old) = old.as_ref().and_then(Value::as_str) {
                self.index.remove(&(name.clone(), Self::matched(&name, old)));
            }
            if let Some(new) = value.as_str() {
                let key = Self::matched(&name, new);
                self.index.insert((name, key), record_id);
            }
        }
    }

    /// Per-input problems with the properties (empty when valid).
    fn check_properties(&self, properties: &Map<String, Value>) -> Vec<Value> {
        let mut errors = Vec::new();
        for (name, value) in properties {
            match self.properties.get(name) {
                None if self.strict => errors.push(json!({
                    "message": format!("Property \"{name}\" does not exist"),
                    "code": "PROPERTY_DOESNT_EXIST",
                    "context": {"propertyName": [name]},
                })),
                Some(p) if p.ty == PropertyType::Number && !value.is_null() => {
                    let text = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
                    if text.trim().parse::<f64>().is_err() {
                        errors.push(json!({
                            "message": format!("{text} was not a valid number."),
                            "code": "INVALID_FLOAT",
                            "context": {"propertyName": [name]},
                        }));
                    }
                }
                Some(p) if p.ty == PropertyType::Bool && !value.is_null() => {
                    let text = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
                    if text != "true" && text != "false" {
                        errors.push(json!({
                            "message": format!("{text} was not a valid boolean."),
                            "code": "INVALID_BOOLEAN",
                            "context": {"propertyName": [name]},
                        }));
                    }
                }
                _ => {}
            }
        }
        errors
    }

    /// `POST .../batch/upsert`. Returns (status, body); `next_id` numbers new records.
    pub fn upsert(
        &mut self,
        object: &str,
        body: &Value,
        now: &str,
        next_id: &mut u64,
    ) -> Result<(u16, Value), Refusal> {
        let inputs = body
            .get("inputs")
            .and_then(Value::as_array)
            .ok_or_else(|| validation("Invalid input JSON: `inputs` is required".into(), Vec::new()))?;
        if inputs.len() > BATCH_LIMIT {
            return Err(validation(
                format!("Too many inputs: {} (the limit is {BATCH_LIMIT})", inputs.len()),
                Vec::new(),
            ));
        }
        let mut seen = HashMap::new();
        let mut parsed = Vec::new();
        for input in inputs {
            let property = input.get("idProperty").and_then(Value::as_str).unwrap_or("");
            let id = input.get("id").and_then(Value::as_str).unwrap_or("");
            if property.is_empty() || id.is_empty() {
                return Err(validation("Every input of an upsert needs `id` and `idProperty`".into(), Vec::new()));
            }
            if !self.unique(object, property) {
                return Err(validation(
                    format!("Unable to perform update/upsert by non-unique {} property {property}", type_id(object)),
                    Vec::new(),
                ));
            }
            let key = if property == "email" { id.to_ascii_lowercase() } else { id.to_string() };
            if seen.insert((property.to_string(), key), ()).is_some() {
                return Err(validation(
                    format!("Duplicate IDs found in batch input: [{id}]. IDs must be unique"),
                    Vec::new(),
                ));
            }
            let properties = input.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
            let trace = input.get("objectWriteTraceId").and_then(Value::as_str).map(str::to_string);
            parsed.push((property.to_string(), id.to_string(), properties, trace));
        }
        // Multi-status only when every input carries a trace id; otherwise one bad input fails all.
        let multi_status = parsed.iter().all(|p| p.3.is_some());
        let mut errors = Vec::new();
        let mut valid = Vec::new();
        for p in parsed {
            let problems = self.check_properties(&p.2);
            if problems.is_empty() {
                valid.push(p);
            } else if multi_status {
                errors.push(json!({
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": "Property values were not valid",
                    "context": {"objectWriteTraceId": [p.3.clone().unwrap_or_default()], "id": [p.1]},
                    "errors": problems,
                }));
            } else {
                return Err(validation("Property values were not valid".into(), problems));
            }
        }
        let mut results = Vec::new();
        for (property, id, properties, trace) in valid {
            let existing = self.find(&property, &id);
            let (record_id, new) = match existing {
                Some(rid) => (rid, false),
                None => {
                    *next_id += 1;
                    (*next_id, true)
                }
            };
            self.records.entry(record_id).or_insert_with(|| Record {
                id: record_id,
                properties: Map::new(),
                created_at: now.to_string(),
                updated_at: now.to_string(),
                archived: false,
            });
            self.set(object, record_id, property.clone(), Value::String(id.clone()));
            for (k, v) in properties {
                self.set(object, record_id, k, v);
            }
            self.set(object, record_id, "hs_object_id".into(), Value::String(record_id.to_string()));
            let record = self.records.get_mut(&record_id).expect("just written");
            record.updated_at = now.to_string();
            let mut result = json!({
                "id": record_id.to_string(),
                "properties": record.properties,
                "createdAt": record.created_at,
                "updatedAt": record.updated_at,
                "archived": false,
                "new": new,
            });
            if let Some(t) = trace {
                result["objectWriteTraceId"] = Value::String(t);
            }
            results.push(result);
        }
        let mut out =
            json!({"status": "COMPLETE", "results": results, "startedAt": now, "completedAt": now, "links": {}});
        if errors.is_empty() {
            Ok((200, out))
        } else {
            out["numErrors"] = json!(errors.len());
            out["errors"] = Value::Array(errors);
            Ok((207, out))
        }
    }

    /// `POST .../batch/read` by `idProperty` (or by record id without it).
    pub fn read(&self, object: &str, body: &Value) -> Result<(u16, Value), Refusal> {
        let inputs = body.get("inputs").and_then(Value::as_array).cloned().unwrap_or_default();
        if inputs.len() > BATCH_LIMIT {
            return Err(validation(
                format!("Too many inputs: {} (the limit is {BATCH_LIMIT})", inputs.len()),
                Vec::new(),
            ));
        }
        let property = body.get("idProperty").and_then(Value::as_str);
        if let Some(p) = property {
            if !self.unique(object, p) {
                return Err(validation(format!("{p} is not a unique property of {}", type_id(object)), Vec::new()));
            }
        }
        let mut results = Vec::new();
        let mut missing = Vec::new();
        for input in &inputs {
            let id = input.get("id").and_then(Value::as_str).unwrap_or("");
            let found = match property {
                Some(p) => self.find(p, id),
                None => id.parse().ok().filter(|rid| self.records.get(rid).is_some_and(|r| !r.archived)),
            };
            match found.and_then(|rid| self.records.get(&rid)) {
                Some(r) => results.push(json!({
                    "id": r.id.to_string(), "properties": r.properties, "createdAt": r.created_at,
                    "updatedAt": r.updated_at, "archived": false,
                })),
                None => missing.push(id.to_string()),
            }
        }
        let mut out = json!({"status": "COMPLETE", "results": results, "links": {}});
        if missing.is_empty() {
            return Ok((200, out));
        }
        out["numErrors"] = json!(1);
        out["errors"] = json!([{
            "status": "error", "category": "OBJECT_NOT_FOUND",
            "message": "Could not get some objects, they may be deleted or not exist. Check that ids are valid.",
            "context": {"ids": missing},
        }]);
        Ok((207, out))
    }

    /// `POST .../batch/archive` by record id: 204, whether or not each id exists.
    pub fn archive(&mut self, body: &Value) -> Result<u16, Refusal> {
        let inputs = body.get("inputs").and_then(Value::as_array).cloned().unwrap_or_default();
        if inputs.len() > BATCH_LIMIT {
            return Err(validation(
                format!("Too many inputs: {} (the limit is {BATCH_LIMIT})", inputs.len()),
                Vec::new(),
            ));
        }
        let mut archived = std::collections::HashSet::new();
        for input in inputs {
            let id: Option<u64> = input.get("id").and_then(Value::as_str).and_then(|s| s.parse().ok());
            if let Some(r) = id.and_then(|id| self.records.get_mut(&id)) {
                r.archived = true;
                archived.insert(r.id);
            }
        }
        if !archived.is_empty() {
            self.index.retain(|_, rid| !archived.contains(rid));
        }
        Ok(204)
    }
}

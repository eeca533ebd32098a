//! `{{ }}` expressions, compiled once by minijinja and evaluated per record.
//!
//! A field is either one expression (`"{{ after.ltv | decimal(2) }}"`, whose value keeps its
//! type), text with expressions inside (`"{{ after.first }} {{ after.last }}"`, always a string),
//! or plain text (a constant). Every expression compiles against one process-wide environment
//! that holds sluice's filters, so a compiled expression can live as long as the pipeline.

use aes_gcm::aead::{Aead, Generate, KeyInit};
use base64::Engine as _;
use hmac::Mac;
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Expression, UndefinedBehavior, Value};
use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::LazyLock;

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // A typo in a column name is an error, not an empty string written to a CRM.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.add_filter("decimal", decimal);
    env.add_filter("bool", boolean);
    env.add_filter("json", json);
    env.add_filter("date", date);
    env.add_filter("timestamptz", timestamptz);
    env.add_filter("hmac_sha256", hmac_sha256);
    env.add_filter("mask", mask);
    env.add_filter("encrypt", encrypt);
    env.add_function("secret", secret);
    env
});

/// A compiled field, filter or key expression.
#[derive(Debug)]
pub struct Expr {
    compiled: Expression<'static, 'static>,
    /// The text as written in the pipeline file, for messages.
    pub source: String,
    /// Whether the result is always text (several expressions or text around one).
    templated: bool,
    /// The text rewritten as one expression (see [`ExprList`]).
    code: String,
}

/// Several expressions compiled into one list expression: a record's fields cost one run of the
/// engine instead of one per field (measured: see the README's mapping benchmark).
#[derive(Debug)]
pub struct ExprList {
    compiled: Expression<'static, 'static>,
}

impl ExprList {
    /// `None` if the list does not compile (it always does when each part compiled alone).
    pub fn compile(parts: &[&Expr]) -> Option<Self> {
        let code: Vec<String> = parts.iter().map(|e| format!("({})", e.code)).collect();
        let compiled = ENV.compile_expression_owned(format!("[{}]", code.join(", "))).ok()?;
        Some(Self { compiled })
    }

    /// The values in order, or `None` when any part fails or is undefined: then evaluating the
    /// parts one by one says which and why.
    pub fn eval(&self, context: &Value) -> Option<Vec<Value>> {
        let list = self.compiled.eval(context.clone()).ok()?;
        let values: Vec<Value> = list.try_iter().ok()?.collect();
        (!values.iter().any(Value::is_undefined)).then_some(values)
    }
}

/// Why an expression did not compile: the message and the byte offset in its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub message: String,
    pub offset: usize,
}

impl Expr {
    /// Compiles a field as written: one `{{ expr }}`, text with `{{ }}` inside, or a constant.
    pub fn compile(text: &str) -> Result<Self, CompileError> {
        let (code, offsets, templated) = to_expression(text)?;
        let compiled = ENV.compile_expression_owned(code.clone()).map_err(|e| {
            // minijinja reports a byte range in the code it compiled; map it back to the text.
            let at = e.range().map(|r| r.start).unwrap_or(0);
            let offset =
                offsets.iter().rev().find(|(code_at, _)| *code_at <= at).map(|(c, t)| t + (at - c)).unwrap_or(0);
            CompileError { message: describe(&e), offset }
        })?;
        Ok(Self { compiled, source: text.to_string(), templated, code })
    }

    /// Evaluates against a record's context.
    pub fn eval(&self, context: &Value) -> Result<Value, Error> {
        let v = self.compiled.eval(context.clone())?;
        // Strict mode fails only when an undefined value is used further; a field that is
        // undefined as a whole (a misspelt column) must fail too.
        if v.is_undefined() {
            return Err(Error::new(ErrorKind::UndefinedError, format!("`{}` is undefined", self.source)));
        }
        Ok(if self.templated { Value::from(v.to_string()) } else { v })
    }

    /// Dotted names the expression reads (`after.email`), to check against the source schema.
    pub fn variables(&self) -> BTreeSet<String> {
        self.compiled.undeclared_variables(true).into_iter().collect()
    }

    /// Environment variables named by `secret('NAME')` calls, to check before the first record.
    pub fn secret_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = self.source.as_str();
        while let Some(i) = rest.find("secret(") {
            rest = &rest[i + "secret(".len()..];
            let arg = rest.trim_start();
            if let Some(quote) = arg.chars().next().filter(|c| *c == '\'' || *c == '"') {
                if let Some(end) = arg[1..].find(quote) {
                    names.push(arg[1..1 + end].to_string());
                }
            }
        }
        names
    }
}

/// Rewrites field text as one expression: `a {{ x }} b` becomes `"a " ~ (x) ~ " b"`.
/// Returns the code, pairs of (offset in code, offset in text) for error positions, and whether
/// the result must be rendered as text.
#[allow(clippy::type_complexity)]
fn to_expression(text: &str) -> Result<(String, Vec<(usize, usize)>, bool), CompileError> {
    let mut parts: Vec<(bool, usize, &str)> = Vec::new();
    let mut at = 0;
    while let Some(open) = text[at..].find("{{") {
        let open = at + open;
        let close = text[open..]
            .find("}}")
            .map(|c| open + c)
            .ok_or_else(|| CompileError { message: "`{{` is not closed by `}}`".into(), offset: open })?;
        if open > at {
            parts.push((false, at, &text[at..open]));
        }
        parts.push((true, open + 2, &text[open + 2..close]));
        at = close + 2;
    }
    if at < text.len() {
        parts.push((false, at, &text[at..]));
    }
    if text.contains("{%") {
        let offset = text.find("{%").unwrap_or(0);
        return Err(CompileError { message: "`{% %}` blocks are not supported in fields".into(), offset });
    }
    let single = parts.len() == 1 && parts[0].0;
    let mut code = String::new();
    let mut offsets = Vec::new();
    for (i, (is_expr, text_at, part)) in parts.iter().enumerate() {
        if i > 0 {
            code.push_str(" ~ ");
        }
        if *is_expr {
            code.push('(');
            offsets.push((code.len(), *text_at));
            code.push_str(part);
            code.push(')');
        } else {
            offsets.push((code.len(), *text_at));
            code.push_str(&serde_json::to_string(part).expect("a string serializes"));
        }
    }
    if code.is_empty() {
        code.push_str("\"\"");
    }
    Ok((code, offsets, !single))
}

fn describe(e: &Error) -> String {
    match e.detail() {
        Some(d) => format!("{}: {d}", e.kind()),
        None => e.kind().to_string(),
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// Exact decimal text, optionally rounded half-even to `scale` places.
fn decimal(value: Value, scale: Option<i64>) -> Result<Value, Error> {
    if value.is_none() {
        return Ok(value);
    }
    let text = value.to_string();
    let d = bigdecimal::BigDecimal::from_str(text.trim()).map_err(|_| invalid(format!("`{text}` is not a decimal")))?;
    let d = match scale {
        Some(s) => d.with_scale_round(s, bigdecimal::RoundingMode::HalfEven),
        None => d,
    };
    Ok(Value::from(d.to_plain_string()))
}

/// The value of JSON text: objects and arrays become maps and lists whose fields an expression
/// can read (`(after.document | json).email`, for a MongoDB document or a jsonb column).
fn json(value: Value) -> Result<Value, Error> {
    if value.is_none() {
        return Ok(value);
    }
    let text = value.to_string();
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("`{text}` is not JSON ({e})")))?;
    Ok(from_json(parsed))
}

/// serde_json's numbers are exact text here (its `arbitrary_precision`), which minijinja's
/// serde support would see as a map: so the conversion is by hand.
fn from_json(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) if f.is_finite() => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        serde_json::Value::String(s) => Value::from(s),
        serde_json::Value::Array(items) => Value::from(items.into_iter().map(from_json).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => {
            Value::from(map.into_iter().map(|(k, v)| (k, from_json(v))).collect::<std::collections::BTreeMap<_, _>>())
        }
    }
}

/// true/false from booleans, numbers, and the usual words (`yes`, `t`, `1`, `off` ...).
fn boolean(value: Value) -> Result<Value, Error> {
    if value.is_none() || value.kind() == minijinja::value::ValueKind::Bool {
        return Ok(value);
    }
    if value.is_number() {
        return Ok(Value::from(value.is_true()));
    }
    let text = value.to_string();
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "1" | "on" => Ok(Value::from(true)),
        "false" | "f" | "no" | "n" | "0" | "off" => Ok(Value::from(false)),
        _ => Err(invalid(format!("`{text}` is not a boolean"))),
    }
}

/// `YYYY-MM-DD` from a date, a timestamp text, or seconds since the epoch.
fn date(value: Value) -> Result<Value, Error> {
    if value.is_none() {
        return Ok(value);
    }
    let at = instant(&value)?;
    Ok(Value::from(at.date_naive().to_string()))
}

/// RFC 3339 in UTC from a timestamp text (with or without zone; without means UTC), a date,
/// or seconds since the epoch.
fn timestamptz(value: Value) -> Result<Value, Error> {
    if value.is_none() {
        return Ok(value);
    }
    let at = instant(&value)?;
    Ok(Value::from(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)))
}

fn instant(value: &Value) -> Result<chrono::DateTime<chrono::Utc>, Error> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    if let Some(secs) = value.as_i64() {
        return DateTime::from_timestamp(secs, 0).ok_or_else(|| invalid(format!("{secs} is out of range")));
    }
    let text = value.to_string();
    let t = text.trim();
    // A bare date first: the format-string parsers below are several times slower.
    if t.len() == 10 {
        if let Ok(d) = t.parse::<NaiveDate>() {
            return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
        }
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(at) = DateTime::parse_from_str(t, format) {
            return Ok(at.with_timezone(&Utc));
        }
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(at) = NaiveDateTime::parse_from_str(t, format) {
            return Ok(at.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(invalid(format!("`{text}` is not a date or timestamp")))
}

/// Lower-case hex HMAC-SHA-256 of the value's text under `key`.
fn hmac_sha256(value: Value, key: String) -> Result<Value, Error> {
    if value.is_none() {
        return Ok(value);
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    mac.update(value.to_string().as_bytes());
    Ok(Value::from(hex::encode(mac.finalize().into_bytes())))
}

/// Replaces all but the last `keep` characters (default 4) with `char` (default `*`).
fn mask(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let keep: usize = kwargs.get::<Option<usize>>("keep")?.unwrap_or(4);
    let with: String = kwargs.get::<Option<String>>("char")?.unwrap_or_else(|| "*".into());
    kwargs.assert_all_used()?;
    if value.is_none() {
        return Ok(value);
    }
    let text = value.to_string();
    let n = text.chars().count();
    let hidden = n.saturating_sub(keep);
    let masked: String =
        text.chars().enumerate().map(|(i, c)| if i < hidden { with.clone() } else { c.to_string() }).collect();
    Ok(Value::from(masked))
}

/// AES-256-GCM of the value's text: base64 of a random 96-bit nonce then the ciphertext and tag.
/// The key is 32 bytes, given as 64 hex digits or base64.
fn encrypt(value: Value, key: String) -> Result<Value, Error> {
    if value.is_none() {
        return Ok(value);
    }
    let key = parse_key(&key)?;
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).map_err(|e| invalid(e.to_string()))?;
    let nonce = aes_gcm::Nonce::generate();
    let sealed = cipher.encrypt(&nonce, value.to_string().as_bytes()).map_err(|e| invalid(e.to_string()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(Value::from(base64::engine::general_purpose::STANDARD.encode(out)))
}

/// Decrypts what [`encrypt`] produced; used by tests and by anyone holding the key.
pub fn decrypt(sealed: &str, key: &str) -> Result<String, Error> {
    let key = parse_key(key)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(sealed).map_err(|e| invalid(e.to_string()))?;
    if bytes.len() < 12 {
        return Err(invalid("ciphertext is too short"));
    }
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).map_err(|e| invalid(e.to_string()))?;
    let (nonce, body) = bytes.split_at(12);
    let plain = cipher
        .decrypt(nonce.try_into().map_err(|_| invalid("bad nonce"))?, body)
        .map_err(|_| invalid("ciphertext does not match the key"))?;
    String::from_utf8(plain).map_err(|e| invalid(e.to_string()))
}

fn parse_key(key: &str) -> Result<Vec<u8>, Error> {
    let bytes = hex::decode(key.trim())
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(key.trim()).ok())
        .ok_or_else(|| invalid("the encryption key is neither hex nor base64"))?;
    if bytes.len() != 32 {
        return Err(invalid(format!("the encryption key has {} bytes; AES-256 needs 32", bytes.len())));
    }
    Ok(bytes)
}

/// The value of an environment variable (read at each call, never logged).
fn secret(name: String) -> Result<Value, Error> {
    std::env::var(&name).map(Value::from).map_err(|_| invalid(format!("environment variable {name} is not set")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn eval(text: &str, ctx: Value) -> Value {
        Expr::compile(text).expect("compiles").eval(&ctx).expect("evaluates")
    }

    #[test]
    fn json_text_becomes_fields_an_expression_can_read() {
        let doc = r#"{"_id":{"$oid":"64b7f0c2a1b2c3d4e5f60718"},"email":"Ada@X.org","n":9007199254740993,
                     "total":12.5,"tags":["a","b"],"ship":{"city":"Oslo"},"gone":null,"price":{"$numberDecimal":"1.10"}}"#;
        let ctx = context! { after => context! { document => doc } };
        assert_eq!(eval("{{ (after.document | json).email | lower }}", ctx.clone()), Value::from("ada@x.org"));
        assert_eq!(
            eval("{{ (after.document | json)._id['$oid'] }}", ctx.clone()),
            Value::from("64b7f0c2a1b2c3d4e5f60718")
        );
        assert_eq!(eval("{{ (after.document | json).n }}", ctx.clone()), Value::from(9_007_199_254_740_993_i64));
        assert_eq!(eval("{{ (after.document | json).total }}", ctx.clone()), Value::from(12.5));
        assert_eq!(eval("{{ (after.document | json).tags[1] }}", ctx.clone()), Value::from("b"));
        assert_eq!(eval("{{ (after.document | json).ship.city }}", ctx.clone()), Value::from("Oslo"));
        assert!(eval("{{ (after.document | json).gone }}", ctx.clone()).is_none());
        assert_eq!(
            eval("{{ (after.document | json).price['$numberDecimal'] | decimal(2) }}", ctx.clone()),
            Value::from("1.10")
        );
        assert_eq!(eval("{{ after.missing_is_none | default(none) | json }}", ctx.clone()), Value::from(()));
        let bad = Expr::compile("{{ after.document | json }}")
            .unwrap()
            .eval(&context! { after => context! { document => "{" } });
        assert!(bad.unwrap_err().to_string().contains("is not JSON"));
    }

    #[test]
    fn single_expressions_keep_their_type_and_templates_render_text() {
        let ctx = context! { after => context! { id => 7, first => "Ada", last => "Lovelace" } };
        assert_eq!(eval("{{ after.id }}", ctx.clone()), Value::from(7));
        assert_eq!(eval("{{ after.first }} {{ after.last }}", ctx.clone()), Value::from("Ada Lovelace"));
        assert_eq!(eval("id-{{ after.id }}", ctx.clone()), Value::from("id-7"));
        assert_eq!(eval("constant", ctx.clone()), Value::from("constant"));
        assert_eq!(eval("{{ after.first | lower }}", ctx), Value::from("ada"));
    }

    #[test]
    fn compile_errors_point_into_the_field_text() {
        let e = Expr::compile("{{ after.email | }}").unwrap_err();
        assert!(e.message.contains("syntax error"), "{e:?}");
        assert!((3..=18).contains(&e.offset), "{e:?}");
        let e = Expr::compile("hi {{ after.x").unwrap_err();
        assert_eq!(e.offset, 3);
        assert!(Expr::compile("{% if x %}a{% endif %}").is_err());
    }

    #[test]
    fn unknown_names_are_errors_not_empty_strings() {
        let e = Expr::compile("{{ after.emial }}").unwrap().eval(&context! { after => context! { email => "a" } });
        assert!(e.is_err());
    }

    #[test]
    fn coercions() {
        let ctx = context! { v => "12.345", t => "2026-11-26 10:00:00.5+02", d => "2026-01-02", b => "Yes" };
        assert_eq!(eval("{{ v | decimal(2) }}", ctx.clone()), Value::from("12.34"));
        assert_eq!(eval("{{ '12.355' | decimal(2) }}", ctx.clone()), Value::from("12.36"));
        assert_eq!(eval("{{ v | decimal }}", ctx.clone()), Value::from("12.345"));
        assert_eq!(eval("{{ t | timestamptz }}", ctx.clone()), Value::from("2026-11-26T08:00:00.500Z"));
        assert_eq!(eval("{{ d | timestamptz }}", ctx.clone()), Value::from("2026-01-02T00:00:00Z"));
        assert_eq!(eval("{{ t | date }}", ctx.clone()), Value::from("2026-11-26"));
        assert_eq!(eval("{{ b | bool }}", ctx.clone()), Value::from(true));
        assert_eq!(eval("{{ '42' | int }}", ctx.clone()), Value::from(42));
        assert!(Expr::compile("{{ 'x1' | decimal }}").unwrap().eval(&ctx).is_err());
    }

    #[test]
    fn pii_helpers() {
        let ctx = context! { ssn => "123-45-6789" };
        // RFC 4231-style check against an independently computed value (python hmac module).
        assert_eq!(
            eval("{{ 'hello' | hmac_sha256('key') }}", ctx.clone()),
            Value::from("9307b3b915efb5171ff14d8cb55fbcc798c6c0ef1456d66ded1a6aa723a58b7b")
        );
        assert_eq!(eval("{{ ssn | mask }}", ctx.clone()), Value::from("*******6789"));
        assert_eq!(eval("{{ ssn | mask(keep=2, char='#') }}", ctx.clone()), Value::from("#########89"));
        let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let sealed = eval(&format!("{{{{ ssn | encrypt('{key}') }}}}"), ctx.clone());
        assert_ne!(sealed.as_str(), Some("123-45-6789"));
        assert_eq!(decrypt(sealed.as_str().unwrap(), key).unwrap(), "123-45-6789");
        assert!(decrypt(sealed.as_str().unwrap(), &key.replace('0', "1")).is_err());
    }

    #[test]
    fn secrets_are_found_by_name() {
        let e = Expr::compile("{{ after.ssn | hmac_sha256(secret('PII_KEY')) ~ secret(\"OTHER\") }}").unwrap();
        assert_eq!(e.secret_names(), vec!["PII_KEY".to_string(), "OTHER".to_string()]);
    }
}

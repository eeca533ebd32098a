//! Asking a running pipeline for a backfill: the request is checked against the database
//! (tables, keys, the `where` clause) before it is sent, so a mistake is reported before any
//! row moves.

use super::book::BackfillRequest;
use super::{Message, PREFIX};
use crate::config::PgConnection;
use crate::connectors::postgres::client::{self, qualified, query_error, quote_ident, quote_literal};
use crate::connectors::postgres::Catalog;
use crate::error::{Error, Result};
use crate::event::TableId;
use tokio_postgres::Client;

/// A key range from `--key-range A..B`: keys from `A` (inclusive) to `B` (exclusive); either
/// end may be left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub from: Option<String>,
    pub to: Option<String>,
}

impl KeyRange {
    pub fn parse(text: &str) -> Option<Self> {
        let (from, to) = text.split_once("..")?;
        let end = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let range = Self { from: end(from), to: end(to) };
        (range.from.is_some() || range.to.is_some()).then_some(range)
    }

    /// The range as a condition on the key column `key`.
    fn condition(&self, key: &str) -> String {
        let key = quote_ident(key);
        let from = self.from.as_ref().map(|f| format!("{key} >= {}", quote_literal(f)));
        let to = self.to.as_ref().map(|t| format!("{key} < {}", quote_literal(t)));
        from.into_iter().chain(to).collect::<Vec<_>>().join(" AND ")
    }
}

/// The conditions joined with AND (each in parentheses when there are several); `None` for none.
pub fn all_of(conditions: &[String]) -> Option<String> {
    match conditions {
        [] => None,
        [one] => Some(one.clone()),
        many => Some(many.iter().map(|c| format!("({c})")).collect::<Vec<_>>().join(" AND ")),
    }
}

/// Prepares (without running) a query with each condition, so a bad `where` fails before any
/// row moves, in PostgreSQL's own words.
pub async fn check_conditions(client: &Client, name: &str, table: &TableId, conditions: &[String]) -> Result<()> {
    for c in conditions {
        if let Err(e) = client.prepare(&format!("SELECT 1 FROM {} WHERE ({c})", qualified(table))).await {
            let why = match e.as_db_error() {
                Some(d) => format!("{} ({})", d.message(), d.code().code()),
                None => e.to_string(),
            };
            return Err(Error::config(format!(
                "backfill {name}: the where clause `{c}` does not work on {table}: {why}. \
                 Write a boolean SQL expression over the table's columns, as after WHERE"
            )));
        }
    }
    Ok(())
}

/// Checks `request` against the source database, adds the key range's condition, and sends
/// it to the pipeline (a transactional logical message: it reaches the pipeline in commit
/// order, now or when it next runs).
pub async fn submit(conn: &PgConnection, mut request: BackfillRequest, key_range: Option<&KeyRange>) -> Result<()> {
    if key_range.is_some() && request.tables.len() != 1 {
        return Err(Error::config("--key-range applies to one table; run one backfill per table"));
    }
    let mut catalog = Catalog::new(client::connect(conn, "sluice backfill request").await?);
    for table in &request.tables {
        let info = catalog.table(table).await?;
        let mut conditions: Vec<String> = request.filter.iter().cloned().collect();
        if let Some(range) = key_range {
            let keys: Vec<&str> = info.schema.columns.iter().filter(|c| c.key).map(|c| c.name.as_str()).collect();
            let [key] = keys[..] else {
                return Err(Error::config(format!(
                    "--key-range needs a single-column primary key; {table} has ({}). Use --where instead",
                    keys.join(", ")
                )));
            };
            conditions.push(range.condition(key));
        }
        check_conditions(catalog.client(), &request.name, table, &conditions).await?;
        if key_range.is_some() {
            request.filter = all_of(&conditions);
        }
        if let Some(cursor) = &request.cursor {
            if !info.schema.columns.iter().any(|c| &c.name == cursor) {
                return Err(Error::config(format!(
                    "backfill {}: cursor column {cursor} is not a column of {table}",
                    request.name
                )));
            }
        }
    }
    emit(catalog.client(), &request).await
}

/// Sends a checked request.
pub async fn emit(client: &Client, request: &BackfillRequest) -> Result<()> {
    let content = Message::Request(Box::new(request.clone())).encode();
    client
        .execute("SELECT pg_logical_emit_message(true, $1, $2)", &[&PREFIX, &content])
        .await
        .map_err(|e| query_error("backfill request", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges_parse_with_open_ends() {
        assert_eq!(KeyRange::parse("10..20"), Some(KeyRange { from: Some("10".into()), to: Some("20".into()) }));
        assert_eq!(KeyRange::parse("..20"), Some(KeyRange { from: None, to: Some("20".into()) }));
        assert_eq!(KeyRange::parse("a.."), Some(KeyRange { from: Some("a".into()), to: None }));
        assert_eq!(KeyRange::parse(".."), None);
        assert_eq!(KeyRange::parse("10"), None);
        assert_eq!(KeyRange::parse("10..20").unwrap().condition("id"), "\"id\" >= '10' AND \"id\" < '20'");
        assert_eq!(KeyRange::parse("..20").unwrap().condition("id"), "\"id\" < '20'");
    }

    #[test]
    fn conditions_join_with_and() {
        assert_eq!(all_of(&[]), None);
        assert_eq!(all_of(&["a > 1".into()]).as_deref(), Some("a > 1"));
        assert_eq!(all_of(&["a > 1".into(), "b OR c".into()]).as_deref(), Some("(a > 1) AND (b OR c)"));
    }
}

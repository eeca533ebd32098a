//! Debezium's transaction metadata (`provide.transaction.metadata`): a BEGIN and an END record
//! per transaction in the topic `PREFIX.transaction`, and in each change's envelope its place
//! in its transaction (`transaction: {id, total_order, data_collection_order}`).
//!
//! The publisher reads the log in order, and a transaction's changes are contiguous there, so
//! a transaction begins at its first change and ends at the next record outside it, or, when
//! nothing follows, once the source has committed a position past it (every change of it is
//! then in the log and published).

use super::envelope::json_str;
use crate::event::{ChangeEvent, Phase};
use std::fmt::Write as _;

/// A change's place in its transaction, for its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct TxOrder {
    pub id: String,
    /// 1-based, over the whole transaction.
    pub total_order: u64,
    /// 1-based, over the transaction's changes to this change's table.
    pub data_collection_order: u64,
}

/// A record for the transaction topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub key: String,
    pub value: String,
}

/// The transaction the publisher is inside, if any.
#[derive(Debug, Default)]
pub struct TransactionTracker {
    open: Option<OpenTx>,
    /// Wrap keys and values as `{"schema", "payload"}` (`transport.schemas: true`).
    schemas: bool,
}

#[derive(Debug)]
struct OpenTx {
    id: String,
    /// The commit LSN every change of the transaction carries.
    lsn: u64,
    commit_ms: i64,
    events: u64,
    /// Changes per table (`schema.table`), in the order first seen.
    collections: Vec<(String, u64)>,
}

impl TransactionTracker {
    pub fn new(schemas: bool) -> Self {
        Self { open: None, schemas }
    }

    /// Takes the next record in log order: returns the markers to publish before it (the END of
    /// the transaction it leaves, the BEGIN of the one it starts) and its place in its
    /// transaction (`None` for snapshot reads, which belong to none).
    pub fn next(&mut self, event: &ChangeEvent) -> (Vec<Marker>, Option<TxOrder>) {
        let mut markers = Vec::new();
        let tx = match (event.position.phase, event.tx_id) {
            (Phase::Change, Some(tx)) => Some(tx),
            _ => None,
        };
        let same = matches!((&self.open, tx), (Some(open), Some(_)) if open.lsn == event.position.lsn);
        if !same {
            if let Some(end) = self.end() {
                markers.push(end);
            }
            if let Some(tx) = tx {
                let open = OpenTx {
                    id: format!("{tx}:{}", event.position.lsn),
                    lsn: event.position.lsn,
                    commit_ms: event.commit_ts_us.div_euclid(1000),
                    events: 0,
                    collections: Vec::new(),
                };
                markers.push(self.marker(&open, "BEGIN"));
                self.open = Some(open);
            }
        }
        let Some(open) = self.open.as_mut() else { return (markers, None) };
        let collection = format!("{}.{}", event.table.schema, event.table.name);
        open.events += 1;
        let in_collection = match open.collections.iter_mut().find(|(c, _)| *c == collection) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                open.collections.push((collection, 1));
                1
            }
        };
        let order = TxOrder { id: open.id.clone(), total_order: open.events, data_collection_order: in_collection };
        (markers, Some(order))
    }

    /// The END of the open transaction if the source has committed `source_position` past it
    /// (its commit's end, or anything later); the transaction stays open until [`Self::ended`].
    pub fn end_if_past(&self, source_position: u64) -> Option<Marker> {
        let open = self.open.as_ref().filter(|o| source_position > o.lsn)?;
        Some(self.marker(open, "END"))
    }

    /// The END returned by [`Self::end_if_past`] is published.
    pub fn ended(&mut self) {
        self.open = None;
    }

    fn end(&mut self) -> Option<Marker> {
        let open = self.open.take()?;
        Some(self.marker(&open, "END"))
    }

    fn marker(&self, open: &OpenTx, status: &str) -> Marker {
        let mut id = String::with_capacity(open.id.len() + 2);
        json_str(&mut id, &open.id);
        let mut value = format!("{{\"status\":\"{status}\",\"id\":{id},\"ts_ms\":{},", open.commit_ms);
        if status == "BEGIN" {
            value.push_str("\"event_count\":null,\"data_collections\":null}");
        } else {
            let _ = write!(value, "\"event_count\":{},\"data_collections\":[", open.events);
            for (i, (collection, n)) in open.collections.iter().enumerate() {
                if i > 0 {
                    value.push(',');
                }
                value.push_str("{\"data_collection\":");
                json_str(&mut value, collection);
                let _ = write!(value, ",\"event_count\":{n}}}");
            }
            value.push_str("]}");
        }
        let key = format!("{{\"id\":{id}}}");
        if !self.schemas {
            return Marker { key, value };
        }
        Marker {
            key: format!("{{\"schema\":{KEY_SCHEMA},\"payload\":{key}}}"),
            value: format!("{{\"schema\":{VALUE_SCHEMA},\"payload\":{value}}}"),
        }
    }
}

/// The Kafka Connect schemas Debezium gives the transaction topic's keys and values.
const KEY_SCHEMA: &str = "{\"type\":\"struct\",\"fields\":[{\"type\":\"string\",\"optional\":false,\"field\":\"id\"}],\
     \"optional\":false,\"name\":\"io.debezium.connector.common.TransactionMetadataKey\"}";
const VALUE_SCHEMA: &str = "{\"type\":\"struct\",\"fields\":[{\"type\":\"string\",\"optional\":false,\"field\":\"status\"},\
     {\"type\":\"string\",\"optional\":false,\"field\":\"id\"},{\"type\":\"int64\",\"optional\":false,\"field\":\"ts_ms\"},\
     {\"type\":\"int64\",\"optional\":true,\"field\":\"event_count\"},{\"type\":\"array\",\"items\":{\"type\":\"struct\",\
     \"fields\":[{\"type\":\"string\",\"optional\":false,\"field\":\"data_collection\"},{\"type\":\"int64\",\
     \"optional\":false,\"field\":\"event_count\"}],\"optional\":false},\"optional\":true,\"field\":\"data_collections\"}],\
     \"optional\":false,\"name\":\"io.debezium.connector.common.TransactionMetadataValue\"}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, Position, TableId};

    fn change(table: &str, lsn: u64, seq: u64, tx: u64) -> ChangeEvent {
        ChangeEvent {
            table: TableId { schema: "public".into(), name: table.into() },
            schema_id: 1,
            op: Op::Insert,
            key: vec![],
            before: None,
            after: None,
            position: Position::change(lsn, seq),
            commit_ts_us: 1_700_000_000_123_456,
            tx_id: Some(tx),
            toast_fetched: false,
            snapshot_last: false,
            origin: None,
        }
    }

    #[test]
    fn a_transaction_is_begun_counted_per_table_and_ended_by_the_next_one() {
        let mut t = TransactionTracker::new(false);
        let (m, o) = t.next(&change("a", 100, 0, 7));
        assert_eq!(
            m,
            [Marker {
                key: r#"{"id":"7:100"}"#.into(),
                value: r#"{"status":"BEGIN","id":"7:100","ts_ms":1700000000123,"event_count":null,"data_collections":null}"#
                    .into()
            }]
        );
        assert_eq!(o, Some(TxOrder { id: "7:100".into(), total_order: 1, data_collection_order: 1 }));
        assert_eq!(t.next(&change("b", 100, 1, 7)).1.unwrap().data_collection_order, 1);
        let (m, o) = t.next(&change("a", 100, 2, 7));
        assert!(m.is_empty());
        assert_eq!(o, Some(TxOrder { id: "7:100".into(), total_order: 3, data_collection_order: 2 }));
        // Not past it yet: the source's position is the commit itself.
        assert_eq!(t.end_if_past(100), None);
        let (m, _) = t.next(&change("a", 200, 0, 8));
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].value,
            r#"{"status":"END","id":"7:100","ts_ms":1700000000123,"event_count":3,"data_collections":[{"data_collection":"public.a","event_count":2},{"data_collection":"public.b","event_count":1}]}"#
        );
        assert!(m[1].value.starts_with(r#"{"status":"BEGIN","id":"8:200""#));
        let end = t.end_if_past(201).unwrap();
        assert!(end.value.contains(r#""event_count":1"#), "{}", end.value);
        t.ended();
        assert_eq!(t.end_if_past(u64::MAX), None);
    }

    #[test]
    fn snapshot_reads_belong_to_no_transaction_and_end_the_open_one() {
        let mut t = TransactionTracker::new(true);
        t.next(&change("a", 100, 0, 7));
        let mut read = change("a", 300, 0, 0);
        read.position = Position::snapshot(300, 0);
        read.tx_id = None;
        let (m, o) = t.next(&read);
        assert_eq!(o, None);
        assert_eq!(m.len(), 1);
        assert!(m[0].value.starts_with(r#"{"schema":{"type":"struct""#), "{}", m[0].value);
        assert!(m[0].value.contains(r#""payload":{"status":"END","id":"7:100""#), "{}", m[0].value);
        assert!(m[0].key.ends_with(r#""payload":{"id":"7:100"}}"#), "{}", m[0].key);
    }
}

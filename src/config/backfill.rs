//! The `backfills:` section: scheduled backfills, checked without I/O. The `where` clause is
//! SQL, checked against the database when the pipeline starts, before any row moves.

use super::pipeline::{BackfillSchedule, DEFAULT_BACKFILL_CHUNK_ROWS, DEFAULT_BACKFILL_PARALLELISM};
use super::raw::RawBackfill;
use super::validate::Ctx;
use super::ConfigError;
use crate::event::TableId;

pub(super) fn schedules(cx: &Ctx, raw: Vec<RawBackfill>) -> Result<Vec<BackfillSchedule>, ConfigError> {
    let mut out: Vec<BackfillSchedule> = Vec::new();
    for b in raw {
        let name = b.name.value.trim().to_string();
        if name.is_empty()
            || name == "adhoc"
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(cx.err(
                &b.name,
                format!("backfills: `{}` is not a valid backfill name", b.name.value),
                "use letters, digits, `-` and `_` (and not `adhoc`, which names backfills run by hand)",
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(cx.err(
                &b.name,
                format!("backfills: two backfills are named `{name}`"),
                "give each a unique name",
            ));
        }
        let field = |key: &str| format!("backfills[{name}].{key}");
        let cron = b.schedule.value.parse::<croner::Cron>().map_err(|e| {
            cx.err(
                &b.schedule,
                format!("{}: `{}` is not a cron expression ({e})", field("schedule"), b.schedule.value),
                "write five fields: minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\" for 02:00 daily",
            )
        })?;
        let time_zone = match &b.time_zone {
            None => chrono_tz::UTC,
            Some(tz) => tz.value.trim().parse::<chrono_tz::Tz>().map_err(|_| {
                cx.err(
                    tz,
                    format!("{}: `{}` is not a time zone", field("time_zone"), tz.value),
                    "use an IANA name such as UTC, Europe/Berlin or America/New_York",
                )
            })?,
        };
        let mut tables = Vec::new();
        for t in &b.tables.value {
            let id = TableId::parse(t.value.trim()).ok_or_else(|| {
                cx.err(t, format!("{}: `{}` is not a table name", field("tables"), t.value), "write schema.table")
            })?;
            tables.push(id);
        }
        if tables.is_empty() {
            return Err(cx.err(
                &b.tables,
                format!("{}: the list is empty", field("tables")),
                "list the tables to read",
            ));
        }
        let cursor = match (b.mode.as_ref().map(|m| m.value.as_str()), &b.cursor) {
            (None | Some("full"), None) => None,
            (Some("incremental"), Some(c)) if !c.value.trim().is_empty() => Some(c.value.trim().to_string()),
            (Some("incremental"), _) => {
                return Err(cx.err(
                    b.mode.as_ref().expect("matched"),
                    format!("{}: incremental needs a cursor column", field("mode")),
                    "add `cursor: updated_at` (a column that grows on every insert and update)",
                ))
            }
            (None | Some("full"), Some(c)) => {
                return Err(cx.err(
                    c,
                    format!("{}: a cursor applies to incremental backfills only", field("cursor")),
                    "add `mode: incremental`, or remove `cursor`",
                ))
            }
            (Some(other), _) => {
                return Err(cx.err(
                    b.mode.as_ref().expect("matched"),
                    format!("{}: `{other}` is not a backfill mode", field("mode")),
                    "use `full` or `incremental`",
                ))
            }
        };
        let parallelism = match &b.parallelism {
            Some(p) if p.value == 0 || p.value > 64 => {
                return Err(cx.err(p, format!("{}: must be 1 to 64", field("parallelism")), "use a value like 2 or 4"))
            }
            Some(p) => p.value,
            None => DEFAULT_BACKFILL_PARALLELISM,
        };
        let chunk_rows = match &b.chunk_rows {
            Some(n) if n.value == 0 => {
                return Err(cx.err(
                    n,
                    format!("{}: must be at least 1", field("chunk_rows")),
                    "use a value like 100000",
                ))
            }
            Some(n) => n.value,
            None => DEFAULT_BACKFILL_CHUNK_ROWS,
        };
        let filter_at = b.filter.as_ref().map(|f| (f.referenced.line(), f.referenced.column()));
        let filter = b.filter.map(|f| f.value.trim().to_string()).filter(|f| !f.is_empty());
        out.push(BackfillSchedule {
            name,
            cron,
            time_zone,
            tables,
            filter,
            filter_at,
            cursor,
            parallelism,
            chunk_rows,
        });
    }
    Ok(out)
}

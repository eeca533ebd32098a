//! What to do when the target changed a record since sluice last wrote it.
//!
//! A sink detects a conflict per record: the target holds the record and its current mapped
//! fields are not what sluice last wrote there (sluice stores a hash of what it wrote next to
//! the record; a record created outside sluice has none). Without a conflict the source's
//! change is written as it is, whatever the strategy.

use super::Located;

/// A sink's declared strategy.
#[derive(Debug, Clone)]
pub enum Strategy {
    /// The source's change overwrites the target's.
    SourceWins,
    /// The target's edit stays; the source's change to that record is dropped.
    TargetWins,
    /// The later of the source's timestamp field and the target's wins (a tie goes to the
    /// source). A delete's timestamp is its commit time.
    NewestWins { source: Located, target_field: String },
    /// Each field belongs to one side: a target-owned field is written only when sluice creates
    /// the record; on an existing record only source-owned fields are written.
    Merge { target_owned: Vec<String> },
    /// The conflict waits in the review queue for `sluice conflicts resolve`; `target_owned`
    /// shapes the `merged` resolution.
    Manual { target_owned: Vec<String> },
}

impl Strategy {
    /// Whether the sink must read the target's state before writing.
    pub fn reads_target(&self) -> bool {
        !matches!(self, Strategy::SourceWins)
    }

    /// The decision `sluice conflicts resolve --take merged` applies: source-owned fields
    /// written, target-owned kept; a source delete goes through.
    pub fn merged(&self, is_delete: bool, fields: &[String]) -> Decision {
        let owned = match self {
            Strategy::Merge { target_owned } | Strategy::Manual { target_owned } => target_owned.as_slice(),
            _ => &[],
        };
        if is_delete {
            Decision::Write
        } else {
            Decision::WriteOwned(fields.iter().map(|f| !owned.contains(f)).collect())
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Strategy::SourceWins => "source_wins",
            Strategy::TargetWins => "target_wins",
            Strategy::NewestWins { .. } => "newest_wins",
            Strategy::Merge { .. } => "merge",
            Strategy::Manual { .. } => "manual",
        }
    }
}

/// The target's side of one record, as the sink read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetState {
    /// The record was changed outside sluice since sluice last wrote it.
    pub changed: bool,
    /// The target's timestamp field is later than the source's (newest_wins only).
    pub target_newer: bool,
}

/// What happens to one record's write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write it as mapped.
    Write,
    /// Update only the source-owned fields (mask aligned with the mapped fields).
    WriteOwned(Vec<bool>),
    /// Leave the target as it is.
    Keep,
    /// Park it for review.
    Park,
}

/// Decides one record. `target` is `None` when the target has no such record; `is_delete` for
/// a source delete; `fields` names the mapped fields.
pub fn decide(strategy: &Strategy, target: Option<&TargetState>, is_delete: bool, fields: &[String]) -> Decision {
    // Ownership holds whether or not the target changed the record this time: a target-owned
    // field is written only when sluice creates the record.
    if let (Strategy::Merge { .. }, Some(_), false) = (strategy, target, is_delete) {
        return strategy.merged(false, fields);
    }
    let Some(state) = target.filter(|t| t.changed) else { return Decision::Write };
    match strategy {
        Strategy::SourceWins => Decision::Write,
        Strategy::TargetWins => Decision::Keep,
        Strategy::NewestWins { .. } if state.target_newer => Decision::Keep,
        Strategy::NewestWins { .. } => Decision::Write,
        // The source owns the record's existence: its delete removes it.
        Strategy::Merge { .. } => Decision::Write,
        Strategy::Manual { .. } => Decision::Park,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_per_strategy() {
        let fields = ["email".to_string(), "phone".to_string()];
        let changed = TargetState { changed: true, target_newer: false };
        let newer = TargetState { changed: true, target_newer: true };
        let clean = TargetState { changed: false, target_newer: true };
        let merge = Strategy::Merge { target_owned: vec!["phone".into()] };
        let loc = super::super::Located {
            expr: std::sync::Arc::new(super::super::Expr::compile("{{ after.ts }}").unwrap()),
            file: "p".into(),
            line: 1,
            column: 1,
        };
        let newest = Strategy::NewestWins { source: loc, target_field: "ts".into() };
        let manual = Strategy::Manual { target_owned: vec![] };
        for s in [&Strategy::SourceWins, &Strategy::TargetWins, &newest, &merge, &manual] {
            assert_eq!(decide(s, None, false, &fields), Decision::Write, "{}: no target record", s.name());
        }
        for s in [&Strategy::SourceWins, &Strategy::TargetWins, &newest, &manual] {
            assert_eq!(decide(s, Some(&clean), false, &fields), Decision::Write, "{}: unchanged target", s.name());
        }
        // Ownership holds on every existing record, changed or not.
        assert_eq!(decide(&merge, Some(&clean), false, &fields), Decision::WriteOwned(vec![true, false]));
        assert_eq!(decide(&Strategy::SourceWins, Some(&changed), false, &fields), Decision::Write);
        assert_eq!(decide(&Strategy::TargetWins, Some(&changed), true, &fields), Decision::Keep);
        assert_eq!(decide(&newest, Some(&changed), false, &fields), Decision::Write);
        assert_eq!(decide(&newest, Some(&newer), false, &fields), Decision::Keep);
        assert_eq!(decide(&merge, Some(&changed), false, &fields), Decision::WriteOwned(vec![true, false]));
        assert_eq!(decide(&merge, Some(&changed), true, &fields), Decision::Write);
        assert_eq!(decide(&Strategy::Manual { target_owned: vec![] }, Some(&changed), false, &fields), Decision::Park);
    }
}

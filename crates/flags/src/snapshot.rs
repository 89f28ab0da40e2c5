//! The immutable set of flags that evaluation reads.

use std::collections::HashMap;

use domain::{FeatureFlag, FlagAction, FlagChange, FlagListing};

use crate::evaluate::{CompiledFlag, Evaluation};

/// Every flag as of one store revision, compiled for evaluation. A snapshot
/// never changes; the service replaces it whole.
#[derive(Debug, Clone, Default)]
pub struct FlagSnapshot {
    /// The store revision whose every change this snapshot contains. It may
    /// also contain later changes made through this process; then the
    /// store's revision differs, and the next poll reloads everything.
    revision: u64,
    flags: HashMap<String, CompiledFlag>,
}

impl FlagSnapshot {
    pub fn from_listing(listing: FlagListing) -> Self {
        let flags = listing
            .flags
            .into_iter()
            .map(|flag| (flag.name.as_str().to_owned(), CompiledFlag::new(flag)))
            .collect();
        Self {
            revision: listing.revision,
            flags,
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&CompiledFlag> {
        self.flags.get(name)
    }

    /// Evaluates `flag` for `user`, or returns `None` when no flag has that
    /// name.
    pub fn evaluate(&self, flag: &str, user: &str) -> Option<Evaluation> {
        self.flags.get(flag).map(|compiled| compiled.evaluate(user))
    }

    /// Returns the flags sorted by name.
    pub fn flags(&self) -> Vec<FeatureFlag> {
        let mut flags: Vec<FeatureFlag> = self
            .flags
            .values()
            .map(|compiled| compiled.flag().clone())
            .collect();
        flags.sort_by(|a, b| a.name.cmp(&b.name));
        flags
    }

    /// Returns a copy with one committed change applied. The revision moves
    /// to the change's revision only when that is the very next one, because
    /// otherwise another process changed something in between that this
    /// snapshot does not contain yet.
    pub(crate) fn with_change(&self, change: &FlagChange) -> Self {
        let mut next = self.clone();
        let name = change.flag.name.as_str();
        match change.action {
            Some(FlagAction::Created | FlagAction::Updated) => {
                next.flags
                    .insert(name.to_owned(), CompiledFlag::new(change.flag.clone()));
            }
            Some(FlagAction::Deleted) => {
                next.flags.remove(name);
            }
            None => return next,
        }
        if change.revision == self.revision.saturating_add(1) {
            next.revision = change.revision;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::DateTime;
    use domain::{FlagName, NewFlag, Rollout};

    use super::*;
    use crate::evaluate::Reason;

    fn flag(name: &str, enabled: bool) -> FeatureFlag {
        let new = NewFlag {
            enabled,
            rollout: Rollout::FULL,
            ..NewFlag::new(FlagName::parse(name).unwrap())
        };
        FeatureFlag::from_new(new, DateTime::UNIX_EPOCH)
    }

    fn snapshot(revision: u64, flags: Vec<FeatureFlag>) -> FlagSnapshot {
        FlagSnapshot::from_listing(FlagListing { revision, flags })
    }

    fn change(flag: FeatureFlag, action: Option<FlagAction>, revision: u64) -> FlagChange {
        FlagChange {
            flag,
            action,
            revision,
        }
    }

    #[test]
    fn evaluate_unknown_is_none() {
        let snapshot = snapshot(1, vec![flag("known", true)]);
        assert_eq!(snapshot.evaluate("other", "u"), None);
        assert_eq!(
            snapshot.evaluate("known", "u").unwrap().reason,
            Reason::Rollout
        );
    }

    #[test]
    fn flags_are_sorted() {
        let snapshot = snapshot(1, vec![flag("b", true), flag("c", true), flag("a", true)]);
        let names: Vec<String> = snapshot
            .flags()
            .iter()
            .map(|f| f.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(snapshot.len(), 3);
    }

    #[test]
    fn next_revision_advances() {
        let base = snapshot(4, vec![flag("a", true)]);
        let next = base.with_change(&change(flag("a", false), Some(FlagAction::Updated), 5));
        assert_eq!(next.revision(), 5);
        assert!(!next.get("a").unwrap().flag().enabled);
        assert!(
            base.get("a").unwrap().flag().enabled,
            "the old snapshot is unchanged"
        );
    }

    #[test]
    fn gap_keeps_old_revision() {
        let base = snapshot(4, vec![]);
        let next = base.with_change(&change(flag("a", true), Some(FlagAction::Created), 7));
        assert_eq!(
            next.revision(),
            4,
            "revisions 5 and 6 are not in this snapshot"
        );
        assert!(next.get("a").is_some());
    }

    #[test]
    fn delete_removes_flag() {
        let base = snapshot(4, vec![flag("a", true), flag("b", true)]);
        let next = base.with_change(&change(flag("a", true), Some(FlagAction::Deleted), 5));
        assert!(next.get("a").is_none());
        assert!(next.get("b").is_some());
        assert_eq!(next.revision(), 5);
    }

    #[test]
    fn no_op_change_keeps_everything() {
        let base = snapshot(4, vec![flag("a", true)]);
        let next = base.with_change(&change(flag("a", false), None, 4));
        assert!(next.get("a").unwrap().flag().enabled);
        assert_eq!(next.revision(), 4);
    }
}

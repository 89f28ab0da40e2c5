//! Logging of evaluations of flags that do not exist: once per name, with a
//! bounded set of names.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use domain::MAX_FLAG_NAME_LEN;

/// Outcome of [`UnknownFlags::record`] for one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// First time for this name: logged.
    Logged,
    /// Logged before.
    Repeat,
    /// The set of names is full, so this name was counted but not logged.
    Dropped,
}

/// The unknown flag names seen so far, up to a fixed number of them.
#[derive(Debug)]
pub(crate) struct UnknownFlags {
    logged: Mutex<HashSet<String>>,
    capacity: usize,
    full_logged: AtomicBool,
    evaluations: AtomicU64,
    default: bool,
}

impl UnknownFlags {
    pub(crate) fn new(capacity: usize, default: bool) -> Self {
        Self {
            logged: Mutex::new(HashSet::new()),
            capacity,
            full_logged: AtomicBool::new(false),
            evaluations: AtomicU64::new(0),
            default,
        }
    }

    /// Counts one evaluation of `name` and logs a warning the first time
    /// the name is seen.
    pub(crate) fn record(&self, name: &str) -> Recorded {
        self.evaluations.fetch_add(1, Ordering::Relaxed);
        // No flag name is longer than the maximum, so a longer name is kept
        // as a prefix: that bounds the memory per name.
        let key = prefix(name, MAX_FLAG_NAME_LEN + 1);

        let mut logged = self
            .logged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if logged.contains(key) {
            return Recorded::Repeat;
        }
        if logged.len() >= self.capacity {
            drop(logged);
            if !self.full_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    capacity = self.capacity,
                    "too many distinct unknown feature flag names; further ones are counted but not logged"
                );
            }
            return Recorded::Dropped;
        }
        logged.insert(key.to_owned());
        drop(logged);

        tracing::warn!(
            flag = key,
            default = self.default,
            "evaluated a feature flag that does not exist, so it returned the configured default; create the flag or fix the name"
        );
        Recorded::Logged
    }

    /// Evaluations of unknown flags so far, logged or not.
    pub(crate) fn evaluations(&self) -> u64 {
        self.evaluations.load(Ordering::Relaxed)
    }
}

/// Returns the longest prefix of `text` of at most `max` bytes that ends on
/// a character boundary.
fn prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_each_name_once() {
        let unknown = UnknownFlags::new(10, false);
        assert_eq!(unknown.record("a"), Recorded::Logged);
        assert_eq!(unknown.record("a"), Recorded::Repeat);
        assert_eq!(unknown.record("b"), Recorded::Logged);
        assert_eq!(unknown.record("a"), Recorded::Repeat);
        assert_eq!(unknown.evaluations(), 4);
    }

    #[test]
    fn stops_growing_at_capacity() {
        let unknown = UnknownFlags::new(3, false);
        for name in ["a", "b", "c"] {
            assert_eq!(unknown.record(name), Recorded::Logged);
        }
        assert_eq!(unknown.record("d"), Recorded::Dropped);
        assert_eq!(unknown.record("e"), Recorded::Dropped);
        assert_eq!(unknown.record("a"), Recorded::Repeat);
        assert_eq!(unknown.evaluations(), 6);
        let logged = unknown
            .logged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        assert_eq!(logged.len(), 3);
    }

    #[test]
    fn long_names_are_kept_as_prefix() {
        let unknown = UnknownFlags::new(10, false);
        let long = "x".repeat(10_000);
        assert_eq!(unknown.record(&long), Recorded::Logged);
        let logged = unknown
            .logged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        assert!(
            logged
                .iter()
                .all(|name| name.len() == MAX_FLAG_NAME_LEN + 1)
        );
    }

    #[test]
    fn prefix_respects_char_boundaries() {
        assert_eq!(prefix("abc", 10), "abc");
        assert_eq!(prefix("abcdef", 3), "abc");
        // 'é' is two bytes, so a cut inside it moves back before it.
        assert_eq!(prefix("aé", 2), "a");
    }

    #[test]
    fn zero_capacity_logs_nothing() {
        let unknown = UnknownFlags::new(0, true);
        assert_eq!(unknown.record("a"), Recorded::Dropped);
        assert_eq!(unknown.evaluations(), 1);
    }
}

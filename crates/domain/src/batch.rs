use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{BatchId, UserId};

/// The state of a batch. It is never set directly: [`BatchCounters::status`]
/// derives it from the item counters every time they change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchStatus {
    /// Accepted; no item has started yet.
    Pending,
    /// At least one item has started or finished, and some are not finished.
    Processing,
    /// Every item succeeded. Terminal.
    Completed,
    /// Every item is finished and at least one is dead. Terminal.
    Failed,
    /// Every item is finished, none is dead, and at least one was
    /// cancelled. Terminal.
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 5] = [
        BatchStatus::Pending,
        BatchStatus::Processing,
        BatchStatus::Completed,
        BatchStatus::Failed,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Pending => "pending",
            BatchStatus::Processing => "processing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Cancelled
        )
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BatchStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BatchStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = BatchStatus::ALL
                    .iter()
                    .map(|status| status.as_str())
                    .collect();
                format!(
                    "unknown batch status {s:?}; use one of: {}",
                    known.join(", ")
                )
            })
    }
}

/// A batch's item counters. `failed` counts dead items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchCounters {
    pub item_count: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl BatchCounters {
    /// Items in a terminal state.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled
    }

    /// Derives the batch status from the counters and whether any item has
    /// started. This is the only place the rule is written down.
    pub fn status(&self, started: bool) -> BatchStatus {
        let all_finished = self.finished() >= self.item_count;

        if all_finished {
            if self.failed > 0 {
                BatchStatus::Failed
            } else if self.cancelled > 0 {
                BatchStatus::Cancelled
            } else {
                BatchStatus::Completed
            }
        } else if started || self.finished() > 0 {
            BatchStatus::Processing
        } else {
            BatchStatus::Pending
        }
    }

    /// Share of finished items, 0 to 100, rounded down so that 100 means done.
    pub fn percentage(&self) -> u8 {
        if self.item_count == 0 {
            return 100;
        }
        let percent = self.finished().saturating_mul(100) / self.item_count;
        percent.min(100) as u8
    }
}

/// A submitter's request to create a batch.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub id: BatchId,
    pub owner: UserId,
    pub kind: String,
    /// Higher runs first. Applies to every item.
    pub priority: i32,
    /// Attempts per item before it is dead-lettered (the first run counts).
    pub max_attempts: u32,
    /// Earliest time any item may run; `None` means now.
    pub run_at: Option<DateTime<Utc>>,
    pub config: serde_json::Value,
    pub metadata: serde_json::Value,
    pub correlation_id: Option<String>,
    /// W3C `traceparent` of the request that created the batch; attempts
    /// continue this trace.
    pub traceparent: Option<String>,
    /// With a key, a repeated create by the same owner returns the first
    /// batch instead of making a second one.
    pub idempotency_key: Option<String>,
    /// Digest of the request body, so a key reused for a different request
    /// is rejected rather than silently returning the wrong batch.
    pub request_digest: Option<String>,
    /// Batches that must complete before any item of this one runs.
    pub depends_on: Vec<BatchId>,
}

impl NewBatch {
    /// Creates a batch with the default priority and attempts, and no metadata.
    pub fn new(owner: UserId, kind: impl Into<String>) -> Self {
        Self {
            id: BatchId::new(),
            owner,
            kind: kind.into(),
            priority: 0,
            max_attempts: 4,
            run_at: None,
            config: serde_json::Value::Object(Default::default()),
            metadata: serde_json::Value::Object(Default::default()),
            correlation_id: None,
            traceparent: None,
            idempotency_key: None,
            request_digest: None,
            depends_on: Vec::new(),
        }
    }
}

/// Longest accepted kind name, in bytes.
pub const MAX_KIND_BYTES: usize = 128;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

impl NewBatch {
    /// Checks what every store requires of a new batch before writing it.
    pub fn validate(&self) -> Result<(), crate::StoreError> {
        let invalid = |field, reason: String| Err(crate::StoreError::Invalid { field, reason });
        if self.kind.is_empty() || self.kind.len() > MAX_KIND_BYTES {
            return invalid("kind", format!("must be 1 to {MAX_KIND_BYTES} bytes long"));
        }
        if self.owner.as_str().is_empty() {
            return invalid("owner", "must not be empty".to_owned());
        }
        if self.max_attempts == 0 {
            return invalid("maxAttempts", "must be at least 1".to_owned());
        }
        if let Some(key) = &self.idempotency_key
            && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES)
        {
            return invalid(
                "idempotencyKey",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes long"),
            );
        }
        Ok(())
    }
}

/// Read model of a batch with its counters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    pub id: BatchId,
    pub owner: UserId,
    pub kind: String,
    pub status: BatchStatus,
    #[serde(flatten)]
    pub counters: BatchCounters,
    pub priority: i32,
    pub max_attempts: u32,
    pub config: serde_json::Value,
    pub metadata: serde_json::Value,
    pub correlation_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub cancel_requested: bool,
    /// Bumped by every retry or re-drive that reopens a finished batch; each
    /// generation finishes at most once.
    pub generation: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Alias kept for listings, which return the same shape as a single batch.
pub type BatchSummary = Batch;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counters(item_count: u64, succeeded: u64, failed: u64, cancelled: u64) -> BatchCounters {
        BatchCounters {
            item_count,
            succeeded,
            failed,
            cancelled,
        }
    }

    #[test]
    fn validate_names_the_field_at_fault() {
        let field_of = |batch: NewBatch| match batch.validate() {
            Err(crate::StoreError::Invalid { field, .. }) => Some(field),
            _ => None,
        };
        let ok = NewBatch::new(UserId::new("alice"), "webhook");
        assert_eq!(field_of(ok.clone()), None);
        assert_eq!(
            field_of(NewBatch::new(UserId::new("alice"), "")),
            Some("kind")
        );
        let long_kind = "k".repeat(MAX_KIND_BYTES + 1);
        assert_eq!(
            field_of(NewBatch::new(UserId::new("alice"), long_kind)),
            Some("kind")
        );
        assert_eq!(
            field_of(NewBatch::new(UserId::new(""), "webhook")),
            Some("owner")
        );
        let no_attempts = NewBatch {
            max_attempts: 0,
            ..ok.clone()
        };
        assert_eq!(field_of(no_attempts), Some("maxAttempts"));
        let long_key = NewBatch {
            idempotency_key: Some("x".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1)),
            ..ok
        };
        assert_eq!(field_of(long_key), Some("idempotencyKey"));
    }

    #[test]
    fn status_follows_the_definitions() {
        assert_eq!(counters(3, 0, 0, 0).status(false), BatchStatus::Pending);
        assert_eq!(counters(3, 0, 0, 0).status(true), BatchStatus::Processing);
        assert_eq!(counters(3, 1, 0, 0).status(false), BatchStatus::Processing);
        assert_eq!(counters(3, 3, 0, 0).status(true), BatchStatus::Completed);
        assert_eq!(counters(3, 2, 1, 0).status(true), BatchStatus::Failed);
        assert_eq!(counters(3, 2, 0, 1).status(true), BatchStatus::Cancelled);
    }

    #[test]
    fn dead_item_outranks_cancelled_ones() {
        assert_eq!(counters(4, 0, 1, 3).status(true), BatchStatus::Failed);
    }

    #[test]
    fn percentage_reaches_100_only_when_done() {
        assert_eq!(counters(3, 2, 0, 0).percentage(), 66);
        assert_eq!(counters(3, 2, 1, 0).percentage(), 100);
        assert_eq!(counters(1000, 999, 0, 0).percentage(), 99);
    }

    /// Counters whose finished items never exceed the item count.
    fn any_counters() -> impl Strategy<Value = BatchCounters> {
        (1u64..50)
            .prop_flat_map(|item_count| (Just(item_count), 0..=item_count))
            .prop_flat_map(|(item_count, succeeded)| {
                (
                    Just(item_count),
                    Just(succeeded),
                    0..=item_count - succeeded,
                )
            })
            .prop_flat_map(|(item_count, succeeded, failed)| {
                let rest = item_count - succeeded - failed;
                (Just(item_count), Just(succeeded), Just(failed), 0..=rest)
            })
            .prop_map(|(item_count, succeeded, failed, cancelled)| {
                counters(item_count, succeeded, failed, cancelled)
            })
    }

    proptest! {
        /// Completed means every item succeeded; failed means every item is
        /// terminal and one is dead; anything unfinished is not terminal.
        #[test]
        fn derived_status_matches_counters(c in any_counters(), started: bool) {
            let status = c.status(started);
            let all_finished = c.finished() == c.item_count;

            prop_assert_eq!(status.is_terminal(), all_finished);
            prop_assert_eq!(status == BatchStatus::Completed, c.succeeded == c.item_count);
            prop_assert_eq!(status == BatchStatus::Failed, all_finished && c.failed > 0);
            prop_assert_eq!(status == BatchStatus::Pending, !started && c.finished() == 0);
        }
    }
}

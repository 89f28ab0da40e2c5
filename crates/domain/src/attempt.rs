use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Number of failed attempts kept per job. Older records are dropped first,
/// so a job that is asked to retry later for days keeps a bounded history.
pub const MAX_ATTEMPT_HISTORY: usize = 25;

/// Cause of an attempt's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureKind {
    /// The handler returned a retryable error.
    Error,
    /// The handler returned an error that no retry can fix.
    Permanent,
    /// The handler ran past its kind's timeout and was cancelled.
    Timeout,
    /// The handler asked to run again after a delay (an upstream 429, say).
    /// It does not count against the job's attempts.
    RetryAfter,
    /// The worker's lease ran out, usually because its process died.
    LeaseExpired,
}

/// One failed attempt in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// Attempt number, 1 for the first run.
    pub attempt: u32,
    pub kind: FailureKind,
    pub error: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
}

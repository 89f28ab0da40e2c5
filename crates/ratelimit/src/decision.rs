//! The limiter trait, its decision and its error.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{GcraOutcome, StoreError};

use crate::policy::Policy;

/// A rate limiter: checks `cost` units for `key` against `policy` at
/// `now`, and consumes them when they fit.
#[async_trait]
pub trait RateLimiter: Send + Sync + std::fmt::Debug {
    /// Admits or denies `cost` units. `cost` is 1 for a request and N for
    /// a batch of N items; 0 is rejected with [`RateLimitError::ZeroCost`].
    /// A denied check consumes nothing.
    async fn check(
        &self,
        policy: &Policy,
        key: &str,
        cost: u32,
        now: DateTime<Utc>,
    ) -> Result<Decision, RateLimitError>;
}

/// Errors of a check. A denial is not an error: it is a [`Decision`].
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error(
        "rate-limit cost 0 is invalid; pass the number of requests or items to admit, at least 1"
    )]
    ZeroCost,

    /// The shared store failed or contains a value the rule cannot use.
    #[error("checking the rate-limit state of policy {policy} failed")]
    Store {
        policy: String,
        #[source]
        source: StoreError,
    },

    #[error("pruning stored rate-limit state failed")]
    Prune(#[source] StoreError),
}

/// Whether a check admitted its cost, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The key is over its rate. The same cost fits after `retry_after`.
    RateExceeded {
        retry_after: Duration,
    },
    /// The cost is larger than one check can ever admit (`burst + 1`), so
    /// waiting does not help: split the batch into parts of at most
    /// `max_cost`, the first of at most [`Decision::available_now`].
    CostTooLarge {
        cost: u32,
        max_cost: u32,
    },
}

/// The outcome of a check and the key's state after it, for the
/// `RateLimit-*` and `Retry-After` response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The policy's limit: units per period at the sustained rate.
    pub limit: u32,
    /// Units left of the limit for the coming period:
    /// `limit - ceil((TAT - now) / T)`, at least 0. After N units at one
    /// instant a fresh key reports `limit - N`. It counts the limit only:
    /// the burst may admit a little more, and pacing may deny a request
    /// while this is above 0, which [`Decision::available_now`] shows.
    pub remaining: u32,
    /// The largest cost that would be admitted right now:
    /// `floor((tolerance + T - (TAT - now)) / T)`, between 0 and `burst + 1`.
    pub available_now: u32,
    /// When the key's budget is full again (`remaining == limit`).
    pub reset_at: DateTime<Utc>,
    /// `reset_at` minus the check's `now`.
    pub reset_after: Duration,
}

impl Decision {
    /// Builds the decision for `cost` units from the GCRA outcome of a
    /// check of `policy` at `now`.
    pub(crate) fn from_outcome(
        policy: &Policy,
        cost: u32,
        outcome: GcraOutcome,
        now: DateTime<Utc>,
    ) -> Self {
        let params = policy.gcra();
        let interval = i128::from(params.emission_interval_ms.max(1));
        let tolerance = i128::from(params.tolerance_ms.max(0));
        let now_ms = now.timestamp_millis();
        // How far the TAT runs ahead of now; 0 for a full budget.
        let ahead = (i128::from(outcome.tat_ms) - i128::from(now_ms)).max(0);

        let used = (ahead + interval - 1) / interval;
        let remaining = (i128::from(policy.limit()) - used).clamp(0, i128::from(policy.limit()));
        let available =
            ((tolerance + interval - ahead) / interval).clamp(0, i128::from(policy.max_cost()));

        let verdict = if outcome.allowed {
            Verdict::Allowed
        } else if cost > policy.max_cost() {
            Verdict::CostTooLarge {
                cost,
                max_cost: policy.max_cost(),
            }
        } else {
            // The cost fits once max(TAT, t) + cost * T - t <= tolerance + T.
            let wait = ahead + i128::from(cost) * interval - tolerance - interval;
            Verdict::RateExceeded {
                retry_after: millis(wait.max(1)),
            }
        };

        let reset_after = millis(ahead);
        let reset_at = DateTime::from_timestamp_millis(now_ms.saturating_add(to_i64(ahead)))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);

        Self {
            verdict,
            limit: policy.limit(),
            remaining: to_u32(remaining),
            available_now: to_u32(available),
            reset_at,
            reset_after,
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allowed)
    }

    /// Returns how long to wait before the same cost fits, or `None` when
    /// it was allowed or can never fit.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.verdict {
            Verdict::RateExceeded { retry_after } => Some(retry_after),
            Verdict::Allowed | Verdict::CostTooLarge { .. } => None,
        }
    }

    /// [`retry_after`](Self::retry_after) in whole seconds, rounded up,
    /// as the `Retry-After` header wants it.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after().map(ceil_secs)
    }

    /// [`reset_after`](Self::reset_after) in whole seconds, rounded up.
    pub fn reset_after_secs(&self) -> u64 {
        ceil_secs(self.reset_after)
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    let whole = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    }
}

fn millis(value: i128) -> Duration {
    Duration::from_millis(u64::try_from(value.max(0)).unwrap_or(u64::MAX))
}

fn to_u32(value: i128) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

fn to_i64(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

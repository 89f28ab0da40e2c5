//! The shared rate limiter's store contract: GCRA state per policy and key,
//! checked and consumed in one atomic step.
//!
//! GCRA (the generic cell rate algorithm) keeps one number per key, the
//! theoretical arrival time (TAT): the time at which the key's budget is
//! full again. A request of `cost` units is admitted when
//! `max(TAT, now) + cost * T - now <= tolerance + T`, and then the TAT
//! becomes `max(TAT, now) + cost * T`. A denied request changes nothing.
//! `T` is the emission interval (the time one unit occupies) and the
//! tolerance is how far ahead of `now` the TAT may already run.
//!
//! The rule lives here, in [`GcraParams::check`], so every store backend
//! and the in-memory limiter admit exactly the same requests. A backend
//! only has to make the read, the rule and the write one atomic step.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::StoreError;

/// The two GCRA parameters of a rate-limit policy, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GcraParams {
    /// `T`: the time one unit of cost occupies; at least 1.
    pub emission_interval_ms: i64,
    /// How far ahead of `now` the TAT may run before a request of cost 1
    /// is denied; at least 0. `tolerance / T` extra units fit at once.
    pub tolerance_ms: i64,
}

/// The result of one GCRA check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraOutcome {
    pub allowed: bool,
    /// The key's TAT after the check, in milliseconds since the Unix epoch:
    /// the new TAT when allowed, otherwise `max(stored TAT, now)`. A value
    /// at or before `now` means the key's budget is full.
    pub tat_ms: i64,
}

impl GcraParams {
    /// Largest cost one check can ever admit: `1 + tolerance / T`.
    pub fn max_cost(&self) -> u64 {
        let interval = self.emission_interval_ms.max(1);
        1 + (self.tolerance_ms.max(0) / interval) as u64
    }

    /// Applies the GCRA rule to a key whose stored TAT is `stored_tat_ms`
    /// (`None` for a key with no state) and returns the decision and the
    /// TAT to store. It only computes: storing the new TAT when
    /// `allowed` is the caller's job.
    ///
    /// Fails with [`StoreError::Invalid`] when `cost` is 0, `T` is below 1,
    /// the tolerance is negative, or the new TAT would not fit in an `i64`.
    pub fn check(
        &self,
        stored_tat_ms: Option<i64>,
        cost: u32,
        now_ms: i64,
    ) -> Result<GcraOutcome, StoreError> {
        if cost == 0 {
            return Err(invalid("cost", "must be at least 1".to_owned()));
        }
        if self.emission_interval_ms < 1 {
            return Err(invalid(
                "emission_interval_ms",
                format!("must be at least 1, got {}", self.emission_interval_ms),
            ));
        }
        if self.tolerance_ms < 0 {
            return Err(invalid(
                "tolerance_ms",
                format!("must not be negative, got {}", self.tolerance_ms),
            ));
        }

        // Every sum below fits in i128, even for a corrupt stored TAT near
        // i64::MAX and a cost of u32::MAX.
        let base = i128::from(stored_tat_ms.unwrap_or(now_ms).max(now_ms));
        let interval = i128::from(self.emission_interval_ms);
        let new_tat = base + i128::from(cost) * interval;
        let allowed = new_tat - i128::from(now_ms) <= i128::from(self.tolerance_ms) + interval;

        let tat = if allowed { new_tat } else { base };
        let tat_ms = i64::try_from(tat).map_err(|_| {
            invalid(
                "tolerance_ms",
                format!(
                    "{} is too large: the new TAT does not fit in 64 bits",
                    self.tolerance_ms
                ),
            )
        })?;
        Ok(GcraOutcome { allowed, tat_ms })
    }
}

fn invalid(field: &'static str, reason: String) -> StoreError {
    StoreError::Invalid { field, reason }
}

/// One check of a key against a policy, as a store receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcraRequest {
    /// The policy's name; state is kept per policy and key.
    pub policy: String,
    pub key: String,
    /// Units to consume: 1 for a request, N for a batch of N items.
    pub cost: u32,
    pub params: GcraParams,
    pub now: DateTime<Utc>,
}

impl GcraRequest {
    /// Returns the time `self.cost` units occupy, `cost * T`, in milliseconds.
    pub fn cost_ms(&self) -> i64 {
        i64::from(self.cost).saturating_mul(self.params.emission_interval_ms.max(1))
    }

    /// Applies [`GcraParams::check`] to the stored TAT at `self.now`.
    pub fn apply(&self, stored_tat_ms: Option<i64>) -> Result<GcraOutcome, StoreError> {
        self.params
            .check(stored_tat_ms, self.cost, self.now.timestamp_millis())
    }
}

/// GCRA state that several processes share through one database.
///
/// A PostgreSQL backend can run [`check_gcra`](Self::check_gcra) as one
/// statement: an `INSERT ... SELECT ... WHERE <fresh key conforms>` with
/// `ON CONFLICT (policy, key) DO UPDATE SET tat_ms = GREATEST(tat_ms, now)
/// + cost * T ... WHERE <stored key conforms> RETURNING tat_ms`. A returned
/// row means allowed; no row means denied, and a plain read of the TAT
/// then fills in [`GcraOutcome::tat_ms`] for the retry time.
#[async_trait]
pub trait RateLimitStore: Send + Sync + 'static {
    /// Reads the TAT of `(request.policy, request.key)`, applies
    /// [`GcraRequest::apply`] and, when allowed, stores the new TAT, as one
    /// atomic step: no other check of the same key, from this process or
    /// another, runs between the read and the write.
    async fn check_gcra(&self, request: GcraRequest) -> Result<GcraOutcome, StoreError>;

    /// Gives back `request.cost` units that an allowed check took but the
    /// caller did not use: the TAT moves back by `cost * T`, never before
    /// `request.now`. A key without state is left alone.
    async fn refund_gcra(&self, request: GcraRequest) -> Result<(), StoreError>;

    /// Deletes up to `max_rows` keys whose TAT is at or before `now`. Such
    /// a key's budget is full, so its row is the same as no row. Returns
    /// the number deleted; call again while it equals `max_rows`.
    async fn prune_rate_limits(&self, now: DateTime<Utc>, max_rows: u32)
    -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: GcraParams = GcraParams {
        emission_interval_ms: 100,
        tolerance_ms: 200,
    };

    #[test]
    fn fresh_key_admits_max_cost_at_once() {
        assert_eq!(PARAMS.max_cost(), 3);
        let mut tat = None;
        for n in 1..=3 {
            let outcome = PARAMS.check(tat, 1, 1_000).unwrap();
            assert!(outcome.allowed, "request {n} should be allowed");
            assert_eq!(outcome.tat_ms, 1_000 + n * 100);
            tat = Some(outcome.tat_ms);
        }
        let denied = PARAMS.check(tat, 1, 1_000).unwrap();
        assert!(!denied.allowed);
        assert_eq!(denied.tat_ms, 1_300);
    }

    #[test]
    fn denied_check_keeps_tat() {
        let outcome = PARAMS.check(Some(1_300), 1, 1_099).unwrap();
        assert!(!outcome.allowed);
        assert_eq!(outcome.tat_ms, 1_300);
        let outcome = PARAMS.check(Some(1_300), 1, 1_100).unwrap();
        assert!(outcome.allowed);
        assert_eq!(outcome.tat_ms, 1_400);
    }

    #[test]
    fn stale_tat_counts_as_now() {
        let outcome = PARAMS.check(Some(10), 3, 1_000).unwrap();
        assert!(outcome.allowed);
        assert_eq!(outcome.tat_ms, 1_300);
    }

    #[test]
    fn cost_above_max_is_denied_on_fresh_key() {
        let outcome = PARAMS.check(None, 4, 1_000).unwrap();
        assert!(!outcome.allowed);
        assert_eq!(outcome.tat_ms, 1_000);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert!(PARAMS.check(None, 0, 0).is_err());
        let zero_interval = GcraParams {
            emission_interval_ms: 0,
            tolerance_ms: 0,
        };
        assert!(zero_interval.check(None, 1, 0).is_err());
        let negative_tolerance = GcraParams {
            emission_interval_ms: 1,
            tolerance_ms: -1,
        };
        assert!(negative_tolerance.check(None, 1, 0).is_err());
    }

    #[test]
    fn huge_stored_tat_is_denied_without_overflow() {
        let outcome = PARAMS.check(Some(i64::MAX), u32::MAX, 0).unwrap();
        assert!(!outcome.allowed);
        assert_eq!(outcome.tat_ms, i64::MAX);
    }
}

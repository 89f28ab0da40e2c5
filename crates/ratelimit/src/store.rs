//! The store-backed limiter: GCRA state in a [`RateLimitStore`] that
//! several processes share.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{GcraRequest, RateLimitStore};

use crate::decision::{Decision, RateLimitError, RateLimiter};
use crate::policy::Policy;

/// Keys deleted per transaction by [`StoreLimiter::prune`].
const PRUNE_CHUNK_ROWS: u32 = 1_000;

/// A limiter whose state lives in a shared store, so every process on the
/// same database enforces one limit per key. Each check is one atomic
/// store operation; see [`RateLimitStore::check_gcra`].
pub struct StoreLimiter<S: ?Sized> {
    store: Arc<S>,
}

impl<S: ?Sized> std::fmt::Debug for StoreLimiter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLimiter").finish_non_exhaustive()
    }
}

impl<S: ?Sized> Clone for StoreLimiter<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
        }
    }
}

impl<S: RateLimitStore + ?Sized> StoreLimiter<S> {
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    /// Deletes every stored key whose budget is full at `now`, in chunks
    /// of one transaction each, and returns how many were deleted. Call it
    /// from a timer; checks stay correct without it.
    pub async fn prune(&self, now: DateTime<Utc>) -> Result<u64, RateLimitError> {
        let mut total = 0;
        loop {
            let deleted = self
                .store
                .prune_rate_limits(now, PRUNE_CHUNK_ROWS)
                .await
                .map_err(RateLimitError::Prune)?;
            total += deleted;
            if deleted < u64::from(PRUNE_CHUNK_ROWS) {
                return Ok(total);
            }
        }
    }
}

#[async_trait]
impl<S: RateLimitStore + ?Sized> RateLimiter for StoreLimiter<S> {
    async fn check(
        &self,
        policy: &Policy,
        key: &str,
        cost: u32,
        now: DateTime<Utc>,
    ) -> Result<Decision, RateLimitError> {
        if cost == 0 {
            return Err(RateLimitError::ZeroCost);
        }
        // A cost above max_cost still goes to the store: it is denied there
        // without a write, and the stored TAT gives the denial's
        // available_now.
        let request = GcraRequest {
            policy: policy.name().to_owned(),
            key: key.to_owned(),
            cost,
            params: policy.gcra(),
            now,
        };
        let outcome =
            self.store
                .check_gcra(request)
                .await
                .map_err(|source| RateLimitError::Store {
                    policy: policy.name().to_owned(),
                    source,
                })?;

        let decision = Decision::from_outcome(policy, cost, outcome, now);
        if !decision.is_allowed() {
            tracing::debug!(
                policy = policy.name(),
                key,
                cost,
                verdict = ?decision.verdict,
                "rate limit denied a request"
            );
        }
        Ok(decision)
    }
}

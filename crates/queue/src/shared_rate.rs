//! Processing rate limits shared by every process on one store.
//!
//! With one process, [`Throttle`](crate::throttle::Throttle) keeps each
//! key's GCRA state in memory. Several processes on one database would each
//! allow the full rate, so a queue built with
//! [`QueueBuilder::shared_rates`](crate::QueueBuilder::shared_rates) keeps
//! the state in the store's rate-limit table instead, one row per key,
//! checked and updated atomically by [`RateLimitStore::check_gcra`].
//!
//! A kind's rate is charged before claiming, as in one process, and what
//! the claim did not use is refunded, so an idle worker's empty claim costs
//! nothing. A per-owner rate can only be charged after claiming, once the
//! owners are known; claimed jobs that find no budget are deferred, as the
//! local per-owner limit does: back to `scheduled`, attempt not counted.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{GcraParams, GcraRequest, RateLimitStore, StoreError};

use crate::config::Rate;

/// Policy name of a kind's rate in the store's rate-limit table.
pub(crate) const KIND_POLICY: &str = "queue.kind";
/// Policy name of a kind's per-owner rate.
pub(crate) const USER_POLICY: &str = "queue.user";

/// Maximum store checks per grant. A denial reports how much still fits,
/// so the next check asks for that, and a third check is rarely needed.
const MAX_CHECKS: usize = 3;

/// Returns the GCRA parameters of a processing rate. The interval is
/// rounded up, so the shared limit is never looser than the configured one.
pub(crate) fn params(rate: Rate) -> GcraParams {
    let max = u64::from(rate.max.max(1));
    let burst = i64::from(rate.burst().clamp(1, rate.max.max(1)));
    let per_ms = u64::try_from(rate.per.as_millis()).unwrap_or(u64::MAX);
    let interval = i64::try_from(per_ms.div_ceil(max).max(1)).unwrap_or(i64::MAX);
    GcraParams {
        emission_interval_ms: interval,
        tolerance_ms: interval.saturating_mul(burst - 1),
    }
}

/// The store-backed limiter the queue consults.
#[derive(Clone)]
pub(crate) struct SharedRates {
    store: Arc<dyn RateLimitStore>,
}

impl std::fmt::Debug for SharedRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRates").finish_non_exhaustive()
    }
}

impl SharedRates {
    pub(crate) fn new(store: Arc<dyn RateLimitStore>) -> Self {
        Self { store }
    }

    /// Grants up to `wanted` starts for `key` at `now`. Returns how many
    /// were granted and, when fewer than wanted, how long until the next
    /// one fits.
    pub(crate) async fn take_up_to(
        &self,
        policy: &str,
        key: &str,
        wanted: u32,
        params: GcraParams,
        now: DateTime<Utc>,
    ) -> Result<(u32, Option<Duration>), StoreError> {
        let interval = params.emission_interval_ms.max(1);
        let mut cost = wanted.min(u32::try_from(params.max_cost()).unwrap_or(u32::MAX));
        let mut wait = Duration::from_millis(interval as u64);

        for _ in 0..MAX_CHECKS {
            if cost == 0 {
                break;
            }
            let outcome = self
                .store
                .check_gcra(GcraRequest {
                    policy: policy.to_owned(),
                    key: key.to_owned(),
                    cost,
                    params,
                    now,
                })
                .await?;
            if outcome.allowed {
                let wait = (cost < wanted).then_some(wait);
                return Ok((cost, wait));
            }

            // A denial reports the key's TAT, from which the units that
            // still fit follow: `cost * T <= tolerance + T - ahead`.
            let ahead = (outcome.tat_ms - now.timestamp_millis()).max(0);
            let room = params.tolerance_ms + interval - ahead;
            let fits = u32::try_from((room / interval).max(0)).unwrap_or(0);
            wait = Duration::from_millis((ahead - params.tolerance_ms).max(1) as u64);
            cost = fits.min(cost - 1);
        }
        Ok((0, Some(wait)))
    }

    /// Deletes the state of keys whose budget is full again, which is the
    /// same as no state, so the table holds only recently active kinds and
    /// owners. Returns how many keys were deleted.
    pub(crate) async fn prune(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        const CHUNK: u32 = 1_000;
        let mut deleted = 0;
        loop {
            let chunk = self.store.prune_rate_limits(now, CHUNK).await?;
            deleted += chunk;
            if chunk < u64::from(CHUNK) {
                return Ok(deleted);
            }
        }
    }

    /// Gives back `unused` starts that [`take_up_to`](Self::take_up_to)
    /// granted but no job used.
    pub(crate) async fn refund(
        &self,
        policy: &str,
        key: &str,
        unused: u32,
        params: GcraParams,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if unused == 0 {
            return Ok(());
        }
        self.store
            .refund_gcra(GcraRequest {
                policy: policy.to_owned(),
                key: key.to_owned(),
                cost: unused,
                params,
                now,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use domain::GcraOutcome;

    use super::*;

    /// Applies the shared rule to a map, as a store would.
    #[derive(Default)]
    struct MapStore {
        tat: Mutex<HashMap<(String, String), i64>>,
        checks: Mutex<u32>,
    }

    #[async_trait]
    impl RateLimitStore for MapStore {
        async fn check_gcra(&self, request: GcraRequest) -> Result<GcraOutcome, StoreError> {
            *self.checks.lock().unwrap() += 1;
            let mut tat = self.tat.lock().unwrap();
            let key = (request.policy.clone(), request.key.clone());
            let outcome = request.apply(tat.get(&key).copied())?;
            if outcome.allowed {
                tat.insert(key, outcome.tat_ms);
            }
            Ok(outcome)
        }

        async fn refund_gcra(&self, request: GcraRequest) -> Result<(), StoreError> {
            let mut tat = self.tat.lock().unwrap();
            let key = (request.policy.clone(), request.key.clone());
            if let Some(stored) = tat.get_mut(&key) {
                *stored = (*stored - request.cost_ms()).max(request.now.timestamp_millis());
            }
            Ok(())
        }

        async fn prune_rate_limits(
            &self,
            _now: DateTime<Utc>,
            _max_rows: u32,
        ) -> Result<u64, StoreError> {
            Ok(0)
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap()
    }

    #[test]
    fn params_never_exceed_the_configured_rate() {
        let rate = Rate {
            max: 7,
            per: Duration::from_secs(60),
            burst: Some(2),
        };
        let params = params(rate);
        assert_eq!(params.emission_interval_ms, 8_572);
        assert_eq!(params.tolerance_ms, 8_572);
        assert_eq!(params.max_cost(), 2);
    }

    #[tokio::test]
    async fn grants_the_burst_then_what_refills() {
        let store = Arc::new(MapStore::default());
        let shared = SharedRates::new(store.clone());
        let params = params(Rate {
            max: 10,
            per: Duration::from_secs(10),
            burst: Some(3),
        });

        let (granted, wait) = shared
            .take_up_to(KIND_POLICY, "pdf", 8, params, at(0))
            .await
            .unwrap();
        assert_eq!((granted, wait), (3, Some(Duration::from_millis(1_000))));

        let (granted, wait) = shared
            .take_up_to(KIND_POLICY, "pdf", 8, params, at(500))
            .await
            .unwrap();
        assert_eq!(granted, 0);
        assert_eq!(wait, Some(Duration::from_millis(500)));

        let (granted, _) = shared
            .take_up_to(KIND_POLICY, "pdf", 8, params, at(2_000))
            .await
            .unwrap();
        assert_eq!(granted, 2, "two intervals refilled two starts");
    }

    #[tokio::test]
    async fn partial_grant_takes_what_fits() {
        let store = Arc::new(MapStore::default());
        let shared = SharedRates::new(store.clone());
        let params = params(Rate {
            max: 10,
            per: Duration::from_secs(10),
            burst: Some(5),
        });
        let (granted, _) = shared
            .take_up_to(KIND_POLICY, "pdf", 3, params, at(0))
            .await
            .unwrap();
        assert_eq!(granted, 3);

        *store.checks.lock().unwrap() = 0;
        let (granted, wait) = shared
            .take_up_to(KIND_POLICY, "pdf", 5, params, at(0))
            .await
            .unwrap();
        assert_eq!(granted, 2, "two of the burst of five were left");
        assert!(wait.is_some());
        assert_eq!(*store.checks.lock().unwrap(), 2, "a denial, then a fit");
    }

    #[tokio::test]
    async fn two_limiters_on_one_store_share_the_budget() {
        let store = Arc::new(MapStore::default());
        let first = SharedRates::new(store.clone());
        let second = SharedRates::new(store.clone());
        let params = params(Rate {
            max: 10,
            per: Duration::from_secs(60),
            burst: Some(4),
        });
        let mut granted = 0;
        for step in 0..10 {
            let limiter = if step % 2 == 0 { &first } else { &second };
            granted += limiter
                .take_up_to(KIND_POLICY, "pdf", 2, params, at(step))
                .await
                .unwrap()
                .0;
        }
        assert_eq!(granted, 4, "the burst, once, across both");
    }
}

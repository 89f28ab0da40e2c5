//! The in-memory limiter: GCRA state per policy and key in sharded maps,
//! with a cap on the number of keys.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::decision::{Decision, RateLimitError, RateLimiter};
use crate::policy::Policy;

/// Size settings of an [`InMemoryLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Most keys held at once, across all policies, rounded up to a
    /// multiple of `shards`. The default of 100,000 keys is an estimate of
    /// about 10 MiB of state.
    pub max_keys: usize,
    /// Independent maps, each behind its own lock.
    pub shards: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            shards: 16,
        }
    }
}

/// Share of a full shard dropped when every key in it is still active, so
/// that the next inserts do not each pay for an eviction pass.
const EVICT_FRACTION: usize = 8;

/// Shortest time between two warnings about evicted active keys, in the
/// limiter's own time (milliseconds of the `now` passed to checks).
const EVICTION_WARNING_INTERVAL_MS: i64 = 60_000;

/// A limiter for one process. State lives in memory and is lost on exit.
///
/// A key whose TAT is at or before `now` has a full budget, which is the
/// same as no entry, so such entries are dropped whenever a shard fills
/// and by [`sweep`](Self::sweep). When a shard is full of keys that are all
/// still active, the entries closest to full are evicted: each such key
/// may then get through early, by at most what it had left to refill.
/// That happens only with more than `max_keys` active keys, and is logged
/// and counted in [`evicted_active`](Self::evicted_active).
#[derive(Debug)]
pub struct InMemoryLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    shard_capacity: usize,
    evicted_active: AtomicU64,
    unreported_evictions: AtomicU64,
    last_eviction_warning_ms: AtomicI64,
}

/// TATs by policy name, then key.
#[derive(Debug, Default)]
struct Shard {
    policies: HashMap<Box<str>, HashMap<Box<str>, i64>>,
    len: usize,
}

impl Default for InMemoryLimiter {
    fn default() -> Self {
        Self::new(MemoryLimits::default())
    }
}

impl InMemoryLimiter {
    /// Creates an empty limiter. A `max_keys` or `shards` of 0 is taken
    /// as 1.
    pub fn new(limits: MemoryLimits) -> Self {
        let shards = limits.shards.max(1);
        let shard_capacity = limits.max_keys.max(1).div_ceil(shards);
        Self {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            shard_capacity,
            evicted_active: AtomicU64::new(0),
            unreported_evictions: AtomicU64::new(0),
            last_eviction_warning_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// Checks like [`RateLimiter::check`], synchronously: it waits for
    /// nothing but a shard's lock.
    pub fn check_sync(
        &self,
        policy: &Policy,
        key: &str,
        cost: u32,
        now: DateTime<Utc>,
    ) -> Result<Decision, RateLimitError> {
        if cost == 0 {
            return Err(RateLimitError::ZeroCost);
        }
        let now_ms = now.timestamp_millis();
        let store_error = |source| RateLimitError::Store {
            policy: policy.name().to_owned(),
            source,
        };

        let outcome = {
            let mut shard = self.lock(policy.name(), key);
            let stored = shard.get(policy.name(), key);
            let outcome = policy
                .gcra()
                .check(stored, cost, now_ms)
                .map_err(store_error)?;
            if outcome.allowed {
                if stored.is_none() && shard.len >= self.shard_capacity {
                    self.make_room(&mut shard, now_ms);
                }
                shard.set(policy.name(), key, outcome.tat_ms);
            }
            outcome
        };

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

    /// Drops every entry whose budget is full at `now` and returns how
    /// many were dropped. Call it from a timer to give memory back after a
    /// burst of keys; checks stay correct without it.
    pub fn sweep(&self, now: DateTime<Utc>) -> usize {
        let now_ms = now.timestamp_millis();
        self.shards
            .iter()
            .map(|shard| lock(shard).drop_full(now_ms))
            .sum()
    }

    /// Keys held, across all policies.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most keys held at once: `max_keys` rounded up to a multiple of the
    /// shard count.
    pub fn capacity(&self) -> usize {
        self.shard_capacity * self.shards.len()
    }

    /// Active keys evicted because a shard was full, since creation.
    pub fn evicted_active(&self) -> u64 {
        self.evicted_active.load(Ordering::Relaxed)
    }

    fn lock(&self, policy: &str, key: &str) -> MutexGuard<'_, Shard> {
        let hash = self.hasher.hash_one((policy, key));
        let index = (hash % self.shards.len() as u64) as usize;
        lock(&self.shards[index])
    }

    /// Frees space in a full shard: drops full entries, and when that
    /// frees less than a [`EVICT_FRACTION`] of it, evicts the active
    /// entries closest to full.
    fn make_room(&self, shard: &mut Shard, now_ms: i64) {
        shard.drop_full(now_ms);
        let target = self.shard_capacity - self.shard_capacity.div_ceil(EVICT_FRACTION);
        if shard.len <= target {
            return;
        }
        let evicted = shard.evict_closest_to_full(shard.len - target);
        self.evicted_active
            .fetch_add(evicted as u64, Ordering::Relaxed);
        self.warn_evictions(evicted as u64, now_ms);
    }

    /// Logs evictions of active keys at most once per
    /// [`EVICTION_WARNING_INTERVAL_MS`], with the count since the last log.
    fn warn_evictions(&self, evicted: u64, now_ms: i64) {
        let pending = self
            .unreported_evictions
            .fetch_add(evicted, Ordering::Relaxed)
            + evicted;
        let last = self.last_eviction_warning_ms.load(Ordering::Relaxed);
        let due = last == i64::MIN || now_ms.saturating_sub(last) >= EVICTION_WARNING_INTERVAL_MS;
        if due
            && self
                .last_eviction_warning_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.unreported_evictions
                .fetch_sub(pending, Ordering::Relaxed);
            tracing::warn!(
                evicted = pending,
                capacity = self.capacity(),
                "rate limiter is full of active keys and evicted some; those keys may get through early, so raise max_keys if this repeats"
            );
        }
    }
}

#[async_trait]
impl RateLimiter for InMemoryLimiter {
    async fn check(
        &self,
        policy: &Policy,
        key: &str,
        cost: u32,
        now: DateTime<Utc>,
    ) -> Result<Decision, RateLimitError> {
        self.check_sync(policy, key, cost, now)
    }
}

/// Locks a shard. A panic while holding the lock leaves the map valid (it
/// only ever holds whole entries), so a poisoned lock is used as it is.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shard {
    fn get(&self, policy: &str, key: &str) -> Option<i64> {
        self.policies.get(policy)?.get(key).copied()
    }

    fn set(&mut self, policy: &str, key: &str, tat_ms: i64) {
        let keys = match self.policies.get_mut(policy) {
            Some(keys) => keys,
            None => self.policies.entry(policy.into()).or_default(),
        };
        match keys.get_mut(key) {
            Some(tat) => *tat = tat_ms,
            None => {
                keys.insert(key.into(), tat_ms);
                self.len += 1;
            }
        }
    }

    /// Drops entries whose budget is full at `now_ms`; returns how many.
    fn drop_full(&mut self, now_ms: i64) -> usize {
        self.remove_where(usize::MAX, |tat| tat <= now_ms)
    }

    /// Evicts `count` entries with the smallest TATs; returns how many.
    fn evict_closest_to_full(&mut self, count: usize) -> usize {
        if count == 0 || self.len == 0 {
            return 0;
        }
        let mut tats: Vec<i64> = self
            .policies
            .values()
            .flat_map(|keys| keys.values().copied())
            .collect();
        let count = count.min(tats.len());
        let (_, &mut threshold, _) = tats.select_nth_unstable(count - 1);

        // Everything below the threshold goes; entries equal to it go
        // until `count` is reached.
        let below = self.remove_where(count, |tat| tat < threshold);
        below + self.remove_where(count - below, |tat| tat == threshold)
    }

    /// Removes up to `max` entries matching `doomed`; returns how many.
    fn remove_where(&mut self, max: usize, doomed: impl Fn(i64) -> bool) -> usize {
        let mut removed = 0;
        for keys in self.policies.values_mut() {
            keys.retain(|_, tat| {
                if removed < max && doomed(*tat) {
                    removed += 1;
                    false
                } else {
                    true
                }
            });
        }
        self.policies.retain(|_, keys| !keys.is_empty());
        self.len -= removed;
        removed
    }
}

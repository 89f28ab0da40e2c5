//! Per-host request rate limit for the `fetch` handler, kept in memory.
//!
//! GCRA (the generic cell rate algorithm) keeps one instant per host, the
//! theoretical arrival time (TAT). With emission interval `T = 1 s /
//! per_second` and tolerance `burst * T`, a request at `now` is admitted
//! when `max(TAT, now) - now <= tolerance`, and then the TAT advances by
//! `T`. So an idle host takes `burst + 1` requests at once and then one
//! every `T`. A host whose TAT is at or before `now` has a full budget,
//! which is the same as having no entry, so such entries can be dropped at
//! any time.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Most hosts tracked at once. Past this, entries with a full budget are
/// pruned, and if none are, the entry closest to a full budget is evicted,
/// which lets that host through a little early.
pub const MAX_TRACKED_HOSTS: usize = 10_000;

/// Requests per second to one host, with a burst on top. Config keys:
/// `per_second`, `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostRateLimit {
    /// Sustained requests per second to one host; may be below 1, such as
    /// 0.5 for one request every 2 seconds. Must be positive and finite.
    pub per_second: f64,
    /// Extra requests an idle host takes at once, beyond the first.
    pub burst: u32,
}

impl Default for HostRateLimit {
    fn default() -> Self {
        Self {
            per_second: 5.0,
            burst: 3,
        }
    }
}

/// Invalid [`HostRateLimit`] values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "invalid per_second {0}: the per-host rate must be a positive, finite number of requests per second"
)]
pub struct InvalidRate(pub f64);

/// The in-memory GCRA state per host.
#[derive(Debug)]
pub struct HostRateLimiter {
    interval: Duration,
    tolerance: Duration,
    capacity: usize,
    hosts: Mutex<HashMap<String, Instant>>,
}

impl HostRateLimiter {
    pub fn new(limit: HostRateLimit) -> Result<Self, InvalidRate> {
        Self::with_capacity(limit, MAX_TRACKED_HOSTS)
    }

    fn with_capacity(limit: HostRateLimit, capacity: usize) -> Result<Self, InvalidRate> {
        if !limit.per_second.is_finite() || limit.per_second <= 0.0 {
            return Err(InvalidRate(limit.per_second));
        }
        // Rates above a million per second round to a 1 µs interval.
        let interval =
            Duration::from_secs_f64(1.0 / limit.per_second).max(Duration::from_micros(1));
        let tolerance = interval.saturating_mul(limit.burst);
        Ok(Self {
            interval,
            tolerance,
            capacity: capacity.max(1),
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// Admits one request to `host` at `now`, or returns how long to wait
    /// before a request would be admitted. A denied request changes
    /// nothing.
    pub fn try_acquire(&self, host: &str, now: Instant) -> Result<(), Duration> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = hosts.get(host).copied().unwrap_or(now).max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        self.store(&mut hosts, host, tat + self.interval, now);
        Ok(())
    }

    /// Takes the next slot for `host` unconditionally and returns how long
    /// to wait for it. For requests that cannot be put off, such as the
    /// next hop of a redirect chain already in progress.
    pub fn reserve(&self, host: &str, now: Instant) -> Duration {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = hosts.get(host).copied().unwrap_or(now).max(now);
        self.store(&mut hosts, host, tat + self.interval, now);
        (tat - now).saturating_sub(self.tolerance)
    }

    fn store(&self, hosts: &mut HashMap<String, Instant>, host: &str, tat: Instant, now: Instant) {
        if let Some(entry) = hosts.get_mut(host) {
            *entry = tat;
            return;
        }
        if hosts.len() >= self.capacity {
            hosts.retain(|_, stored| *stored > now);
        }
        if hosts.len() >= self.capacity {
            let oldest = hosts
                .iter()
                .min_by_key(|(_, stored)| **stored)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                hosts.remove(&oldest);
            }
        }
        hosts.insert(host.to_owned(), tat);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn limiter(per_second: f64, burst: u32) -> HostRateLimiter {
        HostRateLimiter::new(HostRateLimit { per_second, burst }).unwrap()
    }

    #[test]
    fn idle_host_takes_burst_plus_one() {
        let limiter = limiter(2.0, 2);
        let now = Instant::now();
        for request in 0..3 {
            assert_eq!(
                limiter.try_acquire("a.example", now),
                Ok(()),
                "request {request}"
            );
        }
        assert_eq!(
            limiter.try_acquire("a.example", now),
            Err(Duration::from_millis(500))
        );
    }

    #[test]
    fn refills_one_per_interval() {
        let limiter = limiter(2.0, 0);
        let start = Instant::now();
        assert_eq!(limiter.try_acquire("a.example", start), Ok(()));
        assert_eq!(
            limiter.try_acquire("a.example", start + Duration::from_millis(200)),
            Err(Duration::from_millis(300))
        );
        assert_eq!(
            limiter.try_acquire("a.example", start + Duration::from_millis(500)),
            Ok(())
        );
    }

    #[test]
    fn hosts_are_independent() {
        let limiter = limiter(1.0, 0);
        let now = Instant::now();
        assert_eq!(limiter.try_acquire("a.example", now), Ok(()));
        assert!(limiter.try_acquire("a.example", now).is_err());
        assert_eq!(limiter.try_acquire("b.example", now), Ok(()));
    }

    #[test]
    fn denied_request_changes_nothing() {
        let limiter = limiter(1.0, 0);
        let now = Instant::now();
        assert_eq!(limiter.try_acquire("a.example", now), Ok(()));
        for _ in 0..5 {
            assert_eq!(
                limiter.try_acquire("a.example", now),
                Err(Duration::from_secs(1))
            );
        }
        assert_eq!(
            limiter.try_acquire("a.example", now + Duration::from_secs(1)),
            Ok(())
        );
    }

    #[test]
    fn reserve_queues_behind_budget() {
        let limiter = limiter(1.0, 1);
        let now = Instant::now();
        assert_eq!(limiter.reserve("a.example", now), Duration::ZERO);
        assert_eq!(limiter.reserve("a.example", now), Duration::ZERO);
        assert_eq!(limiter.reserve("a.example", now), Duration::from_secs(1));
        assert_eq!(limiter.reserve("a.example", now), Duration::from_secs(2));
        assert_eq!(
            limiter.try_acquire("a.example", now),
            Err(Duration::from_secs(3))
        );
    }

    #[test]
    fn fractional_rate() {
        let limiter = limiter(0.5, 0);
        let now = Instant::now();
        assert_eq!(limiter.try_acquire("a.example", now), Ok(()));
        assert_eq!(
            limiter.try_acquire("a.example", now),
            Err(Duration::from_secs(2))
        );
    }

    #[test]
    fn invalid_rates_rejected() {
        for per_second in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let result = HostRateLimiter::new(HostRateLimit {
                per_second,
                burst: 0,
            });
            assert!(result.is_err(), "{per_second}");
        }
    }

    #[test]
    fn map_stays_bounded() {
        let limiter = HostRateLimiter::with_capacity(
            HostRateLimit {
                per_second: 1.0,
                burst: 0,
            },
            3,
        )
        .unwrap();
        let start = Instant::now();
        for (index, host) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let now = start + Duration::from_millis(index as u64);
            assert_eq!(limiter.try_acquire(host, now), Ok(()), "{host}");
            assert!(limiter.tracked() <= 3, "after {host}");
        }
        // "a" had the earliest TAT, so it was evicted first.
        let now = start + Duration::from_millis(10);
        assert_eq!(limiter.try_acquire("a", now), Ok(()));
        assert!(limiter.try_acquire("e", now).is_err());
    }

    #[test]
    fn expired_entries_pruned_first() {
        let limiter = HostRateLimiter::with_capacity(
            HostRateLimit {
                per_second: 1.0,
                burst: 0,
            },
            2,
        )
        .unwrap();
        let start = Instant::now();
        assert_eq!(limiter.try_acquire("a", start), Ok(()));
        assert_eq!(
            limiter.try_acquire("b", start + Duration::from_millis(900)),
            Ok(())
        );
        // At 1.5 s, "a" has a full budget again and is pruned; "b" is kept.
        let later = start + Duration::from_millis(1_500);
        assert_eq!(limiter.try_acquire("c", later), Ok(()));
        assert_eq!(limiter.tracked(), 2);
        assert!(limiter.try_acquire("b", later).is_err());
    }
}

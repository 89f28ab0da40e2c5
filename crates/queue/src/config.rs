use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

/// Settings of the worker runtime as a whole.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Label used in lease owner names, usually the host name.
    pub node_label: String,
    /// How long a claim keeps a job before another worker may take it.
    pub lease_duration: Duration,
    /// How often running jobs' leases are extended. Must be well under
    /// `lease_duration`, so a slow tick does not lose a live lease.
    pub heartbeat_interval: Duration,
    /// How often expired leases are looked for.
    pub reap_interval: Duration,
    /// Maximum wait before a worker looks for work it was not notified of,
    /// such as jobs enqueued by another process.
    pub poll_interval: Duration,
    /// Most jobs one claim takes.
    pub claim_batch: u32,
    /// How long a graceful shutdown lets running handlers finish before
    /// cancelling them and giving their jobs back.
    pub shutdown_grace: Duration,
    pub retention: RetentionConfig,
    /// Capacity of the event channel; a subscriber that falls further
    /// behind misses events and receives their count.
    pub event_capacity: usize,
    /// Seed for the backoff jitter, so tests can repeat a schedule.
    pub jitter_seed: Option<u64>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            node_label: "batchd".into(),
            lease_duration: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            reap_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            claim_batch: 256,
            shutdown_grace: Duration::from_secs(10),
            retention: RetentionConfig::default(),
            event_capacity: 16_384,
            jitter_seed: None,
        }
    }
}

/// How long finished work is kept.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Completed batches are deleted this long after they finished.
    pub completed: Duration,
    /// Failed and cancelled batches (and so their dead letters) are kept
    /// this long.
    pub failed: Duration,
    /// How often the pruner runs; `None` turns pruning off.
    pub interval: Option<Duration>,
    /// Most batches deleted per pruning pass.
    pub max_batches_per_pass: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            completed: Duration::from_secs(7 * 24 * 3600),
            failed: Duration::from_secs(30 * 24 * 3600),
            interval: Some(Duration::from_secs(60)),
            max_batches_per_pass: 100,
        }
    }
}

/// A rate: `max` starts per `per`, of which up to `burst` may come at once.
/// Any window of length `per` admits at most `max + burst - 1` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Rate {
    pub max: u32,
    #[serde(rename = "perSeconds", with = "humantime_secs")]
    pub per: Duration,
    /// Defaults to a fifth of `max`, at least 1.
    #[serde(default)]
    pub burst: Option<u32>,
}

impl Rate {
    pub fn per_minute(max: u32) -> Self {
        Self {
            max,
            per: Duration::from_secs(60),
            burst: None,
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.max / 5).max(1)
    }
}

mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let seconds = f64::deserialize(d)?;
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(serde::de::Error::custom(format!(
                "period must be a positive number of seconds, got {seconds}"
            )));
        }
        Ok(Duration::from_secs_f64(seconds))
    }
}

/// Exponential backoff with jitter: the n-th retry waits
/// `base * 2^(n-1)`, capped at `max_delay`, then moved by up to
/// `jitter` of itself in either direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first run included; 4 means 3 retries.
    pub max_attempts: u32,
    pub base: Duration,
    pub max_delay: Duration,
    /// Fraction of the delay added or removed at random, 0.0 to 1.0.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base: Duration::from_secs(2),
            max_delay: Duration::from_secs(3600),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// Delay before the retry that follows failed attempt `attempt` (1 for
    /// the first run). `unit` is a random number in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let nominal = self
            .base
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        nominal.mul_f64(factor.max(0.0))
    }

    /// Returns whether a job that just failed attempt `attempt` may run again.
    pub fn has_attempts_left(&self, attempt: u32, max_attempts: u32) -> bool {
        attempt < max_attempts
    }
}

/// Settings of one job kind.
#[derive(Debug, Clone)]
pub struct KindConfig {
    /// Handlers of this kind running at once in this process.
    pub concurrency: usize,
    /// An attempt running longer is cancelled and counts as a retryable
    /// failure.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Most attempts started per period across the kind, in this process.
    pub rate: Option<Rate>,
    /// Most attempts started per period for one owner's jobs of this kind.
    pub per_user_rate: Option<Rate>,
}

impl Default for KindConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            rate: None,
            per_user_rate: None,
        }
    }
}

/// Per-kind settings keyed by kind name.
pub type KindConfigs = HashMap<String, KindConfig>;

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn default_backoff_is_2_4_8_seconds() {
        let policy = no_jitter();
        assert_eq!(policy.delay(1, 0.5), Duration::from_secs(2));
        assert_eq!(policy.delay(2, 0.5), Duration::from_secs(4));
        assert_eq!(policy.delay(3, 0.5), Duration::from_secs(8));
        assert_eq!(policy.max_attempts, 4);
    }

    #[test]
    fn backoff_is_capped() {
        let policy = RetryPolicy {
            max_delay: Duration::from_secs(10),
            ..no_jitter()
        };
        assert_eq!(policy.delay(10, 0.5), Duration::from_secs(10));
        assert_eq!(policy.delay(u32::MAX, 0.5), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let policy = RetryPolicy::default();
        let low = policy.delay(1, 0.0);
        let high = policy.delay(1, 0.999_999);
        assert_eq!(low, Duration::from_millis(1800));
        assert!(high <= Duration::from_millis(2200));
        assert!(high > Duration::from_millis(2199));
    }
}

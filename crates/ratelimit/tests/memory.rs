//! The in-memory limiter's bounds on keys, its sweeping, and exact limits
//! under concurrent checks.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use ratelimit::{InMemoryLimiter, MemoryLimits, Policy, PolicySet, RateLimiter};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn policy(name: &str) -> Policy {
    PolicySet::defaults().get(name).unwrap().clone()
}

#[test]
fn unique_keys_stay_bounded_when_all_active() {
    let limiter = InMemoryLimiter::new(MemoryLimits {
        max_keys: 10_000,
        shards: 16,
    });
    assert_eq!(limiter.capacity(), 10_000);
    let auth = policy("auth");

    // Every key stays active for the whole run: one request each, at one
    // instant, against a policy that refills in three minutes.
    let mut max_held = 0;
    for i in 0..300_000u32 {
        let key = format!("key-{i}");
        assert!(
            limiter
                .check_sync(&auth, &key, 1, start())
                .unwrap()
                .is_allowed()
        );
        if i % 1_000 == 0 {
            max_held = max_held.max(limiter.len());
        }
    }
    max_held = max_held.max(limiter.len());

    assert!(max_held <= limiter.capacity(), "held {max_held} keys");
    assert!(
        limiter.len() > limiter.capacity() / 2,
        "held only {}",
        limiter.len()
    );
    assert!(
        limiter.evicted_active() >= 290_000,
        "evicted {}",
        limiter.evicted_active()
    );

    // The newest key is still held, so it is still limited.
    let newest = limiter.check_sync(&auth, "key-299999", 1, start()).unwrap();
    assert!(!newest.is_allowed());
}

#[test]
fn unique_keys_over_time_evict_only_full_entries() {
    let limiter = InMemoryLimiter::new(MemoryLimits {
        max_keys: 1_000,
        shards: 4,
    });
    let general = policy("general");

    // One new key per millisecond; each is full again after 600 ms, so
    // about 600 keys are active at any moment.
    let mut now = start();
    let mut max_held = 0;
    for i in 0..300_000u32 {
        let key = format!("key-{i}");
        assert!(
            limiter
                .check_sync(&general, &key, 1, now)
                .unwrap()
                .is_allowed()
        );
        max_held = max_held.max(limiter.len());
        now += Duration::milliseconds(1);
    }

    assert!(max_held <= limiter.capacity(), "held {max_held} keys");
    assert_eq!(limiter.evicted_active(), 0);
}

#[test]
fn sweep_drops_full_entries_only() {
    let limiter = InMemoryLimiter::default();
    let general = policy("general");
    for i in 0..100 {
        limiter
            .check_sync(&general, &format!("light-{i}"), 1, start())
            .unwrap();
    }
    limiter.check_sync(&general, "heavy", 21, start()).unwrap();
    assert_eq!(limiter.len(), 101);

    assert_eq!(limiter.sweep(start() + Duration::milliseconds(599)), 0);
    assert_eq!(limiter.sweep(start() + Duration::milliseconds(600)), 100);
    assert_eq!(limiter.len(), 1);
    assert_eq!(limiter.sweep(start() + Duration::milliseconds(12_600)), 1);
    assert!(limiter.is_empty());
}

#[test]
fn denied_new_key_is_not_stored() {
    let limiter = InMemoryLimiter::default();
    let decision = limiter
        .check_sync(&policy("batch_items"), "big", 5_000, start())
        .unwrap();
    assert!(!decision.is_allowed());
    assert!(limiter.is_empty());
}

#[test]
fn tiny_limits_still_work() {
    let limiter = InMemoryLimiter::new(MemoryLimits {
        max_keys: 0,
        shards: 0,
    });
    assert_eq!(limiter.capacity(), 1);
    let auth = policy("auth");
    assert!(
        limiter
            .check_sync(&auth, "a", 1, start())
            .unwrap()
            .is_allowed()
    );
    assert!(
        !limiter
            .check_sync(&auth, "a", 1, start())
            .unwrap()
            .is_allowed()
    );
    assert!(
        limiter
            .check_sync(&auth, "b", 1, start())
            .unwrap()
            .is_allowed()
    );
    assert_eq!(limiter.len(), 1);
}

/// Builds a small policy whose whole limit fits at once: 10 per hour,
/// burst 9.
fn small() -> Policy {
    Policy::new("small", 10, StdDuration::from_secs(3_600), 9, "slow down").unwrap()
}

async fn run_concurrently(limiter: Arc<dyn RateLimiter>, policy: Policy, tasks: usize) -> Vec<u32> {
    let policy = Arc::new(policy);
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let limiter = limiter.clone();
        let policy = policy.clone();
        handles.push(tokio::spawn(async move {
            limiter.check(&policy, "shared", 1, start()).await.unwrap()
        }));
    }
    let mut remaining = Vec::new();
    for handle in handles {
        let decision = handle.await.unwrap();
        if decision.is_allowed() {
            remaining.push(decision.remaining);
        }
    }
    remaining.sort_unstable();
    remaining
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_admit_exactly_the_limit() {
    let limiter: Arc<dyn RateLimiter> = Arc::new(InMemoryLimiter::default());
    let remaining = run_concurrently(limiter, small(), 500).await;
    assert_eq!(remaining, (0..10).collect::<Vec<u32>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_auth_admits_one() {
    let limiter: Arc<dyn RateLimiter> = Arc::new(InMemoryLimiter::default());
    let remaining = run_concurrently(limiter, policy("auth"), 200).await;
    assert_eq!(remaining, vec![4]);
}

#[test]
fn threads_admit_exactly_the_limit() {
    let limiter = Arc::new(InMemoryLimiter::default());
    let policy = Arc::new(small());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let limiter = limiter.clone();
            let policy = policy.clone();
            std::thread::spawn(move || {
                (0..100)
                    .filter(|_| {
                        limiter
                            .check_sync(&policy, "shared", 1, start())
                            .unwrap()
                            .is_allowed()
                    })
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .sum();
    assert_eq!(admitted, 10);
}

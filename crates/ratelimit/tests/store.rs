//! The store-backed limiter on a real SQLite file: the same decisions as
//! the in-memory limiter, exact limits under concurrency, and one limit
//! shared by two store handles on one file, as two processes would be.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use ratelimit::{
    InMemoryLimiter, Policy, PolicySet, RateLimitError, RateLimiter, StoreLimiter, Verdict,
};
use sqlite_store::{SqliteConfig, SqliteStore};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn policy(name: &str) -> Policy {
    PolicySet::defaults().get(name).unwrap().clone()
}

/// Builds a small policy whose whole limit fits at once: 10 per hour,
/// burst 9.
fn small() -> Policy {
    Policy::new("small", 10, StdDuration::from_secs(3_600), 9, "slow down").unwrap()
}

async fn open(dir: &tempfile::TempDir) -> Arc<SqliteStore> {
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("batchd.db")))
        .await
        .unwrap();
    Arc::new(store)
}

/// Deterministic pseudo-random arrivals (gap in ms, cost), from a linear
/// congruential generator so the test needs no seed handling.
fn arrivals(policy: &Policy, count: usize) -> Vec<(i64, u32)> {
    let interval = policy.gcra().emission_interval_ms;
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    (0..count)
        .map(|_| {
            let gap = match next() % 4 {
                0 => 0,
                1 => interval,
                _ => (next() % (interval as u64 * 2)) as i64,
            };
            let cost = match next() % 10 {
                0 => 1 + (next() % u64::from(policy.max_cost() + 2)) as u32,
                _ => 1,
            };
            (gap, cost)
        })
        .collect()
}

#[tokio::test]
async fn store_matches_in_memory_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let stored = StoreLimiter::new(open(&dir).await);
    let memory = InMemoryLimiter::default();

    for name in ["general", "auth", "batch_items"] {
        let policy = policy(name);
        let mut now = start();
        for (index, (gap, cost)) in arrivals(&policy, 300).into_iter().enumerate() {
            now += Duration::milliseconds(gap);
            let expected = memory.check(&policy, "client", cost, now).await.unwrap();
            let actual = stored.check(&policy, "client", cost, now).await.unwrap();
            assert_eq!(actual, expected, "{name} arrival {index}");
        }
    }
}

#[tokio::test]
async fn store_reports_oversized_cost() {
    let dir = tempfile::tempdir().unwrap();
    let limiter = StoreLimiter::new(open(&dir).await);
    let items = policy("batch_items");

    assert!(
        limiter
            .check(&items, "client", 40, start())
            .await
            .unwrap()
            .is_allowed()
    );
    let denied = limiter.check(&items, "client", 500, start()).await.unwrap();
    assert_eq!(
        denied.verdict,
        Verdict::CostTooLarge {
            cost: 500,
            max_cost: 101
        }
    );
    assert_eq!(denied.available_now, 61);
}

#[tokio::test]
async fn store_rejects_zero_cost() {
    let dir = tempfile::tempdir().unwrap();
    let limiter = StoreLimiter::new(open(&dir).await);
    let error = limiter
        .check(&small(), "client", 0, start())
        .await
        .unwrap_err();
    assert!(matches!(error, RateLimitError::ZeroCost));
}

async fn admitted_remaining(limiters: Vec<Arc<dyn RateLimiter>>, tasks: usize) -> Vec<u32> {
    let policy = Arc::new(small());
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let limiter = limiters[task % limiters.len()].clone();
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
async fn store_concurrent_checks_admit_exactly_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limiter: Arc<dyn RateLimiter> = Arc::new(StoreLimiter::new(open(&dir).await));
    let remaining = admitted_remaining(vec![limiter], 200).await;
    assert_eq!(remaining, (0..10).collect::<Vec<u32>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_share_one_limit_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let first: Arc<dyn RateLimiter> = Arc::new(StoreLimiter::new(open(&dir).await));
    let second: Arc<dyn RateLimiter> = Arc::new(StoreLimiter::new(open(&dir).await));
    let remaining = admitted_remaining(vec![first, second], 200).await;
    assert_eq!(remaining, (0..10).collect::<Vec<u32>>());
}

#[tokio::test]
async fn two_handles_share_one_limit_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let first = StoreLimiter::new(open(&dir).await);
    let second = StoreLimiter::new(open(&dir).await);
    let auth = policy("auth");

    assert!(
        first
            .check(&auth, "client", 1, start())
            .await
            .unwrap()
            .is_allowed()
    );
    let denied = second.check(&auth, "client", 1, start()).await.unwrap();
    assert_eq!(denied.retry_after(), Some(StdDuration::from_secs(180)));

    let later = start() + Duration::minutes(3);
    assert!(
        second
            .check(&auth, "client", 1, later)
            .await
            .unwrap()
            .is_allowed()
    );
    assert!(
        !first
            .check(&auth, "client", 1, later)
            .await
            .unwrap()
            .is_allowed()
    );
}

#[tokio::test]
async fn prune_removes_full_keys() {
    let dir = tempfile::tempdir().unwrap();
    let limiter = StoreLimiter::new(open(&dir).await);
    let general = policy("general");

    for i in 0..2_500 {
        let key = format!("client-{i}");
        assert!(
            limiter
                .check(&general, &key, 1, start())
                .await
                .unwrap()
                .is_allowed()
        );
    }
    assert!(
        limiter
            .check(&general, "heavy", 21, start())
            .await
            .unwrap()
            .is_allowed()
    );

    assert_eq!(limiter.prune(start()).await.unwrap(), 0);
    assert_eq!(
        limiter
            .prune(start() + Duration::milliseconds(600))
            .await
            .unwrap(),
        2_500
    );
    // The heavy key's row survived: two more units do not fit yet.
    let heavy = limiter
        .check(&general, "heavy", 2, start() + Duration::milliseconds(600))
        .await
        .unwrap();
    assert!(!heavy.is_allowed());
    assert_eq!(
        limiter
            .prune(start() + Duration::seconds(60))
            .await
            .unwrap(),
        1
    );
}

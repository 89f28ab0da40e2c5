//! The GCRA arithmetic at its edges: exactly at the limit, at the window
//! edge, the burst, costs above one, and what a decision reports.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::ManualClock;
use ratelimit::{
    ClientKeyRules, ClientRequest, Decision, InMemoryLimiter, Policy, PolicySet, RateLimitConfig,
    RateLimitError, RouteLimiter, Verdict,
};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn policy(name: &str) -> Policy {
    PolicySet::defaults().get(name).unwrap().clone()
}

fn check(limiter: &InMemoryLimiter, policy: &Policy, cost: u32, at: DateTime<Utc>) -> Decision {
    limiter.check_sync(policy, "client", cost, at).unwrap()
}

fn ms(value: i64) -> Duration {
    Duration::milliseconds(value)
}

#[test]
fn fresh_key_remaining_counts_down() {
    let limiter = InMemoryLimiter::default();
    let general = policy("general");

    for n in 1..=21 {
        let decision = check(&limiter, &general, 1, start());
        assert!(decision.is_allowed(), "request {n} should be allowed");
        assert_eq!(decision.limit, 100);
        assert_eq!(decision.remaining, 100 - n, "remaining after request {n}");
        assert_eq!(
            decision.available_now,
            21 - n,
            "available after request {n}"
        );
    }

    let denied = check(&limiter, &general, 1, start());
    assert_eq!(
        denied.verdict,
        Verdict::RateExceeded {
            retry_after: StdDuration::from_millis(600)
        }
    );
    assert_eq!(denied.remaining, 79);
    assert_eq!(denied.available_now, 0);
}

#[test]
fn remaining_reaches_zero_at_full_burst() {
    let limiter = InMemoryLimiter::default();
    let tight = Policy::new("tight", 10, StdDuration::from_secs(3_600), 9, "slow down").unwrap();

    for n in 1..=10 {
        let decision = check(&limiter, &tight, 1, start());
        assert!(decision.is_allowed(), "request {n} should be allowed");
        assert_eq!(decision.remaining, 10 - n);
    }
    let denied = check(&limiter, &tight, 1, start());
    assert!(!denied.is_allowed());
    assert_eq!(denied.remaining, 0);
    assert_eq!(denied.retry_after(), Some(StdDuration::from_secs(360)));
}

#[test]
fn remaining_never_negative_when_burst_equals_limit() {
    let limiter = InMemoryLimiter::default();
    let loose = Policy::new("loose", 3, StdDuration::from_secs(60), 3, "slow down").unwrap();

    let remaining: Vec<u32> = (0..4)
        .map(|_| check(&limiter, &loose, 1, start()))
        .inspect(|decision| assert!(decision.is_allowed()))
        .map(|decision| decision.remaining)
        .collect();
    assert_eq!(remaining, vec![2, 1, 0, 0]);
    assert!(!check(&limiter, &loose, 1, start()).is_allowed());
}

#[test]
fn auth_spacing_at_window_edge() {
    let limiter = InMemoryLimiter::default();
    let auth = policy("auth");

    let first = check(&limiter, &auth, 1, start());
    assert!(first.is_allowed());
    assert_eq!(first.remaining, 4);

    let early = check(&limiter, &auth, 1, start() + Duration::minutes(3) - ms(1));
    assert_eq!(
        early.verdict,
        Verdict::RateExceeded {
            retry_after: StdDuration::from_millis(1)
        }
    );
    assert_eq!(early.retry_after_secs(), Some(1));

    assert!(check(&limiter, &auth, 1, start() + Duration::minutes(3)).is_allowed());
}

#[test]
fn auth_admits_exactly_limit_per_period() {
    let limiter = InMemoryLimiter::default();
    let auth = policy("auth");

    // One attempt every second for a whole period.
    let mut allowed_at = Vec::new();
    for second in 0..15 * 60 {
        let at = start() + Duration::seconds(second);
        if check(&limiter, &auth, 1, at).is_allowed() {
            allowed_at.push(second);
        }
    }
    assert_eq!(allowed_at, vec![0, 180, 360, 540, 720]);

    // The next one lands exactly at the end of the half-open window.
    assert!(check(&limiter, &auth, 1, start() + Duration::minutes(15)).is_allowed());
}

#[test]
fn general_burst_then_paced() {
    let limiter = InMemoryLimiter::default();
    let general = policy("general");

    for _ in 0..21 {
        assert!(check(&limiter, &general, 1, start()).is_allowed());
    }
    assert!(!check(&limiter, &general, 1, start() + ms(599)).is_allowed());
    assert!(check(&limiter, &general, 1, start() + ms(600)).is_allowed());
    assert!(!check(&limiter, &general, 1, start() + ms(600)).is_allowed());
    assert!(!check(&limiter, &general, 1, start() + ms(1_199)).is_allowed());
    assert!(check(&limiter, &general, 1, start() + ms(1_200)).is_allowed());
}

#[test]
fn paced_at_rate_is_never_denied() {
    let limiter = InMemoryLimiter::default();
    let general = policy("general");

    for i in 0..1_000 {
        let decision = check(&limiter, &general, 1, start() + ms(600 * i));
        assert!(decision.is_allowed(), "request {i} at the sustained rate");
        assert_eq!(decision.remaining, 99, "request {i}");
    }
}

#[test]
fn reset_time_is_when_budget_is_full() {
    let limiter = InMemoryLimiter::default();
    let general = policy("general");

    let mut last = check(&limiter, &general, 1, start());
    assert_eq!(last.reset_at, start() + ms(600));
    for _ in 1..21 {
        last = check(&limiter, &general, 1, start());
    }
    assert_eq!(last.reset_at, start() + ms(21 * 600));
    assert_eq!(last.reset_after, StdDuration::from_millis(12_600));
    assert_eq!(last.reset_after_secs(), 13);

    let halfway = check(&limiter, &general, 1, start() + ms(6_000));
    assert!(halfway.is_allowed());
    assert_eq!(halfway.remaining, 100 - 12);

    let at_reset = check(&limiter, &general, 1, start() + ms(60_000));
    assert!(at_reset.is_allowed());
    assert_eq!(at_reset.remaining, 99);
}

#[test]
fn batch_cost_up_to_max_cost() {
    let limiter = InMemoryLimiter::default();
    let items = policy("batch_items");
    assert_eq!(items.max_cost(), 101);

    let batch = check(&limiter, &items, 101, start());
    assert!(batch.is_allowed());
    assert_eq!(batch.remaining, 399);
    assert_eq!(batch.available_now, 0);

    let next = check(&limiter, &items, 1, start());
    assert_eq!(next.retry_after(), Some(StdDuration::from_millis(120)));
}

#[test]
fn oversized_cost_reports_what_fits() {
    let limiter = InMemoryLimiter::default();
    let items = policy("batch_items");

    let denied = check(&limiter, &items, 102, start());
    assert_eq!(
        denied.verdict,
        Verdict::CostTooLarge {
            cost: 102,
            max_cost: 101
        }
    );
    assert_eq!(denied.available_now, 101);
    assert_eq!(denied.remaining, 500);
    assert_eq!(denied.retry_after(), None);

    // The denial consumed nothing: the full burst still fits.
    assert!(check(&limiter, &items, 101, start()).is_allowed());
}

#[test]
fn partial_budget_reports_wait_for_cost() {
    let limiter = InMemoryLimiter::default();
    let items = policy("batch_items");

    assert!(check(&limiter, &items, 50, start()).is_allowed());
    let denied = check(&limiter, &items, 60, start());
    // 50 + 60 - 101 = 9 units too many, at 120 ms each.
    assert_eq!(
        denied.verdict,
        Verdict::RateExceeded {
            retry_after: StdDuration::from_millis(1_080)
        }
    );
    assert_eq!(denied.available_now, 51);
    assert_eq!(denied.remaining, 450);

    assert!(!check(&limiter, &items, 60, start() + ms(1_079)).is_allowed());
    assert!(check(&limiter, &items, 60, start() + ms(1_080)).is_allowed());
}

#[test]
fn zero_cost_is_an_error() {
    let limiter = InMemoryLimiter::default();
    let error = limiter
        .check_sync(&policy("general"), "client", 0, start())
        .unwrap_err();
    assert!(matches!(error, RateLimitError::ZeroCost));
}

#[test]
fn keys_and_policies_are_independent() {
    let limiter = InMemoryLimiter::default();
    let auth = policy("auth");
    let upload = policy("upload");

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
    assert!(
        limiter
            .check_sync(&upload, "a", 1, start())
            .unwrap()
            .is_allowed()
    );
}

#[test]
fn earlier_time_than_stored_tat_is_denied() {
    let limiter = InMemoryLimiter::default();
    let auth = policy("auth");

    assert!(check(&limiter, &auth, 1, start()).is_allowed());
    let before = check(&limiter, &auth, 1, start() - Duration::minutes(1));
    assert_eq!(before.retry_after(), Some(StdDuration::from_secs(240)));
    assert_eq!(before.remaining, 3);
}

#[tokio::test]
async fn route_limiter_uses_injected_clock() {
    let config: RateLimitConfig = toml::from_str(
        r#"
        [routes]
        "auth.login" = "auth"

        [client_key]
        trusted_proxies = ["192.0.2.10"]
        "#,
    )
    .unwrap();
    let policies = PolicySet::from_config(&config).unwrap();
    let keys = ClientKeyRules::from_config(&config.client_key).unwrap();
    let clock = ManualClock::new(start());
    let limiter = RouteLimiter::new(
        policies,
        keys,
        Arc::new(InMemoryLimiter::default()),
        Arc::new(clock.clone()),
    );
    let request = ClientRequest {
        peer: "192.0.2.10".parse().unwrap(),
        user_id: None,
        x_forwarded_for: &["198.51.100.7"],
        forwarded: &[],
    };

    let first = limiter.check("auth.login", &request, 1).await.unwrap();
    assert_eq!(first.policy.name(), "auth");
    assert_eq!(first.key, "198.51.100.7");
    assert!(first.decision.is_allowed());

    let second = limiter.check("auth.login", &request, 1).await.unwrap();
    assert_eq!(second.decision.retry_after_secs(), Some(180));

    // Other routes use general and are not held back by auth.
    let other = limiter.check("batches.list", &request, 1).await.unwrap();
    assert_eq!(other.policy.name(), "general");
    assert!(other.decision.is_allowed());

    clock.advance(Duration::minutes(3));
    let third = limiter.check("auth.login", &request, 1).await.unwrap();
    assert!(third.decision.is_allowed());
}

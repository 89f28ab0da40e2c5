//! The conformance suite of [`RateLimitStore`]: every backend runs these
//! same checks against a fresh store.
//!
//! The checks observe the stored TAT through the trait alone: a denied
//! check returns `max(stored TAT, now)`, and pruning at `now` deletes
//! exactly the rows whose TAT is at or before `now`.
//!
//! A backend's test file calls
//! [`rate_limit_conformance_tests!`](crate::rate_limit_conformance_tests)
//! with an expression that opens a fresh store and one that opens two
//! handles on one fresh database, as two processes would.

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::{GcraParams, GcraRequest, RateLimitStore, StoreError};

/// Expands to one test per rate-limit-store check. `fresh` is an async
/// expression returning a fresh store, and `pair` one returning two handles
/// on one fresh database.
#[macro_export]
macro_rules! rate_limit_conformance_tests {
    (fresh: $open:expr, pair: $open_pair:expr $(,)?) => {
        $crate::rate_limit_conformance_tests!(@one $open;
            check_stores_tat_only_when_allowed,
            oversized_cost_writes_nothing,
            invalid_cost_is_rejected,
            prune_deletes_only_full_keys,
            refund_gives_back_unused_units,
        );

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_checks_admit_capacity() {
            let store = $open;
            $crate::ratelimit::concurrent_checks_admit_capacity(store).await;
        }

        #[tokio::test]
        async fn two_handles_share_state() {
            let (first, second) = $open_pair;
            $crate::ratelimit::two_handles_share_state(&first, &second).await;
        }
    };
    (@one $open:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let store = $open;
                $crate::ratelimit::$check(&store).await;
            }
        )*
    };
}

/// One unit per second, three units at once.
const PARAMS: GcraParams = GcraParams {
    emission_interval_ms: 1_000,
    tolerance_ms: 2_000,
};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn request(key: &str, cost: u32, now: DateTime<Utc>) -> GcraRequest {
    GcraRequest {
        policy: "test".to_owned(),
        key: key.to_owned(),
        cost,
        params: PARAMS,
        now,
    }
}

pub async fn check_stores_tat_only_when_allowed<S: RateLimitStore>(store: &S) {
    let now = start();

    for n in 1..=3 {
        let outcome = store.check_gcra(request("alice", 1, now)).await.unwrap();
        assert!(outcome.allowed, "request {n} should be allowed");
        assert_eq!(outcome.tat_ms, millis(now) + n * 1_000, "request {n}");
    }
    let denied = store.check_gcra(request("alice", 1, now)).await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(
        denied.tat_ms,
        millis(now) + 3_000,
        "a denied check reports the stored TAT"
    );

    let later = now + Duration::seconds(1);
    let outcome = store.check_gcra(request("alice", 1, later)).await.unwrap();
    assert!(outcome.allowed, "one unit is free again after a second");
    assert_eq!(outcome.tat_ms, millis(now) + 4_000);
    let denied = store.check_gcra(request("alice", 1, later)).await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(denied.tat_ms, millis(now) + 4_000);
}

pub async fn refund_gives_back_unused_units<S: RateLimitStore>(store: &S) {
    let now = start();

    let outcome = store.check_gcra(request("bob", 3, now)).await.unwrap();
    assert!(outcome.allowed);
    assert!(
        !store
            .check_gcra(request("bob", 1, now))
            .await
            .unwrap()
            .allowed
    );

    store.refund_gcra(request("bob", 2, now)).await.unwrap();
    let outcome = store.check_gcra(request("bob", 2, now)).await.unwrap();
    assert!(outcome.allowed, "the two refunded units are free again");
    assert_eq!(outcome.tat_ms, millis(now) + 3_000);

    // A refund larger than what was taken stops at now: the budget is
    // full, never more than full.
    store.refund_gcra(request("bob", 50, now)).await.unwrap();
    assert!(
        store
            .check_gcra(request("bob", 3, now))
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !store
            .check_gcra(request("bob", 1, now))
            .await
            .unwrap()
            .allowed
    );

    // A key without state stays without state.
    store.refund_gcra(request("carol", 2, now)).await.unwrap();
    let outcome = store.check_gcra(request("carol", 3, now)).await.unwrap();
    assert!(outcome.allowed);
    assert_eq!(outcome.tat_ms, millis(now) + 3_000);
}

pub async fn oversized_cost_writes_nothing<S: RateLimitStore>(store: &S) {
    let now = start();

    let outcome = store.check_gcra(request("bob", 4, now)).await.unwrap();
    assert!(!outcome.allowed);
    assert_eq!(outcome.tat_ms, millis(now));

    // A row stored for the denied check would have a TAT of at most `now`,
    // so pruning at `now` would delete it.
    assert_eq!(store.prune_rate_limits(now, 10).await.unwrap(), 0);
    let outcome = store.check_gcra(request("bob", 3, now)).await.unwrap();
    assert!(outcome.allowed, "the key's budget is still full");
}

pub async fn invalid_cost_is_rejected<S: RateLimitStore>(store: &S) {
    let error = store
        .check_gcra(request("carol", 0, start()))
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::Invalid { field: "cost", .. }),
        "{error}"
    );
}

pub async fn two_handles_share_state<S: RateLimitStore>(first: &S, second: &S) {
    let now = start();

    assert!(
        first
            .check_gcra(request("dave", 2, now))
            .await
            .unwrap()
            .allowed
    );
    assert!(
        second
            .check_gcra(request("dave", 1, now))
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !first
            .check_gcra(request("dave", 1, now))
            .await
            .unwrap()
            .allowed
    );
    assert!(
        !second
            .check_gcra(request("dave", 1, now))
            .await
            .unwrap()
            .allowed
    );
}

pub async fn concurrent_checks_admit_capacity<S: RateLimitStore + Clone>(store: S) {
    let now = start();

    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .check_gcra(request("erin", 1, now))
                .await
                .unwrap()
                .allowed
        }));
    }
    let mut allowed = 0;
    for task in tasks {
        if task.await.unwrap() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3);
}

pub async fn prune_deletes_only_full_keys<S: RateLimitStore>(store: &S) {
    let now = start();

    for key in ["k1", "k2", "k3"] {
        assert!(
            store
                .check_gcra(request(key, 1, now))
                .await
                .unwrap()
                .allowed
        );
    }
    assert!(
        store
            .check_gcra(request("busy", 3, now))
            .await
            .unwrap()
            .allowed
    );

    // At now + 1s the three one-unit keys are full again, but "busy" is not.
    let at = now + Duration::seconds(1);
    assert_eq!(store.prune_rate_limits(at, 2).await.unwrap(), 2);
    assert_eq!(store.prune_rate_limits(at, 2).await.unwrap(), 1);
    assert_eq!(store.prune_rate_limits(at, 2).await.unwrap(), 0);

    let probe = store.check_gcra(request("busy", 3, at)).await.unwrap();
    assert!(!probe.allowed);
    assert_eq!(
        probe.tat_ms,
        millis(now) + 3_000,
        "pruning keeps the TAT of a key whose budget is not full"
    );
}

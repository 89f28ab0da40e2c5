//! The shared rate limiter on the local PostgreSQL: the rate-limit-store
//! conformance suite on a fresh schema per test, then a check that needs
//! several processes, stood in for by two stores on one schema.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test"
)]

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Duration, TimeZone, Utc};
use domain::{GcraParams, GcraRequest, RateLimitStore};
use postgres_store::{PgConfig, PgStore, testing};

/// Drops schemas that earlier runs left behind, once per test binary.
async fn drop_stale_schemas_once() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if !DONE.swap(true, Ordering::SeqCst)
        && let Err(error) = testing::drop_stale_schemas().await
    {
        // Another test run may be dropping the same schemas, and the next
        // run tries again.
        eprintln!("dropping stale test schemas failed: {error}");
    }
}

async fn connect(config: PgConfig) -> PgStore {
    PgStore::connect(config)
        .await
        .expect("connect to the test PostgreSQL; set BATCHD_TEST_DATABASE_URL if it is not local")
}

async fn fresh_store() -> PgStore {
    drop_stale_schemas_once().await;
    connect(testing::isolated_config()).await
}

/// Two stores on one fresh schema, as two processes would have.
async fn store_pair() -> (PgStore, PgStore) {
    drop_stale_schemas_once().await;
    let config = testing::isolated_config();
    (connect(config.clone()).await, connect(config).await)
}

store_conformance::rate_limit_conformance_tests!(fresh: fresh_store().await, pair: store_pair().await);

/// One unit per 100 ms and a burst of 1 + 400 / 100 = 5 units.
const PARAMS: GcraParams = GcraParams {
    emission_interval_ms: 100,
    tolerance_ms: 400,
};

/// Times of the phases, in milliseconds after the start. No gap exceeds
/// the 500 ms (tolerance plus one interval) after which a drained key is
/// full again, so every phase after the first admits exactly the units
/// refilled since the previous phase: one per 100 ms.
const PHASE_OFFSETS_MS: [i64; 5] = [0, 200, 500, 900, 1_300];

/// Admissions per phase: the burst, then the refill of each gap.
const EXPECTED_ADMITTED: [usize; 5] = [5, 2, 3, 4, 4];

/// Concurrent checks per store and phase: more than any phase admits, so
/// every phase drains the key and also denies.
const CHECKS_PER_STORE: usize = 12;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_admit_exactly_the_gcra_budget() {
    // A pool smaller than the number of concurrent checks, so checks also
    // queue for connections, as they do in a busy process.
    let mut config = testing::isolated_config();
    config.pool_size = 8;
    let first = connect(config.clone()).await;
    let second = connect(config.clone()).await;

    let mut admitted_tats = Vec::new();
    for (phase, offset_ms) in PHASE_OFFSETS_MS.into_iter().enumerate() {
        let now = start() + Duration::milliseconds(offset_ms);
        let mut tasks = Vec::new();
        for _ in 0..CHECKS_PER_STORE {
            for store in [&first, &second] {
                let store = store.clone();
                let request = GcraRequest {
                    policy: "submit".to_owned(),
                    key: "tenant-1".to_owned(),
                    cost: 1,
                    params: PARAMS,
                    now,
                };
                tasks.push(tokio::spawn(async move { store.check_gcra(request).await }));
            }
        }

        let mut admitted = 0;
        for task in tasks {
            let outcome = task.await.unwrap().unwrap();
            if outcome.allowed {
                admitted += 1;
                admitted_tats.push(outcome.tat_ms);
            }
        }
        assert_eq!(
            admitted, EXPECTED_ADMITTED[phase],
            "phase {phase} at +{offset_ms} ms"
        );
    }

    // The key is never full between phases, so each admission moved the
    // TAT by one interval from where the previous one left it: lost
    // updates would show as repeated values.
    let total: usize = EXPECTED_ADMITTED.iter().sum();
    admitted_tats.sort_unstable();
    let start_ms = start().timestamp_millis();
    let expected: Vec<i64> = (1..=total as i64).map(|n| start_ms + n * 100).collect();
    assert_eq!(admitted_tats, expected);

    testing::drop_schema(config.schema.as_deref().unwrap())
        .await
        .unwrap();
}

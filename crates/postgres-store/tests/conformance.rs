//! The shared store conformance suite, run against the local PostgreSQL
//! with a fresh schema per test.

use std::sync::Once;

use postgres_store::{PgStore, testing};

/// Guards the one cleanup of schemas left by earlier runs.
static DROP_STALE_SCHEMAS: Once = Once::new();

async fn fresh_store() -> PgStore {
    DROP_STALE_SCHEMAS.call_once(|| {
        // Best effort: the task may end with the first test's runtime, and
        // the next run tries again.
        tokio::spawn(async {
            let _ = testing::drop_stale_schemas().await;
        });
    });
    PgStore::connect(testing::isolated_config())
        .await
        .expect("connect to PostgreSQL on a fresh schema")
}

store_conformance::conformance_tests!(fresh_store().await);

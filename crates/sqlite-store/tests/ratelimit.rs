//! The shared rate-limit-store conformance suite, run against a fresh SQLite
//! file per test.

use sqlite_store::{SqliteConfig, SqliteStore};

/// Opens a store on a new file in a directory that lives as long as the
/// test process, so a store still flushing after the test ends finds it.
async fn fresh_store() -> SqliteStore {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.keep().join("batchd.db");
    SqliteStore::open(SqliteConfig::new(path))
        .await
        .expect("open a fresh SQLite store")
}

/// Opens two stores on one new file, as two processes would.
async fn store_pair() -> (SqliteStore, SqliteStore) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.keep().join("batchd.db");
    let first = SqliteStore::open(SqliteConfig::new(path.clone()))
        .await
        .expect("open a fresh SQLite store");
    let second = SqliteStore::open(SqliteConfig::new(path))
        .await
        .expect("open a second store on the same file");
    (first, second)
}

store_conformance::rate_limit_conformance_tests!(fresh: fresh_store().await, pair: store_pair().await);

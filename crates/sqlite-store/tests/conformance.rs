//! The shared store conformance suite, run against a fresh SQLite file per
//! test.

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

store_conformance::conformance_tests!(fresh_store().await);

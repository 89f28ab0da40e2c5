//! The shared rate limiter's GCRA state: [`RateLimitStore`] on SQLite.
//!
//! Each check is one operation on the single writer, so its read of the
//! stored TAT, the GCRA rule and the write run inside the writer's
//! transaction. Checks from this process are serialized by the writer
//! thread. Checks from other processes on the same file are serialized by
//! SQLite's write lock, which the writer takes with `BEGIN IMMEDIATE`
//! before it reads, so no check reads a TAT that another is about to
//! replace.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{GcraOutcome, GcraRequest, RateLimitStore, StoreError};
use rusqlite::{OptionalExtension, params};

use crate::{SqliteStore, db_error, to_millis};

const SELECT_TAT: &str = "SELECT tat_ms FROM rate_limits WHERE policy = ?1 AND key = ?2";

const UPSERT_TAT: &str = "
INSERT INTO rate_limits (policy, key, tat_ms, updated_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (policy, key) DO UPDATE SET tat_ms = excluded.tat_ms, updated_at = excluded.updated_at";

/// Deletes a chunk of keys whose budget is full, walking `rate_limits_tat`.
const DELETE_FULL: &str = "
DELETE FROM rate_limits WHERE (policy, key) IN (
    SELECT policy, key FROM rate_limits WHERE tat_ms <= ?1 LIMIT ?2)";

#[async_trait]
impl RateLimitStore for SqliteStore {
    async fn check_gcra(&self, request: GcraRequest) -> Result<GcraOutcome, StoreError> {
        self.writer()
            .write("check rate limit", false, move |conn| {
                let stored: Option<i64> = conn
                    .prepare_cached(SELECT_TAT)
                    .and_then(|mut stmt| {
                        stmt.query_row(params![request.policy, request.key], |row| row.get(0))
                            .optional()
                    })
                    .map_err(db_error("read rate limit state"))?;

                let outcome = request.apply(stored)?;
                if outcome.allowed {
                    conn.prepare_cached(UPSERT_TAT)
                        .and_then(|mut stmt| {
                            stmt.execute(params![
                                request.policy,
                                request.key,
                                outcome.tat_ms,
                                to_millis(request.now)
                            ])
                        })
                        .map_err(db_error("write rate limit state"))?;
                }
                Ok(outcome)
            })
            .await
    }

    async fn prune_rate_limits(
        &self,
        now: DateTime<Utc>,
        max_rows: u32,
    ) -> Result<u64, StoreError> {
        let now_ms = to_millis(now);
        let deleted = self
            .writer()
            .write("prune rate limit state", true, move |conn| {
                conn.prepare_cached(DELETE_FULL)
                    .and_then(|mut stmt| stmt.execute(params![now_ms, max_rows]))
                    .map_err(db_error("prune rate limit state"))
            })
            .await?;
        if deleted > 0 {
            tracing::debug!(deleted, "pruned rate limit keys whose budget is full");
        }
        Ok(deleted as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use chrono::{Duration, TimeZone};
    use domain::GcraParams;

    use super::*;
    use crate::SqliteConfig;

    /// One unit per second, three units at once.
    const PARAMS: GcraParams = GcraParams {
        emission_interval_ms: 1_000,
        tolerance_ms: 2_000,
    };

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
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

    async fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(SqliteConfig::new(dir.path().join("batchd.db")))
            .await
            .unwrap()
    }

    async fn stored_tat(store: &SqliteStore, key: &'static str) -> Option<i64> {
        store
            .read("test read", move |conn| {
                conn.query_row(SELECT_TAT, params!["test", key], |row| row.get(0))
                    .optional()
                    .map_err(db_error("test read"))
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn ratelimit_check_stores_tat_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let now = start();

        for n in 1..=3 {
            let outcome = store.check_gcra(request("alice", 1, now)).await.unwrap();
            assert!(outcome.allowed, "request {n} should be allowed");
        }
        let denied = store.check_gcra(request("alice", 1, now)).await.unwrap();
        assert!(!denied.allowed);
        assert_eq!(
            stored_tat(&store, "alice").await,
            Some(to_millis(now) + 3_000)
        );

        let later = store
            .check_gcra(request("alice", 1, now + Duration::seconds(1)))
            .await
            .unwrap();
        assert!(later.allowed);
        assert_eq!(
            stored_tat(&store, "alice").await,
            Some(to_millis(now) + 4_000)
        );
    }

    #[tokio::test]
    async fn ratelimit_oversized_cost_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;

        let outcome = store.check_gcra(request("bob", 4, start())).await.unwrap();
        assert!(!outcome.allowed);
        assert_eq!(stored_tat(&store, "bob").await, None);
    }

    #[tokio::test]
    async fn ratelimit_invalid_cost_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;

        let error = store
            .check_gcra(request("carol", 0, start()))
            .await
            .unwrap_err();
        assert!(
            matches!(error, StoreError::Invalid { field: "cost", .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn ratelimit_two_handles_share_state() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(&dir).await;
        let second = open(&dir).await;
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ratelimit_concurrent_checks_admit_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&dir).await);
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

    #[tokio::test]
    async fn ratelimit_prune_deletes_only_full_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
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

        // At now + 1s the three one-unit keys are full again; "busy" is not.
        let at = now + Duration::seconds(1);
        assert_eq!(store.prune_rate_limits(at, 2).await.unwrap(), 2);
        assert_eq!(store.prune_rate_limits(at, 2).await.unwrap(), 1);
        assert_eq!(store.prune_rate_limits(at, 2).await.unwrap(), 0);
        assert_eq!(
            stored_tat(&store, "busy").await,
            Some(to_millis(now) + 3_000)
        );
    }
}

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

/// Moves a key's TAT back by ?3 milliseconds, not before ?4 (now).
const REFUND_TAT: &str = "
UPDATE rate_limits SET tat_ms = max(tat_ms - ?3, ?4), updated_at = ?4
WHERE policy = ?1 AND key = ?2";

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

    async fn refund_gcra(&self, request: GcraRequest) -> Result<(), StoreError> {
        let refund_ms = request.cost_ms();
        let now_ms = to_millis(request.now);
        self.writer()
            .write("refund rate limit", false, move |conn| {
                conn.prepare_cached(REFUND_TAT)
                    .and_then(|mut stmt| {
                        stmt.execute(params![request.policy, request.key, refund_ms, now_ms])
                    })
                    .map_err(db_error("refund rate limit"))?;
                Ok(())
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

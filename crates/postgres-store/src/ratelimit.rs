//! The shared rate limiter's GCRA state: [`RateLimitStore`] on PostgreSQL.
//!
//! A check is one READ COMMITTED transaction that locks the key's row,
//! applies [`GcraRequest::apply`] in Rust (the rule every store shares) and
//! writes the new TAT only when the request is allowed. Checks of the same
//! key from any number of processes wait for that row lock, so each one
//! reads the TAT its predecessor committed. Checks of different keys lock
//! different rows, so they never wait for each other's locks.
//!
//! A key without a row has nothing to lock, so two first checks could both
//! read "no state". For such a key the check creates the row with an upsert
//! that PostgreSQL resolves atomically, and locks it in the same statement.
//! The placeholder TAT is `now`, which the GCRA rule treats exactly like a
//! missing row, and a denied check rolls the placeholder back.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use domain::{GcraOutcome, GcraRequest, RateLimitStore, StoreError};
use tokio_postgres::types::ToSql;

use crate::read::{column, execute, query_opt};
use crate::write::{begin_read_committed, retry_transaction};
use crate::{PgStore, db_error};

/// Locks the row of an existing key. This is the common case, and a denied
/// check then writes nothing.
const LOCK_TAT: &str = "SELECT tat_ms FROM rate_limits WHERE policy = $1 AND key = $2 FOR UPDATE";

/// Locks the key's row, creating it first with the placeholder TAT in $3
/// when it does not exist. The no-op update makes PostgreSQL lock and
/// return a row that a concurrent check inserted first.
const LOCK_OR_CREATE_TAT: &str = "
INSERT INTO rate_limits (policy, key, tat_ms, updated_at) VALUES ($1, $2, $3, $3)
ON CONFLICT (policy, key) DO UPDATE SET tat_ms = rate_limits.tat_ms
RETURNING tat_ms";

const UPDATE_TAT: &str =
    "UPDATE rate_limits SET tat_ms = $3, updated_at = $4 WHERE policy = $1 AND key = $2";

/// Moves a key's TAT back by $3 milliseconds, not before $4 (now). One
/// statement, so it takes the row lock a concurrent check waits on.
const REFUND_TAT: &str = "
UPDATE rate_limits SET tat_ms = GREATEST(tat_ms - $3, $4), updated_at = $4
WHERE policy = $1 AND key = $2";

/// Deletes a chunk of keys whose budget is full, walking `rate_limits_tat`.
/// Rows locked by a check are skipped, so pruning never waits for a check.
/// The outer condition is tested again on the row version the delete
/// finds, so a TAT that a check moved past `now` keeps its row.
const DELETE_FULL: &str = "
DELETE FROM rate_limits
WHERE tat_ms <= $1 AND (policy, key) IN (
    SELECT policy, key FROM rate_limits WHERE tat_ms <= $1
    LIMIT $2
    FOR UPDATE SKIP LOCKED)";

/// Reads the TAT of the locked row that `sql` returns.
async fn locked_tat(
    transaction: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<i64>, StoreError> {
    let row = query_opt(transaction, "lock rate limit state", sql, params).await?;
    row.map(|row| column(&row, 0)).transpose()
}

impl PgStore {
    /// Runs one attempt of a GCRA check in its own transaction.
    async fn check_gcra_once(&self, request: &GcraRequest) -> Result<GcraOutcome, StoreError> {
        const OPERATION: &str = "check rate limit";

        let now_ms = request.now.timestamp_millis();
        let mut client = self.client(OPERATION).await?;
        let transaction = begin_read_committed(&mut client, OPERATION).await?;

        let key: [&(dyn ToSql + Sync); 2] = [&request.policy, &request.key];
        let mut stored = locked_tat(&transaction, LOCK_TAT, &key).await?;
        if stored.is_none() {
            let params: [&(dyn ToSql + Sync); 3] = [&request.policy, &request.key, &now_ms];
            stored = locked_tat(&transaction, LOCK_OR_CREATE_TAT, &params).await?;
        }

        // On an invalid request the dropped transaction rolls back,
        // placeholder row included.
        let outcome = request.apply(stored)?;
        if !outcome.allowed {
            // Also removes a placeholder row this check created.
            transaction.rollback().await.map_err(db_error(OPERATION))?;
            return Ok(outcome);
        }

        let updated = execute(
            &transaction,
            "write rate limit state",
            UPDATE_TAT,
            &[&request.policy, &request.key, &outcome.tat_ms, &now_ms],
        )
        .await?;
        if updated != 1 {
            // The row is locked by this transaction, so it cannot vanish.
            return Err(StoreError::Corrupt {
                what: "rate limit row count after update",
                value: updated.to_string(),
            });
        }
        transaction.commit().await.map_err(db_error(OPERATION))?;
        Ok(outcome)
    }
}

#[async_trait]
impl RateLimitStore for PgStore {
    async fn check_gcra(&self, request: GcraRequest) -> Result<GcraOutcome, StoreError> {
        retry_transaction("check rate limit", || self.check_gcra_once(&request)).await
    }

    async fn refund_gcra(&self, request: GcraRequest) -> Result<(), StoreError> {
        const OPERATION: &str = "refund rate limit";

        let refund_ms = request.cost_ms();
        let now_ms = request.now.timestamp_millis();
        retry_transaction(OPERATION, || async {
            let client = self.client(OPERATION).await?;
            let params: [&(dyn ToSql + Sync); 4] =
                [&request.policy, &request.key, &refund_ms, &now_ms];
            execute(&client, OPERATION, REFUND_TAT, &params).await
        })
        .await?;
        Ok(())
    }

    async fn prune_rate_limits(
        &self,
        now: DateTime<Utc>,
        max_rows: u32,
    ) -> Result<u64, StoreError> {
        const OPERATION: &str = "prune rate limit state";

        let now_ms = now.timestamp_millis();
        let limit = i64::from(max_rows);
        let deleted = retry_transaction(OPERATION, || async {
            let client = self.client(OPERATION).await?;
            execute(&client, OPERATION, DELETE_FULL, &[&now_ms, &limit]).await
        })
        .await?;
        if deleted > 0 {
            tracing::debug!(deleted, "pruned rate limit keys whose budget is full");
        }
        Ok(deleted)
    }
}

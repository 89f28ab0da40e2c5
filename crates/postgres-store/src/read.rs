//! Row mapping and the read queries shared by transactions and pooled
//! connections. Rows have the same shape as in the SQLite store: times in
//! milliseconds since the epoch, ids as text.

use chrono::{DateTime, TimeZone, Utc};
use deadpool_postgres::GenericClient;
use domain::{AttemptRecord, Batch, BatchCounters, BatchId, Job, JobId, Scope, StoreError, UserId};
use serde_json::value::RawValue;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};

use crate::{db_error, sql};

/// Parameters of a statement, as tokio-postgres takes them.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Reads one column, turning a type mismatch into an error instead of a
/// panic.
pub(crate) fn column<'r, T: FromSql<'r>>(row: &'r Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|source| StoreError::backend("read result column", source))
}

pub(crate) fn corrupt(what: &'static str, value: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        value: value.to_string(),
    }
}

/// Converts a stored INTEGER that the domain represents as `u32`.
pub(crate) fn to_u32(value: i32, what: &'static str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| corrupt(what, value))
}

/// Converts a caller's `u32` into an INTEGER parameter.
pub(crate) fn to_i32(value: u32, field: &'static str) -> Result<i32, StoreError> {
    i32::try_from(value).map_err(|_| StoreError::Invalid {
        field,
        reason: format!("{value} is over the maximum of {}", i32::MAX),
    })
}

/// Milliseconds since the Unix epoch, the stored form of every time.
pub(crate) fn to_millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

pub(crate) fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

pub(crate) fn millis_to_time(millis: Option<i64>) -> Option<DateTime<Utc>> {
    millis.map(from_millis)
}

pub(crate) fn parse_batch_id(id: &str) -> Result<BatchId, StoreError> {
    id.parse().map_err(|_| corrupt("batch id", id))
}

fn raw_json(what: &'static str, text: String) -> Result<Box<RawValue>, StoreError> {
    RawValue::from_string(text).map_err(|error| corrupt(what, error))
}

fn json_value(what: &'static str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt(what, text))
}

/// Maps a row of [`sql::BATCH_BY_ID`]'s columns.
pub(crate) fn batch_from_row(row: &Row) -> Result<Batch, StoreError> {
    let counter = |index| -> Result<u64, StoreError> {
        let value: i32 = column(row, index)?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    let id: String = column(row, 0)?;
    let status: String = column(row, 3)?;
    let config: String = column(row, 10)?;
    let metadata: String = column(row, 11)?;

    Ok(Batch {
        id: parse_batch_id(&id)?,
        owner: UserId(column(row, 1)?),
        kind: column(row, 2)?,
        status: status
            .parse()
            .map_err(|_| corrupt("batch status", &status))?,
        counters: BatchCounters {
            item_count: counter(4)?,
            succeeded: counter(5)?,
            failed: counter(6)?,
            cancelled: counter(7)?,
        },
        priority: column(row, 8)?,
        max_attempts: to_u32(column(row, 9)?, "batch max attempts")?,
        config: json_value("batch config", &config)?,
        metadata: json_value("batch metadata", &metadata)?,
        correlation_id: column(row, 12)?,
        idempotency_key: column(row, 13)?,
        cancel_requested: column(row, 14)?,
        generation: to_u32(column(row, 15)?, "batch generation")?,
        created_at: from_millis(column(row, 16)?),
        updated_at: from_millis(column(row, 17)?),
        started_at: millis_to_time(column(row, 18)?),
        finished_at: millis_to_time(column(row, 19)?),
    })
}

/// Maps a row whose first columns are [`sql::job_columns`].
pub(crate) fn job_from_row(row: &Row) -> Result<Job, StoreError> {
    let batch_id: String = column(row, 1)?;
    let status: String = column(row, 5)?;
    let errors: Option<serde_json::Value> = column(row, 15)?;
    let errors: Vec<AttemptRecord> = match errors {
        Some(value) => {
            serde_json::from_value(value.clone()).map_err(|_| corrupt("job errors", value))?
        }
        None => Vec::new(),
    };
    let progress: i16 = column(row, 13)?;
    let result: Option<String> = column(row, 16)?;

    Ok(Job {
        id: JobId(column(row, 0)?),
        batch_id: parse_batch_id(&batch_id)?,
        seq: to_u32(column(row, 2)?, "job position")?,
        kind: column(row, 3)?,
        payload: raw_json("job payload", column(row, 4)?)?,
        status: status.parse().map_err(|_| corrupt("job status", &status))?,
        priority: column(row, 6)?,
        attempts: to_u32(column(row, 7)?, "job attempts")?,
        max_attempts: to_u32(column(row, 8)?, "job max attempts")?,
        blocked_by: to_u32(column(row, 9)?, "job blockers")?,
        run_at: from_millis(column(row, 10)?),
        lease_owner: column(row, 11)?,
        lease_expires_at: millis_to_time(column(row, 12)?),
        progress: u8::try_from(progress).map_err(|_| corrupt("job progress", progress))?,
        last_error: column(row, 14)?,
        errors,
        result: result
            .map(|text| raw_json("job result", text))
            .transpose()?,
        created_at: from_millis(column(row, 17)?),
        attempted_at: millis_to_time(column(row, 18)?),
        finished_at: millis_to_time(column(row, 19)?),
    })
}

/// Loads an accepted batch visible to `scope`. With `lock`, the row stays
/// locked until the transaction ends.
pub(crate) async fn batch(
    client: &impl GenericClient,
    scope: &Scope,
    id: BatchId,
    lock: bool,
) -> Result<Batch, StoreError> {
    let query = if lock {
        sql::BATCH_BY_ID_LOCKED
    } else {
        sql::BATCH_BY_ID
    };
    let statement = client
        .prepare_cached(query)
        .await
        .map_err(db_error("read batch"))?;
    let row = client
        .query_opt(&statement, &[&id.to_string()])
        .await
        .map_err(db_error("read batch"))?;
    let batch = match row {
        Some(row) => batch_from_row(&row)?,
        None => return Err(StoreError::not_found("batch", id)),
    };
    if !scope.allows(&batch.owner) {
        return Err(StoreError::not_found("batch", id));
    }
    Ok(batch)
}

/// Runs a query that returns rows and prepares it through the connection's
/// statement cache.
pub(crate) async fn query(
    client: &impl GenericClient,
    operation: &'static str,
    query: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, StoreError> {
    let statement = client
        .prepare_cached(query)
        .await
        .map_err(db_error(operation))?;
    client
        .query(&statement, params)
        .await
        .map_err(db_error(operation))
}

/// Like [`query`], for a statement that returns at most one row.
pub(crate) async fn query_opt(
    client: &impl GenericClient,
    operation: &'static str,
    query: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, StoreError> {
    let statement = client
        .prepare_cached(query)
        .await
        .map_err(db_error(operation))?;
    client
        .query_opt(&statement, params)
        .await
        .map_err(db_error(operation))
}

/// Like [`query`], for a statement whose affected row count is all the
/// caller needs.
pub(crate) async fn execute(
    client: &impl GenericClient,
    operation: &'static str,
    query: &str,
    params: &Params<'_>,
) -> Result<u64, StoreError> {
    let statement = client
        .prepare_cached(query)
        .await
        .map_err(db_error(operation))?;
    client
        .execute(&statement, params)
        .await
        .map_err(db_error(operation))
}

pub(crate) async fn batches(
    client: &impl GenericClient,
    query_text: &str,
    params: &Params<'_>,
) -> Result<Vec<Batch>, StoreError> {
    query(client, "list batches", query_text, params)
        .await?
        .iter()
        .map(batch_from_row)
        .collect()
}

pub(crate) async fn jobs(
    client: &impl GenericClient,
    query_text: &str,
    params: &Params<'_>,
) -> Result<Vec<Job>, StoreError> {
    query(client, "list jobs", query_text, params)
        .await?
        .iter()
        .map(job_from_row)
        .collect()
}

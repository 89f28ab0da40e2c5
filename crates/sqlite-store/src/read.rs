//! Row mapping and the read queries shared by the writer and the pool.

use domain::{AttemptRecord, Batch, BatchCounters, BatchId, Job, JobId, Scope, StoreError, UserId};
use rusqlite::{Connection, OptionalExtension, Row};
use serde_json::value::RawValue;

use crate::mutate::{millis_to_time, parse_batch_id};
use crate::{db_error, from_millis, sql};

/// Builds the job column list with a table prefix, for queries with joins.
pub(crate) fn job_columns(prefix: &str) -> String {
    sql::JOB_COLUMNS
        .split(',')
        .map(|column| format!("{prefix}{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn string_column(conn: &Connection, query: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare_cached(query).map_err(db_error("read ids"))?;
    let rows = stmt
        .query_map([], |row| row.get(0))
        .map_err(db_error("read ids"))?;
    rows.collect::<Result<_, _>>().map_err(db_error("read ids"))
}

fn corrupt(what: &'static str, value: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        value: value.to_string(),
    }
}

fn raw_json(what: &'static str, text: String) -> Result<Box<RawValue>, StoreError> {
    RawValue::from_string(text).map_err(|error| corrupt(what, error))
}

fn json_value(what: &'static str, text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|_| corrupt(what, text))
}

/// Raw columns of a batch row, decoded outside the rusqlite callback so
/// that decoding errors keep their own type.
struct BatchRow {
    id: String,
    owner: String,
    kind: String,
    status: String,
    counters: [i64; 4],
    priority: i32,
    max_attempts: u32,
    config: String,
    metadata: String,
    correlation_id: Option<String>,
    idempotency_key: Option<String>,
    cancel_requested: bool,
    generation: u32,
    times: [Option<i64>; 4],
}

fn batch_row(row: &Row<'_>) -> rusqlite::Result<BatchRow> {
    Ok(BatchRow {
        id: row.get(0)?,
        owner: row.get(1)?,
        kind: row.get(2)?,
        status: row.get(3)?,
        counters: [row.get(4)?, row.get(5)?, row.get(6)?, row.get(7)?],
        priority: row.get(8)?,
        max_attempts: row.get(9)?,
        config: row.get(10)?,
        metadata: row.get(11)?,
        correlation_id: row.get(12)?,
        idempotency_key: row.get(13)?,
        cancel_requested: row.get(14)?,
        generation: row.get(15)?,
        times: [row.get(16)?, row.get(17)?, row.get(18)?, row.get(19)?],
    })
}

fn batch_from_row(row: BatchRow) -> Result<Batch, StoreError> {
    let [item_count, succeeded, failed, cancelled] = row.counters.map(|n| n.max(0) as u64);
    Ok(Batch {
        id: parse_batch_id(&row.id)?,
        owner: UserId(row.owner),
        kind: row.kind,
        status: row
            .status
            .parse()
            .map_err(|_| corrupt("batch status", &row.status))?,
        counters: BatchCounters {
            item_count,
            succeeded,
            failed,
            cancelled,
        },
        priority: row.priority,
        max_attempts: row.max_attempts,
        config: json_value("batch config", &row.config)?,
        metadata: json_value("batch metadata", &row.metadata)?,
        correlation_id: row.correlation_id,
        idempotency_key: row.idempotency_key,
        cancel_requested: row.cancel_requested,
        generation: row.generation,
        created_at: from_millis(row.times[0].unwrap_or_default()),
        updated_at: from_millis(row.times[1].unwrap_or_default()),
        started_at: millis_to_time(row.times[2]),
        finished_at: millis_to_time(row.times[3]),
    })
}

/// Loads an accepted batch visible to `scope`.
pub(crate) fn batch(conn: &Connection, scope: &Scope, id: BatchId) -> Result<Batch, StoreError> {
    let query = format!(
        "SELECT {} FROM batches WHERE id = ?1 AND accepted = 1",
        sql::BATCH_COLUMNS
    );
    let row = conn
        .prepare_cached(&query)
        .and_then(|mut stmt| stmt.query_row([id.to_string()], batch_row).optional())
        .map_err(db_error("read batch"))?;
    let batch = match row {
        Some(row) => batch_from_row(row)?,
        None => return Err(StoreError::not_found("batch", id)),
    };
    if !scope.allows(&batch.owner) {
        return Err(StoreError::not_found("batch", id));
    }
    Ok(batch)
}

pub(crate) fn batches(
    conn: &Connection,
    query: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Batch>, StoreError> {
    let mut stmt = conn
        .prepare_cached(query)
        .map_err(db_error("list batches"))?;
    let rows = stmt
        .query_map(params, batch_row)
        .map_err(db_error("list batches"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error("list batches"))?;
    rows.into_iter().map(batch_from_row).collect()
}

struct JobRow {
    id: i64,
    batch_id: String,
    seq: u32,
    kind: String,
    payload: String,
    status: String,
    priority: i32,
    attempts: u32,
    max_attempts: u32,
    blockers: u32,
    run_at: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<i64>,
    progress: u8,
    last_error: Option<String>,
    errors: Option<String>,
    result: Option<String>,
    created_at: i64,
    attempted_at: Option<i64>,
    finished_at: Option<i64>,
}

fn job_row(row: &Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: row.get(0)?,
        batch_id: row.get(1)?,
        seq: row.get(2)?,
        kind: row.get(3)?,
        payload: row.get(4)?,
        status: row.get(5)?,
        priority: row.get(6)?,
        attempts: row.get(7)?,
        max_attempts: row.get(8)?,
        blockers: row.get(9)?,
        run_at: row.get(10)?,
        lease_owner: row.get(11)?,
        lease_expires_at: row.get(12)?,
        progress: row.get(13)?,
        last_error: row.get(14)?,
        errors: row.get(15)?,
        result: row.get(16)?,
        created_at: row.get(17)?,
        attempted_at: row.get(18)?,
        finished_at: row.get(19)?,
    })
}

fn job_from_row(row: JobRow) -> Result<Job, StoreError> {
    let errors: Vec<AttemptRecord> = match &row.errors {
        Some(text) => serde_json::from_str(text).map_err(|_| corrupt("job errors", text))?,
        None => Vec::new(),
    };
    Ok(Job {
        id: JobId(row.id),
        batch_id: parse_batch_id(&row.batch_id)?,
        seq: row.seq,
        kind: row.kind,
        payload: raw_json("job payload", row.payload)?,
        status: row
            .status
            .parse()
            .map_err(|_| corrupt("job status", &row.status))?,
        priority: row.priority,
        attempts: row.attempts,
        max_attempts: row.max_attempts,
        blocked_by: row.blockers,
        run_at: from_millis(row.run_at),
        lease_owner: row.lease_owner,
        lease_expires_at: millis_to_time(row.lease_expires_at),
        progress: row.progress,
        last_error: row.last_error,
        errors,
        result: row
            .result
            .map(|text| raw_json("job result", text))
            .transpose()?,
        created_at: from_millis(row.created_at),
        attempted_at: millis_to_time(row.attempted_at),
        finished_at: millis_to_time(row.finished_at),
    })
}

pub(crate) fn jobs(
    conn: &Connection,
    query: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Job>, StoreError> {
    let mut stmt = conn.prepare_cached(query).map_err(db_error("list jobs"))?;
    let rows = stmt
        .query_map(params, job_row)
        .map_err(db_error("list jobs"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_error("list jobs"))?;
    rows.into_iter().map(job_from_row).collect()
}

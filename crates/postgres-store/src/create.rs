//! Creating batches. `create_batch` writes the batch row, every item, the
//! dependencies, the acceptance and the release in one transaction. A
//! streamed batch takes `begin_batch`, `append_items` and then
//! `commit_batch` or `abort_batch`, each a transaction of its own. Until
//! the commit it stays unaccepted and each item has one extra blocker.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::{
    Batch, ChangeSet, CreatedBatch, DependencyRef, JobId, JobStatus, NewBatch, NewJob, Scope,
    StagingBatch, StoreError,
};

use crate::mutate::{Mutation, Touched};
use crate::read::{self, column, parse_batch_id, to_i32, to_millis};
use crate::sql;
use crate::write::Tx;

pub(crate) fn no_items() -> StoreError {
    StoreError::Invalid {
        field: "items",
        reason: "a batch needs at least one item".into(),
    }
}

/// Outcome of inserting a batch row.
pub(crate) enum Begun {
    Started,
    /// The idempotency key matched an accepted batch with the same request.
    Existing(Box<Batch>),
}

/// Input of `create_batch`'s transaction.
pub(crate) struct CreateInput {
    pub(crate) batch: NewBatch,
    pub(crate) items: Vec<NewJob>,
    pub(crate) now: DateTime<Utc>,
    pub(crate) chunk_rows: usize,
}

/// Input of `append_items`'s transaction.
pub(crate) struct AppendInput<'a> {
    pub(crate) staging: &'a StagingBatch,
    pub(crate) items: &'a [NewJob],
    pub(crate) now: DateTime<Utc>,
    pub(crate) chunk_rows: usize,
}

/// Creates a whole batch in the caller's transaction: nothing of it is
/// visible to other sessions before the commit, and nothing remains after
/// a rollback.
pub(crate) async fn create_in(
    tx: &Tx<'_>,
    input: &CreateInput,
) -> Result<CreatedBatch, StoreError> {
    let batch = &input.batch;
    if let Begun::Existing(existing) = begin_in(tx, batch, to_millis(input.now)).await? {
        return Ok(CreatedBatch {
            batch: *existing,
            created: false,
            changes: ChangeSet::default(),
        });
    }

    let mut staging = StagingBatch {
        id: batch.id,
        owner: batch.owner.clone(),
        kind: batch.kind.clone(),
        items_appended: 0,
    };
    let mut mutation = Mutation::new(tx, input.now);
    insert_items_in(&mut mutation, &staging, &input.items, input.chunk_rows).await?;
    staging.items_appended = item_total(0, input.items.len())?;

    accept_in(&mut mutation, &staging).await?;
    let changes = mutation.finish().await?;
    let created = read::batch(tx, &Scope::Owner(staging.owner), staging.id, false).await?;
    Ok(CreatedBatch {
        batch: created,
        created: true,
        changes,
    })
}

pub(crate) async fn append_in(
    tx: &Tx<'_>,
    input: &AppendInput<'_>,
) -> Result<ChangeSet, StoreError> {
    let mut mutation = Mutation::new(tx, input.now);
    insert_items_in(&mut mutation, input.staging, input.items, input.chunk_rows).await?;
    mutation.finish().await
}

/// Accepts a staging batch and releases its items in one transaction.
pub(crate) async fn commit_in(
    tx: &Tx<'_>,
    input: &(StagingBatch, DateTime<Utc>),
) -> Result<CreatedBatch, StoreError> {
    let (staging, now) = input;
    let mut mutation = Mutation::new(tx, *now);
    accept_in(&mut mutation, staging).await?;
    let changes = mutation.finish().await?;
    let batch = read::batch(tx, &Scope::Owner(staging.owner.clone()), staging.id, false).await?;
    Ok(CreatedBatch {
        batch,
        created: true,
        changes,
    })
}

/// Deletes a staging batch with everything inserted for it. An accepted
/// batch belongs to its owner now and is never deleted here.
pub(crate) async fn abort_in(tx: &Tx<'_>, batch_id: &str) -> Result<u64, StoreError> {
    let deleted = read::execute(
        tx,
        "delete staging batch",
        sql::DELETE_STAGING_BATCH,
        &[&batch_id],
    )
    .await?;
    if deleted == 0 {
        return Err(StoreError::not_found("staging batch", batch_id));
    }
    Ok(deleted)
}

/// `appended` plus `more`, as the `u32` item position the domain uses.
pub(crate) fn item_total(appended: u32, more: usize) -> Result<u32, StoreError> {
    u32::try_from(more)
        .ok()
        .and_then(|more| appended.checked_add(more))
        .ok_or_else(|| StoreError::Invalid {
            field: "items",
            reason: format!(
                "{appended} items plus {more} more is over the maximum of {}",
                u32::MAX
            ),
        })
}

/// Inserts the batch row, unaccepted, unless the idempotency key names an
/// earlier batch.
pub(crate) async fn begin_in(
    tx: &Tx<'_>,
    batch: &NewBatch,
    now_ms: i64,
) -> Result<Begun, StoreError> {
    if let Some(key) = &batch.idempotency_key
        && let Some(existing) = existing_for_key(tx, batch, key).await?
    {
        return Ok(existing);
    }
    check_batch_dependencies(tx, batch).await?;

    let id = batch.id.to_string();
    let max_attempts = to_i32(batch.max_attempts, "maxAttempts")?;
    let run_at = batch.run_at.map(to_millis);
    let config = batch.config.to_string();
    let metadata = batch.metadata.to_string();
    let inserted = read::query_opt(
        tx,
        "insert batch",
        sql::INSERT_BATCH,
        &[
            &id,
            &batch.owner.as_str(),
            &batch.kind,
            &batch.priority,
            &max_attempts,
            &run_at,
            &config,
            &metadata,
            &batch.correlation_id,
            &batch.idempotency_key,
            &batch.request_digest,
            &now_ms,
            &batch.traceparent,
        ],
    )
    .await?;

    if inserted.is_none() {
        // A concurrent request with the same key inserted its batch first.
        // The insert waited for it to commit, so it is visible now.
        let Some(key) = &batch.idempotency_key else {
            return Err(StoreError::Invalid {
                field: "id",
                reason: format!("batch {id} already exists"),
            });
        };
        return match existing_for_key(tx, batch, key).await? {
            Some(existing) => Ok(existing),
            None => Err(StoreError::IdempotencyInProgress { key: key.clone() }),
        };
    }

    if !batch.depends_on.is_empty() {
        let depends_on: Vec<String> = batch.depends_on.iter().map(|d| d.to_string()).collect();
        read::execute(
            tx,
            "insert batch dependencies",
            sql::INSERT_BATCH_DEPENDENCIES,
            &[&id, &depends_on],
        )
        .await?;
    }
    Ok(Begun::Started)
}

/// Returns the batch an idempotency key already names, or rejects the key
/// when its batch is still staging or was created by a different request.
async fn existing_for_key(
    tx: &Tx<'_>,
    batch: &NewBatch,
    key: &str,
) -> Result<Option<Begun>, StoreError> {
    let row = read::query_opt(
        tx,
        "look up idempotency key",
        sql::FIND_BY_IDEMPOTENCY_KEY,
        &[&batch.owner.as_str(), &key],
    )
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let id: String = column(&row, 0)?;
    let accepted: bool = column(&row, 1)?;
    let digest: Option<String> = column(&row, 2)?;

    if !accepted {
        return Err(StoreError::IdempotencyInProgress {
            key: key.to_owned(),
        });
    }
    let same_request =
        digest.is_none() || batch.request_digest.is_none() || digest == batch.request_digest;
    if !same_request {
        return Err(StoreError::IdempotencyMismatch {
            key: key.to_owned(),
        });
    }
    let scope = Scope::Owner(batch.owner.clone());
    let existing = read::batch(tx, &scope, parse_batch_id(&id)?, false).await?;
    Ok(Some(Begun::Existing(Box::new(existing))))
}

/// Every batch dependency must be an accepted batch of the same owner.
async fn check_batch_dependencies(tx: &Tx<'_>, batch: &NewBatch) -> Result<(), StoreError> {
    if batch.depends_on.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = batch.depends_on.iter().map(|d| d.to_string()).collect();
    let rows = read::query(
        tx,
        "check batch dependency",
        sql::BATCHES_FOR_DEPENDENCY,
        &[&ids],
    )
    .await?;
    let mut visible = HashMap::new();
    for row in &rows {
        let id: String = column(row, 0)?;
        let owner: String = column(row, 1)?;
        let accepted: bool = column(row, 2)?;
        visible.insert(id, accepted && owner == batch.owner.as_str());
    }
    for id in ids {
        if visible.get(&id) != Some(&true) {
            return Err(StoreError::DependencyNotFound { id });
        }
    }
    Ok(())
}

/// Column values shared by every item of one staging batch.
struct StagingRow {
    batch_id: String,
    kind: String,
    priority: i32,
    max_attempts: i32,
    run_at_ms: i64,
    initial_status: JobStatus,
}

/// Inserts items of a batch that is not yet accepted, `chunk_rows` rows per
/// INSERT. Each item gets one blocker for the staging hold plus one per
/// unmet dependency.
async fn insert_items_in(
    mutation: &mut Mutation<'_>,
    staging: &StagingBatch,
    items: &[NewJob],
    chunk_rows: usize,
) -> Result<(), StoreError> {
    let batch_id = staging.id.to_string();
    let row = read::query_opt(
        mutation.tx,
        "read staging batch",
        sql::STAGING_BATCH,
        &[&batch_id],
    )
    .await?
    .ok_or_else(|| StoreError::not_found("staging batch", &batch_id))?;
    let item_count: i32 = column(&row, 0)?;
    check_item_count(&batch_id, item_count, staging.items_appended)?;

    let run_at: Option<i64> = column(&row, 3)?;
    let run_at_ms = run_at.unwrap_or(mutation.now_ms).max(mutation.now_ms);
    let context = StagingRow {
        batch_id,
        kind: column(&row, 4)?,
        priority: column(&row, 1)?,
        max_attempts: column(&row, 2)?,
        run_at_ms,
        initial_status: if run_at_ms > mutation.now_ms {
            JobStatus::Scheduled
        } else {
            JobStatus::Queued
        },
    };

    let mut first_seq = staging.items_appended;
    for chunk in items.chunks(chunk_rows.max(1)) {
        insert_chunk(mutation, staging, &context, first_seq, chunk).await?;
        first_seq = item_total(first_seq, chunk.len())?;
    }

    let added = i32::try_from(items.len()).map_err(|_| StoreError::Invalid {
        field: "items",
        reason: format!(
            "{} items in one call is over the maximum of {}",
            items.len(),
            i32::MAX
        ),
    })?;
    read::execute(
        mutation.tx,
        "count batch items",
        sql::ADD_ITEMS,
        &[&context.batch_id, &added, &mutation.now_ms],
    )
    .await?;
    Ok(())
}

fn check_item_count(batch_id: &str, stored: i32, appended: u32) -> Result<(), StoreError> {
    if i64::from(stored) != i64::from(appended) {
        return Err(StoreError::Invalid {
            field: "items",
            reason: format!(
                "staging batch {batch_id} holds {stored} items but the caller appended {appended}"
            ),
        });
    }
    Ok(())
}

/// The rows of one INSERT, as parallel arrays for `unnest`.
#[derive(Default)]
struct ChunkRows<'a> {
    ids: Vec<i64>,
    seqs: Vec<i32>,
    payloads: Vec<&'a str>,
    statuses: Vec<&'static str>,
    blockers: Vec<i32>,
    finished_at: Vec<Option<i64>>,
    last_errors: Vec<Option<String>>,
    /// Pairs of (job, the job it waits for).
    dependency_jobs: Vec<i64>,
    dependency_targets: Vec<i64>,
}

/// Inserts one chunk: resolves and locks its dependencies, takes ids for
/// its rows, and writes the rows and their dependency edges.
async fn insert_chunk(
    mutation: &mut Mutation<'_>,
    staging: &StagingBatch,
    context: &StagingRow,
    first_seq: u32,
    items: &[NewJob],
) -> Result<(), StoreError> {
    let tx = mutation.tx;

    // Dependencies on items before this chunk are rows already; the ones
    // inside it are resolved from the ids taken below.
    let mut earlier_seqs: Vec<i32> = Vec::new();
    let mut existing_jobs: Vec<i64> = Vec::new();
    for (offset, item) in items.iter().enumerate() {
        let seq = item_total(first_seq, offset)?;
        for dependency in &item.depends_on {
            match *dependency {
                DependencyRef::Item(earlier) if earlier >= seq => {
                    return Err(StoreError::Invalid {
                        field: "dependsOn",
                        reason: format!(
                            "item {seq} may only depend on earlier items, not on item {earlier}"
                        ),
                    });
                }
                DependencyRef::Item(earlier) if earlier < first_seq => {
                    earlier_seqs.push(to_i32(earlier, "dependsOn")?);
                }
                DependencyRef::Item(_) => {}
                DependencyRef::Job(job) => existing_jobs.push(job.0),
            }
        }
    }

    let earlier_ids = earlier_item_ids(tx, &context.batch_id, earlier_seqs).await?;
    existing_jobs.extend(earlier_ids.values().copied());
    let states = dependency_states(tx, existing_jobs).await?;

    let count = i32::try_from(items.len()).unwrap_or(i32::MAX);
    let id_rows = read::query(tx, "reserve job ids", sql::RESERVE_JOB_IDS, &[&count]).await?;
    let mut ids = id_rows
        .iter()
        .map(|row| column::<i64>(row, 0))
        .collect::<Result<Vec<_>, _>>()?;
    // Ascending ids in item order keep claims in submission order.
    ids.sort_unstable();

    let mut rows = ChunkRows::default();
    let mut doomed: Vec<(i64, u32, String)> = Vec::new();
    for (offset, item) in items.iter().enumerate() {
        let seq = item_total(first_seq, offset)?;
        let id = ids.get(offset).copied().ok_or_else(|| {
            StoreError::backend("reserve job ids", ShortReservation(items.len(), ids.len()))
        })?;

        let mut unmet: Vec<i64> = Vec::new();
        let mut doomed_by = None;
        for dependency in &item.depends_on {
            let (target, status) = match *dependency {
                DependencyRef::Item(earlier) if earlier >= first_seq => {
                    let index = (earlier - first_seq) as usize;
                    let target = ids.get(index).copied().unwrap_or_default();
                    let status = rows.statuses.get(index).copied().unwrap_or("queued");
                    (target, status)
                }
                DependencyRef::Item(earlier) => {
                    let target = earlier_ids.get(&earlier).copied().ok_or_else(|| {
                        StoreError::not_found(
                            "batch item",
                            format!("{} #{earlier}", context.batch_id),
                        )
                    })?;
                    (target, dependency_status(&states, target, staging)?)
                }
                DependencyRef::Job(job) => (job.0, dependency_status(&states, job.0, staging)?),
            };
            match status {
                "succeeded" => {}
                "dead" | "cancelled" => {
                    doomed_by = Some(format!("dependency job {target} is {status}"));
                }
                _ if unmet.contains(&target) => {}
                _ => unmet.push(target),
            }
        }

        let status = if doomed_by.is_some() {
            JobStatus::Cancelled
        } else {
            context.initial_status
        };
        rows.ids.push(id);
        rows.seqs.push(to_i32(seq, "items")?);
        rows.payloads.push(item.payload.get());
        rows.statuses.push(status.as_str());
        rows.blockers
            .push(1 + i32::try_from(unmet.len()).unwrap_or(i32::MAX - 1));
        rows.finished_at
            .push(doomed_by.is_some().then_some(mutation.now_ms));
        rows.last_errors.push(doomed_by.clone());
        for target in unmet {
            rows.dependency_jobs.push(id);
            rows.dependency_targets.push(target);
        }
        if let Some(reason) = doomed_by {
            doomed.push((id, seq, reason));
        }
    }

    read::execute(
        tx,
        "insert jobs",
        sql::INSERT_JOBS,
        &[
            &context.batch_id,
            &context.kind,
            &context.priority,
            &context.max_attempts,
            &context.run_at_ms,
            &mutation.now_ms,
            &rows.ids,
            &rows.seqs,
            &rows.payloads,
            &rows.statuses,
            &rows.blockers,
            &rows.finished_at,
            &rows.last_errors,
        ],
    )
    .await?;
    if !rows.dependency_jobs.is_empty() {
        read::execute(
            tx,
            "insert job dependencies",
            sql::INSERT_JOB_DEPENDENCIES,
            &[&rows.dependency_jobs, &rows.dependency_targets],
        )
        .await?;
    }

    for (id, seq, reason) in doomed {
        let touched = Touched {
            batch_id: context.batch_id.clone(),
            seq,
            kind: context.kind.clone(),
            owner: staging.owner.clone(),
        };
        mutation.cancelled_on_insert(JobId(id), touched, reason)?;
    }
    Ok(())
}

/// The sequence returned fewer ids than requested.
#[derive(Debug, thiserror::Error)]
#[error("the job id sequence returned {1} ids but {0} were requested")]
struct ShortReservation(usize, usize);

/// Job ids of items inserted by earlier chunks or calls, by position.
async fn earlier_item_ids(
    tx: &Tx<'_>,
    batch_id: &str,
    mut seqs: Vec<i32>,
) -> Result<HashMap<u32, i64>, StoreError> {
    if seqs.is_empty() {
        return Ok(HashMap::new());
    }
    seqs.sort_unstable();
    seqs.dedup();
    let rows = read::query(
        tx,
        "resolve item dependency",
        sql::JOB_IDS_BY_SEQ,
        &[&batch_id, &seqs],
    )
    .await?;
    let mut ids = HashMap::with_capacity(rows.len());
    for row in &rows {
        let seq: i32 = column(row, 0)?;
        ids.insert(read::to_u32(seq, "job position")?, column(row, 1)?);
    }
    Ok(ids)
}

/// Status and owner of existing dependency jobs, share-locked until
/// commit.
async fn dependency_states(
    tx: &Tx<'_>,
    mut job_ids: Vec<i64>,
) -> Result<HashMap<i64, (String, String)>, StoreError> {
    if job_ids.is_empty() {
        return Ok(HashMap::new());
    }
    job_ids.sort_unstable();
    job_ids.dedup();
    let rows = read::query(
        tx,
        "check job dependency",
        sql::DEPENDENCY_JOBS,
        &[&job_ids],
    )
    .await?;
    let mut states = HashMap::with_capacity(rows.len());
    for row in &rows {
        states.insert(column(row, 0)?, (column(row, 1)?, column(row, 2)?));
    }
    Ok(states)
}

/// Returns the status of a dependency job, which must exist and belong to
/// the batch's owner.
fn dependency_status<'s>(
    states: &'s HashMap<i64, (String, String)>,
    job_id: i64,
    staging: &StagingBatch,
) -> Result<&'s str, StoreError> {
    match states.get(&job_id) {
        Some((status, owner)) if owner == staging.owner.as_str() => Ok(status),
        _ => Err(StoreError::DependencyNotFound {
            id: job_id.to_string(),
        }),
    }
}

/// Accepts a staging batch and releases its items: from this commit on it
/// is visible and its runnable items are claimable. Each item's staging
/// blocker is replaced by one blocker per unmet batch dependency.
async fn accept_in(mutation: &mut Mutation<'_>, staging: &StagingBatch) -> Result<(), StoreError> {
    let tx = mutation.tx;
    let batch_id = staging.id.to_string();
    let row = read::query_opt(tx, "read staging batch", sql::STAGING_BATCH, &[&batch_id])
        .await?
        .ok_or_else(|| StoreError::not_found("staging batch", &batch_id))?;
    let item_count: i32 = column(&row, 0)?;
    let kind: String = column(&row, 4)?;
    if item_count == 0 {
        return Err(no_items());
    }
    check_item_count(&batch_id, item_count, staging.items_appended)?;

    let dependency_rows = read::query(
        tx,
        "read batch dependencies",
        sql::BATCH_DEPENDENCY_STATES,
        &[&batch_id],
    )
    .await?;
    let mut waiting_on = 0i32;
    let mut doomed_by = None;
    for row in &dependency_rows {
        let dependency: String = column(row, 0)?;
        let status: String = column(row, 1)?;
        match status.as_str() {
            "completed" => {}
            "failed" | "cancelled" => {
                if doomed_by.is_none() {
                    doomed_by = Some(format!("dependency batch {dependency} is {status}"));
                }
            }
            _ => waiting_on += 1,
        }
    }

    read::execute(
        tx,
        "accept batch",
        sql::ACCEPT_BATCH,
        &[&batch_id, &waiting_on, &mutation.now_ms],
    )
    .await?;
    if let Some(reason) = doomed_by {
        mutation.cancel_waiting_in_batch(&batch_id, &reason).await?;
    }

    let released = read::query_opt(
        tx,
        "release batch items",
        sql::RELEASE_ITEMS,
        &[&batch_id, &waiting_on],
    )
    .await?;
    let runnable: i64 = match released {
        Some(row) => column(&row, 0)?,
        None => 0,
    };
    if runnable > 0 {
        mutation.mark_runnable(&kind);
    }
    mutation.touch_batch(&batch_id);
    Ok(())
}

//! The worker's hot path: [`JobStore`] on SQLite.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{
    AppliedOutcome, AttemptOutcome, AttemptRecord, BatchFinished, BatchId, BeginOutcome, ChangeSet,
    ClaimRequest, ClaimedJob, CreatedBatch, DependencyRef, FailureKind, JobId, JobStatus, JobStore,
    KindControl, LeaseRef, NewBatch, NewJob, OutcomeKind, OutcomeResult, ProgressUpdate,
    PromoteReport, ReapReport, Scope, StagingBatch, StoreError, UserId,
};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::value::RawValue;

use crate::mutate::{Mutation, Touched, encode_attempt, millis_to_time, parse_batch_id};
use crate::{SqliteStore, db_error, from_millis, read, sql, to_millis};

/// Most expired leases or due jobs handled by one transaction.
const SWEEP_LIMIT: u32 = 1_000;

/// Outcome of the first step of a creation, inside the writer.
enum Begun {
    Started,
    Existing(Box<domain::Batch>),
}

fn begin_in(conn: &Connection, batch: &NewBatch, now_ms: i64) -> Result<Begun, StoreError> {
    if let Some(key) = &batch.idempotency_key {
        let existing: Option<(String, bool, Option<String>)> = conn
            .prepare_cached(sql::FIND_BY_IDEMPOTENCY_KEY)
            .and_then(|mut stmt| {
                stmt.query_row(params![batch.owner.as_str(), key], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()
            })
            .map_err(db_error("look up idempotency key"))?;

        if let Some((id, accepted, digest)) = existing {
            if !accepted {
                return Err(StoreError::IdempotencyInProgress { key: key.clone() });
            }
            let same_request = digest.is_none()
                || batch.request_digest.is_none()
                || digest == batch.request_digest;
            if !same_request {
                return Err(StoreError::IdempotencyMismatch { key: key.clone() });
            }
            let scope = Scope::Owner(batch.owner.clone());
            return read::batch(conn, &scope, parse_batch_id(&id)?)
                .map(|batch| Begun::Existing(Box::new(batch)));
        }
    }

    for dependency in &batch.depends_on {
        let owner: Option<(String, bool)> = conn
            .prepare_cached("SELECT owner, accepted FROM batches WHERE id = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([dependency.to_string()], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
            })
            .map_err(db_error("check batch dependency"))?;
        let visible = matches!(&owner, Some((owner, true)) if owner == batch.owner.as_str());
        if !visible {
            return Err(StoreError::DependencyNotFound {
                id: dependency.to_string(),
            });
        }
    }

    let config = batch.config.to_string();
    let metadata = batch.metadata.to_string();
    conn.prepare_cached(sql::INSERT_BATCH)
        .and_then(|mut stmt| {
            stmt.execute(params![
                batch.id.to_string(),
                batch.owner.as_str(),
                batch.kind,
                batch.priority,
                batch.max_attempts,
                batch.run_at.map(to_millis),
                config,
                metadata,
                batch.correlation_id,
                batch.idempotency_key,
                batch.request_digest,
                now_ms,
                batch.traceparent,
            ])
        })
        .map_err(db_error("insert batch"))?;

    for dependency in &batch.depends_on {
        conn.prepare_cached(sql::INSERT_BATCH_DEPENDENCY)
            .and_then(|mut stmt| stmt.execute([batch.id.to_string(), dependency.to_string()]))
            .map_err(db_error("insert batch dependency"))?;
    }
    Ok(Begun::Started)
}

/// Inserts items of a batch that is not yet accepted. Each item gets one
/// blocker for the staging hold plus one per unmet dependency.
fn insert_items_in(
    mutation: &mut Mutation<'_>,
    staging: &StagingBatch,
    items: &[NewJob],
) -> Result<(), StoreError> {
    let conn = mutation.conn;
    let batch_id = staging.id.to_string();
    let (item_count, priority, max_attempts, run_at, kind): (i64, i32, u32, Option<i64>, String) =
        conn.prepare_cached(sql::STAGING_BATCH)
            .and_then(|mut stmt| {
                stmt.query_row([&batch_id], |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                })
                .optional()
            })
            .map_err(db_error("read staging batch"))?
            .ok_or_else(|| StoreError::not_found("staging batch", &batch_id))?;

    if item_count != i64::from(staging.items_appended) {
        return Err(StoreError::Invalid {
            field: "items",
            reason: format!(
                "staging batch {batch_id} holds {item_count} items but the caller appended {}",
                staging.items_appended
            ),
        });
    }

    let run_at_ms = run_at.unwrap_or(mutation.now_ms).max(mutation.now_ms);
    let initial_status = if run_at_ms > mutation.now_ms {
        JobStatus::Scheduled
    } else {
        JobStatus::Queued
    };

    let mut insert = conn
        .prepare_cached(sql::INSERT_JOB)
        .map_err(db_error("insert job"))?;
    for (offset, item) in items.iter().enumerate() {
        let seq = staging.items_appended + offset as u32;
        let plan = plan_dependencies(conn, &staging.owner, &batch_id, seq, &item.depends_on)?;
        let status = if plan.doomed_by.is_some() {
            JobStatus::Cancelled
        } else {
            initial_status
        };

        insert
            .execute(params![
                batch_id,
                seq,
                kind,
                item.payload.get(),
                status.as_str(),
                priority,
                max_attempts,
                1 + plan.unmet.len() as i64,
                run_at_ms,
                mutation.now_ms,
            ])
            .map_err(db_error("insert job"))?;
        let job_id = conn.last_insert_rowid();

        if let Some(reason) = plan.doomed_by {
            conn.prepare_cached("UPDATE jobs SET finished_at = ?2, last_error = ?3 WHERE id = ?1")
                .and_then(|mut stmt| stmt.execute(params![job_id, mutation.now_ms, reason]))
                .map_err(db_error("cancel job with a dead dependency"))?;
            mutation.job_changed(
                JobId(job_id),
                Touched {
                    batch_id: batch_id.clone(),
                    seq,
                    kind: kind.clone(),
                },
                JobStatus::Cancelled,
                0,
                Some(reason),
                None,
            )?;
        }
        for dependency in plan.unmet {
            conn.prepare_cached(sql::INSERT_JOB_DEPENDENCY)
                .and_then(|mut stmt| stmt.execute([job_id, dependency]))
                .map_err(db_error("insert job dependency"))?;
        }
    }

    conn.prepare_cached(sql::ADD_ITEM_COUNT)
        .and_then(|mut stmt| stmt.execute(params![batch_id, items.len() as i64]))
        .map_err(db_error("count batch items"))?;
    Ok(())
}

struct DependencyPlan {
    /// Jobs that have not succeeded yet.
    unmet: Vec<i64>,
    /// Set when a dependency is already dead or cancelled.
    doomed_by: Option<String>,
}

fn plan_dependencies(
    conn: &Connection,
    owner: &UserId,
    batch_id: &str,
    seq: u32,
    dependencies: &[DependencyRef],
) -> Result<DependencyPlan, StoreError> {
    let mut plan = DependencyPlan {
        unmet: Vec::new(),
        doomed_by: None,
    };
    for dependency in dependencies {
        let job_id = match *dependency {
            DependencyRef::Item(item) if item < seq => conn
                .prepare_cached(sql::JOB_ID_BY_SEQ)
                .and_then(|mut stmt| stmt.query_row(params![batch_id, item], |row| row.get(0)))
                .map_err(db_error("resolve item dependency"))?,
            DependencyRef::Item(item) => {
                return Err(StoreError::Invalid {
                    field: "dependsOn",
                    reason: format!(
                        "item {seq} may only depend on earlier items, not on item {item}"
                    ),
                });
            }
            DependencyRef::Job(job) => job.0,
        };

        let found: Option<(String, String)> = conn
            .prepare_cached(sql::JOB_FOR_DEPENDENCY)
            .and_then(|mut stmt| {
                stmt.query_row([job_id], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(db_error("check job dependency"))?;
        let status = match found {
            Some((status, dependency_owner)) if dependency_owner == owner.as_str() => status,
            _ => {
                return Err(StoreError::DependencyNotFound {
                    id: job_id.to_string(),
                });
            }
        };
        match status.as_str() {
            "succeeded" => {}
            "dead" | "cancelled" => {
                plan.doomed_by = Some(format!("dependency job {job_id} is {status}"));
            }
            _ => plan.unmet.push(job_id),
        }
    }
    Ok(plan)
}

/// Accepts a staging batch: from this commit on it is visible. Returns the
/// number of unmet batch dependencies, which become a blocker on each item.
fn accept_in(mutation: &mut Mutation<'_>, staging: &StagingBatch) -> Result<u32, StoreError> {
    let conn = mutation.conn;
    let batch_id = staging.id.to_string();
    let item_count: i64 = conn
        .prepare_cached(sql::STAGING_BATCH)
        .and_then(|mut stmt| stmt.query_row([&batch_id], |row| row.get(0)).optional())
        .map_err(db_error("read staging batch"))?
        .ok_or_else(|| StoreError::not_found("staging batch", &batch_id))?;

    if item_count == 0 {
        return Err(StoreError::Invalid {
            field: "items",
            reason: "a batch needs at least one item".into(),
        });
    }
    if item_count != i64::from(staging.items_appended) {
        return Err(StoreError::Invalid {
            field: "items",
            reason: format!(
                "staging batch {batch_id} holds {item_count} items but the caller appended {}",
                staging.items_appended
            ),
        });
    }

    let dependency_states: Vec<(String, String)> = {
        let mut stmt = conn
            .prepare_cached(sql::BATCH_DEPENDENCY_STATES)
            .map_err(db_error("read batch dependencies"))?;
        let rows = stmt
            .query_map([&batch_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(db_error("read batch dependencies"))?;
        rows.collect::<Result<_, _>>()
            .map_err(db_error("read batch dependencies"))?
    };
    let waiting_on = dependency_states
        .iter()
        .filter(|(_, status)| !matches!(status.as_str(), "completed" | "failed" | "cancelled"))
        .count() as u32;
    let doomed_by = dependency_states
        .iter()
        .find(|(_, status)| matches!(status.as_str(), "failed" | "cancelled"))
        .map(|(id, status)| format!("dependency batch {id} is {status}"));

    conn.prepare_cached(sql::ACCEPT_BATCH)
        .and_then(|mut stmt| stmt.execute(params![batch_id, waiting_on, mutation.now_ms]))
        .map_err(db_error("accept batch"))?;

    if let Some(reason) = doomed_by {
        mutation.cancel_waiting_in_batch(&batch_id, &reason)?;
    }
    mutation.touch_batch(&batch_id);
    Ok(waiting_on)
}

/// Lifts the staging blocker from the next range of a batch's items.
/// Returns true once every item is released.
fn release_chunk_in(
    mutation: &mut Mutation<'_>,
    batch_id: &str,
    chunk: usize,
) -> Result<bool, StoreError> {
    let conn = mutation.conn;
    let state: Option<(i64, i64, i64, String)> = conn
        .prepare_cached(sql::RELEASE_STATE)
        .and_then(|mut stmt| {
            stmt.query_row([batch_id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()
        })
        .map_err(db_error("read release state"))?;
    let Some((released, item_count, waiting_on, kind)) = state else {
        return Ok(true);
    };
    if released >= item_count {
        return Ok(true);
    }

    let to = (released + chunk as i64).min(item_count);
    conn.prepare_cached(sql::RELEASE_ITEMS)
        .and_then(|mut stmt| stmt.execute(params![batch_id, released, to, waiting_on]))
        .map_err(db_error("release batch items"))?;
    conn.prepare_cached(sql::SET_RELEASED_COUNT)
        .and_then(|mut stmt| stmt.execute(params![batch_id, to]))
        .map_err(db_error("release batch items"))?;
    if waiting_on == 0 {
        mutation.mark_runnable(&kind);
    }
    Ok(to >= item_count)
}

impl SqliteStore {
    /// Releases every item of an accepted batch, one bounded transaction at
    /// a time.
    pub(crate) async fn release_items(
        &self,
        batch_id: String,
        now: DateTime<Utc>,
    ) -> Result<ChangeSet, StoreError> {
        let chunk = self.config().release_chunk_rows.max(1);
        let mut changes = ChangeSet::default();
        loop {
            let id = batch_id.clone();
            let (done, step) = self
                .writer()
                .write("release batch items", true, move |conn| {
                    let mut mutation = Mutation::new(conn, now);
                    let done = release_chunk_in(&mut mutation, &id, chunk)?;
                    Ok((done, mutation.finish()?))
                })
                .await?;
            changes.merge(step);
            if done {
                return Ok(changes);
            }
        }
    }

    /// Deletes a batch and its jobs, one bounded transaction at a time.
    pub(crate) async fn delete_batch_in_chunks(&self, batch_id: String) -> Result<u64, StoreError> {
        let chunk = self.config().release_chunk_rows.max(1) as i64;
        let mut deleted = 0u64;
        loop {
            let id = batch_id.clone();
            let (rows, done) = self
                .writer()
                .write("delete batch", true, move |conn| {
                    let rows = conn
                        .prepare_cached(sql::DELETE_JOB_CHUNK)
                        .and_then(|mut stmt| stmt.execute(params![id, chunk]))
                        .map_err(db_error("delete batch jobs"))?;
                    if (rows as i64) < chunk {
                        conn.prepare_cached(sql::DELETE_BATCH)
                            .and_then(|mut stmt| stmt.execute([&id]))
                            .map_err(db_error("delete batch"))?;
                        return Ok((rows as u64, true));
                    }
                    Ok((rows as u64, false))
                })
                .await?;
            deleted += rows;
            if done {
                return Ok(deleted);
            }
        }
    }

    async fn begin(&self, batch: NewBatch, now: DateTime<Utc>) -> Result<BeginOutcome, StoreError> {
        batch.validate()?;
        let staging = StagingBatch {
            id: batch.id,
            owner: batch.owner.clone(),
            kind: batch.kind.clone(),
            items_appended: 0,
        };
        let begun = self
            .writer()
            .write("begin batch", false, move |conn| {
                begin_in(conn, &batch, to_millis(now))
            })
            .await?;
        Ok(match begun {
            Begun::Started => BeginOutcome::Started(staging),
            Begun::Existing(batch) => BeginOutcome::Existing(*batch),
        })
    }

    async fn append(
        &self,
        staging: &StagingBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<ChangeSet, StoreError> {
        let staging = staging.clone();
        self.writer()
            .write("append batch items", true, move |conn| {
                let mut mutation = Mutation::new(conn, now);
                insert_items_in(&mut mutation, &staging, &items)?;
                mutation.finish()
            })
            .await
    }

    async fn accept(
        &self,
        staging: StagingBatch,
        now: DateTime<Utc>,
    ) -> Result<ChangeSet, StoreError> {
        let batch_id = staging.id.to_string();
        let mut changes = self
            .writer()
            .write("accept batch", false, move |conn| {
                let mut mutation = Mutation::new(conn, now);
                accept_in(&mut mutation, &staging)?;
                mutation.finish()
            })
            .await?;
        let released = self.release_items(batch_id, now).await?;
        changes.merge(released);
        Ok(changes)
    }

    async fn load_batch(&self, owner: UserId, id: BatchId) -> Result<domain::Batch, StoreError> {
        self.read("read batch", move |conn| {
            read::batch(conn, &Scope::Owner(owner), id)
        })
        .await
    }

    /// Creates a batch small enough for one transaction: insert, accept and
    /// release together, so it is never seen half-made.
    async fn create_small(
        &self,
        batch: NewBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError> {
        batch.validate()?;
        let chunk = self.config().release_chunk_rows.max(1);
        self.writer()
            .write("create batch", true, move |conn| {
                let now_ms = to_millis(now);
                let staging = StagingBatch {
                    id: batch.id,
                    owner: batch.owner.clone(),
                    kind: batch.kind.clone(),
                    items_appended: 0,
                };
                if let Begun::Existing(existing) = begin_in(conn, &batch, now_ms)? {
                    return Ok(CreatedBatch {
                        batch: *existing,
                        created: false,
                        changes: ChangeSet::default(),
                    });
                }

                let mut mutation = Mutation::new(conn, now);
                insert_items_in(&mut mutation, &staging, &items)?;
                let staging = StagingBatch {
                    items_appended: items.len() as u32,
                    ..staging
                };
                accept_in(&mut mutation, &staging)?;
                let id = staging.id.to_string();
                while !release_chunk_in(&mut mutation, &id, chunk)? {}
                let changes = mutation.finish()?;
                let created = read::batch(conn, &Scope::Owner(staging.owner.clone()), staging.id)?;
                Ok(CreatedBatch {
                    batch: created,
                    created: true,
                    changes,
                })
            })
            .await
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn create_batch(
        &self,
        batch: NewBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError> {
        if items.is_empty() {
            return Err(StoreError::Invalid {
                field: "items",
                reason: "a batch needs at least one item".into(),
            });
        }
        let chunk = self.config().insert_chunk_rows.max(1);
        if items.len() <= chunk {
            return self.create_small(batch, items, now).await;
        }

        let mut staging = match self.begin_batch(batch, now).await? {
            BeginOutcome::Started(staging) => staging,
            BeginOutcome::Existing(batch) => {
                return Ok(CreatedBatch {
                    batch,
                    created: false,
                    changes: ChangeSet::default(),
                });
            }
        };

        let mut items = items.into_iter();
        loop {
            let part: Vec<NewJob> = items.by_ref().take(chunk).collect();
            if part.is_empty() {
                break;
            }
            if let Err(error) = self.append_items(&mut staging, part, now).await {
                self.abort_quietly(staging).await;
                return Err(error);
            }
        }
        self.commit_batch(staging, now).await
    }

    async fn begin_batch(
        &self,
        batch: NewBatch,
        now: DateTime<Utc>,
    ) -> Result<BeginOutcome, StoreError> {
        self.begin(batch, now).await
    }

    async fn append_items(
        &self,
        staging: &mut StagingBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let count = items.len() as u32;
        self.append(staging, items, now).await?;
        staging.items_appended += count;
        Ok(())
    }

    async fn commit_batch(
        &self,
        staging: StagingBatch,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError> {
        let owner = staging.owner.clone();
        let id = staging.id;
        let changes = self.accept(staging, now).await?;
        let batch = self.load_batch(owner, id).await?;
        Ok(CreatedBatch {
            batch,
            created: true,
            changes,
        })
    }

    async fn abort_batch(&self, staging: StagingBatch) -> Result<(), StoreError> {
        let id = staging.id.to_string();
        let check_id = id.clone();
        // Only a batch that is still staging may be aborted; an accepted one
        // belongs to its owner now.
        let staging_exists = self
            .read("read staging batch", move |conn| {
                conn.prepare_cached("SELECT 1 FROM batches WHERE id = ?1 AND accepted = 0")
                    .and_then(|mut stmt| stmt.query_row([check_id], |_| Ok(())).optional())
                    .map_err(db_error("read staging batch"))
            })
            .await?;
        if staging_exists.is_none() {
            return Err(StoreError::not_found("staging batch", id));
        }
        self.delete_batch_in_chunks(id).await.map(|_| ())
    }

    async fn claim(
        &self,
        request: ClaimRequest,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        if request.limit == 0 {
            return Ok(Vec::new());
        }
        self.writer()
            .write("claim jobs", false, move |conn| {
                claim_in(conn, &request, now)
            })
            .await
    }

    async fn heartbeat(
        &self,
        leases: &[LeaseRef],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<JobId>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let leases = leases.to_vec();
        self.writer()
            .write("extend leases", false, move |conn| {
                let mut stmt = conn
                    .prepare_cached(sql::HEARTBEAT)
                    .map_err(db_error("extend leases"))?;
                let until = to_millis(lease_until);
                let mut lost = Vec::new();
                for lease in &leases {
                    let updated = stmt
                        .execute(params![
                            lease.job_id.0,
                            lease.owner.as_str(),
                            lease.attempt,
                            until
                        ])
                        .map_err(db_error("extend leases"))?;
                    if updated == 0 {
                        lost.push(lease.job_id);
                    }
                }
                Ok(lost)
            })
            .await
    }

    async fn record_outcomes(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<OutcomeResult>, ChangeSet), StoreError> {
        if outcomes.is_empty() {
            return Ok((Vec::new(), ChangeSet::default()));
        }
        self.writer()
            .write("record outcomes", false, move |conn| {
                let mut mutation = Mutation::new(conn, now);
                let mut results = Vec::with_capacity(outcomes.len());
                for outcome in outcomes {
                    results.push(record_one(&mut mutation, outcome)?);
                }
                Ok((results, mutation.finish()?))
            })
            .await
    }

    async fn record_progress(&self, updates: Vec<ProgressUpdate>) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.writer()
            .write("record progress", false, move |conn| {
                let mut stmt = conn
                    .prepare_cached(sql::PROGRESS)
                    .map_err(db_error("record progress"))?;
                for update in &updates {
                    let lease = &update.lease;
                    stmt.execute(params![
                        lease.job_id.0,
                        lease.owner.as_str(),
                        lease.attempt,
                        update.progress.min(100)
                    ])
                    .map_err(db_error("record progress"))?;
                }
                Ok(())
            })
            .await
    }

    async fn promote_due(&self, now: DateTime<Utc>) -> Result<PromoteReport, StoreError> {
        self.writer()
            .write("promote due jobs", false, move |conn| {
                let now_ms = to_millis(now);
                let kinds: Vec<String> = {
                    let mut stmt = conn
                        .prepare_cached(sql::PROMOTE_DUE)
                        .map_err(db_error("promote due jobs"))?;
                    let rows = stmt
                        .query_map(params![now_ms, SWEEP_LIMIT], |row| row.get(0))
                        .map_err(db_error("promote due jobs"))?;
                    rows.collect::<Result<_, _>>()
                        .map_err(db_error("promote due jobs"))?
                };
                let next_due: Option<i64> = conn
                    .prepare_cached(sql::NEXT_DUE)
                    .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
                    .map_err(db_error("find next due job"))?;

                let mut runnable_kinds: Vec<String> = Vec::new();
                for kind in &kinds {
                    if !runnable_kinds.contains(kind) {
                        runnable_kinds.push(kind.clone());
                    }
                }
                Ok(PromoteReport {
                    promoted: kinds.len() as u64,
                    runnable_kinds,
                    next_due: millis_to_time(next_due),
                })
            })
            .await
    }

    async fn reap_expired_leases(&self, now: DateTime<Utc>) -> Result<ReapReport, StoreError> {
        self.writer()
            .write("reap expired leases", false, move |conn| reap_in(conn, now))
            .await
    }

    async fn pending_finishes(&self, limit: u32) -> Result<Vec<BatchFinished>, StoreError> {
        self.read("read batch outbox", move |conn| {
            let mut stmt = conn
                .prepare_cached(sql::PENDING_FINISHES)
                .map_err(db_error("read batch outbox"))?;
            let rows: Vec<(i64, String)> = stmt
                .query_map([limit], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(db_error("read batch outbox"))?
                .collect::<Result<_, _>>()
                .map_err(db_error("read batch outbox"))?;
            rows.into_iter()
                .map(|(id, event)| {
                    let finished: BatchFinished =
                        serde_json::from_str(&event).map_err(|_| StoreError::Corrupt {
                            what: "outbox event",
                            value: event.clone(),
                        })?;
                    Ok(BatchFinished {
                        outbox_id: id,
                        ..finished
                    })
                })
                .collect()
        })
        .await
    }

    async fn ack_finishes(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        let ids = outbox_ids.to_vec();
        self.writer()
            .write("acknowledge batch outbox", false, move |conn| {
                let mut stmt = conn
                    .prepare_cached(sql::ACK_FINISH)
                    .map_err(db_error("acknowledge batch outbox"))?;
                for id in ids {
                    stmt.execute([id])
                        .map_err(db_error("acknowledge batch outbox"))?;
                }
                Ok(())
            })
            .await
    }

    async fn kind_controls(&self) -> Result<Vec<KindControl>, StoreError> {
        self.read("read kind controls", |conn| {
            let mut stmt = conn
                .prepare_cached(sql::KIND_CONTROLS)
                .map_err(db_error("read kind controls"))?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(KindControl {
                        kind: row.get(0)?,
                        paused: row.get(1)?,
                        updated_at: from_millis(row.get(2)?),
                    })
                })
                .map_err(db_error("read kind controls"))?;
            rows.collect::<Result<_, _>>()
                .map_err(db_error("read kind controls"))
        })
        .await
    }
}

impl SqliteStore {
    async fn abort_quietly(&self, staging: StagingBatch) {
        let id = staging.id;
        if let Err(error) = self.abort_batch(staging).await {
            // The start-up recovery deletes it if this fails.
            tracing::warn!(batch_id = %id, %error, "aborting a half-inserted batch failed");
        }
    }
}

struct ClaimedRow {
    id: i64,
    batch_id: String,
    seq: u32,
    payload: String,
    attempts: u32,
    max_attempts: u32,
    priority: i32,
    created_at: i64,
}

fn claim_in(
    conn: &Connection,
    request: &ClaimRequest,
    now: DateTime<Utc>,
) -> Result<Vec<ClaimedJob>, StoreError> {
    let now_ms = to_millis(now);
    let lease_until = to_millis(request.lease_until);
    let mut rows: Vec<ClaimedRow> = {
        let mut stmt = conn
            .prepare_cached(sql::CLAIM)
            .map_err(db_error("claim jobs"))?;
        let rows = stmt
            .query_map(
                params![
                    request.owner.as_str(),
                    lease_until,
                    now_ms,
                    request.kind,
                    request.limit
                ],
                |row| {
                    Ok(ClaimedRow {
                        id: row.get(0)?,
                        batch_id: row.get(1)?,
                        seq: row.get(2)?,
                        payload: row.get(3)?,
                        attempts: row.get(4)?,
                        max_attempts: row.get(5)?,
                        priority: row.get(6)?,
                        created_at: row.get(7)?,
                    })
                },
            )
            .map_err(db_error("claim jobs"))?;
        rows.collect::<Result<_, _>>()
            .map_err(db_error("claim jobs"))?
    };
    // RETURNING gives rows in no promised order.
    rows.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));

    type BatchInfo = (UserId, Option<String>, Option<String>);
    let mut batch_info: HashMap<String, BatchInfo> = HashMap::new();
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        if !batch_info.contains_key(&row.batch_id) {
            type ClaimInfo = (String, Option<String>, Option<i64>, Option<String>);
            let (owner, correlation_id, started_at, traceparent): ClaimInfo = conn
                .prepare_cached(sql::BATCH_CLAIM_INFO)
                .and_then(|mut stmt| {
                    stmt.query_row([&row.batch_id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                })
                .map_err(db_error("read claimed batch"))?;
            if started_at.is_none() {
                conn.prepare_cached(sql::MARK_BATCH_STARTED)
                    .and_then(|mut stmt| stmt.execute(params![row.batch_id, now_ms]))
                    .map_err(db_error("mark batch started"))?;
            }
            batch_info.insert(
                row.batch_id.clone(),
                (UserId(owner), correlation_id, traceparent),
            );
        }
        let (owner, correlation_id, traceparent) = batch_info[&row.batch_id].clone();
        let payload = RawValue::from_string(row.payload).map_err(|error| StoreError::Corrupt {
            what: "job payload",
            value: error.to_string(),
        })?;

        claimed.push(ClaimedJob {
            id: JobId(row.id),
            batch_id: parse_batch_id(&row.batch_id)?,
            seq: row.seq,
            kind: request.kind.clone(),
            payload,
            owner,
            correlation_id,
            traceparent,
            attempt: row.attempts,
            max_attempts: row.max_attempts,
            priority: row.priority,
            lease: LeaseRef {
                job_id: JobId(row.id),
                owner: request.owner.clone(),
                attempt: row.attempts,
            },
            lease_expires_at: request.lease_until,
            created_at: from_millis(row.created_at),
        });
    }
    Ok(claimed)
}

fn touched_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Touched> {
    Ok(Touched {
        batch_id: row.get(0)?,
        seq: row.get(1)?,
        kind: row.get(2)?,
    })
}

/// Runs one fenced UPDATE ... RETURNING for an outcome; `None` means the
/// lease was not held.
fn fenced(
    conn: &Connection,
    query: &str,
    lease: &LeaseRef,
    extra: &[&dyn rusqlite::ToSql],
) -> Result<Option<Touched>, StoreError> {
    let owner = lease.owner.as_str();
    let mut values: Vec<&dyn rusqlite::ToSql> = vec![&lease.job_id.0, &owner, &lease.attempt];
    values.extend_from_slice(extra);
    conn.prepare_cached(query)
        .and_then(|mut stmt| stmt.query_row(values.as_slice(), touched_row).optional())
        .map_err(db_error("record outcome"))
}

fn cancel_requested(conn: &Connection, batch_id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached(sql::CANCEL_REQUESTED)
        .and_then(|mut stmt| stmt.query_row([batch_id], |row| row.get(0)))
        .map_err(db_error("read batch cancellation"))
}

/// Cancels a job that just went back to waiting because its batch was
/// cancelled while it ran. Returns true if it did.
fn cancel_if_requested(
    mutation: &mut Mutation<'_>,
    job_id: JobId,
    touched: &Touched,
    attempt: u32,
) -> Result<bool, StoreError> {
    if !cancel_requested(mutation.conn, &touched.batch_id)? {
        return Ok(false);
    }
    let reason = "batch was cancelled";
    let cancelled = mutation
        .conn
        .prepare_cached(sql::CANCEL_WAITING_JOB)
        .and_then(|mut stmt| {
            stmt.query_row(params![job_id.0, mutation.now_ms, reason], |_| Ok(()))
                .optional()
        })
        .map_err(db_error("cancel job of a cancelled batch"))?;
    if cancelled.is_some() {
        let touched = Touched {
            batch_id: touched.batch_id.clone(),
            seq: touched.seq,
            kind: touched.kind.clone(),
        };
        mutation.job_changed(
            job_id,
            touched,
            JobStatus::Cancelled,
            attempt,
            Some(reason.into()),
            None,
        )?;
    }
    Ok(cancelled.is_some())
}

fn record_one(
    mutation: &mut Mutation<'_>,
    outcome: AttemptOutcome,
) -> Result<OutcomeResult, StoreError> {
    let conn = mutation.conn;
    let now_ms = mutation.now_ms;
    let lease = &outcome.lease;
    let job_id = lease.job_id;
    let attempt = lease.attempt;
    let record = |failure: FailureKind, error: &str| AttemptRecord {
        attempt,
        kind: failure,
        error: error.to_owned(),
        started_at: outcome.started_at,
        duration_ms: outcome.duration_ms,
    };

    let status = match &outcome.kind {
        OutcomeKind::Succeeded { result } => {
            let result = result.as_ref().map(|raw| raw.get());
            let Some(touched) = fenced(conn, sql::SUCCEED, lease, &[&now_ms, &result])? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            mutation.job_changed(job_id, touched, JobStatus::Succeeded, attempt, None, None)?;
            JobStatus::Succeeded
        }
        OutcomeKind::Retry {
            error,
            failure,
            run_at,
            counts_attempt,
        } => {
            let encoded = encode_attempt(&record(*failure, error))?;
            let uncounted = i64::from(!*counts_attempt);
            let run_at_ms = to_millis(*run_at);
            let Some(touched) = fenced(
                conn,
                sql::RETRY,
                lease,
                &[&run_at_ms, error, &encoded, &uncounted],
            )?
            else {
                return Ok(OutcomeResult::LeaseLost);
            };
            if cancel_if_requested(mutation, job_id, &touched, attempt)? {
                JobStatus::Cancelled
            } else {
                mutation.job_requeued(
                    job_id,
                    touched,
                    JobStatus::Retrying,
                    attempt,
                    Some(error.clone()),
                    Some(*run_at),
                )?;
                JobStatus::Retrying
            }
        }
        OutcomeKind::Dead { error, failure } => {
            let encoded = encode_attempt(&record(*failure, error))?;
            let Some(touched) = fenced(conn, sql::DIE, lease, &[&now_ms, error, &encoded])? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            mutation.job_changed(
                job_id,
                touched,
                JobStatus::Dead,
                attempt,
                Some(error.clone()),
                None,
            )?;
            JobStatus::Dead
        }
        OutcomeKind::Cancelled { reason } => {
            let Some(touched) = fenced(conn, sql::CANCEL_RUNNING, lease, &[&now_ms, reason])?
            else {
                return Ok(OutcomeResult::LeaseLost);
            };
            mutation.job_changed(
                job_id,
                touched,
                JobStatus::Cancelled,
                attempt,
                Some(reason.clone()),
                None,
            )?;
            JobStatus::Cancelled
        }
        OutcomeKind::Deferred { run_at } => {
            let run_at_ms = to_millis(*run_at);
            let Some(touched) = fenced(conn, sql::DEFER, lease, &[&run_at_ms])? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            let attempts_before = attempt.saturating_sub(1);
            if cancel_if_requested(mutation, job_id, &touched, attempts_before)? {
                JobStatus::Cancelled
            } else {
                mutation.job_requeued(
                    job_id,
                    touched,
                    JobStatus::Scheduled,
                    attempts_before,
                    None,
                    Some(*run_at),
                )?;
                JobStatus::Scheduled
            }
        }
        OutcomeKind::Released => {
            let Some(touched) = fenced(conn, sql::RELEASE, lease, &[])? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            let attempts_before = attempt.saturating_sub(1);
            if cancel_if_requested(mutation, job_id, &touched, attempts_before)? {
                JobStatus::Cancelled
            } else {
                mutation.job_requeued(
                    job_id,
                    touched,
                    JobStatus::Queued,
                    attempts_before,
                    None,
                    None,
                )?;
                JobStatus::Queued
            }
        }
    };
    Ok(OutcomeResult::Applied(AppliedOutcome { job_id, status }))
}

struct ExpiredRow {
    id: i64,
    batch_id: String,
    attempts: u32,
    max_attempts: u32,
    lease_owner: Option<String>,
    attempted_at: Option<i64>,
}

fn reap_in(conn: &Connection, now: DateTime<Utc>) -> Result<ReapReport, StoreError> {
    let mut mutation = Mutation::new(conn, now);
    let now_ms = mutation.now_ms;
    let expired: Vec<ExpiredRow> = {
        let mut stmt = conn
            .prepare_cached(sql::EXPIRED_LEASES)
            .map_err(db_error("find expired leases"))?;
        let rows = stmt
            .query_map(params![now_ms, SWEEP_LIMIT], |row| {
                Ok(ExpiredRow {
                    id: row.get(0)?,
                    batch_id: row.get(1)?,
                    attempts: row.get(2)?,
                    max_attempts: row.get(3)?,
                    lease_owner: row.get(4)?,
                    attempted_at: row.get(5)?,
                })
            })
            .map_err(db_error("find expired leases"))?;
        rows.collect::<Result<_, _>>()
            .map_err(db_error("find expired leases"))?
    };

    let mut report = ReapReport::default();
    for row in expired {
        let job_id = JobId(row.id);
        let owner = row.lease_owner.unwrap_or_default();
        let error = format!("lease held by {owner} expired before the attempt finished");
        let started_at = row.attempted_at.unwrap_or(now_ms);
        let record = AttemptRecord {
            attempt: row.attempts,
            kind: FailureKind::LeaseExpired,
            error: error.clone(),
            started_at: from_millis(started_at),
            duration_ms: (now_ms - started_at).max(0) as u64,
        };
        let encoded = encode_attempt(&record)?;

        if cancel_requested(conn, &row.batch_id)? {
            let touched: Option<Touched> = conn
                .prepare_cached(sql::CANCEL_EXPIRED)
                .and_then(|mut stmt| {
                    stmt.query_row(
                        params![row.id, now_ms, now_ms, "batch was cancelled"],
                        touched_row,
                    )
                    .optional()
                })
                .map_err(db_error("cancel expired job"))?;
            if let Some(touched) = touched {
                mutation.job_changed(
                    job_id,
                    touched,
                    JobStatus::Cancelled,
                    row.attempts,
                    Some("batch was cancelled".into()),
                    None,
                )?;
            }
            continue;
        }

        let attempts_left = row.attempts < row.max_attempts;
        let query = if attempts_left {
            sql::REQUEUE_EXPIRED
        } else {
            sql::KILL_EXPIRED
        };
        let touched: Option<Touched> = conn
            .prepare_cached(query)
            .and_then(|mut stmt| {
                stmt.query_row(params![row.id, now_ms, now_ms, error, encoded], touched_row)
                    .optional()
            })
            .map_err(db_error("take back expired lease"))?;
        let Some(touched) = touched else {
            continue;
        };
        if attempts_left {
            report.requeued += 1;
            mutation.job_requeued(
                job_id,
                touched,
                JobStatus::Queued,
                row.attempts,
                Some(error),
                None,
            )?;
        } else {
            report.dead += 1;
            mutation.job_changed(
                job_id,
                touched,
                JobStatus::Dead,
                row.attempts,
                Some(error),
                None,
            )?;
        }
    }

    report.changes = mutation.finish()?;
    Ok(report)
}

//! The worker's hot path: [`JobStore`] on PostgreSQL.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{
    AppliedOutcome, AttemptOutcome, AttemptRecord, BatchFinished, BeginOutcome, ChangeSet,
    ClaimRequest, ClaimedJob, CreatedBatch, FailureKind, JobId, JobStatus, JobStore, KindControl,
    LeaseRef, NewBatch, NewJob, OutcomeKind, OutcomeResult, ProgressUpdate, PromoteReport,
    ReapReport, StagingBatch, StoreError, UserId,
};
use serde_json::value::RawValue;

use crate::create::{self, AppendInput, Begun, CreateInput};
use crate::mutate::{self, BATCH_CANCELLED, Mutation, Touched, encode_attempt, history_cap};
use crate::read::{
    self, column, from_millis, millis_to_time, parse_batch_id, to_i32, to_millis, to_u32,
};
use crate::write::Tx;
use crate::{PgStore, sql};

/// Maximum number of expired leases or due jobs handled by one transaction.
const SWEEP_LIMIT: i64 = 1_000;

/// Minimum time between two sweeps for abandoned staging batches from
/// `reap_expired_leases`, in milliseconds.
const ABANDON_SWEEP_INTERVAL_MS: i64 = 60_000;

impl PgStore {
    /// Deletes abandoned staging batches if no sweep of this store ran in
    /// the last minute (by the callers' clock). A failure is logged, not
    /// returned, because the reap it follows has committed.
    async fn sweep_abandoned_if_due(&self, now: DateTime<Utc>) {
        let now_ms = to_millis(now);
        let last = self.inner.last_abandon_sweep_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < ABANDON_SWEEP_INTERVAL_MS {
            return;
        }
        // Only the caller that moves the mark sweeps, and a concurrent one
        // skips.
        let claimed = self.inner.last_abandon_sweep_ms.compare_exchange(
            last,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if claimed.is_err() {
            return;
        }
        match self.delete_abandoned(now).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(
                abandoned = deleted,
                "deleted staging batches whose writer went quiet"
            ),
            Err(error) => tracing::warn!(
                %error,
                "deleting abandoned staging batches failed; the next reap retries"
            ),
        }
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn create_batch(
        &self,
        batch: NewBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError> {
        if items.is_empty() {
            return Err(create::no_items());
        }
        batch.validate()?;
        let input = CreateInput {
            batch,
            items,
            now,
            chunk_rows: self.config().insert_chunk_rows,
        };
        self.write("create batch", &input, |tx, input| {
            Box::pin(create::create_in(tx, input))
        })
        .await
    }

    async fn begin_batch(
        &self,
        batch: NewBatch,
        now: DateTime<Utc>,
    ) -> Result<BeginOutcome, StoreError> {
        batch.validate()?;
        let begun = self
            .write("begin batch", &(&batch, now), |tx, (batch, now)| {
                Box::pin(create::begin_in(tx, batch, to_millis(*now)))
            })
            .await?;
        Ok(match begun {
            Begun::Started => BeginOutcome::Started(StagingBatch {
                id: batch.id,
                owner: batch.owner,
                kind: batch.kind,
                items_appended: 0,
            }),
            Begun::Existing(existing) => BeginOutcome::Existing(*existing),
        })
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
        let appended = create::item_total(staging.items_appended, items.len())?;
        let input = AppendInput {
            staging,
            items: &items,
            now,
            chunk_rows: self.config().insert_chunk_rows,
        };
        self.write("append batch items", &input, |tx, input| {
            Box::pin(create::append_in(tx, input))
        })
        .await?;
        staging.items_appended = appended;
        Ok(())
    }

    async fn commit_batch(
        &self,
        staging: StagingBatch,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError> {
        self.write("commit batch", &(staging, now), |tx, input| {
            Box::pin(create::commit_in(tx, input))
        })
        .await
    }

    async fn abort_batch(&self, staging: StagingBatch) -> Result<(), StoreError> {
        let id = staging.id.to_string();
        self.write("abort batch", id.as_str(), |tx, id| {
            Box::pin(create::abort_in(tx, id))
        })
        .await
        .map(|_| ())
    }

    async fn claim(
        &self,
        request: ClaimRequest,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        if request.limit == 0 {
            return Ok(Vec::new());
        }
        self.write("claim jobs", &(request, now), |tx, (request, now)| {
            Box::pin(claim_in(tx, request, *now))
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
        self.write(
            "extend leases",
            &(leases, lease_until),
            |tx, (leases, until)| Box::pin(heartbeat_in(tx, leases, *until)),
        )
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
        self.write(
            "record outcomes",
            &(outcomes, now),
            |tx, (outcomes, now)| Box::pin(record_outcomes_in(tx, outcomes, *now)),
        )
        .await
    }

    async fn record_progress(&self, updates: Vec<ProgressUpdate>) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        self.write("record progress", &updates, |tx, updates| {
            Box::pin(progress_in(tx, updates))
        })
        .await
    }

    async fn promote_due(&self, now: DateTime<Utc>) -> Result<PromoteReport, StoreError> {
        self.write("promote due jobs", &now, |tx, now| {
            Box::pin(promote_in(tx, *now))
        })
        .await
    }

    async fn reap_expired_leases(&self, now: DateTime<Utc>) -> Result<ReapReport, StoreError> {
        let report = self
            .write("reap expired leases", &now, |tx, now| {
                Box::pin(reap_in(tx, *now))
            })
            .await?;
        self.sweep_abandoned_if_due(now).await;
        Ok(report)
    }

    async fn pending_finishes(&self, limit: u32) -> Result<Vec<BatchFinished>, StoreError> {
        let client = self.client("read batch outbox").await?;
        let rows = read::query(
            &client,
            "read batch outbox",
            sql::PENDING_FINISHES,
            &[&i64::from(limit)],
        )
        .await?;
        rows.iter()
            .map(|row| {
                let outbox_id: i64 = column(row, 0)?;
                let event: String = column(row, 1)?;
                let finished: BatchFinished = serde_json::from_str(&event)
                    .map_err(|_| read::corrupt("outbox event", &event))?;
                Ok(BatchFinished {
                    outbox_id,
                    ..finished
                })
            })
            .collect()
    }

    async fn ack_finishes(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        self.write("acknowledge batch outbox", outbox_ids, |tx, ids| {
            Box::pin(async move {
                let ids = ids.to_vec();
                read::execute(tx, "acknowledge batch outbox", sql::ACK_FINISHES, &[&ids]).await
            })
        })
        .await
        .map(|_| ())
    }

    async fn kind_controls(&self) -> Result<Vec<KindControl>, StoreError> {
        let client = self.client("read kind controls").await?;
        let rows = read::query(&client, "read kind controls", sql::KIND_CONTROLS, &[]).await?;
        rows.iter()
            .map(|row| {
                Ok(KindControl {
                    kind: column(row, 0)?,
                    paused: column(row, 1)?,
                    updated_at: from_millis(column(row, 2)?),
                })
            })
            .collect()
    }
}

/// Claims jobs and marks their batches started, in one transaction.
async fn claim_in(
    tx: &Tx<'_>,
    request: &ClaimRequest,
    now: DateTime<Utc>,
) -> Result<Vec<ClaimedJob>, StoreError> {
    let now_ms = to_millis(now);
    let lease_until = to_millis(request.lease_until);
    let rows = read::query(
        tx,
        "claim jobs",
        sql::CLAIM,
        &[
            &request.owner.as_str(),
            &lease_until,
            &now_ms,
            &request.kind,
            &i64::from(request.limit),
        ],
    )
    .await?;

    let mut unstarted: Vec<String> = Vec::new();
    let mut claimed = Vec::with_capacity(rows.len());
    for row in &rows {
        let id = JobId(column(row, 0)?);
        let batch_id: String = column(row, 1)?;
        let attempt = to_u32(column(row, 4)?, "job attempts")?;
        let payload: String = column(row, 3)?;
        let payload =
            RawValue::from_string(payload).map_err(|error| read::corrupt("job payload", error))?;
        if column::<bool>(row, 11)? && !unstarted.contains(&batch_id) {
            unstarted.push(batch_id.clone());
        }

        claimed.push(ClaimedJob {
            id,
            batch_id: parse_batch_id(&batch_id)?,
            seq: to_u32(column(row, 2)?, "job position")?,
            kind: request.kind.clone(),
            payload,
            owner: UserId(column(row, 8)?),
            correlation_id: column(row, 9)?,
            traceparent: column(row, 10)?,
            attempt,
            max_attempts: to_u32(column(row, 5)?, "job max attempts")?,
            priority: column(row, 6)?,
            lease: LeaseRef {
                job_id: id,
                owner: request.owner.clone(),
                attempt,
            },
            lease_expires_at: request.lease_until,
            created_at: from_millis(column(row, 7)?),
        });
    }
    // RETURNING gives rows in no promised order.
    claimed.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));

    if !unstarted.is_empty() {
        read::execute(
            tx,
            "mark batch started",
            sql::MARK_BATCHES_STARTED,
            &[&unstarted, &now_ms],
        )
        .await?;
    }
    Ok(claimed)
}

/// Lease fields as parallel arrays for `unnest`.
struct LeaseArrays<'a> {
    ids: Vec<i64>,
    owners: Vec<&'a str>,
    attempts: Vec<i32>,
}

impl<'a> LeaseArrays<'a> {
    fn new(leases: impl Iterator<Item = &'a LeaseRef>) -> Result<Self, StoreError> {
        let mut arrays = Self {
            ids: Vec::new(),
            owners: Vec::new(),
            attempts: Vec::new(),
        };
        for lease in leases {
            arrays.ids.push(lease.job_id.0);
            arrays.owners.push(lease.owner.as_str());
            arrays
                .attempts
                .push(to_i32(lease.attempt, "lease attempt")?);
        }
        Ok(arrays)
    }
}

async fn heartbeat_in(
    tx: &Tx<'_>,
    leases: &[LeaseRef],
    lease_until: DateTime<Utc>,
) -> Result<Vec<JobId>, StoreError> {
    let arrays = LeaseArrays::new(leases.iter())?;
    let until = to_millis(lease_until);
    let rows = read::query(
        tx,
        "extend leases",
        sql::HEARTBEAT,
        &[&arrays.ids, &arrays.owners, &arrays.attempts, &until],
    )
    .await?;
    let extended = rows
        .iter()
        .map(|row| column::<i64>(row, 0))
        .collect::<Result<HashSet<_>, _>>()?;
    Ok(leases
        .iter()
        .map(|lease| lease.job_id)
        .filter(|id| !extended.contains(&id.0))
        .collect())
}

async fn progress_in(tx: &Tx<'_>, updates: &[ProgressUpdate]) -> Result<(), StoreError> {
    let arrays = LeaseArrays::new(updates.iter().map(|update| &update.lease))?;
    let progress: Vec<i16> = updates
        .iter()
        .map(|update| i16::from(update.progress.min(100)))
        .collect();
    read::execute(
        tx,
        "record progress",
        sql::PROGRESS,
        &[&arrays.ids, &arrays.owners, &arrays.attempts, &progress],
    )
    .await?;
    Ok(())
}

/// Returns true for outcomes that put a job back to waiting, which must
/// cancel it instead when its batch's cancellation was requested.
fn returns_to_waiting(outcome: &AttemptOutcome) -> bool {
    matches!(
        outcome.kind,
        OutcomeKind::Retry { .. } | OutcomeKind::Deferred { .. } | OutcomeKind::Released
    )
}

/// Records outcomes in job id order. When some outcome returns a job to
/// waiting, the jobs are locked first and then their batches, and each
/// batch's cancel flag is read under that lock. A concurrent cancel then
/// either ran before, and the job is cancelled here, or runs after and
/// finds the job waiting.
async fn record_outcomes_in(
    tx: &Tx<'_>,
    outcomes: &[AttemptOutcome],
    now: DateTime<Utc>,
) -> Result<(Vec<OutcomeResult>, ChangeSet), StoreError> {
    let mut order: Vec<usize> = (0..outcomes.len()).collect();
    order.sort_by_key(|&index| outcomes[index].lease.job_id);

    let cancel_flags = if outcomes.iter().any(returns_to_waiting) {
        let job_ids: Vec<i64> = order
            .iter()
            .map(|&index| outcomes[index].lease.job_id.0)
            .collect();
        let rows = read::query(tx, "lock outcome jobs", sql::LOCK_JOBS, &[&job_ids]).await?;
        let batch_ids = rows
            .iter()
            .map(|row| column::<String>(row, 1))
            .collect::<Result<Vec<_>, _>>()?;
        mutate::lock_batches(tx, &batch_ids).await?
    } else {
        HashMap::new()
    };

    let mut mutation = Mutation::new(tx, now);
    let mut results = vec![OutcomeResult::LeaseLost; outcomes.len()];
    for index in order {
        results[index] = record_one(&mut mutation, &outcomes[index], &cancel_flags).await?;
    }
    Ok((results, mutation.finish().await?))
}

/// Runs one fenced UPDATE ... RETURNING for an outcome. `None` means the
/// lease was not held.
async fn fenced(
    tx: &Tx<'_>,
    query: &str,
    lease: &LeaseRef,
    extra: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Touched>, StoreError> {
    let owner = lease.owner.as_str();
    let attempt = to_i32(lease.attempt, "lease attempt")?;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&lease.job_id.0, &owner, &attempt];
    params.extend_from_slice(extra);
    let row = read::query_opt(tx, "record outcome", query, &params).await?;
    row.map(|row| Touched::from_row(&row, 0)).transpose()
}

async fn record_one(
    mutation: &mut Mutation<'_>,
    outcome: &AttemptOutcome,
    cancel_flags: &HashMap<String, bool>,
) -> Result<OutcomeResult, StoreError> {
    let tx = mutation.tx;
    let now_ms = mutation.now_ms;
    let lease = &outcome.lease;
    let job_id = lease.job_id;
    let attempt = lease.attempt;
    let cap = history_cap();
    let record = |failure: FailureKind, error: &str| AttemptRecord {
        attempt,
        kind: failure,
        error: error.to_owned(),
        started_at: outcome.started_at,
        duration_ms: outcome.duration_ms,
    };
    let cancel_requested = |touched: &Touched| {
        cancel_flags
            .get(&touched.batch_id)
            .copied()
            .unwrap_or(false)
    };

    let status = match &outcome.kind {
        OutcomeKind::Succeeded { result } => {
            let result = result.as_ref().map(|raw| raw.get());
            let Some(touched) = fenced(tx, sql::SUCCEED, lease, &[&now_ms, &result]).await? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            mutation.job_changed(job_id, touched, JobStatus::Succeeded, attempt, None)?;
            JobStatus::Succeeded
        }
        OutcomeKind::Retry {
            error,
            failure,
            run_at,
            counts_attempt,
        } => {
            let encoded = encode_attempt(&record(*failure, error))?;
            let uncounted = i32::from(!*counts_attempt);
            let run_at_ms = to_millis(*run_at);
            let Some(touched) = fenced(
                tx,
                sql::RETRY,
                lease,
                &[&run_at_ms, error, &encoded, &uncounted, &cap],
            )
            .await?
            else {
                return Ok(OutcomeResult::LeaseLost);
            };
            if cancel_requested(&touched) && mutation.cancel_waiting_job(job_id, attempt).await? {
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
            let Some(touched) =
                fenced(tx, sql::DIE, lease, &[&now_ms, error, &encoded, &cap]).await?
            else {
                return Ok(OutcomeResult::LeaseLost);
            };
            mutation.job_changed(
                job_id,
                touched,
                JobStatus::Dead,
                attempt,
                Some(error.clone()),
            )?;
            JobStatus::Dead
        }
        OutcomeKind::Cancelled { reason } => {
            let Some(touched) = fenced(tx, sql::CANCEL_RUNNING, lease, &[&now_ms, reason]).await?
            else {
                return Ok(OutcomeResult::LeaseLost);
            };
            mutation.job_changed(
                job_id,
                touched,
                JobStatus::Cancelled,
                attempt,
                Some(reason.clone()),
            )?;
            JobStatus::Cancelled
        }
        OutcomeKind::Deferred { run_at } => {
            let run_at_ms = to_millis(*run_at);
            let Some(touched) = fenced(tx, sql::DEFER, lease, &[&run_at_ms]).await? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            let attempts_before = attempt.saturating_sub(1);
            if cancel_requested(&touched)
                && mutation.cancel_waiting_job(job_id, attempts_before).await?
            {
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
            let Some(touched) = fenced(tx, sql::RELEASE, lease, &[]).await? else {
                return Ok(OutcomeResult::LeaseLost);
            };
            let attempts_before = attempt.saturating_sub(1);
            if cancel_requested(&touched)
                && mutation.cancel_waiting_job(job_id, attempts_before).await?
            {
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

async fn promote_in(tx: &Tx<'_>, now: DateTime<Utc>) -> Result<PromoteReport, StoreError> {
    let now_ms = to_millis(now);
    let rows = read::query(
        tx,
        "promote due jobs",
        sql::PROMOTE_DUE,
        &[&now_ms, &SWEEP_LIMIT],
    )
    .await?;
    let next_due = read::query_opt(tx, "find next due job", sql::NEXT_DUE, &[]).await?;
    let next_due: Option<i64> = match next_due {
        Some(row) => column(&row, 0)?,
        None => None,
    };

    let mut runnable_kinds: Vec<String> = Vec::new();
    for row in &rows {
        let kind: String = column(row, 0)?;
        if !runnable_kinds.contains(&kind) {
            runnable_kinds.push(kind);
        }
    }
    Ok(PromoteReport {
        promoted: rows.len() as u64,
        runnable_kinds,
        next_due: millis_to_time(next_due),
    })
}

struct ExpiredRow {
    id: i64,
    batch_id: String,
    attempts: u32,
    max_attempts: u32,
    lease_owner: Option<String>,
    attempted_at: Option<i64>,
}

/// Takes back expired leases. The job rows are locked first (skipping any
/// a worker has locked right now), then their batches, whose cancel flags
/// decide between cancelling, requeueing and killing each job.
async fn reap_in(tx: &Tx<'_>, now: DateTime<Utc>) -> Result<ReapReport, StoreError> {
    let mut mutation = Mutation::new(tx, now);
    let now_ms = mutation.now_ms;
    let rows = read::query(
        tx,
        "find expired leases",
        sql::EXPIRED_LEASES,
        &[&now_ms, &SWEEP_LIMIT],
    )
    .await?;
    let expired = rows
        .iter()
        .map(|row| {
            Ok(ExpiredRow {
                id: column(row, 0)?,
                batch_id: column(row, 1)?,
                attempts: to_u32(column(row, 2)?, "job attempts")?,
                max_attempts: to_u32(column(row, 3)?, "job max attempts")?,
                lease_owner: column(row, 4)?,
                attempted_at: column(row, 5)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if expired.is_empty() {
        return Ok(ReapReport::default());
    }

    let batch_ids: BTreeSet<String> = expired.iter().map(|row| row.batch_id.clone()).collect();
    let batch_ids: Vec<String> = batch_ids.into_iter().collect();
    let cancel_flags = mutate::lock_batches(tx, &batch_ids).await?;
    let cap = history_cap();

    let mut report = ReapReport::default();
    for row in expired {
        let job_id = JobId(row.id);

        if cancel_flags.get(&row.batch_id).copied().unwrap_or(false) {
            let cancelled = read::query_opt(
                tx,
                "cancel expired job",
                sql::CANCEL_EXPIRED,
                &[&row.id, &now_ms, &now_ms, &BATCH_CANCELLED],
            )
            .await?;
            if let Some(cancelled) = cancelled {
                let touched = Touched::from_row(&cancelled, 0)?;
                mutation.job_changed(
                    job_id,
                    touched,
                    JobStatus::Cancelled,
                    row.attempts,
                    Some(BATCH_CANCELLED.into()),
                )?;
            }
            continue;
        }

        let owner = row.lease_owner.unwrap_or_default();
        let error = format!("lease held by {owner} expired before the attempt finished");
        let started_at = row.attempted_at.unwrap_or(now_ms);
        let record = AttemptRecord {
            attempt: row.attempts,
            kind: FailureKind::LeaseExpired,
            error: error.clone(),
            started_at: from_millis(started_at),
            duration_ms: u64::try_from(now_ms - started_at).unwrap_or(0),
        };
        let encoded = encode_attempt(&record)?;

        let attempts_left = row.attempts < row.max_attempts;
        let query = if attempts_left {
            sql::REQUEUE_EXPIRED
        } else {
            sql::KILL_EXPIRED
        };
        let updated = read::query_opt(
            tx,
            "take back expired lease",
            query,
            &[&row.id, &now_ms, &now_ms, &error, &encoded, &cap],
        )
        .await?;
        let Some(updated) = updated else {
            continue;
        };
        let touched = Touched::from_row(&updated, 0)?;
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
            mutation.job_changed(job_id, touched, JobStatus::Dead, row.attempts, Some(error))?;
        }
    }

    report.changes = mutation.finish().await?;
    Ok(report)
}

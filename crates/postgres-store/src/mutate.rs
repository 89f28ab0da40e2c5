//! State changes inside one write transaction, and the bookkeeping that
//! must happen in the same transaction: batch counters, batch status, the
//! batch-finished outbox, and the jobs and batches that depend on the
//! changed ones.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use domain::{
    AttemptRecord, BatchCounters, BatchFinished, BatchId, BatchProgress, BatchStatus, ChangeSet,
    JobChange, JobId, JobStatus, StoreError, UserId,
};
use tokio_postgres::Row;

use crate::read::{self, column, parse_batch_id, to_u32};
use crate::sql;
use crate::write::Tx;

/// Reason stored on jobs cancelled because their batch was.
pub(crate) const BATCH_CANCELLED: &str = "batch was cancelled";

/// Counter changes of one batch, applied once per operation.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    succeeded: i32,
    failed: i32,
    cancelled: i32,
}

/// The job row a transition touched: the columns of `sql::touched!`.
#[derive(Debug, Clone)]
pub(crate) struct Touched {
    pub(crate) batch_id: String,
    pub(crate) seq: u32,
    pub(crate) kind: String,
    pub(crate) owner: UserId,
}

impl Touched {
    /// Reads the four `touched!` columns starting at `first`.
    pub(crate) fn from_row(row: &Row, first: usize) -> Result<Self, StoreError> {
        Ok(Self {
            batch_id: column(row, first)?,
            seq: to_u32(column(row, first + 1)?, "job position")?,
            kind: column(row, first + 2)?,
            owner: UserId(column(row, first + 3)?),
        })
    }
}

/// Context of one write operation.
pub(crate) struct Mutation<'t> {
    pub(crate) tx: &'t Tx<'t>,
    pub(crate) now: DateTime<Utc>,
    pub(crate) now_ms: i64,
    /// Sorted by batch id, so counters are updated, and batch rows locked,
    /// in the same order by every transaction.
    deltas: BTreeMap<String, Delta>,
    /// Jobs that succeeded in this write, whose dependents are released
    /// when the write settles.
    succeeded: Vec<i64>,
    /// Jobs that died or were cancelled in this write, with the reason
    /// their dependents are cancelled for when the write settles.
    failed: Vec<(i64, String)>,
    pub(crate) changes: ChangeSet,
}

impl<'t> Mutation<'t> {
    pub(crate) fn new(tx: &'t Tx<'t>, now: DateTime<Utc>) -> Self {
        Self {
            tx,
            now,
            now_ms: now.timestamp_millis(),
            deltas: BTreeMap::new(),
            succeeded: Vec::new(),
            failed: Vec::new(),
            changes: ChangeSet::default(),
        }
    }

    /// Records that a job reached `status` and queues the follow-up work
    /// for when the write settles: counters, and its dependents (released
    /// on success, cancelled on death or cancellation).
    pub(crate) fn job_changed(
        &mut self,
        job_id: JobId,
        touched: Touched,
        status: JobStatus,
        attempt: u32,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        self.count(&touched.batch_id, status);
        self.push_change(job_id, touched, status, attempt, error, None)?;

        match status {
            JobStatus::Succeeded => self.succeeded.push(job_id.0),
            JobStatus::Dead | JobStatus::Cancelled => {
                let reason = format!("dependency job {job_id} is {status}");
                self.failed.push((job_id.0, reason));
            }
            _ => {}
        }
        Ok(())
    }

    /// Records an item inserted already cancelled because a dependency had
    /// failed. Later items that name it are cancelled on insert too, so no
    /// dependency row points at it and there is no follow-up.
    pub(crate) fn cancelled_on_insert(
        &mut self,
        job_id: JobId,
        touched: Touched,
        reason: String,
    ) -> Result<(), StoreError> {
        self.count(&touched.batch_id, JobStatus::Cancelled);
        self.push_change(job_id, touched, JobStatus::Cancelled, 0, Some(reason), None)
    }

    /// Records that a job entered `queued` or another waiting state, which
    /// changes no counter but is worth an event.
    pub(crate) fn job_requeued(
        &mut self,
        job_id: JobId,
        touched: Touched,
        status: JobStatus,
        attempt: u32,
        error: Option<String>,
        run_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        if status == JobStatus::Queued {
            self.mark_runnable(&touched.kind);
        }
        self.push_change(job_id, touched, status, attempt, error, run_at)
    }

    /// Records a re-driven job, which is `queued` again. It is runnable
    /// unless a dependency still blocks it.
    pub(crate) fn job_redriven(
        &mut self,
        job_id: JobId,
        touched: Touched,
        runnable: bool,
    ) -> Result<(), StoreError> {
        if runnable {
            self.mark_runnable(&touched.kind);
        }
        self.push_change(job_id, touched, JobStatus::Queued, 0, None, None)
    }

    /// Cancels a job that went back to waiting while its batch's
    /// cancellation was requested. `attempt` is the attempt reported in the
    /// change. Returns false if the job was no longer waiting.
    pub(crate) async fn cancel_waiting_job(
        &mut self,
        job_id: JobId,
        attempt: u32,
    ) -> Result<bool, StoreError> {
        let row = read::query_opt(
            self.tx,
            "cancel job of a cancelled batch",
            sql::CANCEL_WAITING_JOB,
            &[&job_id.0, &self.now_ms, &BATCH_CANCELLED],
        )
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let touched = Touched::from_row(&row, 0)?;
        self.job_changed(
            job_id,
            touched,
            JobStatus::Cancelled,
            attempt,
            Some(BATCH_CANCELLED.to_owned()),
        )?;
        Ok(true)
    }

    /// Queues a status recomputation of a batch even without counter changes,
    /// as when it is accepted.
    pub(crate) fn touch_batch(&mut self, batch_id: &str) {
        self.deltas.entry(batch_id.to_owned()).or_default();
    }

    /// Adds a counter change that has no job event, such as a re-drive.
    pub(crate) fn adjust_failed(&mut self, batch_id: &str, by: i32) {
        let delta = self.deltas.entry(batch_id.to_owned()).or_default();
        delta.failed = delta.failed.saturating_add(by);
    }

    pub(crate) fn mark_runnable(&mut self, kind: &str) {
        if !self.changes.runnable_kinds.iter().any(|k| k == kind) {
            self.changes.runnable_kinds.push(kind.to_owned());
        }
    }

    fn count(&mut self, batch_id: &str, status: JobStatus) {
        let delta = self.deltas.entry(batch_id.to_owned()).or_default();
        match status {
            JobStatus::Succeeded => delta.succeeded = delta.succeeded.saturating_add(1),
            JobStatus::Dead => delta.failed = delta.failed.saturating_add(1),
            JobStatus::Cancelled => delta.cancelled = delta.cancelled.saturating_add(1),
            _ => {}
        }
    }

    fn push_change(
        &mut self,
        job_id: JobId,
        touched: Touched,
        status: JobStatus,
        attempt: u32,
        error: Option<String>,
        run_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        self.changes.jobs.push(JobChange {
            job_id,
            batch_id: parse_batch_id(&touched.batch_id)?,
            owner: touched.owner,
            kind: touched.kind,
            seq: touched.seq,
            status,
            attempt,
            error,
            run_at,
        });
        Ok(())
    }

    /// Releases the dependents of the jobs that succeeded, and cancels
    /// those of the jobs that failed, level by level down each chain.
    async fn settle_dependents(&mut self) -> Result<(), StoreError> {
        if !self.succeeded.is_empty() {
            let succeeded = std::mem::take(&mut self.succeeded);
            let rows = read::query(
                self.tx,
                "release dependent jobs",
                sql::RELEASE_DEPENDENTS,
                &[&succeeded],
            )
            .await?;
            for row in rows {
                let kind: String = column(&row, 0)?;
                let blockers: i32 = column(&row, 1)?;
                if blockers == 0 {
                    self.mark_runnable(&kind);
                }
            }
        }

        while !self.failed.is_empty() {
            let (causes, reasons): (Vec<i64>, Vec<String>) =
                std::mem::take(&mut self.failed).into_iter().unzip();
            let rows = read::query(
                self.tx,
                "cancel dependent jobs",
                sql::CANCEL_DEPENDENTS,
                &[&causes, &reasons, &self.now_ms],
            )
            .await?;
            for row in rows {
                let dependent = JobId(column(&row, 0)?);
                let attempts = to_u32(column(&row, 1)?, "job attempts")?;
                // The root cause's reason carries on down the chain.
                let reason: String = column(&row, 2)?;
                let touched = Touched::from_row(&row, 3)?;
                self.count(&touched.batch_id, JobStatus::Cancelled);
                self.push_change(
                    dependent,
                    touched,
                    JobStatus::Cancelled,
                    attempts,
                    Some(reason.clone()),
                    None,
                )?;
                self.failed.push((dependent.0, reason));
            }
        }
        Ok(())
    }

    /// Cancels every item of a batch that has not started.
    pub(crate) async fn cancel_waiting_in_batch(
        &mut self,
        batch_id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let rows = read::query(
            self.tx,
            "cancel batch items",
            sql::CANCEL_WAITING_IN_BATCH,
            &[&batch_id, &self.now_ms, &reason],
        )
        .await?;

        for row in rows {
            let job_id = JobId(column(&row, 0)?);
            let attempts = to_u32(column(&row, 1)?, "job attempts")?;
            let touched = Touched::from_row(&row, 2)?;
            self.job_changed(
                job_id,
                touched,
                JobStatus::Cancelled,
                attempts,
                Some(reason.to_owned()),
            )?;
        }
        Ok(())
    }

    /// Settles the dependents of changed jobs, then applies pending counter
    /// changes in batch id order, derives each batch's status, writes the
    /// outbox row of every batch that finished, and settles the batches
    /// that waited on it. Settling a dependent batch can change more jobs
    /// and counters, which the loop picks up.
    async fn settle(&mut self) -> Result<(), StoreError> {
        loop {
            self.settle_dependents().await?;
            let Some((batch_id, delta)) = self.deltas.pop_first() else {
                return Ok(());
            };
            self.apply_delta(&batch_id, delta).await?;
        }
    }

    async fn apply_delta(&mut self, batch_id: &str, delta: Delta) -> Result<(), StoreError> {
        let row = read::query_opt(
            self.tx,
            "update batch counters",
            sql::APPLY_COUNTERS,
            &[
                &batch_id,
                &delta.succeeded,
                &delta.failed,
                &delta.cancelled,
                &self.now_ms,
            ],
        )
        .await?
        .ok_or_else(|| StoreError::not_found("batch", batch_id))?;
        let row = CounterRow::from_row(&row)?;

        // A batch still being inserted has no final item count, so its
        // status is derived once it is accepted.
        if !row.accepted {
            return Ok(());
        }

        let old_status: BatchStatus = row
            .status
            .parse()
            .map_err(|_| read::corrupt("batch status", &row.status))?;
        let new_status = row.counters.status(row.started);
        let batch = parse_batch_id(batch_id)?;

        if new_status != old_status {
            // Leaving a terminal state (a re-drive) opens a new generation,
            // which may finish once more.
            let generation = if old_status.is_terminal() && !new_status.is_terminal() {
                row.generation + 1
            } else {
                row.generation
            };
            let finished_at = new_status.is_terminal().then_some(self.now_ms);
            read::execute(
                self.tx,
                "update batch status",
                sql::SET_BATCH_STATUS,
                &[
                    &batch_id,
                    &new_status.as_str(),
                    &finished_at,
                    &generation,
                    &self.now_ms,
                ],
            )
            .await?;

            if new_status.is_terminal() {
                self.batch_finished(batch, &row, new_status, generation)
                    .await?;
            }
        }

        let progress = BatchProgress {
            batch_id: batch,
            owner: UserId(row.owner.clone()),
            kind: row.kind.clone(),
            status: new_status,
            counters: row.counters,
            correlation_id: row.correlation_id.clone(),
            revision: row.revision,
        };
        match self
            .changes
            .batches
            .iter_mut()
            .find(|b| b.batch_id == batch)
        {
            Some(existing) => *existing = progress,
            None => self.changes.batches.push(progress),
        }
        Ok(())
    }

    async fn batch_finished(
        &mut self,
        batch_id: BatchId,
        row: &CounterRow,
        status: BatchStatus,
        generation: i32,
    ) -> Result<(), StoreError> {
        let event = BatchFinished {
            outbox_id: 0,
            batch_id,
            owner: UserId(row.owner.clone()),
            kind: row.kind.clone(),
            status,
            counters: row.counters,
            generation: to_u32(generation, "batch generation")?,
            correlation_id: row.correlation_id.clone(),
            finished_at: self.now,
            revision: row.revision,
        };
        let stored = serde_json::to_string(&event)
            .map_err(|source| StoreError::backend("encode outbox event", source))?;
        let id = batch_id.to_string();
        let inserted = read::query_opt(
            self.tx,
            "write batch outbox",
            sql::INSERT_OUTBOX,
            &[&id, &generation, &stored, &self.now_ms],
        )
        .await?;
        if let Some(inserted) = inserted {
            let outbox_id: i64 = column(&inserted, 0)?;
            self.changes
                .finished
                .push(BatchFinished { outbox_id, ..event });
        }

        self.settle_dependent_batches(&id, status).await
    }

    async fn settle_dependent_batches(
        &mut self,
        batch_id: &str,
        status: BatchStatus,
    ) -> Result<(), StoreError> {
        let dependents = read::query(
            self.tx,
            "find dependent batches",
            sql::BATCH_DEPENDENTS,
            &[&batch_id],
        )
        .await?;

        for row in dependents {
            let dependent: String = column(&row, 0)?;
            if status == BatchStatus::Completed {
                read::execute(
                    self.tx,
                    "release dependent batch",
                    sql::DECREMENT_WAITING,
                    &[&dependent],
                )
                .await?;
                let unblocked = read::query(
                    self.tx,
                    "release dependent batch",
                    sql::UNBLOCK_BATCH_ITEMS,
                    &[&dependent],
                )
                .await?;
                for item in unblocked {
                    let kind: String = column(&item, 0)?;
                    let blockers: i32 = column(&item, 1)?;
                    if blockers == 0 {
                        self.mark_runnable(&kind);
                    }
                }
            } else {
                let reason = format!("dependency batch {batch_id} is {status}");
                self.cancel_waiting_in_batch(&dependent, &reason).await?;
            }
        }
        Ok(())
    }

    /// Settles every pending counter change and returns what the write
    /// changed.
    pub(crate) async fn finish(mut self) -> Result<ChangeSet, StoreError> {
        self.settle().await?;
        Ok(self.changes)
    }
}

struct CounterRow {
    owner: String,
    kind: String,
    counters: BatchCounters,
    started: bool,
    status: String,
    generation: i32,
    correlation_id: Option<String>,
    accepted: bool,
    revision: u64,
}

impl CounterRow {
    fn from_row(row: &Row) -> Result<Self, StoreError> {
        let counter = |index| -> Result<u64, StoreError> {
            let value: i32 = column(row, index)?;
            u64::try_from(value).map_err(|_| read::corrupt("batch counter", value))
        };
        Ok(Self {
            owner: column(row, 0)?,
            kind: column(row, 1)?,
            counters: BatchCounters {
                item_count: counter(2)?,
                succeeded: counter(3)?,
                failed: counter(4)?,
                cancelled: counter(5)?,
            },
            started: column(row, 6)?,
            status: column(row, 7)?,
            generation: column(row, 8)?,
            correlation_id: column(row, 9)?,
            accepted: column(row, 10)?,
            revision: {
                let value: i64 = column(row, 11)?;
                u64::try_from(value).map_err(|_| read::corrupt("batch revision", value))?
            },
        })
    }
}

/// Locks the given batches in id order and returns whether each one's
/// cancellation was requested.
pub(crate) async fn lock_batches(
    tx: &Tx<'_>,
    batch_ids: &[String],
) -> Result<HashMap<String, bool>, StoreError> {
    let mut sorted = batch_ids.to_vec();
    sorted.sort();
    sorted.dedup();
    let rows = read::query(tx, "lock batches", sql::LOCK_BATCHES, &[&sorted]).await?;
    rows.iter()
        .map(|row| Ok((column(row, 0)?, column(row, 1)?)))
        .collect()
}

/// Encodes an attempt record for the `errors` JSONB column.
pub(crate) fn encode_attempt(record: &AttemptRecord) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(record)
        .map_err(|source| StoreError::backend("encode attempt record", source))
}

/// Returns the history cap as the SQL parameter of `append_error!`.
pub(crate) fn history_cap() -> i32 {
    i32::try_from(domain::MAX_ATTEMPT_HISTORY).unwrap_or(i32::MAX)
}

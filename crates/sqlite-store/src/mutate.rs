//! State changes inside one write transaction, and the bookkeeping that
//! must happen in the same transaction: batch counters, batch status,
//! the batch-finished outbox, and the jobs and batches that depend on the
//! changed ones.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use domain::{
    AttemptRecord, BatchCounters, BatchFinished, BatchId, BatchProgress, BatchStatus, ChangeSet,
    JobChange, JobId, JobStatus, StoreError, UserId,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{db_error, from_millis, sql};

/// Counter changes of one batch, applied once per operation.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    succeeded: i64,
    failed: i64,
    cancelled: i64,
}

/// The job row a transition touched.
pub(crate) struct Touched {
    pub(crate) batch_id: String,
    pub(crate) seq: u32,
    pub(crate) kind: String,
}

/// Context of one write operation.
pub(crate) struct Mutation<'c> {
    pub(crate) conn: &'c Connection,
    pub(crate) now: DateTime<Utc>,
    pub(crate) now_ms: i64,
    deltas: HashMap<String, Delta>,
    /// Owner of each batch the operation touched, filled lazily.
    owners: HashMap<String, UserId>,
    pub(crate) changes: ChangeSet,
}

impl<'c> Mutation<'c> {
    pub(crate) fn new(conn: &'c Connection, now: DateTime<Utc>) -> Self {
        Self {
            conn,
            now,
            now_ms: now.timestamp_millis(),
            deltas: HashMap::new(),
            owners: HashMap::new(),
            changes: ChangeSet::default(),
        }
    }

    /// Records that a job reached `status` and does the follow-up work:
    /// counters, and its dependents (released on success, cancelled on
    /// death or cancellation).
    pub(crate) fn job_changed(
        &mut self,
        job_id: JobId,
        touched: Touched,
        status: JobStatus,
        attempt: u32,
        error: Option<String>,
        run_at: Option<DateTime<Utc>>,
    ) -> Result<(), StoreError> {
        let delta = self.deltas.entry(touched.batch_id.clone()).or_default();
        match status {
            JobStatus::Succeeded => delta.succeeded += 1,
            JobStatus::Dead => delta.failed += 1,
            JobStatus::Cancelled => delta.cancelled += 1,
            _ => {}
        }

        let owner = self.owner_of(&touched.batch_id)?;
        let batch_id = parse_batch_id(&touched.batch_id)?;
        self.changes.jobs.push(JobChange {
            job_id,
            batch_id,
            owner,
            kind: touched.kind.clone(),
            seq: touched.seq,
            status,
            attempt,
            error,
            run_at,
        });

        match status {
            JobStatus::Succeeded => self.release_dependents(job_id),
            JobStatus::Dead | JobStatus::Cancelled => {
                let reason = format!("dependency job {job_id} is {status}");
                self.cancel_dependents(job_id, &reason)
            }
            _ => Ok(()),
        }
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
        let owner = self.owner_of(&touched.batch_id)?;
        let batch_id = parse_batch_id(&touched.batch_id)?;
        self.changes.jobs.push(JobChange {
            job_id,
            batch_id,
            owner,
            kind: touched.kind,
            seq: touched.seq,
            status,
            attempt,
            error,
            run_at,
        });
        Ok(())
    }

    /// Queues a status recomputation of a batch even without counter changes,
    /// as when it is accepted.
    pub(crate) fn touch_batch(&mut self, batch_id: &str) {
        self.deltas.entry(batch_id.to_owned()).or_default();
    }

    /// Adds a counter change that has no job event, such as a re-drive.
    pub(crate) fn adjust_failed(&mut self, batch_id: &str, by: i64) {
        self.deltas.entry(batch_id.to_owned()).or_default().failed += by;
    }

    pub(crate) fn mark_runnable(&mut self, kind: &str) {
        if !self.changes.runnable_kinds.iter().any(|k| k == kind) {
            self.changes.runnable_kinds.push(kind.to_owned());
        }
    }

    fn owner_of(&mut self, batch_id: &str) -> Result<UserId, StoreError> {
        if let Some(owner) = self.owners.get(batch_id) {
            return Ok(owner.clone());
        }
        let owner: String = self
            .conn
            .prepare_cached("SELECT owner FROM batches WHERE id = ?1")
            .and_then(|mut stmt| stmt.query_row([batch_id], |row| row.get(0)))
            .map_err(db_error("read batch owner"))?;
        let owner = UserId(owner);
        self.owners.insert(batch_id.to_owned(), owner.clone());
        Ok(owner)
    }

    fn release_dependents(&mut self, job_id: JobId) -> Result<(), StoreError> {
        let dependents = self.dependents(job_id)?;
        for dependent in dependents {
            let released: Option<(String, i64)> = self
                .conn
                .prepare_cached(sql::UNBLOCK_JOB)
                .and_then(|mut stmt| {
                    stmt.query_row([dependent], |row| Ok((row.get(0)?, row.get(1)?)))
                        .optional()
                })
                .map_err(db_error("release dependent job"))?;
            if let Some((kind, 0)) = released {
                self.mark_runnable(&kind);
            }
        }
        Ok(())
    }

    /// Cancels every job waiting on `job_id`, and theirs in turn.
    fn cancel_dependents(&mut self, job_id: JobId, reason: &str) -> Result<(), StoreError> {
        let mut pending = self.dependents(job_id)?;
        while let Some(dependent) = pending.pop() {
            let cancelled: Option<(String, u32, String, u32)> = self
                .conn
                .prepare_cached(sql::CANCEL_WAITING_JOB)
                .and_then(|mut stmt| {
                    stmt.query_row(params![dependent, self.now_ms, reason], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })
                    .optional()
                })
                .map_err(db_error("cancel dependent job"))?;
            let Some((batch_id, seq, kind, attempts)) = cancelled else {
                continue;
            };

            self.deltas.entry(batch_id.clone()).or_default().cancelled += 1;
            let owner = self.owner_of(&batch_id)?;
            self.changes.jobs.push(JobChange {
                job_id: JobId(dependent),
                batch_id: parse_batch_id(&batch_id)?,
                owner,
                kind,
                seq,
                status: JobStatus::Cancelled,
                attempt: attempts,
                error: Some(reason.to_owned()),
                run_at: None,
            });
            pending.extend(self.dependents(JobId(dependent))?);
        }
        Ok(())
    }

    fn dependents(&self, job_id: JobId) -> Result<Vec<i64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(sql::DEPENDENTS)
            .map_err(db_error("find dependent jobs"))?;
        let rows = stmt
            .query_map([job_id.0], |row| row.get(0))
            .map_err(db_error("find dependent jobs"))?;
        rows.collect::<Result<Vec<i64>, _>>()
            .map_err(db_error("find dependent jobs"))
    }

    /// Cancels every item of a batch that has not started; returns how many.
    pub(crate) fn cancel_waiting_in_batch(
        &mut self,
        batch_id: &str,
        reason: &str,
    ) -> Result<u64, StoreError> {
        let rows: Vec<(i64, u32, String, u32)> = {
            let mut stmt = self
                .conn
                .prepare_cached(sql::CANCEL_WAITING_IN_BATCH)
                .map_err(db_error("cancel batch items"))?;
            let rows = stmt
                .query_map(params![batch_id, self.now_ms, reason], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })
                .map_err(db_error("cancel batch items"))?;
            rows.collect::<Result<_, _>>()
                .map_err(db_error("cancel batch items"))?
        };

        let count = rows.len() as u64;
        for (job_id, seq, kind, attempts) in rows {
            self.job_changed(
                JobId(job_id),
                Touched {
                    batch_id: batch_id.to_owned(),
                    seq,
                    kind,
                },
                JobStatus::Cancelled,
                attempts,
                Some(reason.to_owned()),
                None,
            )?;
        }
        Ok(count)
    }

    /// Applies pending counter changes, derives each batch's status, writes
    /// the outbox row of every batch that finished, and settles the batches
    /// that waited on it. Repeats until nothing is left, because settling a
    /// dependent batch can finish it too.
    pub(crate) fn settle(&mut self) -> Result<(), StoreError> {
        while !self.deltas.is_empty() {
            let deltas: Vec<(String, Delta)> = self.deltas.drain().collect();
            for (batch_id, delta) in deltas {
                self.apply_delta(&batch_id, delta)?;
            }
        }
        Ok(())
    }

    fn apply_delta(&mut self, batch_id: &str, delta: Delta) -> Result<(), StoreError> {
        let row = self
            .conn
            .prepare_cached(sql::APPLY_COUNTERS)
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![
                        batch_id,
                        delta.succeeded,
                        delta.failed,
                        delta.cancelled,
                        self.now_ms
                    ],
                    |row| {
                        Ok(CounterRow {
                            owner: row.get(0)?,
                            kind: row.get(1)?,
                            counters: BatchCounters {
                                item_count: row.get::<_, i64>(2)? as u64,
                                succeeded: row.get::<_, i64>(3)? as u64,
                                failed: row.get::<_, i64>(4)? as u64,
                                cancelled: row.get::<_, i64>(5)? as u64,
                            },
                            started: row.get(6)?,
                            status: row.get(7)?,
                            generation: row.get(8)?,
                            correlation_id: row.get(9)?,
                            accepted: row.get(10)?,
                            revision: row.get::<_, i64>(11)? as u64,
                        })
                    },
                )
            })
            .map_err(db_error("update batch counters"))?;

        // A batch still being inserted has no final item count, so its
        // status is derived once it is accepted.
        if !row.accepted {
            return Ok(());
        }

        let old_status: BatchStatus = row.status.parse().map_err(|_| StoreError::Corrupt {
            what: "batch status",
            value: row.status.clone(),
        })?;
        let new_status = row.counters.status(row.started);
        let batch = parse_batch_id(batch_id)?;
        let owner = UserId(row.owner.clone());

        if new_status != old_status {
            // Leaving a terminal state (a re-drive) opens a new generation,
            // which may finish once more.
            let generation = if old_status.is_terminal() && !new_status.is_terminal() {
                row.generation + 1
            } else {
                row.generation
            };
            let finished_at = new_status.is_terminal().then_some(self.now_ms);
            self.conn
                .prepare_cached(sql::SET_BATCH_STATUS)
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        batch_id,
                        new_status.as_str(),
                        finished_at,
                        generation,
                        self.now_ms
                    ])
                })
                .map_err(db_error("update batch status"))?;

            if new_status.is_terminal() {
                self.batch_finished(batch, &row, new_status, generation)?;
            }
        }

        let progress = BatchProgress {
            batch_id: batch,
            owner,
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

    fn batch_finished(
        &mut self,
        batch_id: BatchId,
        row: &CounterRow,
        status: BatchStatus,
        generation: u32,
    ) -> Result<(), StoreError> {
        let event = BatchFinished {
            outbox_id: 0,
            batch_id,
            owner: UserId(row.owner.clone()),
            kind: row.kind.clone(),
            status,
            counters: row.counters,
            generation,
            correlation_id: row.correlation_id.clone(),
            finished_at: self.now,
            revision: row.revision,
        };
        let stored = serde_json::to_string(&event)
            .map_err(|source| StoreError::backend("encode outbox event", source))?;
        let id = batch_id.to_string();
        let inserted = self
            .conn
            .prepare_cached(sql::INSERT_OUTBOX)
            .and_then(|mut stmt| stmt.execute(params![id, generation, stored, self.now_ms]))
            .map_err(db_error("write batch outbox"))?;
        if inserted == 1 {
            let outbox_id = self.conn.last_insert_rowid();
            self.changes
                .finished
                .push(BatchFinished { outbox_id, ..event });
        }

        self.settle_dependent_batches(&id, status)
    }

    fn settle_dependent_batches(
        &mut self,
        batch_id: &str,
        status: BatchStatus,
    ) -> Result<(), StoreError> {
        let dependents: Vec<(String, i64)> = {
            let mut stmt = self
                .conn
                .prepare_cached(sql::BATCH_DEPENDENTS)
                .map_err(db_error("find dependent batches"))?;
            let rows = stmt
                .query_map([batch_id], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(db_error("find dependent batches"))?;
            rows.collect::<Result<_, _>>()
                .map_err(db_error("find dependent batches"))?
        };

        for (dependent, released_count) in dependents {
            if status == BatchStatus::Completed {
                self.conn
                    .prepare_cached(sql::DECREMENT_WAITING)
                    .and_then(|mut stmt| stmt.execute([&dependent]))
                    .map_err(db_error("release dependent batch"))?;
                // Items not yet released pick up the new waiting count when
                // they are.
                let unblocked = self
                    .conn
                    .prepare_cached(sql::UNBLOCK_RELEASED_ITEMS)
                    .and_then(|mut stmt| stmt.execute(params![dependent, released_count]))
                    .map_err(db_error("release dependent batch"))?;
                if unblocked > 0 {
                    let kind: String = self
                        .conn
                        .prepare_cached(sql::BATCH_KIND)
                        .and_then(|mut stmt| stmt.query_row([&dependent], |row| row.get(0)))
                        .map_err(db_error("read batch kind"))?;
                    self.mark_runnable(&kind);
                }
            } else {
                let reason = format!("dependency batch {batch_id} is {status}");
                self.cancel_waiting_in_batch(&dependent, &reason)?;
            }
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<ChangeSet, StoreError> {
        self.settle()?;
        Ok(self.changes)
    }
}

struct CounterRow {
    owner: String,
    kind: String,
    counters: BatchCounters,
    started: bool,
    status: String,
    generation: u32,
    correlation_id: Option<String>,
    accepted: bool,
    revision: u64,
}

pub(crate) fn parse_batch_id(id: &str) -> Result<BatchId, StoreError> {
    id.parse().map_err(|_| StoreError::Corrupt {
        what: "batch id",
        value: id.to_owned(),
    })
}

/// Encodes an attempt record for the `errors` JSON column.
pub(crate) fn encode_attempt(record: &AttemptRecord) -> Result<String, StoreError> {
    serde_json::to_string(record)
        .map_err(|source| StoreError::backend("encode attempt record", source))
}

pub(crate) fn millis_to_time(millis: Option<i64>) -> Option<DateTime<Utc>> {
    millis.map(from_millis)
}

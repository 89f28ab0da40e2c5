//! Read models and operator actions: [`AdminStore`] on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::{
    AdminStore, Batch, BatchFilter, BatchId, ChangeSet, DeadLetterFilter, ItemFilter, Job, JobId,
    JobStatus, KindControl, Page, PruneReport, PruneRequest, QueueDepth, RedriveReport,
    RedriveSelection, Scope, StoreError,
};
use rusqlite::{Connection, OptionalExtension, ToSql, params};

use crate::mutate::{Mutation, Touched};
use crate::{SqliteStore, db_error, read, sql, to_millis};

fn batch_of_job(conn: &Connection, scope: &Scope, id: JobId) -> Result<Batch, StoreError> {
    let batch_id: Option<String> = conn
        .prepare_cached("SELECT batch_id FROM jobs WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([id.0], |row| row.get(0)).optional())
        .map_err(db_error("read job"))?;
    let Some(batch_id) = batch_id else {
        return Err(StoreError::not_found("job", id));
    };
    let batch_id = crate::mutate::parse_batch_id(&batch_id)?;
    read::batch(conn, scope, batch_id).map_err(|error| match error {
        StoreError::NotFound { .. } => StoreError::not_found("job", id),
        other => other,
    })
}

fn dead_ids(
    conn: &Connection,
    scope: &Scope,
    filter: &DeadLetterFilter,
    limit: u32,
) -> Result<Vec<Job>, StoreError> {
    let mut query = format!(
        "SELECT {} FROM jobs j JOIN batches b ON b.id = j.batch_id
         WHERE j.status = 'dead' AND b.accepted = 1 AND j.id > ?1",
        read::job_columns("j.")
    );
    let cursor = filter.cursor.map_or(0, |id| id.0);
    let owner = scope.owner().map(|o| o.as_str().to_owned());
    let batch = filter.batch_id.map(|id| id.to_string());
    let mut values: Vec<&dyn ToSql> = vec![&cursor];
    if let Some(owner) = &owner {
        values.push(owner);
        query.push_str(&format!(" AND b.owner = ?{}", values.len()));
    }
    if let Some(kind) = &filter.kind {
        values.push(kind);
        query.push_str(&format!(" AND j.kind = ?{}", values.len()));
    }
    if let Some(batch) = &batch {
        values.push(batch);
        query.push_str(&format!(" AND j.batch_id = ?{}", values.len()));
    }
    query.push_str(&format!(" ORDER BY j.id LIMIT {}", limit));
    read::jobs(conn, &query, &values)
}

fn redrive_in(mutation: &mut Mutation<'_>, job_ids: &[JobId]) -> Result<Vec<JobId>, StoreError> {
    let mut redriven = Vec::new();
    for &job_id in job_ids {
        let row: Option<(String, u32, String, i64)> = mutation
            .conn
            .prepare_cached(sql::REDRIVE_JOB)
            .and_then(|mut stmt| {
                stmt.query_row(params![job_id.0, mutation.now_ms], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })
                .optional()
            })
            .map_err(db_error("re-drive job"))?;
        let Some((batch_id, seq, kind, blockers)) = row else {
            continue;
        };

        mutation.adjust_failed(&batch_id, -1);
        mutation
            .conn
            .prepare_cached(sql::CLEAR_CANCEL_REQUEST)
            .and_then(|mut stmt| stmt.execute([&batch_id]))
            .map_err(db_error("re-drive job"))?;
        let touched = Touched {
            batch_id,
            seq,
            kind: kind.clone(),
        };
        mutation.job_requeued(job_id, touched, JobStatus::Queued, 0, None, None)?;
        if blockers > 0 {
            // Still waiting for something: not runnable after all.
            mutation.changes.runnable_kinds.retain(|k| k != &kind);
        }
        redriven.push(job_id);
    }
    Ok(redriven)
}

#[async_trait]
impl AdminStore for SqliteStore {
    async fn get_batch(&self, scope: &Scope, id: BatchId) -> Result<Batch, StoreError> {
        let scope = scope.clone();
        self.read("read batch", move |conn| read::batch(conn, &scope, id))
            .await
    }

    async fn list_batches(
        &self,
        scope: &Scope,
        filter: BatchFilter,
    ) -> Result<Page<Batch>, StoreError> {
        let scope = scope.clone();
        let limit = domain::page_limit(filter.limit);
        self.read("list batches", move |conn| {
            let mut query = format!(
                "SELECT {} FROM batches WHERE accepted = 1",
                sql::BATCH_COLUMNS
            );
            let owner = scope.owner().map(|o| o.as_str().to_owned());
            let status = filter.status.map(|s| s.as_str());
            let cursor = filter.cursor.map(|id| id.to_string());
            let mut values: Vec<&dyn ToSql> = Vec::new();
            if let Some(owner) = &owner {
                values.push(owner);
                query.push_str(&format!(" AND owner = ?{}", values.len()));
            }
            if let Some(status) = &status {
                values.push(status);
                query.push_str(&format!(" AND status = ?{}", values.len()));
            }
            if let Some(kind) = &filter.kind {
                values.push(kind);
                query.push_str(&format!(" AND kind = ?{}", values.len()));
            }
            if let Some(cursor) = &cursor {
                values.push(cursor);
                query.push_str(&format!(" AND id < ?{}", values.len()));
            }
            query.push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));
            let batches = read::batches(conn, &query, &values)?;
            Ok(Page::from_rows(batches, limit, |b| b.id.to_string()))
        })
        .await
    }

    async fn list_items(
        &self,
        scope: &Scope,
        batch_id: BatchId,
        filter: ItemFilter,
    ) -> Result<Page<Job>, StoreError> {
        let scope = scope.clone();
        let limit = domain::page_limit(filter.limit);
        self.read("list batch items", move |conn| {
            read::batch(conn, &scope, batch_id)?;

            let id = batch_id.to_string();
            let after: i64 = filter.cursor.map_or(-1, i64::from);
            let status = filter.status.map(|s| s.as_str());
            let mut query = format!(
                "SELECT {} FROM jobs WHERE batch_id = ?1 AND seq > ?2",
                sql::JOB_COLUMNS
            );
            let mut values: Vec<&dyn ToSql> = vec![&id, &after];
            if let Some(status) = &status {
                values.push(status);
                query.push_str(" AND status = ?3");
            }
            query.push_str(&format!(" ORDER BY seq LIMIT {}", limit + 1));
            let jobs = read::jobs(conn, &query, &values)?;
            Ok(Page::from_rows(jobs, limit, |job| job.seq.to_string()))
        })
        .await
    }

    async fn get_job(&self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        let scope = scope.clone();
        self.read("read job", move |conn| {
            batch_of_job(conn, &scope, id)?;
            let query = format!("SELECT {} FROM jobs WHERE id = ?1", sql::JOB_COLUMNS);
            read::jobs(conn, &query, &[&id.0])?
                .pop()
                .ok_or_else(|| StoreError::not_found("job", id))
        })
        .await
    }

    async fn cancel_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(Batch, ChangeSet), StoreError> {
        let scope = scope.clone();
        let reason = reason.to_owned();
        self.writer()
            .write("cancel batch", false, move |conn| {
                let batch = read::batch(conn, &scope, id)?;
                if batch.status.is_terminal() {
                    return Err(StoreError::IllegalState {
                        entity: "batch",
                        id: id.to_string(),
                        state: batch.status.to_string(),
                        action: "cancelled",
                    });
                }

                let batch_id = id.to_string();
                let mut mutation = Mutation::new(conn, now);
                conn.prepare_cached(sql::REQUEST_CANCEL)
                    .and_then(|mut stmt| stmt.execute(params![batch_id, mutation.now_ms]))
                    .map_err(db_error("cancel batch"))?;
                mutation.cancel_waiting_in_batch(&batch_id, &reason)?;

                let running: Vec<i64> = {
                    let mut stmt = conn
                        .prepare_cached(sql::RUNNING_IN_BATCH)
                        .map_err(db_error("cancel batch"))?;
                    let rows = stmt
                        .query_map([&batch_id], |row| row.get(0))
                        .map_err(db_error("cancel batch"))?;
                    rows.collect::<Result<_, _>>()
                        .map_err(db_error("cancel batch"))?
                };
                mutation.touch_batch(&batch_id);
                let mut changes = mutation.finish()?;
                changes.cancel_running = running.into_iter().map(JobId).collect();
                Ok((read::batch(conn, &scope, id)?, changes))
            })
            .await
    }

    async fn retry_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        now: DateTime<Utc>,
    ) -> Result<(Batch, RedriveReport), StoreError> {
        let scope = scope.clone();
        self.writer()
            .write("retry batch", false, move |conn| {
                read::batch(conn, &scope, id)?;
                let dead: Vec<JobId> = {
                    let mut stmt = conn
                        .prepare_cached("SELECT id FROM jobs WHERE batch_id = ?1 AND status = 'dead' ORDER BY seq")
                        .map_err(db_error("retry batch"))?;
                    let rows = stmt
                        .query_map([id.to_string()], |row| row.get(0).map(JobId))
                        .map_err(db_error("retry batch"))?;
                    rows.collect::<Result<_, _>>().map_err(db_error("retry batch"))?
                };

                let mut mutation = Mutation::new(conn, now);
                let redriven = redrive_in(&mut mutation, &dead)?;
                let changes = mutation.finish()?;
                let batch = read::batch(conn, &scope, id)?;
                Ok((batch, RedriveReport { redriven, changes }))
            })
            .await
    }

    async fn list_dead(
        &self,
        scope: &Scope,
        filter: DeadLetterFilter,
    ) -> Result<Page<Job>, StoreError> {
        let scope = scope.clone();
        let limit = domain::page_limit(filter.limit);
        self.read("list dead letters", move |conn| {
            let jobs = dead_ids(conn, &scope, &filter, limit + 1)?;
            Ok(Page::from_rows(jobs, limit, |job| job.id.to_string()))
        })
        .await
    }

    async fn redrive(
        &self,
        scope: &Scope,
        selection: RedriveSelection,
        now: DateTime<Utc>,
    ) -> Result<RedriveReport, StoreError> {
        let scope = scope.clone();
        self.writer()
            .write("re-drive dead letters", false, move |conn| {
                let ids: Vec<JobId> = match selection {
                    RedriveSelection::Jobs(ids) => {
                        let mut visible = Vec::with_capacity(ids.len());
                        for id in ids {
                            match batch_of_job(conn, &scope, id) {
                                Ok(_) => visible.push(id),
                                Err(StoreError::NotFound { .. }) => {}
                                Err(other) => return Err(other),
                            }
                        }
                        visible
                    }
                    RedriveSelection::Matching(filter) => {
                        let limit = domain::page_limit(filter.limit);
                        dead_ids(conn, &scope, &filter, limit)?
                            .into_iter()
                            .map(|job| job.id)
                            .collect()
                    }
                };

                let mut mutation = Mutation::new(conn, now);
                let redriven = redrive_in(&mut mutation, &ids)?;
                Ok(RedriveReport {
                    redriven,
                    changes: mutation.finish()?,
                })
            })
            .await
    }

    async fn prune(&self, request: PruneRequest) -> Result<PruneReport, StoreError> {
        let completed_before = to_millis(request.completed_before);
        let failed_before = to_millis(request.failed_before);
        let limit = request.max_batches;
        let batch_ids: Vec<String> = self
            .read("find prunable batches", move |conn| {
                let mut stmt = conn
                    .prepare_cached(sql::PRUNABLE_BATCHES)
                    .map_err(db_error("find prunable batches"))?;
                let rows = stmt
                    .query_map(params![completed_before, failed_before, limit], |row| {
                        row.get(0)
                    })
                    .map_err(db_error("find prunable batches"))?;
                rows.collect::<Result<_, _>>()
                    .map_err(db_error("find prunable batches"))
            })
            .await?;

        let mut report = PruneReport::default();
        for batch_id in batch_ids {
            // Hidden first, so no read returns a batch whose jobs are half gone, and
            // start-up recovery deletes the rest if the process dies here.
            let id = batch_id.clone();
            self.writer()
                .write("hide pruned batch", false, move |conn| {
                    conn.prepare_cached(sql::HIDE_BATCH)
                        .and_then(|mut stmt| stmt.execute([id]))
                        .map_err(db_error("hide pruned batch"))
                })
                .await?;
            report.jobs += self.delete_batch_in_chunks(batch_id).await?;
            report.batches += 1;
        }
        Ok(report)
    }

    async fn set_kind_paused(
        &self,
        kind: &str,
        paused: bool,
        now: DateTime<Utc>,
    ) -> Result<KindControl, StoreError> {
        let kind = kind.to_owned();
        self.writer()
            .write("pause kind", false, move |conn| {
                conn.prepare_cached(sql::SET_KIND_PAUSED)
                    .and_then(|mut stmt| stmt.execute(params![kind, paused, to_millis(now)]))
                    .map_err(db_error("pause kind"))?;
                Ok(KindControl {
                    kind,
                    paused,
                    updated_at: now,
                })
            })
            .await
    }

    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError> {
        self.read("count queue depth", |conn| {
            // One query per state, each served by that state's partial
            // index, so the cost follows the live work and not the history.
            let queries: [(JobStatus, &str); 5] = [
                (
                    JobStatus::Queued,
                    "SELECT kind, count(*) FROM jobs WHERE status = 'queued' AND blockers = 0 GROUP BY kind",
                ),
                (
                    JobStatus::Processing,
                    "SELECT kind, count(*) FROM jobs WHERE status = 'processing' GROUP BY kind",
                ),
                (
                    JobStatus::Scheduled,
                    "SELECT kind, count(*) FROM jobs WHERE status IN ('scheduled', 'retrying') AND status = 'scheduled' GROUP BY kind",
                ),
                (
                    JobStatus::Retrying,
                    "SELECT kind, count(*) FROM jobs WHERE status IN ('scheduled', 'retrying') AND status = 'retrying' GROUP BY kind",
                ),
                (
                    JobStatus::Dead,
                    "SELECT kind, count(*) FROM jobs WHERE status = 'dead' GROUP BY kind",
                ),
            ];
            let mut depth = Vec::new();
            for (status, query) in queries {
                let mut stmt = conn.prepare_cached(query).map_err(db_error("count queue depth"))?;
                let rows = stmt
                    .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
                    .map_err(db_error("count queue depth"))?;
                for row in rows {
                    let (kind, count) = row.map_err(db_error("count queue depth"))?;
                    depth.push(QueueDepth {
                        kind,
                        status,
                        count: count.max(0) as u64,
                    });
                }
            }
            Ok(depth)
        })
        .await
    }
}

//! Read models and operator actions: [`AdminStore`] on PostgreSQL.

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use domain::{
    AdminStore, Batch, BatchFilter, BatchId, ChangeSet, DeadLetterFilter, ItemFilter, Job, JobId,
    KindControl, Page, PruneReport, PruneRequest, QueueDepth, RedriveReport, RedriveSelection,
    Scope, StoreError,
};
use tokio_postgres::types::ToSql;

use crate::mutate::{Mutation, Touched};
use crate::read::{self, column, to_millis};
use crate::write::Tx;
use crate::{PgStore, sql};

/// A query under construction whose parameters are numbered as they are
/// added.
struct Filtered<'a> {
    query: String,
    params: Vec<&'a (dyn ToSql + Sync)>,
}

impl<'a> Filtered<'a> {
    fn new(query: impl Into<String>) -> Self {
        Self {
            query: query.into(),
            params: Vec::new(),
        }
    }

    /// Appends `clause`, in which `{}` stands for the new parameter.
    fn and(&mut self, clause: &str, value: &'a (dyn ToSql + Sync)) {
        self.params.push(value);
        let placeholder = format!("${}", self.params.len());
        self.query.push_str(" AND ");
        self.query.push_str(&clause.replace("{}", &placeholder));
    }
}

async fn dead_jobs(
    client: &impl GenericClient,
    scope: &Scope,
    filter: &DeadLetterFilter,
    limit: u32,
) -> Result<Vec<Job>, StoreError> {
    let cursor = filter.cursor.map_or(0, |id| id.0);
    let owner = scope.owner().map(|owner| owner.as_str().to_owned());
    let batch = filter.batch_id.map(|id| id.to_string());

    let mut query = Filtered::new(format!(
        "SELECT {} FROM jobs j JOIN batches b ON b.id = j.batch_id
         WHERE j.status = 'dead' AND b.accepted",
        sql::job_columns!()
    ));
    query.and("j.id > {}", &cursor);
    if let Some(owner) = &owner {
        query.and("b.owner = {}", owner);
    }
    if let Some(kind) = &filter.kind {
        query.and("j.kind = {}", kind);
    }
    if let Some(batch) = &batch {
        query.and("j.batch_id = {}", batch);
    }
    query
        .query
        .push_str(&format!(" ORDER BY j.id LIMIT {limit}"));
    read::jobs(client, &query.query, &query.params).await
}

/// Sends dead jobs back to the queue with fresh attempts. Returns the ids
/// re-driven, in the order given.
async fn redrive_in(
    mutation: &mut Mutation<'_>,
    job_ids: &[JobId],
) -> Result<Vec<JobId>, StoreError> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted: Vec<i64> = job_ids.iter().map(|id| id.0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let rows = read::query(
        mutation.tx,
        "re-drive jobs",
        sql::REDRIVE_JOBS,
        &[&sorted, &mutation.now_ms],
    )
    .await?;
    let mut requeued: HashMap<i64, (i32, Touched)> = HashMap::with_capacity(rows.len());
    for row in &rows {
        requeued.insert(
            column(row, 0)?,
            (column(row, 1)?, Touched::from_row(row, 2)?),
        );
    }

    let mut redriven = Vec::with_capacity(requeued.len());
    let mut reopened = BTreeSet::new();
    for &job_id in job_ids {
        let Some((blockers, touched)) = requeued.remove(&job_id.0) else {
            continue;
        };
        mutation.adjust_failed(&touched.batch_id, -1);
        reopened.insert(touched.batch_id.clone());
        mutation.job_redriven(job_id, touched, blockers == 0)?;
        redriven.push(job_id);
    }

    for batch_id in &reopened {
        read::execute(
            mutation.tx,
            "re-drive jobs",
            sql::CLEAR_CANCEL_REQUEST,
            &[batch_id],
        )
        .await?;
    }
    Ok(redriven)
}

/// Input of `cancel_batch`'s transaction.
struct CancelInput<'a> {
    scope: &'a Scope,
    id: BatchId,
    reason: &'a str,
    now: DateTime<Utc>,
}

/// Flags the batch, cancels its waiting items and lists its running ones.
/// The batch row is locked first, so a worker returning a job to waiting
/// either reads the flag or commits before the waiting items are collected.
async fn cancel_in(tx: &Tx<'_>, input: &CancelInput<'_>) -> Result<(Batch, ChangeSet), StoreError> {
    let batch = read::batch(tx, input.scope, input.id, true).await?;
    if batch.status.is_terminal() {
        return Err(StoreError::IllegalState {
            entity: "batch",
            id: input.id.to_string(),
            state: batch.status.to_string(),
            action: "cancelled",
        });
    }

    let batch_id = input.id.to_string();
    let mut mutation = Mutation::new(tx, input.now);
    read::execute(
        tx,
        "cancel batch",
        sql::REQUEST_CANCEL,
        &[&batch_id, &mutation.now_ms],
    )
    .await?;
    mutation
        .cancel_waiting_in_batch(&batch_id, input.reason)
        .await?;

    let running = read::query(tx, "cancel batch", sql::RUNNING_IN_BATCH, &[&batch_id]).await?;
    let running = running
        .iter()
        .map(|row| column(row, 0).map(JobId))
        .collect::<Result<Vec<_>, _>>()?;
    mutation.touch_batch(&batch_id);
    let mut changes = mutation.finish().await?;
    changes.cancel_running = running;
    Ok((
        read::batch(tx, input.scope, input.id, false).await?,
        changes,
    ))
}

async fn retry_batch_in(
    tx: &Tx<'_>,
    input: &(Scope, BatchId, DateTime<Utc>),
) -> Result<(Batch, RedriveReport), StoreError> {
    let (scope, id, now) = input;
    read::batch(tx, scope, *id, false).await?;
    let dead = read::query(tx, "retry batch", sql::DEAD_IN_BATCH, &[&id.to_string()]).await?;
    let dead = dead
        .iter()
        .map(|row| column(row, 0).map(JobId))
        .collect::<Result<Vec<_>, _>>()?;

    let mut mutation = Mutation::new(tx, *now);
    let redriven = redrive_in(&mut mutation, &dead).await?;
    let changes = mutation.finish().await?;
    let batch = read::batch(tx, scope, *id, false).await?;
    Ok((batch, RedriveReport { redriven, changes }))
}

async fn redrive_selection_in(
    tx: &Tx<'_>,
    input: &(Scope, RedriveSelection, DateTime<Utc>),
) -> Result<RedriveReport, StoreError> {
    let (scope, selection, now) = input;
    let ids: Vec<JobId> = match selection {
        RedriveSelection::Jobs(ids) => {
            let requested: Vec<i64> = ids.iter().map(|id| id.0).collect();
            let owner = scope.owner().map(|owner| owner.as_str());
            let rows = read::query(
                tx,
                "re-drive dead letters",
                sql::VISIBLE_JOBS,
                &[&requested, &owner],
            )
            .await?;
            let visible = rows
                .iter()
                .map(|row| column::<i64>(row, 0))
                .collect::<Result<HashSet<_>, _>>()?;
            ids.iter()
                .copied()
                .filter(|id| visible.contains(&id.0))
                .collect()
        }
        RedriveSelection::Matching(filter) => {
            let limit = domain::page_limit(filter.limit);
            dead_jobs(tx, scope, filter, limit)
                .await?
                .into_iter()
                .map(|job| job.id)
                .collect()
        }
    };

    let mut mutation = Mutation::new(tx, *now);
    let redriven = redrive_in(&mut mutation, &ids).await?;
    Ok(RedriveReport {
        redriven,
        changes: mutation.finish().await?,
    })
}

/// Deletes one batch and its jobs if it is still prunable. Returns the
/// number of jobs deleted, or `None` when the batch was kept.
async fn prune_one_in(tx: &Tx<'_>, input: &(String, i64, i64)) -> Result<Option<u64>, StoreError> {
    let (batch_id, completed_before, failed_before) = input;
    let locked = read::query_opt(
        tx,
        "prune batch",
        sql::LOCK_PRUNABLE_BATCH,
        &[batch_id, completed_before, failed_before],
    )
    .await?;
    if locked.is_none() {
        return Ok(None);
    }
    let jobs = read::execute(tx, "prune batch", sql::DELETE_BATCH_JOBS, &[batch_id]).await?;
    read::execute(tx, "prune batch", sql::DELETE_BATCH, &[batch_id]).await?;
    Ok(Some(jobs))
}

async fn set_kind_paused_in(
    tx: &Tx<'_>,
    input: &(&str, bool, DateTime<Utc>),
) -> Result<KindControl, StoreError> {
    let (kind, paused, now) = *input;
    read::execute(
        tx,
        "pause kind",
        sql::SET_KIND_PAUSED,
        &[&kind, &paused, &to_millis(now)],
    )
    .await?;
    Ok(KindControl {
        kind: kind.to_owned(),
        paused,
        updated_at: now,
    })
}

#[async_trait]
impl AdminStore for PgStore {
    async fn get_batch(&self, scope: &Scope, id: BatchId) -> Result<Batch, StoreError> {
        let client = self.client("read batch").await?;
        read::batch(&client, scope, id, false).await
    }

    async fn list_batches(
        &self,
        scope: &Scope,
        filter: BatchFilter,
    ) -> Result<Page<Batch>, StoreError> {
        let limit = domain::page_limit(filter.limit);
        let owner = scope.owner().map(|owner| owner.as_str().to_owned());
        let status = filter.status.map(|status| status.as_str());
        let cursor = filter.cursor.map(|id| id.to_string());

        let mut query = Filtered::new(sql::LIST_BATCHES);
        if let Some(owner) = &owner {
            query.and("owner = {}", owner);
        }
        if let Some(status) = &status {
            query.and("status = {}", status);
        }
        if let Some(kind) = &filter.kind {
            query.and("kind = {}", kind);
        }
        if let Some(cursor) = &cursor {
            query.and("id < {}", cursor);
        }
        query
            .query
            .push_str(&format!(" ORDER BY id DESC LIMIT {}", limit + 1));

        let client = self.client("list batches").await?;
        let batches = read::batches(&client, &query.query, &query.params).await?;
        Ok(Page::from_rows(batches, limit, |batch| {
            batch.id.to_string()
        }))
    }

    async fn list_items(
        &self,
        scope: &Scope,
        batch_id: BatchId,
        filter: ItemFilter,
    ) -> Result<Page<Job>, StoreError> {
        let limit = domain::page_limit(filter.limit);
        let client = self.client("list batch items").await?;
        read::batch(&client, scope, batch_id, false).await?;

        let id = batch_id.to_string();
        let after: i32 = match filter.cursor {
            Some(cursor) => read::to_i32(cursor, "cursor")?,
            None => -1,
        };
        let status = filter.status.map(|status| status.as_str());
        let mut query = Filtered::new(format!(
            "SELECT {} FROM jobs j WHERE j.batch_id = $1",
            sql::job_columns!()
        ));
        query.params.push(&id);
        query.and("j.seq > {}", &after);
        if let Some(status) = &status {
            query.and("j.status = {}", status);
        }
        query
            .query
            .push_str(&format!(" ORDER BY j.seq LIMIT {}", limit + 1));

        let jobs = read::jobs(&client, &query.query, &query.params).await?;
        Ok(Page::from_rows(jobs, limit, |job| job.seq.to_string()))
    }

    async fn get_job(&self, scope: &Scope, id: JobId) -> Result<Job, StoreError> {
        let client = self.client("read job").await?;
        let row = read::query_opt(&client, "read job", sql::JOB_WITH_OWNER, &[&id.0])
            .await?
            .ok_or_else(|| StoreError::not_found("job", id))?;
        let owner: String = column(&row, 20)?;
        if !scope.allows(&domain::UserId(owner)) {
            return Err(StoreError::not_found("job", id));
        }
        read::job_from_row(&row)
    }

    async fn cancel_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(Batch, ChangeSet), StoreError> {
        let input = CancelInput {
            scope,
            id,
            reason,
            now,
        };
        self.write("cancel batch", &input, |tx, input| {
            Box::pin(cancel_in(tx, input))
        })
        .await
    }

    async fn retry_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        now: DateTime<Utc>,
    ) -> Result<(Batch, RedriveReport), StoreError> {
        self.write("retry batch", &(scope.clone(), id, now), |tx, input| {
            Box::pin(retry_batch_in(tx, input))
        })
        .await
    }

    async fn list_dead(
        &self,
        scope: &Scope,
        filter: DeadLetterFilter,
    ) -> Result<Page<Job>, StoreError> {
        let limit = domain::page_limit(filter.limit);
        let client = self.client("list dead letters").await?;
        let jobs = dead_jobs(&client, scope, &filter, limit + 1).await?;
        Ok(Page::from_rows(jobs, limit, |job| job.id.to_string()))
    }

    async fn redrive(
        &self,
        scope: &Scope,
        selection: RedriveSelection,
        now: DateTime<Utc>,
    ) -> Result<RedriveReport, StoreError> {
        self.write(
            "re-drive dead letters",
            &(scope.clone(), selection, now),
            |tx, input| Box::pin(redrive_selection_in(tx, input)),
        )
        .await
    }

    async fn prune(&self, request: PruneRequest) -> Result<PruneReport, StoreError> {
        let completed_before = to_millis(request.completed_before);
        let failed_before = to_millis(request.failed_before);
        let limit = i64::from(request.max_batches);
        let batch_ids = {
            let client = self.client("find prunable batches").await?;
            let rows = read::query(
                &client,
                "find prunable batches",
                sql::PRUNABLE_BATCHES,
                &[&completed_before, &failed_before, &limit],
            )
            .await?;
            rows.iter()
                .map(|row| column::<String>(row, 0))
                .collect::<Result<Vec<_>, _>>()?
        };

        // One transaction per batch keeps each one bounded. A batch
        // re-driven or pruned by another process meanwhile is skipped.
        let mut report = PruneReport::default();
        for batch_id in batch_ids {
            let input = (batch_id, completed_before, failed_before);
            let deleted = self
                .write("prune batch", &input, |tx, input| {
                    Box::pin(prune_one_in(tx, input))
                })
                .await?;
            if let Some(jobs) = deleted {
                report.batches += 1;
                report.jobs += jobs;
            }
        }
        Ok(report)
    }

    async fn set_kind_paused(
        &self,
        kind: &str,
        paused: bool,
        now: DateTime<Utc>,
    ) -> Result<KindControl, StoreError> {
        self.write("pause kind", &(kind, paused, now), |tx, input| {
            Box::pin(set_kind_paused_in(tx, input))
        })
        .await
    }

    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError> {
        let client = self.client("count queue depth").await?;
        let rows = read::query(&client, "count queue depth", sql::QUEUE_DEPTH, &[]).await?;
        rows.iter()
            .map(|row| {
                let status: String = column(row, 1)?;
                let count: i64 = column(row, 2)?;
                Ok(QueueDepth {
                    kind: column(row, 0)?,
                    status: status
                        .parse()
                        .map_err(|_| read::corrupt("job status", &status))?,
                    count: u64::try_from(count).unwrap_or(0),
                })
            })
            .collect()
    }
}

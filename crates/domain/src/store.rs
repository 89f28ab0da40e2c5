//! The store traits and the plain data they exchange.
//!
//! [`JobStore`] is what a worker needs on its hot path; [`AdminStore`] holds
//! the read models and the operator's actions. A backend implements both.
//! Every write returns a [`ChangeSet`] describing what it committed, so the
//! caller can publish events strictly after the state they describe is
//! durable.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::attempt::FailureKind;
use crate::batch::{Batch, BatchCounters, BatchStatus, NewBatch};
use crate::error::StoreError;
use crate::ids::{BatchId, JobId, LeaseOwner, UserId};
use crate::job::{ClaimedJob, Job, JobStatus, LeaseRef, NewJob};

/// Whose data a read or an action may touch. An owner scope that does not
/// match an entity's owner behaves exactly as if the entity did not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Owner(UserId),
    /// Operators see every owner's batches and dead letters.
    Admin,
}

impl Scope {
    pub fn allows(&self, owner: &UserId) -> bool {
        match self {
            Scope::Owner(user) => user == owner,
            Scope::Admin => true,
        }
    }

    /// Returns the owner to filter by, or `None` for an operator.
    pub fn owner(&self) -> Option<&UserId> {
        match self {
            Scope::Owner(user) => Some(user),
            Scope::Admin => None,
        }
    }
}

/// A job that another job waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DependencyRef {
    /// A job that already exists.
    Job(JobId),
    /// An earlier item of the same batch, by its 0-based position.
    Item(u32),
}

/// A batch whose items are being inserted. It is invisible to every read
/// and its items cannot be claimed until [`JobStore::commit_batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingBatch {
    pub id: BatchId,
    pub owner: UserId,
    pub kind: String,
    /// Items inserted so far; the next item gets this position.
    pub items_appended: u32,
}

/// Result of starting a batch.
#[derive(Debug, Clone)]
pub enum BeginOutcome {
    Started(StagingBatch),
    /// The idempotency key matched an accepted batch with the same request.
    Existing(Batch),
}

/// A request for up to `limit` runnable jobs of one kind.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub kind: String,
    pub owner: LeaseOwner,
    pub limit: u32,
    pub lease_until: DateTime<Utc>,
}

/// The result of one attempt as the worker observed it.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub lease: LeaseRef,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub kind: OutcomeKind,
}

/// The result of an attempt, already decided by the worker's retry policy.
#[derive(Debug, Clone)]
pub enum OutcomeKind {
    Succeeded {
        result: Option<Box<RawValue>>,
    },
    /// Run again at `run_at`. With `counts_attempt` false (a handler's
    /// "retry after"), the attempt is recorded but not counted.
    Retry {
        error: String,
        failure: FailureKind,
        run_at: DateTime<Utc>,
        counts_attempt: bool,
    },
    Dead {
        error: String,
        failure: FailureKind,
    },
    /// The handler stopped because its batch was cancelled.
    Cancelled {
        reason: String,
    },
    /// A processing rate limit held the job back before it ran; the attempt
    /// is not counted and nothing is added to its history.
    Deferred {
        run_at: DateTime<Utc>,
    },
    /// The worker is shutting down and gives the job back unrun.
    Released,
}

/// Whether an outcome was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutcomeResult {
    Applied(AppliedOutcome),
    /// The lease was no longer held (it expired and the job was reclaimed,
    /// or the job was cancelled); nothing was written.
    LeaseLost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedOutcome {
    pub job_id: JobId,
    pub status: JobStatus,
}

/// One job's state change inside a committed write, for events and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobChange {
    pub job_id: JobId,
    pub batch_id: BatchId,
    pub owner: UserId,
    pub kind: String,
    pub seq: u32,
    pub status: JobStatus,
    pub attempt: u32,
    pub error: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
}

/// A batch's counters after a committed write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchProgress {
    pub batch_id: BatchId,
    pub owner: UserId,
    pub kind: String,
    pub status: BatchStatus,
    #[serde(flatten)]
    pub counters: BatchCounters,
    pub correlation_id: Option<String>,
    /// How many counter updates the batch has had, this one included.
    /// Strictly increasing per batch across every process on the store,
    /// so a consumer can drop an update older than one it has seen.
    #[serde(default)]
    pub revision: u64,
}

/// A batch reaching a terminal state, as recorded in the outbox in the same
/// transaction. Delivered after commit; `outbox_id` lets a consumer drop a
/// repeat delivered after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchFinished {
    pub outbox_id: i64,
    pub batch_id: BatchId,
    pub owner: UserId,
    pub kind: String,
    pub status: BatchStatus,
    #[serde(flatten)]
    pub counters: BatchCounters,
    pub generation: u32,
    pub correlation_id: Option<String>,
    pub finished_at: DateTime<Utc>,
    /// The batch's revision at the update that finished it; see
    /// [`BatchProgress::revision`]. 0 in events recorded before revisions
    /// existed.
    #[serde(default)]
    pub revision: u64,
}

/// Everything a committed write changed that someone may want to hear of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub jobs: Vec<JobChange>,
    pub batches: Vec<BatchProgress>,
    pub finished: Vec<BatchFinished>,
    /// Kinds that gained runnable jobs, so idle workers can be woken.
    pub runnable_kinds: Vec<String>,
    /// Jobs still running whose batch was cancelled; their handlers should
    /// be signalled.
    pub cancel_running: Vec<JobId>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.batches.is_empty()
            && self.finished.is_empty()
            && self.runnable_kinds.is_empty()
            && self.cancel_running.is_empty()
    }

    /// Appends another change set, keeping the latest counters per batch.
    pub fn merge(&mut self, other: ChangeSet) {
        self.jobs.extend(other.jobs);
        for progress in other.batches {
            match self
                .batches
                .iter_mut()
                .find(|b| b.batch_id == progress.batch_id)
            {
                Some(existing) => *existing = progress,
                None => self.batches.push(progress),
            }
        }
        self.finished.extend(other.finished);
        for kind in other.runnable_kinds {
            if !self.runnable_kinds.contains(&kind) {
                self.runnable_kinds.push(kind);
            }
        }
        self.cancel_running.extend(other.cancel_running);
    }
}

/// A batch creation's result.
#[derive(Debug, Clone)]
pub struct CreatedBatch {
    pub batch: Batch,
    /// False when an idempotency key returned an earlier batch.
    pub created: bool,
    pub changes: ChangeSet,
}

/// A handler's progress report for a running job.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    pub lease: LeaseRef,
    pub progress: u8,
}

/// Due work moved from `scheduled` or `retrying` to `queued`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromoteReport {
    pub promoted: u64,
    pub runnable_kinds: Vec<String>,
    /// When the next scheduled or retrying job falls due, if any.
    pub next_due: Option<DateTime<Utc>>,
}

/// Expired leases taken back from workers that stopped heartbeating.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    pub requeued: u64,
    pub dead: u64,
    pub changes: ChangeSet,
}

/// Selection of the finished batches that retention removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneRequest {
    /// Completed batches that finished before this time.
    pub completed_before: DateTime<Utc>,
    /// Failed and cancelled batches that finished before this time; usually
    /// older than `completed_before`, so dead letters stay inspectable longer.
    pub failed_before: DateTime<Utc>,
    /// Most batches removed by one call.
    pub max_batches: u32,
}

/// Finished work removed by retention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub batches: u64,
    pub jobs: u64,
}

/// A page of a listing and the cursor for the next one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Largest page any listing returns.
pub const MAX_PAGE: u32 = 1_000;

/// Returns the page size for a requested `limit`: 100 when none was
/// given, never more than [`MAX_PAGE`].
pub fn page_limit(limit: u32) -> u32 {
    match limit {
        0 => 100,
        n => n.min(MAX_PAGE),
    }
}

impl<T> Page<T> {
    /// Builds a page from a listing read with one row more than `limit`:
    /// that extra row, when present, means another page follows, whose
    /// cursor is `cursor_of` the last item kept.
    pub fn from_rows(mut items: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> String) -> Self {
        let has_more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next_cursor = if has_more {
            items.last().map(cursor_of)
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

#[derive(Debug, Clone, Default)]
pub struct BatchFilter {
    pub status: Option<BatchStatus>,
    pub kind: Option<String>,
    /// Return batches created before this one (newest first).
    pub cursor: Option<BatchId>,
    pub limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct ItemFilter {
    pub status: Option<JobStatus>,
    /// Return items after this position.
    pub cursor: Option<u32>,
    pub limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub kind: Option<String>,
    pub batch_id: Option<BatchId>,
    /// Return dead jobs with an id greater than this one.
    pub cursor: Option<JobId>,
    pub limit: u32,
}

/// Selection of dead jobs to send back to the queue.
#[derive(Debug, Clone)]
pub enum RedriveSelection {
    Jobs(Vec<JobId>),
    /// Every dead job matching the filter, up to its limit.
    Matching(DeadLetterFilter),
}

#[derive(Debug, Clone, Default)]
pub struct RedriveReport {
    pub redriven: Vec<JobId>,
    pub changes: ChangeSet,
}

/// Whether workers may claim a kind, shared by every process on the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KindControl {
    pub kind: String,
    pub paused: bool,
    pub updated_at: DateTime<Utc>,
}

/// Number of jobs of one kind in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueDepth {
    pub kind: String,
    pub status: JobStatus,
    pub count: u64,
}

/// The worker's hot path.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Creates a batch and all its items. Nothing is visible or claimable
    /// until every item is durable; on error nothing remains.
    async fn create_batch(
        &self,
        batch: NewBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError>;

    /// Starts a batch whose items arrive in several parts, such as a
    /// streamed request body.
    async fn begin_batch(
        &self,
        batch: NewBatch,
        now: DateTime<Utc>,
    ) -> Result<BeginOutcome, StoreError>;

    /// Inserts the next items of a staging batch, in order.
    async fn append_items(
        &self,
        staging: &mut StagingBatch,
        items: Vec<NewJob>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// Makes a staging batch visible and its items claimable.
    async fn commit_batch(
        &self,
        staging: StagingBatch,
        now: DateTime<Utc>,
    ) -> Result<CreatedBatch, StoreError>;

    /// Deletes a staging batch and everything inserted for it.
    async fn abort_batch(&self, staging: StagingBatch) -> Result<(), StoreError>;

    /// Leases up to `request.limit` queued jobs of one kind, highest priority
    /// first, then oldest first.
    async fn claim(
        &self,
        request: ClaimRequest,
        now: DateTime<Utc>,
    ) -> Result<Vec<ClaimedJob>, StoreError>;

    /// Extends the given leases; returns the jobs whose lease is no longer
    /// held, so their handlers can be stopped.
    async fn heartbeat(
        &self,
        leases: &[LeaseRef],
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<JobId>, StoreError>;

    /// Records attempt outcomes, each fenced by its lease, in one transaction.
    async fn record_outcomes(
        &self,
        outcomes: Vec<AttemptOutcome>,
        now: DateTime<Utc>,
    ) -> Result<(Vec<OutcomeResult>, ChangeSet), StoreError>;

    /// Stores handlers' progress for jobs still leased by the reporter.
    async fn record_progress(&self, updates: Vec<ProgressUpdate>) -> Result<(), StoreError>;

    /// Moves scheduled and retrying jobs whose time has come to `queued`.
    async fn promote_due(&self, now: DateTime<Utc>) -> Result<PromoteReport, StoreError>;

    /// Takes back jobs whose lease expired: queued again if attempts remain,
    /// dead otherwise.
    async fn reap_expired_leases(&self, now: DateTime<Utc>) -> Result<ReapReport, StoreError>;

    /// Batch-finished events recorded but not yet acknowledged, oldest first.
    async fn pending_finishes(&self, limit: u32) -> Result<Vec<BatchFinished>, StoreError>;

    /// Marks batch-finished events as delivered.
    async fn ack_finishes(&self, outbox_ids: &[i64]) -> Result<(), StoreError>;

    /// Returns the kinds an operator has paused.
    async fn kind_controls(&self) -> Result<Vec<KindControl>, StoreError>;
}

/// Read models and operator actions.
#[async_trait]
pub trait AdminStore: Send + Sync + 'static {
    async fn get_batch(&self, scope: &Scope, id: BatchId) -> Result<Batch, StoreError>;

    /// Lists batches newest first.
    async fn list_batches(
        &self,
        scope: &Scope,
        filter: BatchFilter,
    ) -> Result<Page<Batch>, StoreError>;

    /// Lists a batch's items in submission order.
    async fn list_items(
        &self,
        scope: &Scope,
        batch_id: BatchId,
        filter: ItemFilter,
    ) -> Result<Page<Job>, StoreError>;

    async fn get_job(&self, scope: &Scope, id: JobId) -> Result<Job, StoreError>;

    /// Cancels every item that has not started and flags the running ones.
    async fn cancel_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<(Batch, ChangeSet), StoreError>;

    /// Sends a batch's dead items back to the queue with fresh attempts.
    async fn retry_batch(
        &self,
        scope: &Scope,
        id: BatchId,
        now: DateTime<Utc>,
    ) -> Result<(Batch, RedriveReport), StoreError>;

    /// Lists dead jobs, oldest first.
    async fn list_dead(
        &self,
        scope: &Scope,
        filter: DeadLetterFilter,
    ) -> Result<Page<Job>, StoreError>;

    /// Sends the selected dead jobs back to the queue with fresh attempts.
    async fn redrive(
        &self,
        scope: &Scope,
        selection: RedriveSelection,
        now: DateTime<Utc>,
    ) -> Result<RedriveReport, StoreError>;

    /// Deletes finished batches, with their jobs, that are past retention.
    async fn prune(&self, request: PruneRequest) -> Result<PruneReport, StoreError>;

    async fn set_kind_paused(
        &self,
        kind: &str,
        paused: bool,
        now: DateTime<Utc>,
    ) -> Result<KindControl, StoreError>;

    /// Counts jobs per kind and state.
    async fn queue_depth(&self) -> Result<Vec<QueueDepth>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_limit_defaults_and_caps() {
        assert_eq!(page_limit(0), 100);
        assert_eq!(page_limit(7), 7);
        assert_eq!(page_limit(MAX_PAGE + 1), MAX_PAGE);
    }

    #[test]
    fn page_with_extra_row_has_cursor() {
        let page = Page::from_rows(vec![1, 2, 3], 2, |n| n.to_string());
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next_cursor.as_deref(), Some("2"));

        let last = Page::from_rows(vec![1, 2], 2, |n| n.to_string());
        assert_eq!(last.items, vec![1, 2]);
        assert_eq!(last.next_cursor, None);
    }
}

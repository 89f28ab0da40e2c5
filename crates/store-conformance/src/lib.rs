//! The conformance suite of the store traits: every backend runs these
//! same checks, so SQLite and PostgreSQL cannot drift apart.
//!
//! Each check is an async function over any `JobStore + AdminStore`. A
//! backend's test file calls [`conformance_tests!`] with an expression that
//! opens a fresh, empty store; the macro expands to one `#[tokio::test]`
//! per check. Checks pass explicit times, so none of them sleeps.
//!
//! The suite assumes the backend inserts batches in chunks of at most 500
//! items, so the 1,200-item batches here take the multi-transaction path.
//!
//! The [`flags`] and [`ratelimit`] modules hold the suites of `FlagStore`
//! and `RateLimitStore`, run through [`flag_conformance_tests!`] and
//! [`rate_limit_conformance_tests!`].

#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed check"
)]

pub mod flags;
pub mod ratelimit;

use chrono::{DateTime, Duration, Utc};
use domain::{
    AdminStore, AttemptOutcome, BatchFilter, BatchId, BatchStatus, BeginOutcome, ClaimRequest,
    ClaimedJob, DeadLetterFilter, DependencyRef, FailureKind, ItemFilter, Job, JobId, JobStatus,
    JobStore, LeaseOwner, NewBatch, NewJob, OutcomeKind, OutcomeResult, PruneRequest,
    RedriveSelection, Scope, StoreError, UserId,
};

/// A store under test.
pub trait TestStore: JobStore + AdminStore {}
impl<T: JobStore + AdminStore> TestStore for T {}

/// Expands to one test per conformance check. `$open` is an async
/// expression returning a fresh store.
#[macro_export]
macro_rules! conformance_tests {
    ($open:expr) => {
        $crate::conformance_tests!(@each $open;
            small_batch_is_visible_with_counters,
            large_batch_is_inserted_in_chunks,
            staging_batch_is_invisible_until_commit,
            aborted_batch_leaves_nothing,
            empty_batch_is_rejected,
            idempotency_key_returns_the_same_batch,
            claim_takes_priority_then_age,
            claimed_job_is_not_claimed_twice,
            success_finishes_the_batch_once,
            stale_lease_cannot_record_an_outcome,
            retry_waits_for_its_run_at,
            retry_after_does_not_count_an_attempt,
            deferred_job_keeps_its_attempts,
            released_job_is_queued_again,
            dead_job_is_listed_and_redriven,
            retry_batch_requeues_dead_items,
            expired_lease_is_requeued_or_dead,
            heartbeat_extends_and_reports_lost_leases,
            cancel_batch_cancels_waiting_and_flags_running,
            item_dependency_chain_runs_in_order,
            dead_dependency_cancels_dependents,
            batch_dependency_waits_for_completion,
            failed_batch_dependency_cancels_dependent_batch,
            scheduled_batch_waits_for_run_at,
            prune_removes_only_old_finished_batches,
            other_owner_sees_nothing,
            listings_paginate_with_cursors,
            kind_pause_is_stored,
            queue_depth_counts_live_jobs,
            progress_is_stored_for_the_lease_holder,
        );
    };
    (@each $open:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let store = $open;
                $crate::$check(&store).await;
            }
        )*
    };
}

fn t0() -> DateTime<Utc> {
    // Milliseconds only, because stores keep times at that precision.
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

fn alice() -> UserId {
    UserId::new("alice")
}

fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).unwrap())
        .collect()
}

fn batch(kind: &str) -> NewBatch {
    NewBatch::new(alice(), kind)
}

async fn create<S: TestStore>(store: &S, new: NewBatch, n: usize, now: DateTime<Utc>) -> BatchId {
    let created = store.create_batch(new, items(n), now).await.unwrap();
    assert!(created.created);
    created.batch.id
}

async fn claim<S: TestStore>(
    store: &S,
    kind: &str,
    owner: &LeaseOwner,
    limit: u32,
    now: DateTime<Utc>,
) -> Vec<ClaimedJob> {
    store
        .claim(
            ClaimRequest {
                kind: kind.into(),
                owner: owner.clone(),
                limit,
                lease_until: now + Duration::seconds(30),
            },
            now,
        )
        .await
        .unwrap()
}

async fn record<S: TestStore>(
    store: &S,
    job: &ClaimedJob,
    kind: OutcomeKind,
    now: DateTime<Utc>,
) -> OutcomeResult {
    let outcome = AttemptOutcome {
        lease: job.lease.clone(),
        started_at: now,
        duration_ms: 5,
        kind,
    };
    let (mut results, _) = store.record_outcomes(vec![outcome], now).await.unwrap();
    results.pop().unwrap()
}

fn success() -> OutcomeKind {
    OutcomeKind::Succeeded { result: None }
}

fn retry_at(run_at: DateTime<Utc>) -> OutcomeKind {
    OutcomeKind::Retry {
        error: "upstream returned 503".into(),
        failure: FailureKind::Error,
        run_at,
        counts_attempt: true,
    }
}

fn dead() -> OutcomeKind {
    OutcomeKind::Dead {
        error: "upstream returned 400".into(),
        failure: FailureKind::Permanent,
    }
}

async fn all_items<S: TestStore>(store: &S, id: BatchId) -> Vec<Job> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_items(
                &Scope::Admin,
                id,
                ItemFilter {
                    status: None,
                    cursor,
                    limit: 1_000,
                },
            )
            .await
            .unwrap();
        out.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next.parse().unwrap()),
            None => return out,
        }
    }
}

async fn job<S: TestStore>(store: &S, id: JobId) -> Job {
    store.get_job(&Scope::Admin, id).await.unwrap()
}

/// Checks that a batch's counters equal the statuses of its jobs.
pub async fn assert_counters_match<S: TestStore>(store: &S, id: BatchId) {
    let batch = store.get_batch(&Scope::Admin, id).await.unwrap();
    let jobs = all_items(store, id).await;
    let count = |status| jobs.iter().filter(|j| j.status == status).count() as u64;
    assert_eq!(
        batch.counters.item_count,
        jobs.len() as u64,
        "item count of {id}"
    );
    assert_eq!(
        batch.counters.succeeded,
        count(JobStatus::Succeeded),
        "succeeded of {id}"
    );
    assert_eq!(
        batch.counters.failed,
        count(JobStatus::Dead),
        "failed of {id}"
    );
    assert_eq!(
        batch.counters.cancelled,
        count(JobStatus::Cancelled),
        "cancelled of {id}"
    );
}

pub async fn small_batch_is_visible_with_counters<S: TestStore>(store: &S) {
    let now = t0();
    let mut new = batch("noop");
    new.correlation_id = Some("corr-1".into());
    new.metadata = serde_json::json!({ "source": "test" });
    let id = create(store, new, 3, now).await;

    let got = store.get_batch(&Scope::Owner(alice()), id).await.unwrap();
    assert_eq!(got.status, BatchStatus::Pending);
    assert_eq!(got.counters.item_count, 3);
    assert_eq!(got.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(got.metadata["source"], "test");

    let jobs = all_items(store, id).await;
    assert_eq!(jobs.len(), 3);
    assert!(
        jobs.iter()
            .all(|j| j.status == JobStatus::Queued && j.blocked_by == 0)
    );
    assert_eq!(jobs[2].payload.get(), r#"{"n":2}"#);
    assert_counters_match(store, id).await;
}

pub async fn large_batch_is_inserted_in_chunks<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 1_200, now).await;
    let jobs = all_items(store, id).await;
    assert_eq!(jobs.len(), 1_200);
    assert!(jobs.iter().enumerate().all(|(i, j)| j.seq as usize == i));
    assert!(
        jobs.iter().all(|j| j.blocked_by == 0),
        "every item is released"
    );

    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 2_000, now).await;
    assert_eq!(claimed.len(), 1_200);
}

pub async fn staging_batch_is_invisible_until_commit<S: TestStore>(store: &S) {
    let now = t0();
    let new = batch("noop");
    let id = new.id;
    let BeginOutcome::Started(mut staging) = store.begin_batch(new, now).await.unwrap() else {
        panic!("a fresh batch must start staging");
    };
    store
        .append_items(&mut staging, items(10), now)
        .await
        .unwrap();

    let hidden = store.get_batch(&Scope::Admin, id).await;
    assert!(
        matches!(hidden, Err(StoreError::NotFound { .. })),
        "{hidden:?}"
    );
    let owner = LeaseOwner::unique("test");
    assert!(claim(store, "noop", &owner, 100, now).await.is_empty());
    let listed = store
        .list_batches(&Scope::Admin, BatchFilter::default())
        .await
        .unwrap();
    assert!(listed.items.is_empty());

    store
        .append_items(&mut staging, items(5), now)
        .await
        .unwrap();
    let created = store.commit_batch(staging, now).await.unwrap();
    assert_eq!(created.batch.counters.item_count, 15);
    assert_eq!(claim(store, "noop", &owner, 100, now).await.len(), 15);
}

pub async fn aborted_batch_leaves_nothing<S: TestStore>(store: &S) {
    let now = t0();
    let new = batch("noop");
    let id = new.id;
    let BeginOutcome::Started(mut staging) = store.begin_batch(new, now).await.unwrap() else {
        panic!("a fresh batch must start staging");
    };
    store
        .append_items(&mut staging, items(10), now)
        .await
        .unwrap();
    store.abort_batch(staging).await.unwrap();

    assert!(store.get_batch(&Scope::Admin, id).await.is_err());
    let owner = LeaseOwner::unique("test");
    assert!(claim(store, "noop", &owner, 100, now).await.is_empty());
    let depth = store.queue_depth().await.unwrap();
    assert!(depth.is_empty(), "{depth:?}");
}

pub async fn empty_batch_is_rejected<S: TestStore>(store: &S) {
    let result = store.create_batch(batch("noop"), Vec::new(), t0()).await;
    assert!(
        matches!(result, Err(StoreError::Invalid { field: "items", .. })),
        "{result:?}"
    );
}

pub async fn idempotency_key_returns_the_same_batch<S: TestStore>(store: &S) {
    let now = t0();
    let keyed = |digest: &str| {
        let mut new = batch("noop");
        new.idempotency_key = Some("key-1".into());
        new.request_digest = Some(digest.into());
        new
    };
    let first = store
        .create_batch(keyed("d1"), items(2), now)
        .await
        .unwrap();
    let second = store
        .create_batch(keyed("d1"), items(2), now)
        .await
        .unwrap();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.batch.id, second.batch.id);

    let mismatch = store.create_batch(keyed("d2"), items(2), now).await;
    assert!(
        matches!(mismatch, Err(StoreError::IdempotencyMismatch { .. })),
        "{mismatch:?}"
    );

    // Another owner may use the same key for a batch of their own.
    let mut other = keyed("d1");
    other.owner = UserId::new("bob");
    let third = store.create_batch(other, items(1), now).await.unwrap();
    assert!(third.created);
    assert_ne!(third.batch.id, first.batch.id);
}

pub async fn claim_takes_priority_then_age<S: TestStore>(store: &S) {
    let now = t0();
    let low = create(store, batch("noop"), 2, now).await;
    let mut urgent = batch("noop");
    urgent.priority = 5;
    let high = create(store, urgent, 2, now).await;
    create(store, batch("other"), 2, now).await;

    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 3, now).await;
    let order: Vec<(BatchId, u32)> = claimed.iter().map(|j| (j.batch_id, j.seq)).collect();
    assert_eq!(order, vec![(high, 0), (high, 1), (low, 0)]);
    assert!(claimed.iter().all(|j| j.kind == "noop" && j.attempt == 1));
    assert!(claimed.iter().all(|j| j.owner == alice()));

    let batch = store.get_batch(&Scope::Admin, high).await.unwrap();
    assert_eq!(batch.status, BatchStatus::Processing);
    assert!(batch.started_at.is_some());
}

pub async fn claimed_job_is_not_claimed_twice<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 5, now).await;
    let a = LeaseOwner::unique("a");
    let b = LeaseOwner::unique("b");
    let first = claim(store, "noop", &a, 3, now).await;
    let second = claim(store, "noop", &b, 10, now).await;
    assert_eq!(first.len(), 3);
    assert_eq!(second.len(), 2);
    let mut ids: Vec<JobId> = first.iter().chain(&second).map(|j| j.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);
}

pub async fn success_finishes_the_batch_once<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 2, now).await;
    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 10, now).await;

    let result = serde_json::value::to_raw_value(&serde_json::json!({ "ok": true })).unwrap();
    let first = record(
        store,
        &claimed[0],
        OutcomeKind::Succeeded {
            result: Some(result),
        },
        now,
    )
    .await;
    assert!(matches!(first, OutcomeResult::Applied(_)));
    assert!(store.pending_finishes(10).await.unwrap().is_empty());

    let outcome = AttemptOutcome {
        lease: claimed[1].lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: success(),
    };
    let (_, changes) = store.record_outcomes(vec![outcome], now).await.unwrap();
    assert_eq!(changes.finished.len(), 1);
    assert_eq!(changes.finished[0].status, BatchStatus::Completed);
    assert_eq!(changes.batches.last().unwrap().counters.succeeded, 2);

    let batch = store.get_batch(&Scope::Admin, id).await.unwrap();
    assert_eq!(batch.status, BatchStatus::Completed);
    assert!(batch.finished_at.is_some());
    let stored = job(store, claimed[0].id).await;
    assert_eq!(stored.result.unwrap().get(), r#"{"ok":true}"#);
    assert_eq!(stored.progress, 100);

    let pending = store.pending_finishes(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].batch_id, id);
    store.ack_finishes(&[pending[0].outbox_id]).await.unwrap();
    assert!(store.pending_finishes(10).await.unwrap().is_empty());

    // A repeated success changes nothing and writes no second event.
    let again = record(store, &claimed[1], success(), now).await;
    assert_eq!(again, OutcomeResult::LeaseLost);
    assert!(store.pending_finishes(10).await.unwrap().is_empty());
    assert_counters_match(store, id).await;
}

pub async fn stale_lease_cannot_record_an_outcome<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let mut claimed = claim(store, "noop", &owner, 1, now).await.remove(0);

    let mut forged = claimed.clone();
    forged.lease.owner = LeaseOwner::unique("intruder");
    assert_eq!(
        record(store, &forged, success(), now).await,
        OutcomeResult::LeaseLost
    );

    claimed.lease.attempt += 1;
    assert_eq!(
        record(store, &claimed, success(), now).await,
        OutcomeResult::LeaseLost
    );
    assert_eq!(job(store, claimed.id).await.status, JobStatus::Processing);
    assert_counters_match(store, id).await;
}

pub async fn retry_waits_for_its_run_at<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let first = claim(store, "noop", &owner, 1, now).await.remove(0);
    let later = now + Duration::seconds(2);
    assert!(matches!(
        record(store, &first, retry_at(later), now).await,
        OutcomeResult::Applied(_)
    ));

    let stored = job(store, first.id).await;
    assert_eq!(stored.status, JobStatus::Retrying);
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.errors.len(), 1);
    assert_eq!(stored.errors[0].kind, FailureKind::Error);
    assert_eq!(stored.last_error.as_deref(), Some("upstream returned 503"));

    assert!(claim(store, "noop", &owner, 1, now).await.is_empty());
    let early = store.promote_due(now + Duration::seconds(1)).await.unwrap();
    assert_eq!(early.promoted, 0);
    assert_eq!(early.next_due, Some(later));

    let due = store.promote_due(later).await.unwrap();
    assert_eq!(due.promoted, 1);
    assert_eq!(due.runnable_kinds, vec!["noop".to_string()]);
    let second = claim(store, "noop", &owner, 1, later).await.remove(0);
    assert_eq!(second.attempt, 2);
    assert_counters_match(store, id).await;
}

pub async fn retry_after_does_not_count_an_attempt<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let first = claim(store, "noop", &owner, 1, now).await.remove(0);
    let outcome = OutcomeKind::Retry {
        error: "upstream returned 429".into(),
        failure: FailureKind::RetryAfter,
        run_at: now,
        counts_attempt: false,
    };
    record(store, &first, outcome, now).await;

    let stored = job(store, first.id).await;
    assert_eq!(stored.attempts, 0);
    assert_eq!(stored.errors[0].kind, FailureKind::RetryAfter);
    store.promote_due(now).await.unwrap();
    assert_eq!(claim(store, "noop", &owner, 1, now).await[0].attempt, 1);
}

pub async fn deferred_job_keeps_its_attempts<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let first = claim(store, "noop", &owner, 1, now).await.remove(0);
    let run_at = now + Duration::seconds(6);
    record(store, &first, OutcomeKind::Deferred { run_at }, now).await;

    let stored = job(store, first.id).await;
    assert_eq!(stored.status, JobStatus::Scheduled);
    assert_eq!(stored.attempts, 0);
    assert!(stored.errors.is_empty());
    assert_eq!(stored.run_at, run_at);
}

pub async fn released_job_is_queued_again<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let first = claim(store, "noop", &owner, 1, now).await.remove(0);
    record(store, &first, OutcomeKind::Released, now).await;

    let stored = job(store, first.id).await;
    assert_eq!(stored.status, JobStatus::Queued);
    assert_eq!(stored.attempts, 0);
    assert!(stored.lease_owner.is_none());
    assert_eq!(claim(store, "noop", &owner, 1, now).await[0].attempt, 1);
}

pub async fn dead_job_is_listed_and_redriven<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 2, now).await;
    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 2, now).await;
    record(store, &claimed[0], dead(), now).await;
    let (_, changes) = store
        .record_outcomes(
            vec![AttemptOutcome {
                lease: claimed[1].lease.clone(),
                started_at: now,
                duration_ms: 1,
                kind: success(),
            }],
            now,
        )
        .await
        .unwrap();
    assert_eq!(changes.finished[0].status, BatchStatus::Failed);
    assert_eq!(changes.finished[0].generation, 0);

    let dead_letters = store
        .list_dead(&Scope::Owner(alice()), DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(dead_letters.items.len(), 1);
    let dead_job = &dead_letters.items[0];
    assert_eq!(dead_job.id, claimed[0].id);
    assert_eq!(dead_job.payload.get(), r#"{"n":0}"#);
    assert_eq!(dead_job.errors.len(), 1);
    assert_eq!(dead_job.errors[0].kind, FailureKind::Permanent);

    let report = store
        .redrive(
            &Scope::Admin,
            RedriveSelection::Jobs(vec![claimed[0].id]),
            now,
        )
        .await
        .unwrap();
    assert_eq!(report.redriven, vec![claimed[0].id]);
    let batch = store.get_batch(&Scope::Admin, id).await.unwrap();
    assert_eq!(batch.status, BatchStatus::Processing);
    assert_eq!(batch.counters.failed, 0);
    assert_eq!(batch.generation, 1);
    assert!(batch.finished_at.is_none());
    assert_counters_match(store, id).await;

    let again = claim(store, "noop", &owner, 1, now).await.remove(0);
    assert_eq!(again.attempt, 1);
    let outcome = AttemptOutcome {
        lease: again.lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: success(),
    };
    let (_, changes) = store.record_outcomes(vec![outcome], now).await.unwrap();
    assert_eq!(
        changes.finished.len(),
        1,
        "the new generation finishes once"
    );
    assert_eq!(changes.finished[0].status, BatchStatus::Completed);
    assert_eq!(changes.finished[0].generation, 1);
    assert!(
        store
            .list_dead(&Scope::Admin, DeadLetterFilter::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

pub async fn retry_batch_requeues_dead_items<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 3, now).await;
    let owner = LeaseOwner::unique("test");
    for job in claim(store, "noop", &owner, 3, now).await {
        record(store, &job, dead(), now).await;
    }
    assert_eq!(
        store.get_batch(&Scope::Admin, id).await.unwrap().status,
        BatchStatus::Failed
    );

    let (batch, report) = store
        .retry_batch(&Scope::Owner(alice()), id, now)
        .await
        .unwrap();
    assert_eq!(report.redriven.len(), 3);
    assert_eq!(batch.counters.failed, 0);
    assert_eq!(batch.status, BatchStatus::Processing);
    assert_eq!(claim(store, "noop", &owner, 10, now).await.len(), 3);
    assert_counters_match(store, id).await;
}

pub async fn expired_lease_is_requeued_or_dead<S: TestStore>(store: &S) {
    let now = t0();
    let mut new = batch("noop");
    new.max_attempts = 2;
    let id = create(store, new, 1, now).await;
    let crashed = LeaseOwner::unique("crashed");
    let first = claim(store, "noop", &crashed, 1, now).await.remove(0);

    let before_expiry = store
        .reap_expired_leases(now + Duration::seconds(29))
        .await
        .unwrap();
    assert_eq!(before_expiry.requeued, 0);
    let after_expiry = now + Duration::seconds(31);
    let reaped = store.reap_expired_leases(after_expiry).await.unwrap();
    assert_eq!(reaped.requeued, 1);
    assert_eq!(reaped.changes.runnable_kinds, vec!["noop".to_string()]);
    let stored = job(store, first.id).await;
    assert_eq!(stored.status, JobStatus::Queued);
    assert_eq!(stored.errors[0].kind, FailureKind::LeaseExpired);

    // The crashed worker comes back too late: its outcome is fenced off.
    assert_eq!(
        record(store, &first, success(), after_expiry).await,
        OutcomeResult::LeaseLost
    );

    let other = LeaseOwner::unique("survivor");
    let second = claim(store, "noop", &other, 1, after_expiry)
        .await
        .remove(0);
    assert_eq!(second.attempt, 2);
    let reaped = store
        .reap_expired_leases(after_expiry + Duration::seconds(31))
        .await
        .unwrap();
    assert_eq!(reaped.dead, 1, "no attempts left after the second expiry");
    assert_eq!(
        store.get_batch(&Scope::Admin, id).await.unwrap().status,
        BatchStatus::Failed
    );
    assert_counters_match(store, id).await;
}

pub async fn heartbeat_extends_and_reports_lost_leases<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 2, now).await;
    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 2, now).await;
    let leases: Vec<_> = claimed.iter().map(|j| j.lease.clone()).collect();

    let extended = now + Duration::seconds(60);
    assert!(store.heartbeat(&leases, extended).await.unwrap().is_empty());
    let reaped = store
        .reap_expired_leases(now + Duration::seconds(45))
        .await
        .unwrap();
    assert_eq!(reaped.requeued, 0, "extended leases do not expire");

    record(store, &claimed[0], success(), now).await;
    let lost = store.heartbeat(&leases, extended).await.unwrap();
    assert_eq!(lost, vec![claimed[0].id]);
}

pub async fn cancel_batch_cancels_waiting_and_flags_running<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 4, now).await;
    let owner = LeaseOwner::unique("test");
    let running = claim(store, "noop", &owner, 2, now).await;

    let (batch, changes) = store
        .cancel_batch(&Scope::Owner(alice()), id, "user asked", now)
        .await
        .unwrap();
    assert!(batch.cancel_requested);
    assert_eq!(batch.counters.cancelled, 2);
    assert_eq!(batch.status, BatchStatus::Processing);
    let mut flagged = changes.cancel_running.clone();
    flagged.sort();
    assert_eq!(flagged, vec![running[0].id, running[1].id]);

    // A running job that fails afterwards is cancelled, not retried.
    record(store, &running[0], retry_at(now), now).await;
    assert_eq!(job(store, running[0].id).await.status, JobStatus::Cancelled);
    let outcome = OutcomeKind::Cancelled {
        reason: "batch was cancelled".into(),
    };
    let result = AttemptOutcome {
        lease: running[1].lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: outcome,
    };
    let (_, changes) = store.record_outcomes(vec![result], now).await.unwrap();
    assert_eq!(changes.finished[0].status, BatchStatus::Cancelled);
    assert_counters_match(store, id).await;

    let again = store.cancel_batch(&Scope::Admin, id, "twice", now).await;
    assert!(
        matches!(again, Err(StoreError::IllegalState { .. })),
        "{again:?}"
    );
}

pub async fn item_dependency_chain_runs_in_order<S: TestStore>(store: &S) {
    let now = t0();
    let mut chain = items(3);
    chain[1].depends_on = vec![DependencyRef::Item(0)];
    chain[2].depends_on = vec![DependencyRef::Item(1)];
    let created = store.create_batch(batch("noop"), chain, now).await.unwrap();
    let owner = LeaseOwner::unique("test");

    for expected_seq in 0..3 {
        let claimed = claim(store, "noop", &owner, 10, now).await;
        assert_eq!(claimed.len(), 1, "only item {expected_seq} is runnable");
        assert_eq!(claimed[0].seq, expected_seq);
        let outcome = AttemptOutcome {
            lease: claimed[0].lease.clone(),
            started_at: now,
            duration_ms: 1,
            kind: success(),
        };
        let (_, changes) = store.record_outcomes(vec![outcome], now).await.unwrap();
        if expected_seq < 2 {
            assert_eq!(changes.runnable_kinds, vec!["noop".to_string()]);
        }
    }
    let batch = store
        .get_batch(&Scope::Admin, created.batch.id)
        .await
        .unwrap();
    assert_eq!(batch.status, BatchStatus::Completed);

    let forward = {
        let mut bad = items(2);
        bad[0].depends_on = vec![DependencyRef::Item(1)];
        store
            .create_batch(NewBatch::new(alice(), "noop"), bad, now)
            .await
    };
    assert!(
        matches!(forward, Err(StoreError::Invalid { .. })),
        "{forward:?}"
    );
}

pub async fn dead_dependency_cancels_dependents<S: TestStore>(store: &S) {
    let now = t0();
    let mut chain = items(3);
    chain[1].depends_on = vec![DependencyRef::Item(0)];
    chain[2].depends_on = vec![DependencyRef::Item(1)];
    let created = store.create_batch(batch("noop"), chain, now).await.unwrap();
    let owner = LeaseOwner::unique("test");
    let first = claim(store, "noop", &owner, 10, now).await.remove(0);

    let outcome = AttemptOutcome {
        lease: first.lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: dead(),
    };
    let (_, changes) = store.record_outcomes(vec![outcome], now).await.unwrap();
    let cancelled: Vec<u32> = changes
        .jobs
        .iter()
        .filter(|c| c.status == JobStatus::Cancelled)
        .map(|c| c.seq)
        .collect();
    assert_eq!(cancelled, vec![1, 2]);
    assert_eq!(changes.finished[0].status, BatchStatus::Failed);

    let jobs = all_items(store, created.batch.id).await;
    assert!(
        jobs[1]
            .last_error
            .as_deref()
            .unwrap()
            .contains(&first.id.to_string())
    );
    assert_counters_match(store, created.batch.id).await;

    // A new job that depends on the dead one is cancelled on arrival.
    let mut late = items(1);
    late[0].depends_on = vec![DependencyRef::Job(first.id)];
    let doomed = store.create_batch(batch("noop"), late, now).await.unwrap();
    assert_eq!(doomed.batch.status, BatchStatus::Cancelled);
}

pub async fn batch_dependency_waits_for_completion<S: TestStore>(store: &S) {
    let now = t0();
    let first = create(store, batch("first"), 2, now).await;
    let mut second = batch("second");
    second.depends_on = vec![first];
    let second = create(store, second, 1_200, now).await;

    let owner = LeaseOwner::unique("test");
    assert!(claim(store, "second", &owner, 10, now).await.is_empty());
    let jobs = claim(store, "first", &owner, 10, now).await;
    record(store, &jobs[0], success(), now).await;
    assert!(claim(store, "second", &owner, 10, now).await.is_empty());

    let outcome = AttemptOutcome {
        lease: jobs[1].lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: success(),
    };
    let (_, changes) = store.record_outcomes(vec![outcome], now).await.unwrap();
    assert!(changes.runnable_kinds.contains(&"second".to_string()));
    assert_eq!(
        claim(store, "second", &owner, 2_000, now).await.len(),
        1_200
    );
    assert_counters_match(store, second).await;

    let unknown = {
        let mut orphan = batch("second");
        orphan.depends_on = vec![BatchId::new()];
        store.create_batch(orphan, items(1), now).await
    };
    assert!(
        matches!(unknown, Err(StoreError::DependencyNotFound { .. })),
        "{unknown:?}"
    );
}

pub async fn failed_batch_dependency_cancels_dependent_batch<S: TestStore>(store: &S) {
    let now = t0();
    let first = create(store, batch("first"), 1, now).await;
    let mut second = batch("second");
    second.depends_on = vec![first];
    let second = create(store, second, 3, now).await;

    let owner = LeaseOwner::unique("test");
    let job = claim(store, "first", &owner, 1, now).await.remove(0);
    let outcome = AttemptOutcome {
        lease: job.lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind: dead(),
    };
    let (_, changes) = store.record_outcomes(vec![outcome], now).await.unwrap();
    let finished: Vec<(BatchId, BatchStatus)> = changes
        .finished
        .iter()
        .map(|f| (f.batch_id, f.status))
        .collect();
    assert!(finished.contains(&(first, BatchStatus::Failed)));
    assert!(finished.contains(&(second, BatchStatus::Cancelled)));
    assert_counters_match(store, second).await;

    let mut late = batch("second");
    late.depends_on = vec![first];
    let late = store.create_batch(late, items(2), now).await.unwrap();
    assert_eq!(late.batch.status, BatchStatus::Cancelled);
}

pub async fn scheduled_batch_waits_for_run_at<S: TestStore>(store: &S) {
    let now = t0();
    let mut new = batch("noop");
    let run_at = now + Duration::minutes(5);
    new.run_at = Some(run_at);
    let id = create(store, new, 2, now).await;

    let jobs = all_items(store, id).await;
    assert!(
        jobs.iter()
            .all(|j| j.status == JobStatus::Scheduled && j.run_at == run_at)
    );
    let owner = LeaseOwner::unique("test");
    assert!(claim(store, "noop", &owner, 10, now).await.is_empty());
    assert_eq!(store.promote_due(now).await.unwrap().next_due, Some(run_at));
    assert_eq!(store.promote_due(run_at).await.unwrap().promoted, 2);
    assert_eq!(claim(store, "noop", &owner, 10, run_at).await.len(), 2);
}

pub async fn prune_removes_only_old_finished_batches<S: TestStore>(store: &S) {
    let now = t0();
    let owner = LeaseOwner::unique("test");
    let old = create(store, batch("noop"), 2, now).await;
    for job in claim(store, "noop", &owner, 10, now).await {
        record(store, &job, success(), now).await;
    }
    let failed = create(store, batch("noop"), 1, now).await;
    for job in claim(store, "noop", &owner, 10, now).await {
        record(store, &job, dead(), now).await;
    }
    let open = create(store, batch("noop"), 1, now).await;

    let later = now + Duration::days(2);
    let report = store
        .prune(PruneRequest {
            completed_before: later,
            failed_before: now - Duration::days(1),
            max_batches: 10,
        })
        .await
        .unwrap();
    assert_eq!(report.batches, 1);
    assert_eq!(report.jobs, 2);
    assert!(store.get_batch(&Scope::Admin, old).await.is_err());
    assert!(
        store.get_batch(&Scope::Admin, failed).await.is_ok(),
        "failed batches are kept longer"
    );
    assert!(
        store.get_batch(&Scope::Admin, open).await.is_ok(),
        "unfinished batches are never pruned"
    );

    let report = store
        .prune(PruneRequest {
            completed_before: later,
            failed_before: later,
            max_batches: 10,
        })
        .await
        .unwrap();
    assert_eq!(report.batches, 1);
    assert!(
        store
            .list_dead(&Scope::Admin, DeadLetterFilter::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

pub async fn other_owner_sees_nothing<S: TestStore>(store: &S) {
    let now = t0();
    let id = create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let job = claim(store, "noop", &owner, 1, now).await.remove(0);
    record(store, &job, dead(), now).await;

    let mallory = Scope::Owner(UserId::new("mallory"));
    fn not_found<T>(result: Result<T, StoreError>) -> bool {
        matches!(result, Err(StoreError::NotFound { .. }))
    }
    assert!(not_found(store.get_batch(&mallory, id).await));
    assert!(not_found(store.get_job(&mallory, job.id).await));
    assert!(not_found(
        store.list_items(&mallory, id, ItemFilter::default()).await
    ));
    assert!(not_found(store.cancel_batch(&mallory, id, "no", now).await));
    assert!(not_found(store.retry_batch(&mallory, id, now).await));
    assert!(
        store
            .list_batches(&mallory, BatchFilter::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        store
            .list_dead(&mallory, DeadLetterFilter::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let report = store
        .redrive(&mallory, RedriveSelection::Jobs(vec![job.id]), now)
        .await
        .unwrap();
    assert!(report.redriven.is_empty());
    assert_eq!(job_status(store, job.id).await, JobStatus::Dead);
}

async fn job_status<S: TestStore>(store: &S, id: JobId) -> JobStatus {
    job(store, id).await.status
}

pub async fn listings_paginate_with_cursors<S: TestStore>(store: &S) {
    let now = t0();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(store, batch("noop"), 1, now).await);
    }
    create(store, NewBatch::new(UserId::new("bob"), "noop"), 1, now).await;

    let scope = Scope::Owner(alice());
    let first = store
        .list_batches(
            &scope,
            BatchFilter {
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        first.items.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[4], ids[3]]
    );
    let cursor = first.next_cursor.unwrap().parse().unwrap();
    let second = store
        .list_batches(
            &scope,
            BatchFilter {
                limit: 10,
                cursor: Some(cursor),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        second.items.iter().map(|b| b.id).collect::<Vec<_>>(),
        vec![ids[2], ids[1], ids[0]]
    );
    assert!(second.next_cursor.is_none());

    let by_status = store
        .list_batches(
            &scope,
            BatchFilter {
                status: Some(BatchStatus::Completed),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(by_status.items.is_empty());

    let id = create(store, batch("noop"), 5, now).await;
    let page = store
        .list_items(
            &scope,
            id,
            ItemFilter {
                status: None,
                cursor: Some(1),
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.items.iter().map(|j| j.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(page.next_cursor.as_deref(), Some("3"));
    let queued = store
        .list_items(
            &scope,
            id,
            ItemFilter {
                status: Some(JobStatus::Queued),
                cursor: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(queued.items.len(), 5);
}

pub async fn kind_pause_is_stored<S: TestStore>(store: &S) {
    let now = t0();
    store.set_kind_paused("fetch", true, now).await.unwrap();
    let controls = store.kind_controls().await.unwrap();
    assert_eq!(controls.len(), 1);
    assert!(controls[0].paused);
    store.set_kind_paused("fetch", false, now).await.unwrap();
    assert!(!store.kind_controls().await.unwrap()[0].paused);
}

pub async fn queue_depth_counts_live_jobs<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 3, now).await;
    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 2, now).await;
    record(store, &claimed[0], dead(), now).await;

    let depth = store.queue_depth().await.unwrap();
    let count = |status| {
        depth
            .iter()
            .find(|d| d.kind == "noop" && d.status == status)
            .map_or(0, |d| d.count)
    };
    assert_eq!(count(JobStatus::Queued), 1);
    assert_eq!(count(JobStatus::Processing), 1);
    assert_eq!(count(JobStatus::Dead), 1);
}

pub async fn progress_is_stored_for_the_lease_holder<S: TestStore>(store: &S) {
    let now = t0();
    create(store, batch("noop"), 1, now).await;
    let owner = LeaseOwner::unique("test");
    let claimed = claim(store, "noop", &owner, 1, now).await.remove(0);
    let update = domain::ProgressUpdate {
        lease: claimed.lease.clone(),
        progress: 40,
    };
    store.record_progress(vec![update]).await.unwrap();
    assert_eq!(job(store, claimed.id).await.progress, 40);

    let mut stale = claimed.lease.clone();
    stale.owner = LeaseOwner::unique("other");
    store
        .record_progress(vec![domain::ProgressUpdate {
            lease: stale,
            progress: 90,
        }])
        .await
        .unwrap();
    assert_eq!(job(store, claimed.id).await.progress, 40);
}

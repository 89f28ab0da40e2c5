//! Several stores with their own pools on one schema, standing in for
//! several batchd processes: claims, outcomes and reaping race each other,
//! and counters, claims and batch completion must stay exact.

#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test"
)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{
    AdminStore, AttemptOutcome, BatchFinished, BatchId, BatchStatus, ClaimRequest, ClaimedJob,
    FailureKind, ItemFilter, Job, JobId, JobStatus, JobStore, LeaseOwner, NewBatch, NewJob,
    OutcomeKind, OutcomeResult, Scope, UserId,
};
use postgres_store::{PgConfig, PgStore, testing};
use store_conformance::assert_counters_match;

/// Upper bound on each test's concurrent phase.
const TIME_LIMIT: Duration = Duration::from_secs(120);

fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).unwrap())
        .collect()
}

/// Connects `count` stores to one fresh schema, each with a small pool of
/// its own.
async fn processes(count: usize) -> (PgConfig, Vec<PgStore>) {
    let mut config = testing::isolated_config();
    config.pool_size = 4;
    let mut stores = Vec::with_capacity(count);
    for _ in 0..count {
        stores.push(PgStore::connect(config.clone()).await.unwrap());
    }
    (config, stores)
}

async fn all_items(store: &PgStore, id: BatchId) -> Vec<Job> {
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

fn outcome(job: &ClaimedJob, kind: OutcomeKind, now: DateTime<Utc>) -> AttemptOutcome {
    AttemptOutcome {
        lease: job.lease.clone(),
        started_at: now,
        duration_ms: 1,
        kind,
    }
}

/// Claims, outcome results and finish events one worker task observed.
#[derive(Default)]
struct WorkerLog {
    claimed: Vec<(JobId, u32)>,
    results: Vec<OutcomeResult>,
    finished: Vec<BatchFinished>,
}

/// Claims until the kind has nothing left and records a success for every
/// job claimed.
async fn succeed_until_empty(store: PgStore, kind: &'static str, label: String) -> WorkerLog {
    let owner = LeaseOwner::unique(&label);
    let mut log = WorkerLog::default();
    loop {
        let now = now_ms();
        let claimed = store
            .claim(
                ClaimRequest {
                    kind: kind.into(),
                    owner: owner.clone(),
                    limit: 25,
                    lease_until: now + chrono::Duration::minutes(5),
                },
                now,
            )
            .await
            .unwrap();
        if claimed.is_empty() {
            return log;
        }
        let outcomes = claimed
            .iter()
            .map(|job| outcome(job, OutcomeKind::Succeeded { result: None }, now))
            .collect();
        let (results, changes) = store.record_outcomes(outcomes, now).await.unwrap();
        log.claimed
            .extend(claimed.iter().map(|job| (job.id, job.attempt)));
        log.results.extend(results);
        log.finished.extend(changes.finished);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_job_claimed_once_across_processes() {
    const ITEMS: usize = 3_000;
    let (_, stores) = processes(4).await;
    let created = stores[0]
        .create_batch(
            NewBatch::new(UserId::new("alice"), "bulk"),
            items(ITEMS),
            now_ms(),
        )
        .await
        .unwrap();
    let id = created.batch.id;

    let mut workers = Vec::new();
    for (process, store) in stores.iter().enumerate() {
        for task in 0..2 {
            let label = format!("p{process}-t{task}");
            workers.push(tokio::spawn(succeed_until_empty(
                store.clone(),
                "bulk",
                label,
            )));
        }
    }
    let logs = tokio::time::timeout(TIME_LIMIT, futures_join(workers))
        .await
        .expect("workers finish within the time limit");

    let mut claimed: Vec<JobId> = Vec::new();
    let mut finished: Vec<BatchFinished> = Vec::new();
    for log in logs {
        for result in &log.results {
            assert!(
                matches!(result, OutcomeResult::Applied(applied) if applied.status == JobStatus::Succeeded),
                "{result:?}"
            );
        }
        claimed.extend(log.claimed.iter().map(|(id, _)| *id));
        finished.extend(log.finished);
    }
    let unique: HashSet<JobId> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), ITEMS, "claims in all");
    assert_eq!(unique.len(), ITEMS, "distinct jobs claimed");

    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].batch_id, id);
    assert_eq!(finished[0].status, BatchStatus::Completed);
    assert_eq!(finished[0].counters.succeeded, ITEMS as u64);

    let jobs = all_items(&stores[1], id).await;
    assert_eq!(jobs.len(), ITEMS);
    for job in &jobs {
        assert_eq!(job.status, JobStatus::Succeeded, "job {}", job.id);
        assert_eq!(job.attempts, 1, "job {}", job.id);
    }
    let batch = stores[2].get_batch(&Scope::Admin, id).await.unwrap();
    assert_eq!(batch.status, BatchStatus::Completed);
    assert_eq!(batch.counters.succeeded, ITEMS as u64);
    assert_counters_match(&stores[3], id).await;

    let outbox = stores[0].pending_finishes(100).await.unwrap();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    assert_eq!(outbox[0].batch_id, id);
}

/// Works through several batches with retries: a job's first attempt
/// fails in one case out of four and runs again once promoted.
async fn work_with_retries(store: PgStore, label: String, batches: Vec<BatchId>) -> WorkerLog {
    let owner = LeaseOwner::unique(&label);
    let mut log = WorkerLog::default();
    loop {
        let now = now_ms();
        store.promote_due(now).await.unwrap();
        let claimed = store
            .claim(
                ClaimRequest {
                    kind: "mixed".into(),
                    owner: owner.clone(),
                    limit: 40,
                    lease_until: now + chrono::Duration::minutes(5),
                },
                now,
            )
            .await
            .unwrap();
        if claimed.is_empty() {
            let mut open = 0;
            for id in &batches {
                let batch = store.get_batch(&Scope::Admin, *id).await.unwrap();
                if !batch.status.is_terminal() {
                    open += 1;
                }
            }
            if open == 0 {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }

        // Reversed, so outcome groups name their jobs and batches in
        // descending order and the store has to sort them.
        let outcomes = claimed
            .iter()
            .rev()
            .map(|job| {
                let kind = if job.attempt == 1 && job.seq % 4 == 0 {
                    OutcomeKind::Retry {
                        error: "upstream returned 503".into(),
                        failure: FailureKind::Error,
                        run_at: now,
                        counts_attempt: true,
                    }
                } else {
                    OutcomeKind::Succeeded { result: None }
                };
                outcome(job, kind, now)
            })
            .collect();
        let (results, changes) = store.record_outcomes(outcomes, now).await.unwrap();
        log.claimed
            .extend(claimed.iter().map(|job| (job.id, job.attempt)));
        log.results.extend(results);
        log.finished.extend(changes.finished);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_across_batches_keep_counters_exact() {
    const BATCHES: usize = 3;
    const ITEMS: usize = 400;
    let (_, stores) = processes(3).await;
    let mut batches = Vec::new();
    for _ in 0..BATCHES {
        let created = stores[0]
            .create_batch(
                NewBatch::new(UserId::new("alice"), "mixed"),
                items(ITEMS),
                now_ms(),
            )
            .await
            .unwrap();
        batches.push(created.batch.id);
    }

    let mut workers = Vec::new();
    for (process, store) in stores.iter().enumerate() {
        for task in 0..2 {
            let label = format!("p{process}-t{task}");
            workers.push(tokio::spawn(work_with_retries(
                store.clone(),
                label,
                batches.clone(),
            )));
        }
    }
    let logs = tokio::time::timeout(TIME_LIMIT, futures_join(workers))
        .await
        .expect("workers finish within the time limit");

    let mut attempts_claimed: HashSet<(JobId, u32)> = HashSet::new();
    let mut finished: Vec<BatchFinished> = Vec::new();
    for log in logs {
        assert!(
            log.results
                .iter()
                .all(|result| matches!(result, OutcomeResult::Applied(_))),
            "every outcome of a held lease applies"
        );
        for claim in log.claimed {
            assert!(
                attempts_claimed.insert(claim),
                "attempt claimed twice: {claim:?}"
            );
        }
        finished.extend(log.finished);
    }

    let mut finishes_per_batch: HashMap<BatchId, usize> = HashMap::new();
    for event in &finished {
        *finishes_per_batch.entry(event.batch_id).or_default() += 1;
        assert_eq!(event.status, BatchStatus::Completed);
    }
    for id in &batches {
        assert_eq!(
            finishes_per_batch.get(id),
            Some(&1),
            "finishes of batch {id}"
        );

        let jobs = all_items(&stores[1], *id).await;
        assert_eq!(jobs.len(), ITEMS);
        for job in &jobs {
            assert_eq!(job.status, JobStatus::Succeeded, "job {}", job.id);
            let expected_attempts = if job.seq % 4 == 0 { 2 } else { 1 };
            assert_eq!(
                job.attempts, expected_attempts,
                "job {} (item {})",
                job.id, job.seq
            );
        }
        assert_counters_match(&stores[2], *id).await;
    }
    assert_eq!(
        stores[0].pending_finishes(100).await.unwrap().len(),
        BATCHES
    );
}

/// Kinds of the race test, one batch each, so every claim group spans
/// three batches.
const RACE_KINDS: [&str; 3] = ["race-0", "race-1", "race-2"];

/// Lease expiry of claim group `group`: groups expire 100 ms apart.
fn race_expiry(t0: DateTime<Utc>, group: usize) -> DateTime<Utc> {
    t0 + chrono::Duration::seconds(30) + chrono::Duration::milliseconds(100 * group as i64)
}

/// Reaps with a clock that moves over the groups' expiries, then once
/// with every lease expired. Returns the jobs it requeued and killed.
async fn reap_forward(reaper: PgStore, t0: DateTime<Utc>, groups: usize) -> (u64, u64) {
    let mut requeued = 0;
    let mut dead = 0;
    for group in 0..groups {
        let now = race_expiry(t0, group) + chrono::Duration::milliseconds(1);
        let report = reaper.reap_expired_leases(now).await.unwrap();
        requeued += report.requeued;
        dead += report.dead;
    }
    let report = reaper
        .reap_expired_leases(race_expiry(t0, groups))
        .await
        .unwrap();
    (requeued + report.requeued, dead + report.dead)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reaper_worker_race_has_one_winner() {
    const GROUPS: usize = 30;
    const PER_KIND: u32 = 3;
    let (_, stores) = processes(3).await;
    let worker = stores[0].clone();
    let t0 = now_ms();
    let mut batches = Vec::new();
    for kind in RACE_KINDS {
        let items = items(GROUPS * PER_KIND as usize);
        let created = worker
            .create_batch(NewBatch::new(UserId::new("alice"), kind), items, t0)
            .await
            .unwrap();
        batches.push(created.batch.id);
    }

    let owner = LeaseOwner::unique("slow-worker");
    let mut groups: Vec<Vec<ClaimedJob>> = Vec::new();
    for group in 0..GROUPS {
        let mut jobs = Vec::new();
        for kind in RACE_KINDS {
            let request = ClaimRequest {
                kind: kind.into(),
                owner: owner.clone(),
                limit: PER_KIND,
                lease_until: race_expiry(t0, group),
            };
            jobs.extend(worker.claim(request, t0).await.unwrap());
        }
        assert_eq!(jobs.len(), RACE_KINDS.len() * PER_KIND as usize);
        groups.push(jobs);
    }
    let total = GROUPS * RACE_KINDS.len() * PER_KIND as usize;

    // The worker records the latest-expiring groups first while two
    // reapers in other processes take expired leases from the earliest
    // on, so both sides meet on the same jobs. The worker acts when every
    // lease has expired, so any job the reapers have not taken yet is its.
    let late = race_expiry(t0, GROUPS);
    let recording = tokio::spawn(async move {
        let mut results: Vec<(JobId, OutcomeResult)> = Vec::new();
        for group in groups.iter().rev() {
            let outcomes = group
                .iter()
                .map(|job| outcome(job, OutcomeKind::Succeeded { result: None }, late))
                .collect();
            let (outcome_results, _) = worker.record_outcomes(outcomes, late).await.unwrap();
            results.extend(group.iter().map(|job| job.id).zip(outcome_results));
        }
        results
    });
    let reapers = [
        tokio::spawn(reap_forward(stores[1].clone(), t0, GROUPS)),
        tokio::spawn(reap_forward(stores[2].clone(), t0, GROUPS)),
    ];
    let (results, reaped) = tokio::time::timeout(TIME_LIMIT, async {
        (recording.await.unwrap(), futures_join(reapers.into()).await)
    })
    .await
    .expect("the race ends within the time limit");

    let requeued: u64 = reaped.iter().map(|(requeued, _)| requeued).sum();
    let dead: u64 = reaped.iter().map(|(_, dead)| dead).sum();
    assert_eq!(dead, 0, "attempts were left, so nothing died");
    assert_eq!(results.len(), total);

    let store = &stores[1];
    let mut worker_won = 0u64;
    for (job_id, result) in &results {
        let job = store.get_job(&Scope::Admin, *job_id).await.unwrap();
        match result {
            OutcomeResult::Applied(applied) => {
                worker_won += 1;
                assert_eq!(applied.status, JobStatus::Succeeded);
                assert_eq!(job.status, JobStatus::Succeeded, "job {job_id}");
                assert!(job.errors.is_empty(), "job {job_id}: {:?}", job.errors);
            }
            OutcomeResult::LeaseLost => {
                assert_eq!(job.status, JobStatus::Queued, "job {job_id}");
                assert_eq!(job.errors.len(), 1, "job {job_id}");
                assert_eq!(job.errors[0].kind, FailureKind::LeaseExpired);
            }
        }
    }
    eprintln!("worker won {worker_won} jobs, reapers won {requeued}");
    assert_eq!(
        worker_won + requeued,
        total as u64,
        "each job went to exactly one side"
    );

    let mut succeeded = 0;
    for id in &batches {
        assert_counters_match(store, *id).await;
        let batch = store.get_batch(&Scope::Admin, *id).await.unwrap();
        succeeded += batch.counters.succeeded;
        let expected = if batch.counters.succeeded == batch.counters.item_count {
            BatchStatus::Completed
        } else {
            BatchStatus::Processing
        };
        assert_eq!(batch.status, expected, "batch {id}");
    }
    assert_eq!(succeeded, worker_won);
    let outbox = store.pending_finishes(100).await.unwrap();
    assert!(
        outbox
            .iter()
            .all(|event| event.status == BatchStatus::Completed),
        "{outbox:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dependency_added_while_its_job_finishes() {
    const JOBS: usize = 40;
    let (_, stores) = processes(2).await;
    let (worker, creator) = (stores[0].clone(), stores[1].clone());
    let now = now_ms();
    worker
        .create_batch(
            NewBatch::new(UserId::new("alice"), "upstream"),
            items(JOBS),
            now,
        )
        .await
        .unwrap();
    let claimed = worker
        .claim(
            ClaimRequest {
                kind: "upstream".into(),
                owner: LeaseOwner::unique("upstream-worker"),
                limit: JOBS as u32,
                lease_until: now + chrono::Duration::minutes(5),
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), JOBS);

    // Each job's outcome races the creation of a batch that depends on
    // it; even jobs succeed and odd ones die.
    let mut races = Vec::new();
    for (index, job) in claimed.into_iter().enumerate() {
        let (worker, creator) = (worker.clone(), creator.clone());
        races.push(tokio::spawn(async move {
            let kind = if index % 2 == 0 {
                OutcomeKind::Succeeded { result: None }
            } else {
                OutcomeKind::Dead {
                    error: "upstream returned 400".into(),
                    failure: FailureKind::Permanent,
                }
            };
            let mut dependent = items(1);
            dependent[0].depends_on = vec![domain::DependencyRef::Job(job.id)];
            let new = NewBatch::new(UserId::new("alice"), "downstream");
            let (recorded, created) = tokio::join!(
                worker.record_outcomes(vec![outcome(&job, kind, now)], now),
                creator.create_batch(new, dependent, now),
            );
            assert!(matches!(recorded.unwrap().0[0], OutcomeResult::Applied(_)));
            (index, job.id, created.unwrap().batch.id)
        }));
    }
    let races = tokio::time::timeout(TIME_LIMIT, futures_join(races))
        .await
        .expect("the races end within the time limit");

    for (index, dependency, batch_id) in races {
        let jobs = all_items(&creator, batch_id).await;
        let job = &jobs[0];
        if index % 2 == 0 {
            assert_eq!(job.status, JobStatus::Queued, "dependent of {dependency}");
            assert_eq!(job.blocked_by, 0, "dependent of {dependency}");
        } else {
            assert_eq!(
                job.status,
                JobStatus::Cancelled,
                "dependent of {dependency}"
            );
            let batch = creator.get_batch(&Scope::Admin, batch_id).await.unwrap();
            assert_eq!(batch.status, BatchStatus::Cancelled, "batch {batch_id}");
        }
        assert_counters_match(&creator, batch_id).await;
    }
}

/// Awaits every task and returns their outputs in order.
async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.expect("task completes without panicking"));
    }
    outputs
}

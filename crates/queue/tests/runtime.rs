//! The worker runtime against a real SQLite store: retries, dead letters,
//! dependencies, cancellation, rate limits, pausing, shutdown and events.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use domain::{
    AdminStore, BatchStatus, DeadLetterFilter, DependencyRef, FailureKind, JobId, JobStatus,
    JobStore, NewJob, RedriveSelection, Scope,
};
use queue::{FnHandler, HandlerError, JobContext, JobHandler, KindConfig, Queue, QueueEvent, Rate};

fn noop() -> impl JobHandler {
    FnHandler(|_job: JobContext| std::future::ready(Ok(None)))
}

#[tokio::test]
async fn batch_runs_to_completion_with_exact_counters() {
    let path = temp_db();
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("noop", noop(), KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "noop", 2_000).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(30)).await;

    assert_eq!(finished.status, BatchStatus::Completed);
    assert_eq!(finished.counters.succeeded, 2_000);
    let counts = statuses(&queue, batch).await;
    assert_eq!(counts.get(&JobStatus::Succeeded), Some(&2_000));
    queue.shutdown().await;
}

#[tokio::test]
async fn failing_job_retries_with_backoff_then_succeeds() {
    let path = temp_db();
    let calls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = calls.clone();
    let handler = FnHandler(move |_job: JobContext| {
        let seen = seen.clone();
        async move {
            let mut calls = seen.lock().unwrap();
            calls.push(Instant::now());
            if calls.len() < 3 {
                Err(HandlerError::retryable("upstream returned 503"))
            } else {
                Ok(None)
            }
        }
    });
    let config = KindConfig {
        retry: fast_retry(4),
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("flaky", handler, config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "flaky", 1).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(finished.status, BatchStatus::Completed);

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3);
    let first_gap = calls[1] - calls[0];
    let second_gap = calls[2] - calls[1];
    assert!(
        first_gap >= Duration::from_millis(50),
        "first retry after {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(100),
        "second retry after {second_gap:?}"
    );
    assert!(
        second_gap < Duration::from_secs(2),
        "second retry after {second_gap:?}"
    );

    let job = queue
        .store()
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(job.attempts, 3);
    assert_eq!(job.errors.len(), 2);
    assert!(job.errors.iter().all(|e| e.kind == FailureKind::Error));
    queue.shutdown().await;
}

#[tokio::test]
async fn exhausted_retries_dead_letter_and_redrive_succeeds() {
    let path = temp_db();
    let healthy = Arc::new(AtomicU32::new(0));
    let flag = healthy.clone();
    let handler = FnHandler(move |_job: JobContext| {
        let flag = flag.clone();
        async move {
            if flag.load(Ordering::SeqCst) == 1 {
                Ok(None)
            } else {
                Err(HandlerError::retryable("still broken"))
            }
        }
    });
    let config = KindConfig {
        retry: fast_retry(3),
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("broken", handler, config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "broken", 2).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(finished.status, BatchStatus::Failed);
    assert_eq!(finished.counters.failed, 2);

    let dead = queue
        .store()
        .list_dead(&Scope::Owner(alice()), DeadLetterFilter::default())
        .await
        .unwrap();
    assert_eq!(dead.items.len(), 2);
    assert!(
        dead.items
            .iter()
            .all(|job| job.attempts == 3 && job.errors.len() == 3)
    );

    healthy.store(1, Ordering::SeqCst);
    let ids: Vec<JobId> = dead.items.iter().map(|j| j.id).collect();
    let report = queue
        .redrive(&Scope::Admin, RedriveSelection::Jobs(ids))
        .await
        .unwrap();
    assert_eq!(report.redriven.len(), 2);
    let again = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(again.status, BatchStatus::Completed);
    assert_eq!(again.generation, 1);
    queue.shutdown().await;
}

#[tokio::test]
async fn permanent_error_skips_retries() {
    let path = temp_db();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let handler = FnHandler(move |_job: JobContext| {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Err(HandlerError::permanent("upstream returned 400")))
    });
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("strict", handler, KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "strict", 1).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(finished.status, BatchStatus::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    queue.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_not_counted_as_a_failure() {
    let path = temp_db();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let handler = FnHandler(move |_job: JobContext| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(if call < 3 {
            Err(HandlerError::RetryAfter {
                delay: Duration::from_millis(30),
                reason: "upstream returned 429".into(),
            })
        } else {
            Ok(None)
        })
    });
    // One attempt allowed: only uncounted retries can get the job through.
    let config = KindConfig {
        retry: fast_retry(1),
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("polite", handler, config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "polite", 1).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(finished.status, BatchStatus::Completed);
    let job = queue
        .store()
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.errors.len(), 3);
    assert!(job.errors.iter().all(|e| e.kind == FailureKind::RetryAfter));
    queue.shutdown().await;
}

#[tokio::test]
async fn timeout_and_panic_count_as_retryable_failures() {
    let path = temp_db();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let handler = FnHandler(move |_job: JobContext| {
        let call = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            match call {
                0 => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(None)
                }
                1 => panic!("handler bug"),
                _ => Ok(None),
            }
        }
    });
    let config = KindConfig {
        timeout: Duration::from_millis(100),
        retry: fast_retry(4),
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("slow", handler, config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "slow", 1).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(finished.status, BatchStatus::Completed);
    let job = queue
        .store()
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(job.attempts, 3);
    assert_eq!(job.errors[0].kind, FailureKind::Timeout);
    assert!(
        job.errors[1].error.contains("handler bug"),
        "{:?}",
        job.errors[1]
    );
    queue.shutdown().await;
}

#[tokio::test]
async fn dependency_chain_runs_in_order() {
    let path = temp_db();
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = order.clone();
    let handler = FnHandler(move |job: JobContext| {
        seen.lock().unwrap().push(job.seq());
        std::future::ready(Ok(None))
    });
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("step", handler, KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    // Each item waits for the one before it.
    let mut chain: Vec<NewJob> = items(5);
    for (i, item) in chain.iter_mut().enumerate().skip(1) {
        item.depends_on = vec![DependencyRef::Item(i as u32 - 1)];
    }
    let batch = queue.new_batch(alice(), "step").unwrap();
    let id = queue.create_batch(batch, chain).await.unwrap().batch.id;
    wait_finished(&mut events, id, Duration::from_secs(10)).await;
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    queue.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_batch_signals_running_handlers() {
    let path = temp_db();
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = started.clone();
    let handler = FnHandler(move |job: JobContext| {
        let signal = signal.clone();
        async move {
            signal.notify_one();
            job.cancellation().cancelled().await;
            Err(HandlerError::Cancelled)
        }
    });
    let config = KindConfig {
        concurrency: 1,
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("long", handler, config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let batch = submit(&queue, "long", 5).await;
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .unwrap();
    let cancelled = queue
        .cancel_batch(&Scope::Owner(alice()), batch, "no longer needed")
        .await
        .unwrap();
    assert_eq!(
        cancelled.counters.cancelled, 4,
        "waiting items are cancelled at once"
    );

    let finished = wait_finished(&mut events, batch, Duration::from_secs(5)).await;
    assert_eq!(finished.status, BatchStatus::Cancelled);
    assert_eq!(finished.counters.cancelled, 5);
    queue.shutdown().await;
}

#[tokio::test]
async fn kind_rate_limit_spaces_starts() {
    let path = temp_db();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let seen = starts.clone();
    let handler = FnHandler(move |_job: JobContext| {
        seen.lock().unwrap().push(Instant::now());
        std::future::ready(Ok(None))
    });
    // 10 per second with a burst of 2: 12 jobs take about a second.
    let config = KindConfig {
        rate: Some(Rate {
            max: 10,
            per: Duration::from_secs(1),
            burst: Some(2),
        }),
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("pdf", handler, config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let began = Instant::now();
    let batch = submit(&queue, "pdf", 12).await;
    wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 12);
    let first_200ms = starts
        .iter()
        .filter(|t| **t - began < Duration::from_millis(150))
        .count();
    assert!(first_200ms <= 3, "{first_200ms} starts in the first 150 ms");
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "finished after {:?}",
        began.elapsed()
    );
    let job = queue
        .store()
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items;
    assert!(job.iter().all(|j| j.attempts == 1));
    queue.shutdown().await;
}

#[tokio::test]
async fn per_user_rate_defers_without_counting_attempts() {
    let path = temp_db();
    let config = KindConfig {
        per_user_rate: Some(Rate {
            max: 5,
            per: Duration::from_secs(1),
            burst: Some(1),
        }),
        retry: fast_retry(1),
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("item", noop(), config)
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();

    let began = Instant::now();
    let batch = submit(&queue, "item", 6).await;
    let finished = wait_finished(&mut events, batch, Duration::from_secs(10)).await;
    assert_eq!(
        finished.status,
        BatchStatus::Completed,
        "deferrals never exhaust the single attempt"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(800),
        "finished after {:?}",
        began.elapsed()
    );
    let jobs = queue
        .store()
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items;
    assert!(jobs.iter().all(|j| j.attempts == 1 && j.errors.is_empty()));
    queue.shutdown().await;
}

#[tokio::test]
async fn two_queues_share_a_kind_rate_through_the_store() {
    let path = temp_db();
    let store = open(&path).await;
    let starts = Arc::new(Mutex::new(Vec::new()));
    // 10 per second with a burst of 2, for both queues together: 12 jobs
    // take about a second however many queues run them.
    let config = KindConfig {
        rate: Some(Rate {
            max: 10,
            per: Duration::from_secs(1),
            burst: Some(2),
        }),
        concurrency: 8,
        ..KindConfig::default()
    };
    let mut queues = Vec::new();
    for _ in 0..2 {
        let seen = starts.clone();
        let handler = FnHandler(move |_job: JobContext| {
            seen.lock().unwrap().push(Instant::now());
            std::future::ready(Ok(None))
        });
        let queue = Queue::builder(store.clone())
            .config(fast_config())
            .shared_rates(store.clone())
            .register("pdf", handler, config.clone())
            .build();
        queues.push(queue);
    }
    // Whichever queue records the last outcome announces the finish.
    let mut first_events = queues[0].subscribe();
    let mut second_events = queues[1].subscribe();
    for queue in &queues {
        queue.start().await.unwrap();
    }

    let began = Instant::now();
    let batch = submit(&queues[0], "pdf", 12).await;
    tokio::select! {
        _ = wait_finished(&mut first_events, batch, Duration::from_secs(10)) => {}
        _ = wait_finished(&mut second_events, batch, Duration::from_secs(10)) => {}
    }

    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), 12, "each job ran once");
    let early = starts
        .iter()
        .filter(|t| **t - began < Duration::from_millis(150))
        .count();
    assert!(
        early <= 3,
        "{early} starts in the first 150 ms across both queues"
    );
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "finished after {:?}",
        began.elapsed()
    );
    let jobs = queues[0]
        .store()
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items;
    assert!(
        jobs.iter().all(|j| j.attempts == 1 && j.errors.is_empty()),
        "deferred jobs keep their attempt count"
    );
    for queue in &queues {
        queue.shutdown().await;
    }
}

#[tokio::test]
async fn paused_kind_is_not_claimed_until_resumed() {
    let path = temp_db();
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("noop", noop(), KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();
    queue.pause_kind("noop").await.unwrap();

    let batch = submit(&queue, "noop", 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = statuses(&queue, batch).await;
    assert_eq!(counts.get(&JobStatus::Queued), Some(&3));

    queue.resume_kind("noop").await.unwrap();
    let finished = wait_finished(&mut events, batch, Duration::from_secs(5)).await;
    assert_eq!(finished.status, BatchStatus::Completed);
    queue.shutdown().await;
}

#[tokio::test]
async fn shutdown_releases_running_jobs_without_counting_them() {
    let path = temp_db();
    let store = open(&path).await;
    let handler = FnHandler(|job: JobContext| async move {
        job.cancellation().cancelled().await;
        Err(HandlerError::Cancelled)
    });
    let queue = Queue::builder(store.clone())
        .config(fast_config())
        .register("long", handler, KindConfig::default())
        .build();
    queue.start().await.unwrap();
    let batch = submit(&queue, "long", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queue.in_flight(), 3);

    let report = queue.shutdown().await;
    assert_eq!(report.released, 3);
    let jobs = store
        .list_items(&Scope::Admin, batch, Default::default())
        .await
        .unwrap()
        .items;
    assert!(
        jobs.iter()
            .all(|j| j.status == JobStatus::Queued && j.attempts == 0),
        "{jobs:?}"
    );
}

#[tokio::test]
async fn events_follow_the_commit_they_describe() {
    let path = temp_db();
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("noop", noop(), KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();
    let batch = submit(&queue, "noop", 20).await;

    let mut completed = 0;
    let mut progress_seen = Vec::new();
    let mut finished = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while finished == 0 {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap();
        match event {
            QueueEvent::JobCompleted(job) => {
                // The event is sent after commit, so a read sees the new state.
                let stored = queue
                    .store()
                    .get_job(&Scope::Admin, job.job_id)
                    .await
                    .unwrap();
                assert_eq!(stored.status, JobStatus::Succeeded);
                completed += 1;
            }
            QueueEvent::BatchProgress(progress) => progress_seen.push(progress.counters.succeeded),
            QueueEvent::BatchFinished(done) if done.batch_id == batch => finished += 1,
            _ => {}
        }
    }
    assert_eq!(completed, 20);
    assert!(
        progress_seen.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {progress_seen:?}"
    );
    assert_eq!(progress_seen.last(), Some(&20));

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        queue.store().pending_finishes(10).await.unwrap().is_empty(),
        "the finish was acknowledged"
    );
    queue.shutdown().await;
}

#[tokio::test]
async fn undelivered_finish_is_delivered_on_start() {
    let path = temp_db();
    let store = open(&path).await;

    // Finish a batch through the store alone, as a process that crashed
    // right after its commit would have left it.
    let batch = domain::NewBatch::new(alice(), "noop");
    let id = store
        .create_batch(batch, items(1), chrono::Utc::now())
        .await
        .unwrap()
        .batch
        .id;
    let owner = domain::LeaseOwner::unique("crashed");
    let now = chrono::Utc::now();
    let claimed = store
        .claim(
            domain::ClaimRequest {
                kind: "noop".into(),
                owner,
                limit: 1,
                lease_until: now + chrono::Duration::seconds(30),
            },
            now,
        )
        .await
        .unwrap()
        .remove(0);
    let outcome = domain::AttemptOutcome {
        lease: claimed.lease,
        started_at: now,
        duration_ms: 1,
        kind: domain::OutcomeKind::Succeeded { result: None },
    };
    store.record_outcomes(vec![outcome], now).await.unwrap();

    let queue = Queue::builder(store.clone())
        .config(fast_config())
        .register("noop", noop(), KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();
    let finished = wait_finished(&mut events, id, Duration::from_secs(5)).await;
    assert_eq!(finished.status, BatchStatus::Completed);
    assert!(store.pending_finishes(10).await.unwrap().is_empty());
    queue.shutdown().await;
}

#[tokio::test]
async fn progress_reports_are_stored_and_published() {
    let path = temp_db();
    let handler = FnHandler(|job: JobContext| async move {
        job.report_progress(50);
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok(None)
    });
    let queue = Queue::builder(open(&path).await)
        .config(fast_config())
        .register("report", handler, KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();
    let batch = submit(&queue, "report", 1).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut progress: HashMap<JobId, u8> = HashMap::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            QueueEvent::JobProgress(job) => {
                let stored = queue
                    .store()
                    .get_job(&Scope::Admin, job.job_id)
                    .await
                    .unwrap();
                assert_eq!(stored.progress, 50);
                progress.insert(job.job_id, job.progress.unwrap());
            }
            QueueEvent::BatchFinished(done) if done.batch_id == batch => break,
            _ => {}
        }
    }
    assert_eq!(progress.values().copied().collect::<Vec<_>>(), vec![50]);
    queue.shutdown().await;
}

#[tokio::test]
async fn retention_prunes_finished_batches() {
    let path = temp_db();
    let mut config = fast_config();
    config.retention.interval = Some(Duration::from_millis(200));
    config.retention.completed = Duration::from_millis(1);
    let queue = Queue::builder(open(&path).await)
        .config(config)
        .register("noop", noop(), KindConfig::default())
        .build();
    let mut events = queue.subscribe();
    queue.start().await.unwrap();
    let batch = submit(&queue, "noop", 5).await;
    wait_finished(&mut events, batch, Duration::from_secs(5)).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while queue.store().get_batch(&Scope::Admin, batch).await.is_ok() {
        assert!(Instant::now() < deadline, "batch was not pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    queue.shutdown().await;
}

#[tokio::test]
async fn unknown_kind_is_rejected() {
    let path = temp_db();
    let queue = Queue::builder(open(&path).await)
        .register("noop", noop(), KindConfig::default())
        .build();
    let error = queue.new_batch(alice(), "missing").unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
}

//! Crash recovery with real processes: a worker process is killed with
//! SIGKILL in the middle of a batch, a new one starts on the same SQLite
//! file, and the batch must finish with nothing lost and with repeated
//! runs only for jobs that were in flight at the kill.
//!
//! The worker is this test binary itself, started again with
//! `CRASH_WORKER_DB` set; `crash_worker_process` then runs a queue until it
//! is killed.

#![allow(clippy::unwrap_used, reason = "tests")]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use domain::{BatchId, FailureKind, JobStatus, JobStore, Scope};
use queue::{FnHandler, JobContext, KindConfig, Queue, QueueConfig};

const ITEMS: usize = 3_000;
const CONCURRENCY: usize = 16;

/// The worker side: runs until killed. Does nothing in a normal test run.
#[tokio::test]
async fn crash_worker_process() {
    let Ok(db) = std::env::var("CRASH_WORKER_DB") else {
        return;
    };
    let log = PathBuf::from(std::env::var("CRASH_WORKER_LOG").unwrap());
    let handler = FnHandler(move |job: JobContext| {
        let log = log.clone();
        async move {
            // One line per start, appended in one write so lines from
            // concurrent handlers never interleave.
            let line = format!("{} {}\n", job.job_id(), job.attempt());
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&log)
                .unwrap();
            file.write_all(line.as_bytes()).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(None)
        }
    });
    let config = QueueConfig {
        lease_duration: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        ..fast_config()
    };
    let kind = KindConfig {
        concurrency: CONCURRENCY,
        ..KindConfig::default()
    };
    let queue = Queue::builder(open(&PathBuf::from(db)).await)
        .config(QueueConfig {
            claim_batch: CONCURRENCY as u32,
            ..config
        })
        .register("work", handler, kind)
        .build();
    queue.start().await.unwrap();
    std::future::pending::<()>().await;
}

fn spawn_worker(db: &Path, log: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_worker_process",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("CRASH_WORKER_DB", db)
        .env("CRASH_WORKER_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn succeeded(store: &sqlite_store::SqliteStore, batch: BatchId) -> u64 {
    domain::AdminStore::get_batch(store, &Scope::Admin, batch)
        .await
        .unwrap()
        .counters
        .succeeded
}

#[tokio::test]
async fn sigkill_mid_batch_loses_nothing() {
    let db = temp_db();
    let log = db.with_file_name("starts.log");
    let store = open(&db).await;
    let batch = domain::NewBatch::new(alice(), "work");
    let id = store
        .create_batch(batch, items(ITEMS), chrono::Utc::now())
        .await
        .unwrap()
        .batch
        .id;

    let mut first = spawn_worker(&db, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while succeeded(&store, id).await < (ITEMS / 3) as u64 {
        assert!(
            Instant::now() < deadline,
            "the first worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = succeeded(&store, id).await;
    assert!(
        at_kill < ITEMS as u64,
        "the kill came after the batch finished"
    );

    let mut second = spawn_worker(&db, &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while succeeded(&store, id).await < ITEMS as u64 {
        assert!(
            Instant::now() < deadline,
            "the batch did not finish after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();

    // Every item succeeded exactly once, and the counters agree.
    let batch = domain::AdminStore::get_batch(store.as_ref(), &Scope::Admin, id)
        .await
        .unwrap();
    assert_eq!(batch.status, domain::BatchStatus::Completed);
    assert_eq!(batch.counters.succeeded, ITEMS as u64);
    assert_eq!(batch.counters.failed + batch.counters.cancelled, 0);
    let mut jobs = Vec::new();
    let mut cursor = None;
    loop {
        let page = domain::AdminStore::list_items(
            store.as_ref(),
            &Scope::Admin,
            id,
            domain::ItemFilter {
                status: None,
                cursor,
                limit: 1_000,
            },
        )
        .await
        .unwrap();
        jobs.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next.parse().unwrap()),
            None => break,
        }
    }
    assert_eq!(jobs.len(), ITEMS);
    assert!(jobs.iter().all(|j| j.status == JobStatus::Succeeded));

    // Repeated starts happen only for jobs whose lease the killed worker
    // held: each has a lease-expired record, and there are no more of them
    // than the worker could hold at once.
    let starts = std::fs::read_to_string(&log).unwrap();
    let mut per_job: HashMap<i64, u32> = HashMap::new();
    for line in starts.lines() {
        let id: i64 = line.split(' ').next().unwrap().parse().unwrap();
        *per_job.entry(id).or_default() += 1;
    }
    assert_eq!(per_job.len(), ITEMS, "every job started at least once");
    let repeated: Vec<i64> = per_job
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(
        repeated.len() <= CONCURRENCY,
        "{} jobs ran twice",
        repeated.len()
    );
    for job in jobs.iter().filter(|j| repeated.contains(&j.id.0)) {
        assert!(
            job.errors
                .iter()
                .any(|e| e.kind == FailureKind::LeaseExpired),
            "job {} ran twice without losing a lease",
            job.id
        );
    }
    let expired = jobs.iter().filter(|j| j.attempts > 1).count();
    eprintln!(
        "killed at {at_kill} of {ITEMS} succeeded; {} jobs ran twice; {expired} needed a second attempt",
        repeated.len()
    );
    assert!(
        expired <= CONCURRENCY,
        "{expired} jobs needed a second attempt"
    );
}

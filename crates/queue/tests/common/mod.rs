//! Shared set-up of the queue's integration tests: a real SQLite store in
//! a temporary directory and settings short enough for tests.

#![allow(dead_code, reason = "each test binary uses a different part")]
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use domain::{BatchId, JobStatus, NewJob, Scope, UserId};
use queue::{Queue, QueueConfig, QueueEvent, RetentionConfig, RetryPolicy};
use sqlite_store::{SqliteConfig, SqliteStore};

pub fn temp_db() -> PathBuf {
    tempfile::tempdir().unwrap().keep().join("queue.db")
}

pub async fn open(path: &PathBuf) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(SqliteConfig::new(path)).await.unwrap())
}

pub fn fast_config() -> QueueConfig {
    QueueConfig {
        lease_duration: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(400),
        reap_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_millis(500),
        retention: RetentionConfig {
            interval: None,
            ..RetentionConfig::default()
        },
        jitter_seed: Some(7),
        ..QueueConfig::default()
    }
}

/// Retries after 50 ms, 100 ms, 200 ms with no jitter.
pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base: Duration::from_millis(50),
        max_delay: Duration::from_secs(1),
        jitter: 0.0,
    }
}

pub fn alice() -> UserId {
    UserId::new("alice")
}

pub fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).unwrap())
        .collect()
}

pub async fn submit(queue: &Queue, kind: &str, n: usize) -> BatchId {
    let batch = queue.new_batch(alice(), kind).unwrap();
    queue.create_batch(batch, items(n)).await.unwrap().batch.id
}

/// Waits for the batch-finished event of `batch`, failing after `limit`.
pub async fn wait_finished(
    events: &mut tokio::sync::broadcast::Receiver<QueueEvent>,
    batch: BatchId,
    limit: Duration,
) -> domain::BatchFinished {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("batch {batch} did not finish within {limit:?}"));
        match event {
            Ok(QueueEvent::BatchFinished(finished)) if finished.batch_id == batch => {
                return finished;
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(error) => panic!("event channel closed: {error}"),
        }
    }
}

/// Counts a batch's items per status.
pub async fn statuses(
    queue: &Queue,
    batch: BatchId,
) -> std::collections::HashMap<JobStatus, usize> {
    let mut counts = std::collections::HashMap::new();
    let mut cursor = None;
    loop {
        let page = queue
            .store()
            .list_items(
                &Scope::Admin,
                batch,
                domain::ItemFilter {
                    status: None,
                    cursor,
                    limit: 1_000,
                },
            )
            .await
            .unwrap();
        for job in &page.items {
            *counts.entry(job.status).or_insert(0) += 1;
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next.parse().unwrap()),
            None => return counts,
        }
    }
}

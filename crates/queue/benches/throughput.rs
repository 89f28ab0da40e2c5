//! Enqueue and drain throughput of the queue on a fresh SQLite file.
//!
//! Run with `cargo bench -p queue --bench throughput`; set
//! `BATCHD_BENCH_ITEMS` to change the batch size (default 100,000).
//! The `batchd bench` command runs the full protocol; this bench covers
//! the two figures the queue itself owns.

#![allow(clippy::unwrap_used, reason = "benchmark harness")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use domain::{JobStore, NewBatch, NewJob, UserId};
use queue::{FnHandler, JobContext, KindConfig, Queue, QueueConfig, QueueEvent, RetentionConfig};
use sqlite_store::{SqliteConfig, SqliteStore};

fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).unwrap())
        .collect()
}

async fn fresh_store() -> Arc<SqliteStore> {
    let path = tempfile::tempdir().unwrap().keep().join("bench.db");
    Arc::new(SqliteStore::open(SqliteConfig::new(path)).await.unwrap())
}

async fn drain(n: usize, concurrency: usize) -> f64 {
    let store = fresh_store().await;
    let batch = NewBatch::new(UserId::new("bench"), "noop");
    let id = store
        .create_batch(batch, items(n), chrono::Utc::now())
        .await
        .unwrap()
        .batch
        .id;

    let handler = FnHandler(|_job: JobContext| std::future::ready(Ok(None)));
    let config = QueueConfig {
        retention: RetentionConfig {
            interval: None,
            ..RetentionConfig::default()
        },
        ..QueueConfig::default()
    };
    let kind = KindConfig {
        concurrency,
        ..KindConfig::default()
    };
    let queue = Queue::builder(store)
        .config(config)
        .register("noop", handler, kind)
        .build();
    let mut events = queue.subscribe();
    let started = Instant::now();
    queue.start().await.unwrap();
    loop {
        match events.recv().await {
            Ok(QueueEvent::BatchFinished(finished)) if finished.batch_id == id => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(error) => panic!("event channel closed: {error}"),
        }
    }
    let elapsed = started.elapsed();
    queue.shutdown().await;
    n as f64 / elapsed.as_secs_f64()
}

/// The physical floor: plain prepared INSERTs of the same rows into the
/// same schema in one transaction, then plain UPDATE-by-id of each row.
async fn floor(n: usize) -> (f64, f64) {
    let path = tempfile::tempdir().unwrap().keep().join("floor.db");
    drop(SqliteStore::open(SqliteConfig::new(&path)).await.unwrap());

    let mut conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )
    .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    conn.execute(
        "INSERT INTO batches (id, owner, kind, status, accepted, max_attempts, created_at, updated_at)
         VALUES ('floor', 'bench', 'noop', 'pending', 1, 4, ?1, ?1)",
        [now],
    )
    .unwrap();
    let payloads: Vec<String> = (0..n)
        .map(|i| serde_json::json!({ "n": i }).to_string())
        .collect();

    let started = Instant::now();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO jobs (batch_id, seq, kind, payload, status, priority, max_attempts, blockers, run_at, created_at)
                 VALUES ('floor', ?1, 'noop', ?2, 'queued', 0, 4, 0, ?3, ?3)",
            )
            .unwrap();
        for (seq, payload) in payloads.iter().enumerate() {
            insert
                .execute(rusqlite::params![seq as i64, payload, now])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    let insert_rate = n as f64 / started.elapsed().as_secs_f64();

    let ids: Vec<i64> = {
        let mut stmt = conn.prepare("SELECT id FROM jobs ORDER BY id").unwrap();
        stmt.query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let started = Instant::now();
    let tx = conn.transaction().unwrap();
    {
        let mut update = tx
            .prepare("UPDATE jobs SET status = 'succeeded', finished_at = ?2 WHERE id = ?1")
            .unwrap();
        for id in &ids {
            update.execute([*id, now]).unwrap();
        }
    }
    tx.commit().unwrap();
    let update_rate = n as f64 / started.elapsed().as_secs_f64();
    (insert_rate, update_rate)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BATCHD_BENCH_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);

    let store = fresh_store().await;
    let batch = NewBatch::new(UserId::new("bench"), "noop");
    let payloads = items(n);
    let started = Instant::now();
    store
        .create_batch(batch, payloads, chrono::Utc::now())
        .await
        .unwrap();
    let enqueue = n as f64 / started.elapsed().as_secs_f64();
    let (insert_floor, update_floor) = floor(n).await;
    println!(
        "machine: {} cores, SQLite {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        rusqlite::version()
    );
    println!("plain INSERT floor:                       {insert_floor:>10.0} rows/s");
    println!("plain UPDATE-by-id floor:                 {update_floor:>10.0} rows/s");
    println!(
        "enqueue {n} items in one batch:         {enqueue:>10.0} items/s  ({:.2} of the INSERT floor)",
        enqueue / insert_floor
    );

    for concurrency in [1, 16, 64] {
        let rate = drain(n, concurrency).await;
        println!(
            "drain {n} no-op jobs, concurrency {concurrency:>2}:  {rate:>10.0} jobs/s   ({:.2} of the UPDATE floor)",
            rate / update_floor
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

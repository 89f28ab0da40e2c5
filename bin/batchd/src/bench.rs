//! `batchd bench`: the benchmark protocol, runnable on any machine.
//!
//! Every run is on a fresh SQLite file in WAL mode with no-op jobs. The
//! protocol: the physical floor (plain INSERTs and UPDATEs of the same rows
//! into the same schema), bulk enqueue through the store and through the
//! HTTP API (NDJSON), drain at concurrency 1, 16 and 64, idle pickup
//! latency, a mixed steady load with pruning, peak memory, and crash
//! recovery of a killed worker process. Enqueue and drain run with
//! `synchronous=NORMAL` and again with `FULL`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use domain::{AdminStore, JobStore, NewBatch, NewJob, PruneRequest, Scope, UserId};
use queue::{FnHandler, JobContext, KindConfig, Queue, QueueConfig, QueueEvent, RetentionConfig};
use serde::Serialize;
use sqlite_store::{SqliteConfig, SqliteStore, Synchronous};

use crate::auth::Auth;

/// Settings of one bench run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub items: usize,
    pub json: bool,
    pub mixed_rate: u32,
    pub mixed_seconds: u64,
    pub pickup_samples: usize,
    pub million: bool,
    pub crash: bool,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    machine: Machine,
    items: usize,
    floor: Floor,
    enqueue: Vec<Rate>,
    drain: Vec<Rate>,
    pickup: Option<Latency>,
    mixed: Option<Mixed>,
    memory: Memory,
    crash: Option<Crash>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) memory_mib: u64,
    pub(crate) sqlite_version: String,
    pub(crate) batchd_version: String,
    pub(crate) git_commit: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Floor {
    insert_rows_per_second: f64,
    update_rows_per_second: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Rate {
    what: String,
    synchronous: &'static str,
    per_second: f64,
    /// This rate divided by the matching floor.
    of_floor: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Latency {
    samples: usize,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Mixed {
    offered_per_second: u32,
    seconds: u64,
    completed: usize,
    end_to_end: Latency,
    database_bytes_before_prune: u64,
    database_bytes_after_prune: u64,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Memory {
    peak_rss_mib_1000_in_flight: Option<f64>,
    /// For an NDJSON batch of the run's item count.
    peak_rss_mib_items_ndjson: Option<f64>,
    peak_rss_mib_1m_ndjson: Option<f64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Crash {
    in_flight_at_kill: usize,
    seconds_until_orphans_run_again: f64,
    repeated_executions: usize,
    completions_counted_twice: u64,
}

fn synchronous_name(mode: Synchronous) -> &'static str {
    match mode {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    }
}

fn items(n: usize) -> Vec<NewJob> {
    (0..n)
        .filter_map(|i| NewJob::from_value(&serde_json::json!({ "n": i })).ok())
        .collect()
}

/// Directories made by this run, removed when it ends.
static DIRECTORIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn fresh_dir() -> anyhow::Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("batchd-bench-")
        .tempdir()?
        .keep();
    if let Ok(mut dirs) = DIRECTORIES.lock() {
        dirs.push(dir.clone());
    }
    Ok(dir)
}

pub(crate) fn remove_directories() {
    let dirs = DIRECTORIES
        .lock()
        .map(|mut dirs| std::mem::take(&mut *dirs))
        .unwrap_or_default();
    for dir in dirs {
        if let Err(error) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(%error, dir = %dir.display(), "removing a benchmark directory failed");
        }
    }
}

async fn fresh_store(synchronous: Synchronous) -> anyhow::Result<(Arc<SqliteStore>, PathBuf)> {
    let path = fresh_dir()?.join("bench.db");
    let mut config = SqliteConfig::new(&path);
    config.synchronous = synchronous;
    Ok((Arc::new(SqliteStore::open(config).await?), path))
}

fn quiet_queue_config() -> QueueConfig {
    QueueConfig {
        retention: RetentionConfig {
            interval: None,
            ..RetentionConfig::default()
        },
        ..QueueConfig::default()
    }
}

pub(crate) fn machine() -> Machine {
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_mib: memory_kib / 1024,
        sqlite_version: rusqlite::version().to_owned(),
        batchd_version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: option_env!("BATCHD_GIT_COMMIT")
            .unwrap_or("unknown")
            .to_owned(),
    }
}

/// Plain prepared INSERTs of the same rows into the same schema in one
/// transaction, then plain UPDATE-by-id of each row in one transaction.
async fn floor(n: usize) -> anyhow::Result<Floor> {
    let (store, path) = fresh_store(Synchronous::Normal).await?;
    drop(store);

    let mut conn = rusqlite::Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )?;
    let now = chrono::Utc::now().timestamp_millis();
    conn.execute(
        "INSERT INTO batches (id, owner, kind, status, accepted, max_attempts, created_at, updated_at)
         VALUES ('floor', 'bench', 'noop', 'pending', 1, 4, ?1, ?1)",
        [now],
    )?;
    let payloads: Vec<String> = (0..n)
        .map(|i| serde_json::json!({ "n": i }).to_string())
        .collect();

    let started = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO jobs (batch_id, seq, kind, payload, status, priority, max_attempts, blockers, run_at, created_at)
             VALUES ('floor', ?1, 'noop', ?2, 'queued', 0, 4, 0, ?3, ?3)",
        )?;
        for (seq, payload) in payloads.iter().enumerate() {
            insert.execute(rusqlite::params![seq as i64, payload, now])?;
        }
    }
    tx.commit()?;
    let insert = n as f64 / started.elapsed().as_secs_f64();

    let ids: Vec<i64> = {
        let mut stmt = conn.prepare("SELECT id FROM jobs ORDER BY id")?;
        let rows = stmt.query_map([], |row| row.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let started = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut update =
            tx.prepare("UPDATE jobs SET status = 'succeeded', finished_at = ?2 WHERE id = ?1")?;
        for id in &ids {
            update.execute([*id, now])?;
        }
    }
    tx.commit()?;
    let update = n as f64 / started.elapsed().as_secs_f64();

    Ok(Floor {
        insert_rows_per_second: insert,
        update_rows_per_second: update,
    })
}

async fn enqueue_store(n: usize, synchronous: Synchronous) -> anyhow::Result<f64> {
    let (store, _) = fresh_store(synchronous).await?;
    let batch = NewBatch::new(UserId::new("bench"), "noop");
    let payloads = items(n);
    let started = Instant::now();
    store
        .create_batch(batch, payloads, chrono::Utc::now())
        .await?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn noop_queue(store: Arc<SqliteStore>, concurrency: usize) -> Queue {
    let handler = FnHandler(|_job: JobContext| std::future::ready(Ok(None)));
    let kind = KindConfig {
        concurrency,
        ..KindConfig::default()
    };
    Queue::builder(store)
        .config(quiet_queue_config())
        .register("noop", handler, kind)
        .build()
}

async fn wait_finished(
    events: &mut tokio::sync::broadcast::Receiver<QueueEvent>,
    id: domain::BatchId,
) -> anyhow::Result<()> {
    loop {
        match events.recv().await {
            Ok(QueueEvent::BatchFinished(finished)) if finished.batch_id == id => return Ok(()),
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(error) => bail!("the event channel closed: {error}"),
        }
    }
}

async fn drain(n: usize, concurrency: usize, synchronous: Synchronous) -> anyhow::Result<f64> {
    let (store, _) = fresh_store(synchronous).await?;
    let batch = NewBatch::new(UserId::new("bench"), "noop");
    let id = store
        .create_batch(batch, items(n), chrono::Utc::now())
        .await?
        .batch
        .id;

    let queue = noop_queue(store, concurrency);
    let mut events = queue.subscribe();
    let started = Instant::now();
    queue.start().await?;
    wait_finished(&mut events, id).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    queue.shutdown().await;
    Ok(rate)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn latency(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    Latency {
        samples: samples.len(),
        p50_ms: percentile(&samples, 50.0),
        p95_ms: percentile(&samples, 95.0),
        p99_ms: percentile(&samples, 99.0),
    }
}

/// A queue whose handler records, per item number, how long after its
/// enqueue call it started.
fn timed_queue(
    store: Arc<SqliteStore>,
    enqueued: Arc<Mutex<HashMap<u64, Instant>>>,
    started: Arc<Mutex<Vec<f64>>>,
) -> Queue {
    let handler = FnHandler(move |job: JobContext| {
        let now = Instant::now();
        let number = job
            .payload_as::<serde_json::Value>()
            .ok()
            .and_then(|v| v["n"].as_u64());
        if let Some(number) = number {
            let begun = enqueued
                .lock()
                .ok()
                .and_then(|map| map.get(&number).copied());
            if let (Some(begun), Ok(mut samples)) = (begun, started.lock()) {
                samples.push(now.duration_since(begun).as_secs_f64() * 1000.0);
            }
        }
        std::future::ready(Ok(None))
    });
    Queue::builder(store)
        .config(quiet_queue_config())
        .register("noop", handler, KindConfig::default())
        .build()
}

/// Enqueues one job at a time at `rate` per second and measures enqueue
/// to handler start.
async fn pickup(samples: usize, rate: u32) -> anyhow::Result<Latency> {
    let (store, _) = fresh_store(Synchronous::Normal).await?;
    let enqueued = Arc::new(Mutex::new(HashMap::new()));
    let starts = Arc::new(Mutex::new(Vec::new()));
    let queue = timed_queue(store, enqueued.clone(), starts.clone());
    queue.start().await?;

    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut ticker = tokio::time::interval(period);
    for n in 0..samples as u64 {
        ticker.tick().await;
        if let Ok(mut map) = enqueued.lock() {
            map.insert(n, Instant::now());
        }
        let batch = queue.new_batch(UserId::new("bench"), "noop")?;
        let job = NewJob::from_value(&serde_json::json!({ "n": n }))?;
        queue.create_batch(batch, vec![job]).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.shutdown().await;
    let measured = starts.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(latency(measured))
}

/// Runs a steady offered load and measures end-to-end latency and the
/// database size before and after pruning what finished.
async fn mixed(rate: u32, seconds: u64) -> anyhow::Result<Mixed> {
    let (store, path) = fresh_store(Synchronous::Normal).await?;
    let enqueued = Arc::new(Mutex::new(HashMap::new()));
    let queue = noop_queue(store.clone(), 16);
    let mut events = queue.subscribe();
    queue.start().await?;

    let done: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let collector = {
        let enqueued = enqueued.clone();
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(QueueEvent::BatchFinished(finished)) => {
                        let begun = enqueued
                            .lock()
                            .ok()
                            .and_then(|map| map.get(&finished.batch_id).copied());
                        if let (Some(begun), Ok(mut done)) = (begun, done.lock()) {
                            done.push(Instant::now().duration_since(begun).as_secs_f64() * 1000.0);
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        })
    };

    let total = rate as u64 * seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    for n in 0..total {
        ticker.tick().await;
        let batch = queue.new_batch(UserId::new("bench"), "noop")?;
        let id = batch.id;
        if let Ok(mut map) = enqueued.lock() {
            map.insert(id, Instant::now());
        }
        let job = NewJob::from_value(&serde_json::json!({ "n": n }))?;
        queue.create_batch(batch, vec![job]).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    queue.shutdown().await;
    collector.abort();

    // The main file after a full checkpoint, so the WAL's high-water mark
    // does not count as data.
    let size = |path: &Path| -> anyhow::Result<u64> {
        let conn = rusqlite::Connection::open(path)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(std::fs::metadata(path)?.len())
    };
    let before = size(&path)?;
    let now = chrono::Utc::now() + chrono::Duration::seconds(1);
    loop {
        let report = store
            .prune(PruneRequest {
                completed_before: now,
                failed_before: now,
                max_batches: 10_000,
            })
            .await?;
        if report.batches == 0 {
            break;
        }
    }
    // Give the freed pages back to the file system so the size shows it.
    let vacuum_path = path.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let conn = rusqlite::Connection::open(&vacuum_path)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")?;
        Ok(())
    })
    .await??;
    let after = size(&path)?;

    let samples = done.lock().map(|d| d.clone()).unwrap_or_default();
    Ok(Mixed {
        offered_per_second: rate,
        seconds,
        completed: samples.len(),
        end_to_end: latency(samples),
        database_bytes_before_prune: before,
        database_bytes_after_prune: after,
    })
}

/// A `batchd serve` child process, killed when dropped. The protocol runs
/// servers as children so their memory is measured apart from the bench's
/// own, and `--cluster` runs several at once.
pub(crate) struct ServerChild {
    child: std::process::Child,
    pub(crate) addr: String,
    secret: String,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerChild {
    fn start() -> anyhow::Result<Self> {
        let config = "[limits]\nmax_items_per_batch = 1000000\n\n[rate_limits]\ndisabled = true\n\n\
             [kinds.noop]\nhandler = \"noop\"\n\n[kinds.sleep]\nhandler = \"sleep\"\nconcurrency = 1000\n";
        Self::spawn(config, &random_secret(), Stdio::null())
    }

    /// Starts `batchd serve` on an ephemeral loopback port with `config`
    /// (TOML) in a fresh data directory, signing tokens with `secret`.
    /// The child logs errors only, to `stderr`.
    pub(crate) fn spawn(config: &str, secret: &str, stderr: Stdio) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};

        let dir = fresh_dir()?;
        let config_path = dir.join("batchd.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {} failed", config_path.display()))?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(&dir)
            .env("BATCHD_JWT_SECRET", secret)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting a `batchd serve` child process failed")?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout from the server process")?;
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|line| {
                line.strip_prefix("batchd listening on http://")
                    .map(str::to_owned)
            })
            .context("the server process did not print its address")?;
        Ok(Self {
            child,
            addr,
            secret: secret.to_owned(),
        })
    }

    /// Resident memory of the server process now, in MiB (Linux).
    fn rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    pub(crate) fn token(&self) -> anyhow::Result<String> {
        Auth::new(&self.secret).mint("bench", false, 3_600)
    }

    pub(crate) async fn batch_status(
        &self,
        client: &reqwest::Client,
        token: &str,
        id: &str,
    ) -> anyhow::Result<serde_json::Value> {
        Ok(client
            .get(format!("http://{}/api/batches/{id}", self.addr))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?)
    }
}

/// Generates a random HS256 secret of 64 hexadecimal characters.
pub(crate) fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Peak RSS of a server process while 1,000 jobs run at once.
async fn in_flight_memory() -> anyhow::Result<f64> {
    let server = ServerChild::start()?;
    let token = server.token()?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let items: Vec<serde_json::Value> = (0..1_000)
        .map(|_| serde_json::json!({ "ms": 3_000 }))
        .collect();
    let response = client
        .post(format!("http://{}/api/batches", server.addr))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "kind": "sleep", "items": items }))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "the 1,000-item sleep batch was rejected with {}",
            response.status()
        );
    }
    let batch: serde_json::Value = response.json().await?;
    let id = batch["id"]
        .as_str()
        .context("no batch id in the response")?
        .to_owned();

    let mut peak: f64 = 0.0;
    loop {
        peak = peak.max(server.rss_mib().unwrap_or(0.0));
        let status = server.batch_status(&client, &token, &id).await?;
        if matches!(
            status["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(peak)
}

/// Enqueues `n` items through the HTTP API of a server process as one
/// NDJSON body, generated while it is sent. Returns items per second and
/// the server's peak RSS while the batch was created and drained.
async fn ndjson(n: usize) -> anyhow::Result<(f64, f64)> {
    let server = Arc::new(ServerChild::start()?);
    let token = server.token()?;

    let peak = Arc::new(Mutex::new(0.0_f64));
    let sampler = {
        let peak = peak.clone();
        let server = server.clone();
        tokio::spawn(async move {
            loop {
                if let (Some(rss), Ok(mut peak)) = (server.rss_mib(), peak.lock()) {
                    *peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let chunks = (0..n.div_ceil(10_000)).map(move |chunk| {
        let from = chunk * 10_000;
        let to = (from + 10_000).min(n);
        let text: String = (from..to).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        Ok::<_, std::io::Error>(bytes::Bytes::from(text))
    });
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let client = reqwest::Client::builder().no_proxy().build()?;
    let started = Instant::now();
    let response = client
        .post(format!("http://{}/api/batches?kind=noop", server.addr))
        .bearer_auth(&token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let batch: serde_json::Value = response.json().await?;
    if !status.is_success() {
        bail!("the NDJSON upload was rejected with {status}: {batch}");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();

    let id = batch["id"]
        .as_str()
        .context("no batch id in the response")?
        .to_owned();
    loop {
        let current = server.batch_status(&client, &token, &id).await?;
        if matches!(
            current["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sampler.abort();
    let peak = peak.lock().map(|p| *p).unwrap_or(0.0);
    Ok((rate, peak))
}

/// Kills a worker process with jobs in flight, restarts it, and measures
/// how long until every orphaned job runs again.
async fn crash() -> anyhow::Result<Crash> {
    const ITEMS: usize = 5_000;
    let dir = fresh_dir()?;
    let db = dir.join("crash.db");
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&db)).await?);
    let batch = NewBatch::new(UserId::new("bench"), "work");
    let id = store
        .create_batch(batch, items(ITEMS), chrono::Utc::now())
        .await?
        .batch
        .id;

    let spawn = || {
        Command::new(std::env::current_exe()?)
            .arg("bench-worker")
            .arg("--database")
            .arg(&db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    let mut first = spawn()?;

    // Wait until the worker has a full set of jobs running.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let processing = store
            .list_items(
                &Scope::Admin,
                id,
                domain::ItemFilter {
                    status: Some(domain::JobStatus::Processing),
                    cursor: None,
                    limit: 1_000,
                },
            )
            .await?
            .items;
        let batch = store.get_batch(&Scope::Admin, id).await?;
        if processing.len() >= 32 && batch.counters.succeeded > 100 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker process did not start running jobs");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill()?;
    first.wait()?;
    // What was running at the kill: the leases the dead process held.
    let orphans: Vec<domain::JobId> = store
        .list_items(
            &Scope::Admin,
            id,
            domain::ItemFilter {
                status: Some(domain::JobStatus::Processing),
                cursor: None,
                limit: 1_000,
            },
        )
        .await?
        .items
        .into_iter()
        .map(|job| job.id)
        .collect();
    let in_flight_at_kill = orphans.len();

    let restarted = Instant::now();
    let mut second = spawn()?;
    let recovered = loop {
        let mut all_again = true;
        for job in &orphans {
            let job = store.get_job(&Scope::Admin, *job).await?;
            if job.attempts < 2 {
                all_again = false;
                break;
            }
        }
        if all_again {
            break restarted.elapsed();
        }
        if restarted.elapsed() > Duration::from_secs(120) {
            bail!("orphaned jobs did not run again within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let deadline = Instant::now() + Duration::from_secs(300);
    let batch = loop {
        let batch = store.get_batch(&Scope::Admin, id).await?;
        if batch.status.is_terminal() {
            break batch;
        }
        if Instant::now() > deadline {
            bail!("the batch did not finish after the restart");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    second.kill()?;
    second.wait()?;

    let mut repeated = 0;
    let mut cursor = None;
    loop {
        let page = store
            .list_items(
                &Scope::Admin,
                id,
                domain::ItemFilter {
                    status: None,
                    cursor,
                    limit: 1_000,
                },
            )
            .await?;
        repeated += page.items.iter().filter(|job| job.attempts > 1).count();
        match page.next_cursor {
            Some(next) => cursor = Some(next.parse()?),
            None => break,
        }
    }

    Ok(Crash {
        in_flight_at_kill,
        seconds_until_orphans_run_again: recovered.as_secs_f64(),
        repeated_executions: repeated,
        completions_counted_twice: batch.counters.succeeded.saturating_sub(ITEMS as u64),
    })
}

/// Runs the worker process of the crash benchmark: 20 ms jobs of kind
/// `work` on `database`, until it is killed.
pub async fn worker(database: PathBuf) -> anyhow::Result<()> {
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(database)).await?);
    let handler = FnHandler(|_job: JobContext| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(None)
    });
    let kind = KindConfig {
        concurrency: 64,
        ..KindConfig::default()
    };
    let queue = Queue::builder(store)
        .config(quiet_queue_config())
        .register("work", handler, kind)
        .build();
    queue.start().await?;
    std::future::pending::<()>().await;
    Ok(())
}

fn log(json: bool, line: impl AsRef<str>) {
    if !json {
        eprintln!("{}", line.as_ref());
    }
}

/// Runs the protocol and prints a table, or JSON with `--json`.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let result = run_protocol(options).await;
    remove_directories();
    result
}

async fn run_protocol(options: BenchOptions) -> anyhow::Result<()> {
    let n = options.items.max(1);
    let json = options.json;
    let mut report = Report {
        machine: machine(),
        items: n,
        ..Report::default()
    };

    log(json, format!("floor: {n} plain INSERTs and UPDATEs"));
    report.floor = floor(n).await?;
    for mode in [Synchronous::Normal, Synchronous::Full] {
        log(
            json,
            format!(
                "enqueue {n} items through the store, synchronous={}",
                synchronous_name(mode)
            ),
        );
        let rate = enqueue_store(n, mode).await?;
        report.enqueue.push(Rate {
            what: "store".into(),
            synchronous: synchronous_name(mode),
            per_second: rate,
            of_floor: rate / report.floor.insert_rows_per_second,
        });
        for concurrency in [1, 16, 64] {
            log(
                json,
                format!(
                    "drain {n} jobs at concurrency {concurrency}, synchronous={}",
                    synchronous_name(mode)
                ),
            );
            let rate = drain(n, concurrency, mode).await?;
            report.drain.push(Rate {
                what: format!("concurrency {concurrency}"),
                synchronous: synchronous_name(mode),
                per_second: rate,
                of_floor: rate / report.floor.update_rows_per_second,
            });
        }
    }

    log(json, format!("enqueue {n} items through HTTP as NDJSON"));
    let (http_rate, http_peak) = ndjson(n).await?;
    report.enqueue.push(Rate {
        what: "http ndjson".into(),
        synchronous: "NORMAL",
        per_second: http_rate,
        of_floor: http_rate / report.floor.insert_rows_per_second,
    });
    report.memory.peak_rss_mib_items_ndjson = Some(http_peak);

    log(
        json,
        format!(
            "pickup latency: {} jobs one at a time at 100 per second",
            options.pickup_samples
        ),
    );
    report.pickup = Some(pickup(options.pickup_samples, 100).await?);

    if options.mixed_seconds > 0 {
        log(
            json,
            format!(
                "mixed load: {} jobs per second for {} s",
                options.mixed_rate, options.mixed_seconds
            ),
        );
        report.mixed = Some(mixed(options.mixed_rate, options.mixed_seconds).await?);
    }

    log(json, "memory: 1,000 jobs in flight");
    report.memory.peak_rss_mib_1000_in_flight = Some(in_flight_memory().await?);
    if options.million {
        log(
            json,
            "memory: a 1,000,000-item NDJSON batch created and drained",
        );
        let (_, peak) = ndjson(1_000_000).await?;
        report.memory.peak_rss_mib_1m_ndjson = Some(peak);
    }
    if options.crash {
        log(
            json,
            "crash recovery: SIGKILL a worker process with jobs in flight",
        );
        report.crash = Some(crash().await?);
    }

    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &Report) {
    let m = &report.machine;
    println!(
        "machine: {} cores, {} MiB, SQLite {}, batchd {} ({})",
        m.cores, m.memory_mib, m.sqlite_version, m.batchd_version, m.git_commit
    );
    println!("items per run: {}", report.items);
    println!();
    println!("enqueue is compared with the INSERT floor, drain with the UPDATE floor");
    println!("{:<44} {:>14} {:>10}", "measurement", "rate", "of floor");
    println!(
        "{:<44} {:>10.0} /s {:>10}",
        "INSERT floor", report.floor.insert_rows_per_second, "1.00"
    );
    println!(
        "{:<44} {:>10.0} /s {:>10}",
        "UPDATE floor", report.floor.update_rows_per_second, "1.00"
    );
    for rate in &report.enqueue {
        let label = format!("enqueue, {} ({})", rate.what, rate.synchronous);
        println!(
            "{label:<44} {:>10.0} /s {:>10.2}",
            rate.per_second, rate.of_floor
        );
    }
    for rate in &report.drain {
        let label = format!("drain, {} ({})", rate.what, rate.synchronous);
        println!(
            "{label:<44} {:>10.0} /s {:>10.2}",
            rate.per_second, rate.of_floor
        );
    }
    println!();
    if let Some(pickup) = &report.pickup {
        println!(
            "idle pickup latency ({} jobs): p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
            pickup.samples, pickup.p50_ms, pickup.p95_ms, pickup.p99_ms
        );
    }
    if let Some(mixed) = &report.mixed {
        println!(
            "mixed load {}/s for {} s: {} completed, end-to-end p50 {:.2} ms, p95 {:.2} ms; database {} KiB before prune, {} KiB after",
            mixed.offered_per_second,
            mixed.seconds,
            mixed.completed,
            mixed.end_to_end.p50_ms,
            mixed.end_to_end.p95_ms,
            mixed.database_bytes_before_prune / 1024,
            mixed.database_bytes_after_prune / 1024
        );
    }
    let memory = &report.memory;
    let show = |value: Option<f64>| value.map_or("not run".to_owned(), |v| format!("{v:.1} MiB"));
    println!(
        "peak RSS: {} with 1,000 jobs in flight; {} for a {}-item NDJSON batch; {} for 1,000,000 items",
        show(memory.peak_rss_mib_1000_in_flight),
        show(memory.peak_rss_mib_items_ndjson),
        report.items,
        show(memory.peak_rss_mib_1m_ndjson)
    );
    if let Some(crash) = &report.crash {
        println!(
            "crash recovery: {} jobs in flight at SIGKILL ran again {:.2} s after restart; {} executions repeated; {} completions counted twice",
            crash.in_flight_at_kill,
            crash.seconds_until_orphans_run_again,
            crash.repeated_executions,
            crash.completions_counted_twice
        );
    }
}

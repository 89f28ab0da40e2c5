//! The embedded store: batchd's [`JobStore`] and [`AdminStore`] on one
//! SQLite file.
//!
//! Main type: [`SqliteStore`], opened with [`SqliteConfig`].
//!
//! How it writes: one thread owns the only write connection and runs every
//! write, grouping whatever is waiting into one transaction (group commit,
//! see `writer.rs`). Reads use an r2d2 pool of read-only connections, which
//! WAL mode lets run beside the writer. Automatic WAL checkpoints are off,
//! because they ran inside commits and stretched the latency tail; a
//! background thread checkpoints instead and keeps the WAL bounded.
//!
//! Invariants it keeps, beyond those of the `domain` traits:
//! - A batch is inserted in chunks of at most `insert_chunk_rows` items per
//!   transaction. Until its final commit the batch row has `accepted = 0`,
//!   which hides it from every read, and each item carries an extra
//!   blocker, which keeps it out of the claim index. On start-up, batches
//!   that never reached that commit are deleted.
//! - Every status change of a job updates its batch's counters in the same
//!   transaction (see `mutate.rs`).
//! - What it never does: emit events, or read the clock inside an
//!   operation. Callers pass `now`; only `open` takes the wall clock, to
//!   finish releases that a crash interrupted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

mod admin;
mod flags;
mod hot;
mod mutate;
mod ratelimit;
mod read;
mod sql;
mod writer;

use writer::Writer;

mod embedded {
    refinery::embed_migrations!("../../migrations/sqlite");
}

/// Durability level of a commit (SQLite's `synchronous` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// A commit survives a process crash; the last commits before a power
    /// loss may be lost. The WAL default.
    #[default]
    Normal,
    /// A commit survives power loss too, at the cost of an fsync per commit.
    Full,
}

/// Settings of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock held by another process.
    pub busy_timeout: Duration,
    pub read_pool_size: u32,
    /// Items inserted per transaction when a batch is created.
    pub insert_chunk_rows: usize,
    /// Items made claimable (or deleted, when pruning) per transaction.
    pub release_chunk_rows: usize,
    /// Most operations grouped into one write transaction.
    pub max_group_ops: usize,
    /// How often the background thread checkpoints the WAL.
    pub checkpoint_interval: Duration,
    /// WAL size past which the writer truncates it between two groups.
    pub max_wal_bytes: u64,
}

impl SqliteConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            read_pool_size: 4,
            insert_chunk_rows: 500,
            release_chunk_rows: 5_000,
            max_group_ops: 1_024,
            checkpoint_interval: Duration::from_millis(500),
            max_wal_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Errors of opening the store. Errors of its operations are
/// [`domain::StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open SQLite database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the directory {path} for the SQLite database")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock {path} while applying migrations")]
    MigrationLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("applying SQLite migrations to {path} failed")]
    Migrate {
        path: PathBuf,
        #[source]
        source: refinery::Error,
    },
    #[error("cannot build the read connection pool for {path}")]
    Pool {
        path: PathBuf,
        #[source]
        source: r2d2::Error,
    },
    #[error("cannot start the SQLite writer thread")]
    Thread(#[source] std::io::Error),
    #[error("recovering unfinished batches in {path} failed")]
    Recover {
        path: PathBuf,
        #[source]
        source: domain::StoreError,
    },
}

/// The store. Cheap to clone; clones share the writer and the pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    writer: Writer,
    pool: r2d2::Pool<SqliteConnectionManager>,
    config: SqliteConfig,
    checkpointer_stop: Arc<AtomicBool>,
    truncate_wal: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.checkpointer_stop.store(true, Ordering::Relaxed);
    }
}

impl SqliteStore {
    /// Opens (or creates) the database, applies migrations, removes batches
    /// whose creation never finished, and finishes releasing accepted ones.
    pub async fn open(config: SqliteConfig) -> Result<Self, OpenError> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }

        let mut conn = open_connection(&path, &config, false)?;
        migrate(&mut conn, &path)?;

        let truncate_wal = Arc::new(AtomicBool::new(false));
        let writer = Writer::spawn(conn, config.max_group_ops, truncate_wal.clone())
            .map_err(OpenError::Thread)?;
        let pool = read_pool(&path, &config)?;
        let checkpointer_stop = Arc::new(AtomicBool::new(false));
        spawn_checkpointer(
            &path,
            &config,
            checkpointer_stop.clone(),
            truncate_wal.clone(),
        )?;

        let store = Self {
            inner: Arc::new(Inner {
                writer,
                pool,
                config,
                checkpointer_stop,
                truncate_wal,
            }),
        };
        store
            .recover(Utc::now())
            .await
            .map_err(|source| OpenError::Recover { path, source })?;
        Ok(store)
    }

    /// Copies the WAL into the database file and truncates it, after the
    /// writes already queued. For a clean stop, and before measuring the
    /// file's size.
    pub async fn checkpoint(&self) -> Result<(), domain::StoreError> {
        self.inner.truncate_wal.store(true, Ordering::Release);
        // The writer truncates before starting a group. The first no-op may
        // join a group that had started already; the second one's group
        // starts after it, so by its reply the truncation has run.
        self.inner
            .writer
            .write("checkpoint", false, |_| Ok(()))
            .await?;
        self.inner
            .writer
            .write("checkpoint", false, |_| Ok(()))
            .await
    }

    pub fn config(&self) -> &SqliteConfig {
        &self.inner.config
    }

    pub(crate) fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// Runs a read on a pooled connection off the async threads.
    pub(crate) async fn read<T, F>(
        &self,
        operation: &'static str,
        work: F,
    ) -> Result<T, domain::StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, domain::StoreError> + Send + 'static,
    {
        let pool = self.inner.pool.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool
                .get()
                .map_err(|source| domain::StoreError::backend(operation, source))?;
            work(&conn)
        })
        .await
        .map_err(|source| domain::StoreError::backend(operation, source))?
    }

    /// Deletes batches left unaccepted by a crash and releases the items of
    /// accepted batches whose release was interrupted.
    async fn recover(&self, now: DateTime<Utc>) -> Result<(), domain::StoreError> {
        let abandoned = self
            .read("find abandoned batches", |conn| {
                read::string_column(conn, sql::ABANDONED_BATCHES)
            })
            .await?;
        for batch_id in &abandoned {
            self.delete_batch_in_chunks(batch_id.clone()).await?;
        }

        let unreleased = self
            .read("find unreleased batches", |conn| {
                read::string_column(conn, sql::UNRELEASED_BATCHES)
            })
            .await?;
        for batch_id in &unreleased {
            self.release_items(batch_id.clone(), now).await?;
        }

        if !abandoned.is_empty() || !unreleased.is_empty() {
            tracing::info!(
                abandoned = abandoned.len(),
                resumed = unreleased.len(),
                "recovered batches whose creation was interrupted"
            );
        }
        Ok(())
    }
}

fn sqlite_error(path: &Path) -> impl Fn(rusqlite::Error) -> OpenError + '_ {
    move |source| OpenError::Open {
        path: path.to_path_buf(),
        source,
    }
}

fn open_connection(
    path: &Path,
    config: &SqliteConfig,
    read_only: bool,
) -> Result<Connection, OpenError> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
    } else {
        OpenFlags::default()
    };
    let conn = Connection::open_with_flags(path, flags).map_err(sqlite_error(path))?;
    configure(&conn, config).map_err(sqlite_error(path))?;
    Ok(conn)
}

fn configure(conn: &Connection, config: &SqliteConfig) -> rusqlite::Result<()> {
    let synchronous = match config.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.busy_timeout(config.busy_timeout)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = {synchronous};
         PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 0;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -32000;"
    ))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Applies the embedded migrations under an exclusive file lock, so two
/// processes starting on one fresh file do not both try.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let lock_path = lock_path(path);
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| OpenError::MigrationLock {
            path: lock_path.clone(),
            source,
        })?;
    lock_file
        .lock()
        .map_err(|source| OpenError::MigrationLock {
            path: lock_path.clone(),
            source,
        })?;

    let report = embedded::migrations::runner().run(conn);
    // The lock is released when the file is closed; an unlock error changes
    // nothing for correctness.
    let _ = lock_file.unlock();

    let report = report.map_err(|source| OpenError::Migrate {
        path: path.to_path_buf(),
        source,
    })?;
    for migration in report.applied_migrations() {
        tracing::info!(
            version = migration.version(),
            name = migration.name(),
            "applied migration"
        );
    }
    Ok(())
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".migrate-lock");
    PathBuf::from(name)
}

fn read_pool(
    path: &Path,
    config: &SqliteConfig,
) -> Result<r2d2::Pool<SqliteConnectionManager>, OpenError> {
    let init_config = config.clone();
    let manager = SqliteConnectionManager::file(path)
        .with_flags(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_init(move |conn| {
            conn.busy_timeout(init_config.busy_timeout)?;
            conn.execute_batch("PRAGMA query_only = ON; PRAGMA foreign_keys = ON;")?;
            conn.set_prepared_statement_cache_capacity(64);
            Ok(())
        });
    r2d2::Pool::builder()
        .max_size(config.read_pool_size.max(1))
        .build(manager)
        .map_err(|source| OpenError::Pool {
            path: path.to_path_buf(),
            source,
        })
}

/// Checkpoints the WAL from its own connection, so checkpoints never run
/// inside the writer's commits. A passive checkpoint never waits for
/// readers or the writer. When the WAL has grown past `max_wal_bytes`
/// anyway, it asks the writer to truncate it between two groups.
fn spawn_checkpointer(
    path: &Path,
    config: &SqliteConfig,
    stop: Arc<AtomicBool>,
    truncate_wal: Arc<AtomicBool>,
) -> Result<(), OpenError> {
    let conn = open_connection(path, config, false)?;
    let interval = config.checkpoint_interval;
    let max_wal_bytes = config.max_wal_bytes;
    let wal_path = {
        let mut name = path.as_os_str().to_owned();
        name.push("-wal");
        PathBuf::from(name)
    };
    std::thread::Builder::new()
        .name("batchd-sqlite-checkpoint".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(interval);
                if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(%error, "WAL checkpoint failed");
                }
                let wal_bytes = std::fs::metadata(&wal_path).map(|m| m.len()).unwrap_or(0);
                if wal_bytes > max_wal_bytes {
                    truncate_wal.store(true, Ordering::Release);
                }
            }
        })
        .map_err(OpenError::Thread)?;
    Ok(())
}

/// Milliseconds since the Unix epoch, the stored form of every time.
pub(crate) fn to_millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

pub(crate) fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

pub(crate) fn db_error(operation: &'static str) -> impl Fn(rusqlite::Error) -> domain::StoreError {
    move |source| domain::StoreError::backend(operation, source)
}

//! The scale-out store: batchd's [`JobStore`](domain::JobStore),
//! [`AdminStore`](domain::AdminStore), [`FlagStore`](domain::FlagStore) and
//! [`RateLimitStore`](domain::RateLimitStore) on one PostgreSQL database
//! that several batchd processes share.
//!
//! Main type: [`PgStore`], opened with [`PgConfig`].
//!
//! How it works: every operation takes a connection from a deadpool pool of
//! tokio-postgres connections and runs in one transaction. Claims lock the
//! rows they take with `FOR NO KEY UPDATE SKIP LOCKED`, so workers in any
//! number of processes never take the same job and never wait on each
//! other.
//! Processes learn of each other's writes through LISTEN/NOTIFY on one
//! channel per schema (see [`Signal`]): a write that makes jobs runnable
//! sends its notification inside its own transaction, so PostgreSQL
//! delivers it exactly when the jobs become visible, and never for a write
//! that rolled back.
//!
//! Invariants it keeps, beyond those of the `domain` traits:
//! - A batch created in one call is inserted and made claimable in one
//!   transaction. A batch streamed in parts stays `accepted = false`
//!   (invisible, its items blocked) until `commit_batch`, which accepts it
//!   and releases every item in one transaction.
//! - Every status change of a job updates its batch's counters in the same
//!   transaction, under the batch row's lock, so counters stay exact with
//!   any number of writers.
//! - A staging batch that no process has appended to for
//!   [`PgConfig::abandon_staging_after`] belonged to a process that died; it
//!   is deleted, never by the process still streaming it.
//! - What it never does: read the clock inside an operation (callers pass
//!   `now`), or depend on one process being the only one.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

mod admin;
mod create;
mod flags;
mod hot;
mod mutate;
mod notify;
mod ratelimit;
mod read;
mod sql;
pub mod testing;
mod write;

pub use notify::{MAX_SIGNAL_BYTES, Signal};

mod embedded {
    refinery::embed_migrations!("../../migrations/postgres");
}

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq-style URL or key=value string, for example
    /// `postgres://batchd@db.internal:5432/batchd`.
    pub url: String,
    /// Schema holding batchd's tables; created if missing. `None` uses the
    /// server's search path (normally `public`).
    pub schema: Option<String>,
    /// Most connections this process holds, besides the one that listens
    /// for notifications.
    pub pool_size: usize,
    /// How long an operation waits for a free pooled connection.
    pub acquire_timeout: Duration,
    /// How long opening one connection may take.
    pub connect_timeout: Duration,
    /// Maximum time a single statement may run before the server cancels it.
    pub statement_timeout: Duration,
    /// Items sent per INSERT when a batch is created.
    pub insert_chunk_rows: usize,
    /// How long a staging batch may go without new items before it counts
    /// as abandoned by a dead process and is deleted. A caller streaming a
    /// batch slowly must call `append_items` more often than this; the
    /// HTTP API appends at least once a minute.
    pub abandon_staging_after: Duration,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            pool_size: 16,
            acquire_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(60),
            insert_chunk_rows: 1_000,
            abandon_staging_after: Duration::from_secs(5 * 60),
        }
    }

    /// Sets the schema batchd's tables live in.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Returns the notification channel of this schema, so processes on
    /// other schemas of the same database never receive each other's
    /// signals.
    pub fn channel(&self) -> String {
        match &self.schema {
            Some(schema) => format!("batchd.{schema}"),
            None => "batchd".to_owned(),
        }
    }
}

/// Errors of opening the store. Errors of its operations are
/// [`domain::StoreError`].
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the PostgreSQL connection string is not valid; expected a URL such as postgres://user@host:5432/database"
    )]
    Url(#[source] tokio_postgres::Error),
    #[error(
        "schema name {schema:?} is not valid: use 1 to 50 lowercase ASCII letters, digits or underscores, not starting with a digit"
    )]
    Schema { schema: String },
    #[error("cannot connect to PostgreSQL at {target}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("preparing schema {schema} on {target} failed")]
    Prepare {
        schema: String,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("applying PostgreSQL migrations on {target} failed")]
    Migrate {
        target: String,
        #[source]
        source: refinery::Error,
    },
    #[error("cannot build the connection pool for {target}")]
    Pool {
        target: String,
        #[source]
        source: deadpool_postgres::BuildError,
    },
    #[error("recovering abandoned batches on {target} failed")]
    Recover {
        target: String,
        #[source]
        source: domain::StoreError,
    },
}

/// The store. Cheap to clone; clones share the pool and the listener.
#[derive(Debug, Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    config: PgConfig,
    channel: String,
    signals: notify::SignalHub,
    stop: CancellationToken,
    /// When `reap_expired_leases` last swept abandoned staging batches, in
    /// the callers' milliseconds since the epoch.
    last_abandon_sweep_ms: AtomicI64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PgStore {
    /// Connects, creates the schema if needed, applies migrations (one
    /// process at a time, under an advisory lock) and deletes staging
    /// batches abandoned by dead processes.
    pub async fn connect(config: PgConfig) -> Result<Self, OpenError> {
        let mut pg_config: tokio_postgres::Config = config.url.parse().map_err(OpenError::Url)?;
        let target = describe(&pg_config);
        pg_config
            .application_name("batchd")
            .connect_timeout(config.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));

        if let Some(schema) = &config.schema {
            validate_schema(schema)?;
            // Every pooled connection resolves unqualified names in this
            // schema, so the SQL never names it.
            pg_config.options(format!("-c search_path={schema}"));
        }
        pg_config.options(format!(
            "{} -c statement_timeout={}",
            pg_config.get_options().unwrap_or_default(),
            config.statement_timeout.as_millis()
        ));

        migrate(&pg_config, config.schema.as_deref(), &target).await?;

        let manager = Manager::from_config(
            pg_config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .wait_timeout(Some(config.acquire_timeout))
            .create_timeout(Some(config.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|source| OpenError::Pool {
                target: target.clone(),
                source,
            })?;

        let channel = config.channel();
        let stop = CancellationToken::new();
        let signals = notify::SignalHub::new(pg_config.clone(), channel.clone(), stop.clone());
        let store = Self {
            inner: Arc::new(Inner {
                pool,
                config,
                channel,
                signals,
                stop,
                last_abandon_sweep_ms: AtomicI64::new(i64::MIN),
            }),
        };

        store
            .recover(chrono::Utc::now())
            .await
            .map_err(|source| OpenError::Recover { target, source })?;
        Ok(store)
    }

    pub fn config(&self) -> &PgConfig {
        &self.inner.config
    }

    /// Signals from every process on this schema, this one included. The
    /// first call starts the listening connection.
    pub fn signals(&self) -> tokio::sync::broadcast::Receiver<Signal> {
        self.inner.signals.subscribe()
    }

    /// Sends a signal to every process listening on this schema.
    pub async fn publish(&self, signal: &Signal) -> Result<(), domain::StoreError> {
        let client = self.client("publish signal").await?;
        notify::send(&**client, &self.inner.channel, signal).await
    }

    /// Connections currently open in the pool and how many of them are idle.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = self.inner.pool.status();
        (status.size, status.available)
    }

    pub(crate) fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// Takes a pooled connection for one operation.
    pub(crate) async fn client(
        &self,
        operation: &'static str,
    ) -> Result<deadpool_postgres::Object, domain::StoreError> {
        self.inner.pool.get().await.map_err(|source| match source {
            // No connection within the wait, or none could be opened: the
            // server is down, unreachable or out of connections.
            deadpool_postgres::PoolError::Timeout(_) | deadpool_postgres::PoolError::Backend(_) => {
                domain::StoreError::unavailable(operation, source)
            }
            other => domain::StoreError::backend(operation, other),
        })
    }

    /// Deletes staging batches whose writer went quiet, which only happens
    /// when the process streaming them died.
    async fn recover(&self, now: chrono::DateTime<chrono::Utc>) -> Result<(), domain::StoreError> {
        let deleted = self.delete_abandoned(now).await?;
        if deleted > 0 {
            tracing::info!(
                abandoned = deleted,
                "deleted batches whose creation was interrupted"
            );
        }
        Ok(())
    }

    /// Deletes staging batches not appended to within
    /// [`PgConfig::abandon_staging_after`]; returns how many.
    pub async fn delete_abandoned(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, domain::StoreError> {
        let quiet_ms =
            i64::try_from(self.inner.config.abandon_staging_after.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.timestamp_millis().saturating_sub(quiet_ms);
        let client = self.client("delete abandoned batches").await?;
        client
            .execute(
                "DELETE FROM batches WHERE NOT accepted AND updated_at < $1",
                &[&cutoff],
            )
            .await
            .map_err(db_error("delete abandoned batches"))
    }
}

/// Host, port and database of a connection config, for messages; never the
/// password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().unwrap_or("(default database)");
    format!("{host}:{port}/{database}")
}

/// Schema names are written into SQL and into the notification channel's
/// name, so only plain identifiers are accepted.
fn validate_schema(schema: &str) -> Result<(), OpenError> {
    let mut chars = schema.chars();
    // Lowercase only: PostgreSQL folds unquoted names to lowercase, so
    // "Jobs" would silently become "jobs".
    let plain_start = chars
        .next()
        .is_some_and(|first| first.is_ascii_lowercase() || first == '_');
    let plain_rest = schema
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain_start && plain_rest && schema.len() <= 50 {
        Ok(())
    } else {
        Err(OpenError::Schema {
            schema: schema.to_owned(),
        })
    }
}

/// Opens a single connection outside the pool and drives it on a task.
pub(crate) async fn connect_one(
    pg_config: &tokio_postgres::Config,
    target: &str,
) -> Result<tokio_postgres::Client, OpenError> {
    let (client, connection) =
        pg_config
            .connect(NoTls)
            .await
            .map_err(|source| OpenError::Connect {
                target: target.to_owned(),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection closed with an error");
        }
    });
    Ok(client)
}

/// Creates the schema and runs the embedded migrations while holding a
/// session advisory lock, so processes starting together on a fresh
/// database apply them once.
async fn migrate(
    pg_config: &tokio_postgres::Config,
    schema: Option<&str>,
    target: &str,
) -> Result<(), OpenError> {
    const MIGRATION_LOCK: i64 = 0x6261_7463_6864; // "batchd"

    let mut client = connect_one(pg_config, target).await?;
    let prepare = |source| OpenError::Prepare {
        schema: schema.unwrap_or("(search path)").to_owned(),
        target: target.to_owned(),
        source,
    };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(prepare)?;
    if let Some(schema) = schema {
        // The session's search path already names the schema; it only
        // takes effect once the schema exists.
        client
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .map_err(prepare)?;
    }

    let report = embedded::migrations::runner()
        .set_grouped(false)
        .run_async(&mut client)
        .await;

    // Closing the connection would release the lock too; unlocking keeps
    // the order explicit.
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(prepare)?;

    let report = report.map_err(|source| OpenError::Migrate {
        target: target.to_owned(),
        source,
    })?;
    for migration in report.applied_migrations() {
        tracing::info!(
            version = migration.version(),
            name = migration.name(),
            "applied PostgreSQL migration"
        );
    }
    Ok(())
}

/// Maps a driver error into the domain's error for `operation`.
pub(crate) fn db_error(
    operation: &'static str,
) -> impl Fn(tokio_postgres::Error) -> domain::StoreError {
    move |source| domain::StoreError::backend(operation, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_must_be_plain_identifiers() {
        for good in ["batchd", "_x", "tenant_42"] {
            assert!(validate_schema(good).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "a-b", "a;drop", "a b", "Jobs", &"x".repeat(51)] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn channel_is_per_schema() {
        assert_eq!(PgConfig::new("postgres://x").channel(), "batchd");
        assert_eq!(
            PgConfig::new("postgres://x").schema("t1").channel(),
            "batchd.t1"
        );
    }

    #[test]
    fn description_names_no_password() {
        let config: tokio_postgres::Config =
            "postgres://u:secret@db.example:6543/jobs".parse().unwrap();
        let text = describe(&config);
        assert_eq!(text, "db.example:6543/jobs");
    }
}

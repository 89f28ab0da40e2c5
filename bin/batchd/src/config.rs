//! Server configuration: defaults, a TOML file, then `BATCHD_*` variables
//! and command-line flags, each overriding the one before.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// Secret used by `--dev` when none is configured. It is public, so a
/// server using it accepts tokens anyone can mint; `serve` refuses to use
/// it unless `--dev` is given.
pub const DEV_SECRET: &str = "batchd-development-secret-never-use-in-production";

/// Shortest accepted JWT secret, in bytes. HS256 keys shorter than the
/// hash output (32 bytes) weaken the signature.
const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server listens on, host:port.
    pub listen: String,
    /// SQLite file path (relative paths are under `data_dir`), or a
    /// `postgres://` URL to share one PostgreSQL database between several
    /// batchd processes.
    pub database: Option<String>,
    /// Directory for the database and downloaded documents.
    pub data_dir: PathBuf,
    /// Directory for log files; no log files when unset.
    pub log_dir: Option<PathBuf>,
    /// HS256 secret for bearer tokens.
    pub jwt_secret: Option<String>,
    /// Accept the public development secret; never in production.
    pub dev_mode: bool,
    pub limits: Limits,
    pub queue: QueueSettings,
    pub outbound: Outbound,
    pub flags: FlagSettings,
    pub rate_limits: crate::limits::RateLimitSettings,
    pub telemetry: TelemetrySettings,
    pub gateway: GatewaySettings,
    /// Settings used when `database` is a PostgreSQL URL.
    pub postgres: PostgresSettings,
    /// Job kinds and the handler each runs.
    pub kinds: BTreeMap<String, KindSettings>,
}

impl Default for Config {
    fn default() -> Self {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            "noop".to_owned(),
            KindSettings::for_handler(HandlerName::Noop),
        );
        kinds.insert(
            "sleep".to_owned(),
            KindSettings::for_handler(HandlerName::Sleep),
        );
        kinds.insert(
            "fetch".to_owned(),
            KindSettings::for_handler(HandlerName::Fetch),
        );
        Self {
            listen: "127.0.0.1:8080".into(),
            database: None,
            data_dir: PathBuf::from("batchd-data"),
            log_dir: None,
            jwt_secret: None,
            dev_mode: false,
            limits: Limits::default(),
            queue: QueueSettings::default(),
            outbound: Outbound::default(),
            flags: FlagSettings::default(),
            rate_limits: crate::limits::RateLimitSettings::default(),
            telemetry: TelemetrySettings::default(),
            gateway: GatewaySettings::default(),
            postgres: PostgresSettings::default(),
            kinds,
        }
    }
}

/// Request and batch size limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest JSON request body, in bytes.
    pub max_json_body_bytes: usize,
    /// Largest NDJSON request body, in bytes.
    pub max_ndjson_body_bytes: u64,
    /// Largest single item (one JSON value), in bytes.
    pub max_item_bytes: usize,
    /// Maximum number of items in one batch.
    pub max_items_per_batch: u64,
    /// Largest page a listing returns.
    pub max_page_size: u32,
    /// Longest wait for the next part of a request body, in seconds; a
    /// stalled body gets 408.
    pub body_idle_timeout_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_json_body_bytes: 16 * 1024 * 1024,
            max_ndjson_body_bytes: 2 * 1024 * 1024 * 1024,
            max_item_bytes: 256 * 1024,
            max_items_per_batch: 1_000_000,
            max_page_size: 1_000,
            body_idle_timeout_seconds: 30,
        }
    }
}

/// Worker runtime settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Lease per claim, in seconds.
    pub lease_seconds: u64,
    /// Seconds a graceful shutdown waits for running handlers.
    pub shutdown_grace_seconds: u64,
    /// Days completed batches are kept.
    pub retention_completed_days: u64,
    /// Days failed and cancelled batches, and their dead letters, are kept.
    pub retention_failed_days: u64,
    /// Items inserted per transaction when a batch is created.
    pub insert_chunk_rows: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            lease_seconds: 10,
            shutdown_grace_seconds: 10,
            retention_completed_days: 7,
            retention_failed_days: 30,
            insert_chunk_rows: 500,
        }
    }
}

/// PostgreSQL connection settings, per process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// Schema holding batchd's tables, created if missing; processes that
    /// should work together use the same one.
    pub schema: Option<String>,
    /// Most connections this process opens, besides one for notifications.
    pub pool_size: usize,
    /// Seconds a statement may run before the server cancels it.
    pub statement_timeout_seconds: u64,
    /// Minutes a batch still being streamed in may go without new items
    /// before it counts as abandoned by a dead process and is deleted.
    pub abandon_staging_minutes: u64,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            schema: None,
            pool_size: 16,
            statement_timeout_seconds: 60,
            abandon_staging_minutes: 5,
        }
    }
}

/// The database that stores the jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl DatabaseTarget {
    /// Returns a description for logs: the SQLite path, or the PostgreSQL URL
    /// without its password.
    pub fn describe(&self) -> String {
        match self {
            DatabaseTarget::Sqlite(path) => path.display().to_string(),
            DatabaseTarget::Postgres(url) => match url::Url::parse(url) {
                Ok(mut parsed) => {
                    if parsed.password().is_some() {
                        let _ = parsed.set_password(Some("***"));
                    }
                    parsed.to_string()
                }
                Err(_) => "(unparsable PostgreSQL URL)".to_owned(),
            },
        }
    }
}

/// Addresses the outbound handlers (`fetch`, `webhook`) may connect to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outbound {
    /// Allow 127.0.0.0/8 and ::1. For tests and demos on one machine.
    pub allow_loopback: bool,
    /// Allow private ranges (10/8, 172.16/12, 192.168/16, fc00::/7).
    pub allow_private: bool,
}

/// WebSocket settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    /// Origins browsers may connect from, such as "https://app.example".
    pub allowed_origins: Vec<String>,
    /// Accept handshakes without an Origin header (non-browser clients).
    pub allow_missing_origin: bool,
    /// Progress messages per second per batch per connection.
    pub progress_per_second: u32,
    /// Messages buffered per connection before intermediate ones drop.
    pub buffer_messages: usize,
    /// Seconds a connection's buffer may stay full before it is closed.
    pub slow_client_seconds: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            allowed_origins: vec!["http://localhost:3000".into()],
            allow_missing_origin: true,
            progress_per_second: 4,
            buffer_messages: 256,
            slow_client_seconds: 10,
        }
    }
}

/// Logging and metrics settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `json` (one object per line) or `pretty` (for a terminal).
    pub log_format: LogFormatName,
    /// Level for modules no directive names.
    pub log_level: String,
    /// Per-module levels, such as "sqlite_store=warn"; RUST_LOG wins.
    pub log_directives: Vec<String>,
    /// Days of application log files kept.
    pub app_log_days: u32,
    /// Days of security log files kept.
    pub security_log_days: u32,
    /// Requests slower than this are logged, in milliseconds.
    pub slow_request_ms: u64,
    /// Job attempts slower than this are logged, in milliseconds.
    pub slow_attempt_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatName {
    #[default]
    Json,
    Pretty,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormatName::Json,
            log_level: "info".into(),
            log_directives: Vec::new(),
            app_log_days: 14,
            security_log_days: 30,
            slow_request_ms: 1_000,
            slow_attempt_ms: 30_000,
        }
    }
}

impl TelemetrySettings {
    pub fn slow_thresholds(&self) -> telemetry::SlowThresholds {
        telemetry::SlowThresholds {
            request: Duration::from_millis(self.slow_request_ms),
            attempt: Duration::from_millis(self.slow_attempt_ms),
        }
    }

    /// Builds the telemetry configuration of `serve`.
    pub fn logging(
        &self,
        log_dir: Option<PathBuf>,
        metrics: std::sync::Arc<telemetry::Metrics>,
    ) -> telemetry::TelemetryConfig {
        let format = match std::env::var("BATCHD_LOG_FORMAT").as_deref() {
            Ok("pretty") => telemetry::LogFormat::Pretty,
            Ok("json") => telemetry::LogFormat::Json,
            _ => match self.log_format {
                LogFormatName::Json => telemetry::LogFormat::Json,
                LogFormatName::Pretty => telemetry::LogFormat::Pretty,
            },
        };
        telemetry::TelemetryConfig {
            format,
            default_level: self.log_level.clone(),
            directives: self.log_directives.clone(),
            log_dir,
            app_retention_days: self.app_log_days,
            security_retention_days: self.security_log_days,
            metrics: Some(metrics),
            ..telemetry::TelemetryConfig::default()
        }
    }
}

/// Feature-flag settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlagSettings {
    /// How often changes made by other processes are picked up, in
    /// milliseconds.
    pub refresh_interval_ms: u64,
    /// Result for a flag name that does not exist.
    pub unknown_flag_default: bool,
}

impl Default for FlagSettings {
    fn default() -> Self {
        Self {
            refresh_interval_ms: 2_000,
            unknown_flag_default: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerName {
    Noop,
    Sleep,
    Fetch,
    Webhook,
}

/// One job kind: its handler and how it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSettings {
    pub handler: HandlerName,
    /// Handlers of this kind running at once in this process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Seconds an attempt may run before it is cancelled and retried.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Attempts in all, the first included; 4 means 3 retries.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; each retry doubles it.
    #[serde(default = "default_backoff_ms")]
    pub backoff_base_ms: u64,
    /// Maximum retry delay, in seconds.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_seconds: u64,
    /// Most attempts started per minute across the kind.
    pub rate_per_minute: Option<u32>,
    /// Most attempts started per minute for one user's jobs.
    pub per_user_rate_per_minute: Option<u32>,
    /// `webhook`: the endpoint each item is POSTed to.
    pub url: Option<String>,
    /// `webhook`: the HMAC-SHA256 signing secret.
    pub secret: Option<String>,
    /// `fetch`: largest document, in bytes.
    pub max_bytes: Option<u64>,
    /// `fetch`: accepted content types, such as "application/pdf" or "text/*".
    pub content_types: Option<Vec<String>>,
    /// `fetch`: requests per second to one host.
    pub per_host_per_second: Option<u32>,
}

fn default_concurrency() -> usize {
    16
}
fn default_timeout() -> u64 {
    300
}
fn default_attempts() -> u32 {
    4
}
fn default_backoff_ms() -> u64 {
    2_000
}
fn default_backoff_max() -> u64 {
    3_600
}

impl KindSettings {
    pub fn for_handler(handler: HandlerName) -> Self {
        Self {
            handler,
            concurrency: default_concurrency(),
            timeout_seconds: default_timeout(),
            max_attempts: default_attempts(),
            backoff_base_ms: default_backoff_ms(),
            backoff_max_seconds: default_backoff_max(),
            rate_per_minute: None,
            per_user_rate_per_minute: None,
            url: None,
            secret: None,
            max_bytes: None,
            content_types: None,
            per_host_per_second: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }
}

/// Values given on the command line or in the environment; each one set
/// replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub database: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub jwt_secret: Option<String>,
    pub dev_mode: bool,
}

impl Config {
    /// Loads the file (if any), applies overrides and checks the result.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Self> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<Config>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => Config::default(),
        };

        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(database) = overrides.database {
            config.database = Some(database);
        }
        if let Some(dir) = overrides.data_dir {
            config.data_dir = dir;
        }
        if let Some(dir) = overrides.log_dir {
            config.log_dir = Some(dir);
        }
        if let Some(secret) = overrides.jwt_secret {
            config.jwt_secret = Some(secret);
        }
        config.dev_mode |= overrides.dev_mode;

        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        if self.kinds.is_empty() {
            bail!("config key kinds: at least one job kind is needed");
        }
        for (name, kind) in &self.kinds {
            if name.is_empty() || name.len() > 128 {
                bail!("config key kinds.{name}: kind names are 1 to 128 bytes");
            }
            if kind.concurrency == 0 {
                bail!("config key kinds.{name}.concurrency: must be at least 1");
            }
            if kind.max_attempts == 0 {
                bail!("config key kinds.{name}.max_attempts: must be at least 1");
            }
            if kind.timeout_seconds == 0 {
                bail!("config key kinds.{name}.timeout_seconds: must be at least 1");
            }
            if kind.handler == HandlerName::Webhook {
                let Some(url) = &kind.url else {
                    bail!("config key kinds.{name}.url: a webhook kind needs the endpoint URL");
                };
                let parsed = url::Url::parse(url)
                    .with_context(|| format!("config key kinds.{name}.url: invalid URL {url:?}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    bail!(
                        "config key kinds.{name}.url: only http and https URLs are supported, got {url:?}"
                    );
                }
                if kind.secret.as_deref().is_none_or(str::is_empty) {
                    bail!("config key kinds.{name}.secret: a webhook kind needs a signing secret");
                }
            }
            if kind.rate_per_minute == Some(0) || kind.per_user_rate_per_minute == Some(0) {
                bail!(
                    "config key kinds.{name}: a rate of 0 per minute would never run a job; remove it instead"
                );
            }
        }
        if self.postgres.pool_size == 0 {
            bail!("config key postgres.pool_size: must be at least 1");
        }
        if self.postgres.statement_timeout_seconds == 0 {
            bail!("config key postgres.statement_timeout_seconds: must be at least 1");
        }
        if self.postgres.abandon_staging_minutes == 0 {
            bail!(
                "config key postgres.abandon_staging_minutes: must be at least 1, or uploads still streaming would be deleted"
            );
        }
        if self.flags.refresh_interval_ms == 0 {
            bail!("config key flags.refresh_interval_ms: must be at least 1");
        }
        if self.limits.max_items_per_batch == 0 {
            bail!("config key limits.max_items_per_batch: must be at least 1");
        }
        if let Some(secret) = &self.jwt_secret
            && secret.len() < MIN_SECRET_BYTES
        {
            bail!(
                "config key jwt_secret (BATCHD_JWT_SECRET): must be at least {MIN_SECRET_BYTES} bytes, got {}",
                secret.len()
            );
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listen.parse().with_context(|| {
            format!(
                "config key listen (BATCHD_LISTEN): invalid host:port {:?}",
                self.listen
            )
        })
    }

    /// Returns where the jobs live: a PostgreSQL URL, or the SQLite file
    /// (`database` relative to `data_dir`, by default `data_dir/batchd.db`).
    pub fn database_target(&self) -> DatabaseTarget {
        match self.database.as_deref() {
            None => DatabaseTarget::Sqlite(self.data_dir.join("batchd.db")),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                DatabaseTarget::Postgres(url.to_owned())
            }
            Some(path) => {
                let path = PathBuf::from(path.strip_prefix("sqlite://").unwrap_or(path));
                DatabaseTarget::Sqlite(if path.is_absolute() {
                    path
                } else {
                    self.data_dir.join(path)
                })
            }
        }
    }

    /// Returns the secret that signs and checks tokens. Without one, only a
    /// development server may run, with the public development secret.
    pub fn signing_secret(&self) -> anyhow::Result<String> {
        match (&self.jwt_secret, self.dev_mode) {
            (Some(secret), _) => Ok(secret.clone()),
            (None, true) => Ok(DEV_SECRET.to_owned()),
            (None, false) => bail!(
                "no JWT secret configured: set BATCHD_JWT_SECRET (at least {MIN_SECRET_BYTES} bytes) or jwt_secret in the config file, or pass --dev to run with a public development secret"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_need_a_secret() {
        let config = Config::load(None, Overrides::default()).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080");
        assert!(config.signing_secret().is_err());
        assert!(config.kinds.contains_key("fetch"));
    }

    #[test]
    fn dev_mode_uses_the_public_secret() {
        let overrides = Overrides {
            dev_mode: true,
            ..Overrides::default()
        };
        let config = Config::load(None, overrides).unwrap();
        assert_eq!(config.signing_secret().unwrap(), DEV_SECRET);
    }

    #[test]
    fn short_secret_is_rejected() {
        let overrides = Overrides {
            jwt_secret: Some("short".into()),
            ..Overrides::default()
        };
        let error = Config::load(None, overrides).unwrap_err().to_string();
        assert!(error.contains("jwt_secret"), "{error}");
    }

    #[test]
    fn webhook_kind_needs_url_and_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.toml");
        std::fs::write(&path, "[kinds.notify]\nhandler = \"webhook\"\n").unwrap();
        let error = format!(
            "{:#}",
            Config::load(Some(&path), Overrides::default()).unwrap_err()
        );
        assert!(error.contains("kinds.notify.url"), "{error}");
    }

    #[test]
    fn unknown_key_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.toml");
        std::fs::write(&path, "listne = \"127.0.0.1:1\"\n").unwrap();
        let error = format!(
            "{:#}",
            Config::load(Some(&path), Overrides::default()).unwrap_err()
        );
        assert!(error.contains("listne"), "{error}");
    }

    #[test]
    fn relative_database_is_under_data_dir() {
        let overrides = Overrides {
            data_dir: Some(PathBuf::from("/var/lib/batchd")),
            database: Some("jobs.db".into()),
            ..Overrides::default()
        };
        let config = Config::load(None, overrides).unwrap();
        assert_eq!(
            config.database_target(),
            DatabaseTarget::Sqlite(PathBuf::from("/var/lib/batchd/jobs.db"))
        );
    }

    #[test]
    fn postgres_url_selects_postgres_and_hides_the_password() {
        let overrides = Overrides {
            database: Some("postgres://batchd:hunter2@db.internal:5432/jobs".into()),
            ..Overrides::default()
        };
        let config = Config::load(None, overrides).unwrap();
        let target = config.database_target();
        assert!(matches!(target, DatabaseTarget::Postgres(ref url) if url.contains("hunter2")));
        let shown = target.describe();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.internal"), "{shown}");
    }
}

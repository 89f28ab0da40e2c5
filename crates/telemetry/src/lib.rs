//! batchd's telemetry: the only crate that installs tracing subscribers.
//!
//! - [`init`] installs the global subscriber from a [`TelemetryConfig`]:
//!   standard error in JSON or human-readable text, and with a log
//!   directory, a daily application log and a daily security log (events
//!   with target `security` only), both JSON, with retention.
//! - [`correlation`]: correlation ids and W3C `traceparent` headers.
//! - [`Metrics`]: the Prometheus registry, fed by [`record_queue_events`],
//!   [`Metrics::observe_request`] and the `job` spans of the queue.
//! - [`Redacted`] and [`is_secret_field`]: fields named like a secret
//!   (`token`, `password`, `authorization`, ...) are written as
//!   `[redacted]` by both formats.

pub mod correlation;
mod format;
mod metrics;
mod redact;
mod rolling;
mod slow;
pub mod testing;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use domain::{Clock, SystemClock};
use tracing::Dispatch;
use tracing_subscriber::filter::{EnvFilter, FilterExt, Targets, filter_fn};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{Layer, Registry};

pub use format::{JsonFields, JsonFormat, PrettyFields};
pub use metrics::{
    CONTENT_TYPE, Metrics, OTHER_LABEL, QueueDepth, record_queue_events, resident_memory_bytes,
};
pub use redact::{REDACTED, Redacted, is_secret_field};
pub use rolling::{DailyFile, DailyFileWriter, parse_file_date};
pub use slow::{AttemptTimer, SLOW_TARGET, SlowThresholds};

/// Target of security events: authentication failures, authorization
/// denials, rate-limit rejections, flag changes and admin actions.
pub const SECURITY_TARGET: &str = "security";

/// Format of the standard error output. Log files are always JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One JSON object per line (see [`JsonFormat`]).
    #[default]
    Json,
    /// Human-readable lines for a terminal.
    Pretty,
}

/// Settings of [`init`].
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub format: LogFormat,
    /// Level for targets no directive names: `error`, `warn`, `info`,
    /// `debug`, `trace` or `off`.
    pub default_level: String,
    /// Per-target directives in `EnvFilter` syntax, such as
    /// `sqlite_store=warn`. Directives from `RUST_LOG` are applied after
    /// these, so for the same target `RUST_LOG` wins.
    pub directives: Vec<String>,
    /// Directory for the daily log files; `None` logs to standard error
    /// only.
    pub log_dir: Option<PathBuf>,
    /// File name prefix of the application log: `{prefix}.YYYY-MM-DD.log`.
    pub app_log_prefix: String,
    /// File name prefix of the security log.
    pub security_log_prefix: String,
    /// Dates of application log kept, today's included.
    pub app_retention_days: u32,
    /// Dates of security log kept, today's included.
    pub security_retention_days: u32,
    /// Colors in the human-readable format; `None` uses them when standard
    /// error is a terminal.
    pub ansi: Option<bool>,
    /// When set, the queue's `job` spans are timed into the attempt
    /// duration histogram and slow attempts are logged.
    pub metrics: Option<Arc<Metrics>>,
    /// Source of timestamps, file dates and attempt timing.
    pub clock: Arc<dyn Clock>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            default_level: "info".to_owned(),
            directives: Vec::new(),
            log_dir: None,
            app_log_prefix: "batchd".to_owned(),
            security_log_prefix: "security".to_owned(),
            app_retention_days: 14,
            security_retention_days: 30,
            ansi: None,
            metrics: None,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Errors of [`init`] and [`build`].
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log level or directive {directive:?} in the configuration: {reason}")]
    InvalidDirective { directive: String, reason: String },
    #[error("invalid directive {directive:?} in RUST_LOG: {reason}; fix or unset RUST_LOG")]
    InvalidRustLog { directive: String, reason: String },
    #[error("cannot open the log file {prefix:?} in {dir}: {source}")]
    LogFile {
        dir: PathBuf,
        prefix: String,
        source: std::io::Error,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the log files of an installed subscriber; dropping it flushes them.
/// Hold it until the process exits.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    app_log: Option<DailyFile>,
    security_log: Option<DailyFile>,
}

impl TelemetryGuard {
    pub fn app_log(&self) -> Option<&DailyFile> {
        self.app_log.as_ref()
    }

    pub fn security_log(&self) -> Option<&DailyFile> {
        self.security_log.as_ref()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        use std::io::Write;
        use tracing_subscriber::fmt::MakeWriter;
        for file in [&self.app_log, &self.security_log].into_iter().flatten() {
            let _ = file.make_writer().flush();
        }
    }
}

/// Builds the filter of the standard error and application log outputs:
/// `default_level`, then the configured directives, then those of
/// `rust_log`. A later directive for the same target replaces an earlier
/// one, so `RUST_LOG` wins.
pub fn env_filter(
    config: &TelemetryConfig,
    rust_log: Option<&str>,
) -> Result<EnvFilter, TelemetryError> {
    let invalid_config = |directive: &str, reason: String| TelemetryError::InvalidDirective {
        directive: directive.to_owned(),
        reason,
    };
    let mut filter = EnvFilter::builder()
        .parse(&config.default_level)
        .map_err(|error| invalid_config(&config.default_level, error.to_string()))?;
    for directive in &config.directives {
        let parsed =
            directive
                .parse()
                .map_err(|error: tracing_subscriber::filter::ParseError| {
                    invalid_config(directive, error.to_string())
                })?;
        filter = filter.add_directive(parsed);
    }
    for directive in rust_log.unwrap_or("").split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        let parsed =
            directive
                .parse()
                .map_err(|error: tracing_subscriber::filter::ParseError| {
                    TelemetryError::InvalidRustLog {
                        directive: directive.to_owned(),
                        reason: error.to_string(),
                    }
                })?;
        filter = filter.add_directive(parsed);
    }
    Ok(filter)
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Builds the subscriber of `config` without installing it, writing the
/// standard error output to `console` and reading directives from
/// `rust_log` in place of the environment. Tests use it with
/// [`tracing::dispatcher::with_default`]; [`init`] installs the same.
pub fn build(
    config: &TelemetryConfig,
    console: BoxMakeWriter,
    rust_log: Option<&str>,
) -> Result<(Dispatch, TelemetryGuard), TelemetryError> {
    let mut layers: Vec<BoxedLayer> = Vec::new();
    let mut guard = TelemetryGuard::default();

    let console_filter = env_filter(config, rust_log)?;
    let console_layer = match config.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(console)
            .fmt_fields(JsonFields)
            .event_format(JsonFormat::new(config.clock.clone()))
            .with_filter(console_filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(console)
            .with_ansi(config.ansi.unwrap_or(false))
            .fmt_fields(PrettyFields)
            .with_filter(console_filter)
            .boxed(),
    };
    layers.push(console_layer);

    if let Some(dir) = &config.log_dir {
        let open = |prefix: &str, retention_days: u32| {
            DailyFile::open(dir, prefix, retention_days, config.clock.clone()).map_err(|source| {
                TelemetryError::LogFile {
                    dir: dir.clone(),
                    prefix: prefix.to_owned(),
                    source,
                }
            })
        };
        let app = open(&config.app_log_prefix, config.app_retention_days)?;
        let security = open(&config.security_log_prefix, config.security_retention_days)?;

        // Security events go to their own file, kept longer, and not to
        // the application log.
        let not_security = filter_fn(|metadata| metadata.target() != SECURITY_TARGET);
        let app_filter = env_filter(config, rust_log)?.and(not_security);
        layers.push(
            tracing_subscriber::fmt::layer()
                .with_writer(app.clone())
                .with_ansi(false)
                .fmt_fields(JsonFields)
                .event_format(JsonFormat::new(config.clock.clone()))
                .with_filter(app_filter)
                .boxed(),
        );

        // Spans of every target are enabled here so that security events
        // carry the correlation id and user id of their request span.
        let security_filter =
            filter_fn(|metadata| metadata.is_span() || metadata.target() == SECURITY_TARGET);
        layers.push(
            tracing_subscriber::fmt::layer()
                .with_writer(security.clone())
                .with_ansi(false)
                .fmt_fields(JsonFields)
                .event_format(JsonFormat::new(config.clock.clone()))
                .with_filter(security_filter)
                .boxed(),
        );
        guard.app_log = Some(app);
        guard.security_log = Some(security);
    }

    if let Some(metrics) = &config.metrics {
        // The timer reads spans only, so events are not passed to it.
        let job_spans = Targets::new().with_target("queue", tracing::Level::TRACE);
        layers.push(
            AttemptTimer::new(metrics.clone(), config.clock.clone())
                .with_filter(job_spans.and(filter_fn(|metadata| metadata.is_span())))
                .boxed(),
        );
    }

    let subscriber = Registry::default().with(layers);
    Ok((Dispatch::new(subscriber), guard))
}

/// Installs the global subscriber of `config`, with standard error as the
/// console output and directives from `RUST_LOG`. Call it once, early in
/// `main`, and keep the returned guard alive.
pub fn init(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut config = config;
    if config.ansi.is_none() {
        config.ansi = Some(std::io::stderr().is_terminal());
    }
    let console = BoxMakeWriter::new(std::io::stderr);
    let (dispatch, guard) = build(&config, console, rust_log.as_deref())?;
    tracing::dispatcher::set_global_default(dispatch)
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(guard)
}

//! Slow-operation warnings: requests and job attempts that take longer than
//! a threshold are logged at WARN with their timing, under the target
//! `batchd::slow`, besides being recorded in the metrics.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::Clock;
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::metrics::Metrics;

/// Target of the slow-operation warnings.
pub const SLOW_TARGET: &str = "batchd::slow";

/// Durations past which an operation is logged as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowThresholds {
    /// One HTTP request, from the first byte read to the response.
    pub request: Duration,
    /// One job attempt, from the start of its handler to its outcome.
    pub attempt: Duration,
}

impl Default for SlowThresholds {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(1),
            attempt: Duration::from_secs(30),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Metrics {
    /// Records one HTTP request in the request counter and latency
    /// histogram, and logs a warning when it took longer than the request
    /// threshold. `route` is the route pattern (`/v1/batches/{id}`), not
    /// the concrete path. The warning carries the fields of the current
    /// span, such as the correlation id.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        self.record_request(route, method, status, elapsed);
        let threshold = self.thresholds().request;
        if elapsed > threshold {
            tracing::warn!(
                target: SLOW_TARGET,
                route,
                method,
                status,
                elapsed_ms = millis(elapsed),
                threshold_ms = millis(threshold),
                "slow request"
            );
        }
    }

    /// Records one job attempt in the attempt histogram and logs a warning
    /// when it took longer than the attempt threshold.
    ///
    /// The queue's `job` spans are timed by [`AttemptTimer`], which
    /// [`init`](crate::init) installs when its config has metrics, so the
    /// binary does not need to call this for queue attempts.
    pub fn observe_attempt(&self, kind: &str, elapsed: Duration) {
        self.record_attempt_duration(kind, elapsed);
        let threshold = self.thresholds().attempt;
        if elapsed > threshold {
            tracing::warn!(
                target: SLOW_TARGET,
                kind,
                elapsed_ms = millis(elapsed),
                threshold_ms = millis(threshold),
                "slow job attempt"
            );
        }
    }
}

/// Name and target prefix of the span the queue runs each attempt in.
const JOB_SPAN_NAME: &str = "job";
const JOB_SPAN_TARGET: &str = "queue";

/// Fields of a `job` span, copied when it opens.
#[derive(Debug, Default)]
struct JobSpan {
    started: Option<DateTime<Utc>>,
    kind: String,
    job_id: String,
    batch_id: String,
    attempt: u64,
    correlation_id: String,
}

impl Visit for JobSpan {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "attempt" {
            self.attempt = value;
        } else {
            self.record_text(field, value.to_string());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "attempt" {
            self.attempt = u64::try_from(value).unwrap_or(0);
        } else {
            self.record_text(field, value.to_string());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_text(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_text(field, format!("{value:?}"));
    }
}

impl JobSpan {
    fn record_text(&mut self, field: &Field, value: String) {
        match field.name() {
            "kind" => self.kind = value,
            "job_id" => self.job_id = value,
            "batch_id" => self.batch_id = value,
            "correlation_id" => self.correlation_id = value,
            _ => {}
        }
    }
}

/// Layer that times the queue's `job` spans, from creation to close, and
/// feeds each duration to [`Metrics::observe_attempt`].
///
/// The span opens just before the attempt's handler starts and closes once
/// its outcome is handed to the recorder, so the time includes that
/// hand-over but not the database write.
pub struct AttemptTimer {
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for AttemptTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptTimer").finish_non_exhaustive()
    }
}

impl AttemptTimer {
    pub fn new(metrics: Arc<Metrics>, clock: Arc<dyn Clock>) -> Self {
        Self { metrics, clock }
    }
}

impl<S> Layer<S> for AttemptTimer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let metadata = attrs.metadata();
        if metadata.name() != JOB_SPAN_NAME || !metadata.target().starts_with(JOB_SPAN_TARGET) {
            return;
        }
        let Some(span) = ctx.span(id) else {
            return;
        };
        let mut job = JobSpan {
            started: Some(self.clock.now()),
            ..JobSpan::default()
        };
        attrs.record(&mut job);
        span.extensions_mut().insert(job);
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else {
            return;
        };
        // Take the data out and release the lock before logging, because
        // the formatting layers read this span's extensions too.
        let Some(job) = span.extensions_mut().remove::<JobSpan>() else {
            return;
        };
        drop(span);
        let Some(started) = job.started else {
            return;
        };
        let elapsed = (self.clock.now() - started).to_std().unwrap_or_default();
        self.metrics.record_attempt_duration(&job.kind, elapsed);

        let threshold = self.metrics.thresholds().attempt;
        if elapsed > threshold {
            // The span is closing, so the warning names the job explicitly
            // and has no parent.
            tracing::warn!(
                target: SLOW_TARGET,
                parent: None,
                job_id = %job.job_id,
                batch_id = %job.batch_id,
                kind = %job.kind,
                attempt = job.attempt,
                correlation_id = %job.correlation_id,
                elapsed_ms = millis(elapsed),
                threshold_ms = millis(threshold),
                "slow job attempt"
            );
        }
    }
}

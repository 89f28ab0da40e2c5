//! batchd's Prometheus metrics, encoded in the OpenMetrics text format,
//! which Prometheus scrapes as it does its own text format.
//!
//! Labels come from small fixed sets only: job kinds, job and batch
//! statuses, rate-limit policy names, route patterns, methods and status
//! classes. User ids, batch ids and job ids never become labels.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{BatchId, BatchStatus, JobStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use queue::QueueEvent;
use tokio::sync::broadcast;

use crate::slow::SlowThresholds;

/// `Content-Type` of the output of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label value that stands for every value past a label's cap or outside
/// its allowed characters.
pub const OTHER_LABEL: &str = "other";

/// Distinct job kinds kept as label values; later ones become `other`.
const MAX_KINDS: usize = 64;
/// Distinct rate-limit policies kept as label values.
const MAX_POLICIES: usize = 64;
/// Distinct route patterns kept as label values.
const MAX_ROUTES: usize = 128;
/// Maximum length of a kind, policy or route kept as a label value, in bytes.
const MAX_LABEL_LEN: usize = 96;

/// Attempt durations in seconds, from 10 ms to 15 minutes.
const ATTEMPT_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 900.0,
];
/// Batch durations in seconds, from 1 second to 1 day.
const BATCH_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 43200.0, 86400.0,
];
/// HTTP request latencies in seconds, from 5 ms to 10 seconds.
const HTTP_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DepthLabels {
    kind: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BatchLabels {
    kind: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: &'static str,
    status_class: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn attempt_histogram() -> Histogram {
    Histogram::new(ATTEMPT_BUCKETS)
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

/// Queue depth of one kind and status, as a depth source returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub kind: String,
    pub status: JobStatus,
    pub depth: i64,
}

type DepthSource = Box<dyn Fn() -> Vec<QueueDepth> + Send + Sync>;

/// Label values seen so far for one label, capped at `max`.
#[derive(Debug)]
struct BoundedValues {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl BoundedValues {
    fn new(max: usize) -> Self {
        Self {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// Returns the value itself while fewer than `max` values were seen,
    /// else [`OTHER_LABEL`]. Values with unexpected characters also become
    /// `other`.
    fn admit(&self, value: &str) -> String {
        let well_formed = !value.is_empty()
            && value.len() <= MAX_LABEL_LEN
            && value.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'{' | b'}')
            });
        if !well_formed {
            return OTHER_LABEL.to_owned();
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() >= self.max {
            return OTHER_LABEL.to_owned();
        }
        seen.insert(value.to_owned());
        value.to_owned()
    }
}

/// Every metric batchd exports, in one registry. Share it with an `Arc`.
pub struct Metrics {
    registry: Registry,
    thresholds: SlowThresholds,
    kinds: BoundedValues,
    policies: BoundedValues,
    routes: BoundedValues,
    depth_source: Mutex<Option<DepthSource>>,

    queue_depth: Family<DepthLabels, Gauge>,
    jobs_started: Family<KindLabels, Counter>,
    jobs_succeeded: Family<KindLabels, Counter>,
    jobs_retried: Family<KindLabels, Counter>,
    jobs_dead_lettered: Family<KindLabels, Counter>,
    jobs_cancelled: Family<KindLabels, Counter>,
    attempt_duration: HistogramFamily<KindLabels>,
    batches_finished: Family<BatchLabels, Counter>,
    batch_duration: HistogramFamily<BatchLabels>,
    rate_limit_rejections: Family<PolicyLabels, Counter>,
    websocket_connections: Gauge,
    http_requests: Family<HttpLabels, Counter>,
    http_request_duration: HistogramFamily<HttpLabels>,
    resident_memory: Gauge,
    events_missed: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("thresholds", &self.thresholds)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(SlowThresholds::default())
    }
}

impl Metrics {
    /// Creates and registers every metric; `thresholds` decide when
    /// [`observe_request`](Self::observe_request) and
    /// [`observe_attempt`](Self::observe_attempt) log a warning.
    pub fn new(thresholds: SlowThresholds) -> Self {
        let mut registry = Registry::with_prefix("batchd");
        let metrics = Self {
            registry: Registry::default(),
            thresholds,
            kinds: BoundedValues::new(MAX_KINDS),
            policies: BoundedValues::new(MAX_POLICIES),
            routes: BoundedValues::new(MAX_ROUTES),
            depth_source: Mutex::new(None),
            queue_depth: Family::default(),
            jobs_started: Family::default(),
            jobs_succeeded: Family::default(),
            jobs_retried: Family::default(),
            jobs_dead_lettered: Family::default(),
            jobs_cancelled: Family::default(),
            attempt_duration: Family::new_with_constructor(attempt_histogram),
            batches_finished: Family::default(),
            batch_duration: Family::new_with_constructor(batch_histogram),
            rate_limit_rejections: Family::default(),
            websocket_connections: Gauge::default(),
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(http_histogram),
            resident_memory: Gauge::default(),
            events_missed: Counter::default(),
        };

        registry.register(
            "queue_depth",
            "Jobs per kind and status",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "jobs_started",
            "Job attempts started",
            metrics.jobs_started.clone(),
        );
        registry.register(
            "jobs_succeeded",
            "Jobs that succeeded",
            metrics.jobs_succeeded.clone(),
        );
        registry.register(
            "jobs_retried",
            "Failed attempts scheduled for a retry",
            metrics.jobs_retried.clone(),
        );
        registry.register(
            "jobs_dead_lettered",
            "Jobs moved to the dead letters",
            metrics.jobs_dead_lettered.clone(),
        );
        registry.register(
            "jobs_cancelled",
            "Jobs cancelled",
            metrics.jobs_cancelled.clone(),
        );
        registry.register(
            "job_attempt_duration_seconds",
            "Duration of job attempts",
            metrics.attempt_duration.clone(),
        );
        registry.register(
            "batches_finished",
            "Batches that reached a final status",
            metrics.batches_finished.clone(),
        );
        registry.register(
            "batch_duration_seconds",
            "Time from batch creation to its final status",
            metrics.batch_duration.clone(),
        );
        registry.register(
            "rate_limit_rejections",
            "Requests rejected by a rate-limit policy",
            metrics.rate_limit_rejections.clone(),
        );
        registry.register(
            "websocket_connections",
            "Open WebSocket connections",
            metrics.websocket_connections.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route pattern, method and status class",
            metrics.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route pattern, method and status class",
            metrics.http_request_duration.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of this process, read from /proc/self/status",
            metrics.resident_memory.clone(),
        );
        registry.register(
            "queue_events_missed",
            "Queue events the metrics consumer missed because it fell behind",
            metrics.events_missed.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    pub fn thresholds(&self) -> SlowThresholds {
        self.thresholds
    }

    /// Refreshes the gauges read at scrape time (queue depth from the
    /// depth source, resident memory) and encodes every metric. A labeled
    /// metric with no series yet is left out, as prometheus-client 0.26
    /// encodes an empty family as nothing.
    pub fn encode(&self) -> String {
        self.refresh_queue_depth();
        if let Some(bytes) = resident_memory_bytes() {
            self.resident_memory
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing into a String cannot fail, so an error here comes from
            // the label encoding.
            tracing::error!(%error, "encoding metrics failed");
        }
        out
    }

    /// Installs a callback that [`encode`](Self::encode) calls to read the
    /// queue depth. It runs on the scraping thread, so it must not block
    /// for long: return numbers a background task keeps up to date.
    pub fn set_depth_source(&self, source: impl Fn() -> Vec<QueueDepth> + Send + Sync + 'static) {
        *self
            .depth_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Box::new(source));
    }

    fn refresh_queue_depth(&self) {
        let source = self
            .depth_source
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(source) = source.as_ref() {
            for depth in source() {
                self.set_queue_depth(&depth.kind, depth.status, depth.depth);
            }
        }
    }

    pub fn set_queue_depth(&self, kind: &str, status: JobStatus, depth: i64) {
        let labels = DepthLabels {
            kind: self.kinds.admit(kind),
            status: status.as_str(),
        };
        self.queue_depth.get_or_create(&labels).set(depth);
    }

    fn kind_labels(&self, kind: &str) -> KindLabels {
        KindLabels {
            kind: self.kinds.admit(kind),
        }
    }

    /// Counts a committed queue event: job starts and outcomes per kind,
    /// and finished batches per kind and status. Queued and progress events
    /// change no metric.
    pub fn record_event(&self, event: &QueueEvent) {
        match event {
            QueueEvent::JobProcessing(job) => {
                self.jobs_started
                    .get_or_create(&self.kind_labels(&job.kind))
                    .inc();
            }
            QueueEvent::JobCompleted(job) => {
                self.jobs_succeeded
                    .get_or_create(&self.kind_labels(&job.kind))
                    .inc();
            }
            QueueEvent::JobRetry(job) => {
                self.jobs_retried
                    .get_or_create(&self.kind_labels(&job.kind))
                    .inc();
            }
            QueueEvent::JobFailed(job) => {
                self.jobs_dead_lettered
                    .get_or_create(&self.kind_labels(&job.kind))
                    .inc();
            }
            QueueEvent::JobCancelled(job) => {
                self.jobs_cancelled
                    .get_or_create(&self.kind_labels(&job.kind))
                    .inc();
            }
            QueueEvent::BatchFinished(finished) => {
                let labels = BatchLabels {
                    kind: self.kinds.admit(&finished.kind),
                    status: finished.status.as_str(),
                };
                self.batches_finished.get_or_create(&labels).inc();
                if let Some(age) = batch_age(finished.batch_id, finished.finished_at) {
                    self.batch_duration
                        .get_or_create(&labels)
                        .observe(age.as_secs_f64());
                }
            }
            QueueEvent::JobQueued(_)
            | QueueEvent::JobProgress(_)
            | QueueEvent::BatchProgress(_) => {}
        }
    }

    /// Records a batch duration measured by the caller, for batches whose
    /// creation time is not in their id.
    pub fn observe_batch_duration(&self, kind: &str, status: BatchStatus, elapsed: Duration) {
        let labels = BatchLabels {
            kind: self.kinds.admit(kind),
            status: status.as_str(),
        };
        self.batch_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn record_attempt_duration(&self, kind: &str, elapsed: Duration) {
        self.attempt_duration
            .get_or_create(&self.kind_labels(kind))
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn record_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let labels = HttpLabels {
            route: self.routes.admit(&route_pattern(route)),
            method: method_label(method),
            status_class: status_class(status),
        };
        self.http_requests.get_or_create(&labels).inc();
        self.http_request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn rate_limit_rejected(&self, policy: &str) {
        let labels = PolicyLabels {
            policy: self.policies.admit(policy),
        };
        self.rate_limit_rejections.get_or_create(&labels).inc();
    }

    pub fn websocket_opened(&self) {
        self.websocket_connections.inc();
    }

    pub fn websocket_closed(&self) {
        self.websocket_connections.dec();
    }

    fn events_missed(&self, count: u64) {
        self.events_missed.inc_by(count);
    }
}

/// Time from a batch's creation, read from its UUID v7 id, to `finished_at`.
/// `None` for ids of another version or a creation time after the finish.
fn batch_age(id: BatchId, finished_at: DateTime<Utc>) -> Option<Duration> {
    if id.0.get_version_num() != 7 {
        return None;
    }
    let (seconds, nanos) = id.0.get_timestamp()?.to_unix();
    let created = DateTime::<Utc>::from_timestamp(i64::try_from(seconds).ok()?, nanos)?;
    (finished_at - created).to_std().ok()
}

/// Replaces path segments that look like ids (all digits, or a UUID) by
/// `{id}`, in case a caller passes a concrete path instead of its pattern.
fn route_pattern(route: &str) -> String {
    route
        .split('/')
        .map(|segment| {
            let is_id = (!segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()))
                || uuid::Uuid::parse_str(segment).is_ok();
            if is_id { "{id}" } else { segment }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    KNOWN
        .iter()
        .find(|known| known.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or(OTHER_LABEL)
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => OTHER_LABEL,
    }
}

/// Resident set size of this process in bytes, from the `VmRSS` line of
/// `/proc/self/status`; `None` where that file does not exist.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// Feeds queue events into `metrics` until the channel closes. A receiver
/// that falls behind loses the oldest events: that is logged and counted in
/// `batchd_queue_events_missed_total`, and counting goes on.
pub async fn record_queue_events(
    metrics: Arc<Metrics>,
    mut events: broadcast::Receiver<QueueEvent>,
) {
    loop {
        match events.recv().await {
            Ok(event) => metrics.record_event(&event),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "metrics fell behind the queue events; job counters miss these events"
                );
                metrics.events_missed(missed);
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_parses_kilobytes() {
        let status = "Name:\tbatchd\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_memory_read_on_linux() {
        let bytes = resident_memory_bytes().expect("VmRSS on Linux");
        assert!(bytes > 0);
    }

    #[test]
    fn route_ids_become_placeholders() {
        assert_eq!(route_pattern("/v1/batches/{id}"), "/v1/batches/{id}");
        assert_eq!(route_pattern("/v1/jobs/12345"), "/v1/jobs/{id}");
        assert_eq!(
            route_pattern("/v1/batches/0190c1d2-7b3a-7c4d-8e5f-0123456789ab/items"),
            "/v1/batches/{id}/items"
        );
    }

    #[test]
    fn status_classes_and_methods() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(429), "4xx");
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(42), OTHER_LABEL);
        assert_eq!(method_label("get"), "GET");
        assert_eq!(method_label("BREW"), OTHER_LABEL);
    }

    #[test]
    fn label_values_capped() {
        let values = BoundedValues::new(2);
        assert_eq!(values.admit("a"), "a");
        assert_eq!(values.admit("b"), "b");
        assert_eq!(values.admit("c"), OTHER_LABEL);
        assert_eq!(values.admit("a"), "a");
        assert_eq!(values.admit("has space"), OTHER_LABEL);
        assert_eq!(values.admit(""), OTHER_LABEL);
    }

    #[test]
    fn batch_age_from_v7_id() {
        let id = BatchId(uuid::Uuid::now_v7());
        let finished = Utc::now() + chrono::Duration::seconds(90);
        let age = batch_age(id, finished).expect("v7 id");
        assert!(
            age >= Duration::from_secs(89) && age <= Duration::from_secs(91),
            "{age:?}"
        );
        assert_eq!(batch_age(BatchId(uuid::Uuid::new_v4()), finished), None);
        let before = Utc::now() - chrono::Duration::seconds(90);
        assert_eq!(batch_age(BatchId(uuid::Uuid::now_v7()), before), None);
    }
}

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use domain::{BatchCounters, BatchFinished, BatchId, BatchStatus, JobId, JobStatus, UserId};
use queue::{JobEvent, QueueEvent};
use telemetry::{Metrics, OTHER_LABEL, QueueDepth, record_queue_events};
use tokio::sync::broadcast;

const USER: &str = "user-secret-alice";

fn job_event(kind: &str, batch_id: BatchId, job_id: i64) -> JobEvent {
    JobEvent {
        job_id: JobId(job_id),
        batch_id,
        owner: UserId::new(USER),
        kind: kind.to_owned(),
        seq: 0,
        attempt: 1,
        progress: None,
        error: None,
        run_at: None,
        correlation_id: Some("req-1".to_owned()),
    }
}

fn batch_finished(kind: &str, batch_id: BatchId, status: BatchStatus) -> BatchFinished {
    BatchFinished {
        outbox_id: 1,
        batch_id,
        owner: UserId::new(USER),
        kind: kind.to_owned(),
        status,
        counters: BatchCounters::default(),
        generation: 0,
        correlation_id: None,
        finished_at: Utc::now() + chrono::Duration::seconds(10),
        revision: 1,
    }
}

/// Parses the text format: checks each line's shape and returns the
/// samples by their full series name (name plus labels), and the declared
/// type of each metric family.
fn parse_exposition(text: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "output must end with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unexpected type in {line}"
            );
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line}");
        }
        samples.insert(series.to_owned(), value);
    }
    (samples, types)
}

#[test]
fn encode_declares_every_metric_type() {
    let metrics = Metrics::default();
    // A labeled family appears only once it has a series, so give each one.
    let batch = BatchId::new();
    for event in [
        QueueEvent::JobProcessing(job_event("fetch", batch, 1)),
        QueueEvent::JobCompleted(job_event("fetch", batch, 1)),
        QueueEvent::JobRetry(job_event("fetch", batch, 2)),
        QueueEvent::JobFailed(job_event("fetch", batch, 2)),
        QueueEvent::JobCancelled(job_event("fetch", batch, 3)),
        QueueEvent::BatchFinished(batch_finished("fetch", batch, BatchStatus::Failed)),
    ] {
        metrics.record_event(&event);
    }
    metrics.set_queue_depth("fetch", JobStatus::Queued, 1);
    metrics.observe_attempt("fetch", Duration::from_millis(10));
    metrics.observe_request("/v1/batches", "POST", 202, Duration::from_millis(3));
    metrics.rate_limit_rejected("submit");
    let text = metrics.encode();
    let (_, types) = parse_exposition(&text);
    let expected = [
        ("batchd_queue_depth", "gauge"),
        ("batchd_jobs_started", "counter"),
        ("batchd_jobs_succeeded", "counter"),
        ("batchd_jobs_retried", "counter"),
        ("batchd_jobs_dead_lettered", "counter"),
        ("batchd_jobs_cancelled", "counter"),
        ("batchd_job_attempt_duration_seconds", "histogram"),
        ("batchd_batches_finished", "counter"),
        ("batchd_batch_duration_seconds", "histogram"),
        ("batchd_rate_limit_rejections", "counter"),
        ("batchd_websocket_connections", "gauge"),
        ("batchd_http_requests", "counter"),
        ("batchd_http_request_duration_seconds", "histogram"),
        ("batchd_process_resident_memory_bytes", "gauge"),
        ("batchd_queue_events_missed", "counter"),
    ];
    for (name, kind) in expected {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "{name}\n{text}"
        );
    }
}

#[test]
fn counters_match_events_fed_in() {
    let metrics = Metrics::default();
    let batch = BatchId::new();
    let mut events = Vec::new();
    for job in 0..5 {
        events.push(QueueEvent::JobQueued(job_event("fetch", batch, job)));
        events.push(QueueEvent::JobProcessing(job_event("fetch", batch, job)));
    }
    for job in 0..3 {
        events.push(QueueEvent::JobCompleted(job_event("fetch", batch, job)));
    }
    events.push(QueueEvent::JobRetry(job_event("fetch", batch, 3)));
    events.push(QueueEvent::JobFailed(job_event("fetch", batch, 3)));
    events.push(QueueEvent::JobCancelled(job_event("fetch", batch, 4)));
    events.push(QueueEvent::JobProcessing(job_event("webhook", batch, 9)));
    events.push(QueueEvent::BatchFinished(batch_finished(
        "fetch",
        batch,
        BatchStatus::Failed,
    )));
    for event in &events {
        metrics.record_event(event);
    }

    let text = metrics.encode();
    let (samples, _) = parse_exposition(&text);
    let expect = [
        ("batchd_jobs_started_total{kind=\"fetch\"}", 5.0),
        ("batchd_jobs_started_total{kind=\"webhook\"}", 1.0),
        ("batchd_jobs_succeeded_total{kind=\"fetch\"}", 3.0),
        ("batchd_jobs_retried_total{kind=\"fetch\"}", 1.0),
        ("batchd_jobs_dead_lettered_total{kind=\"fetch\"}", 1.0),
        ("batchd_jobs_cancelled_total{kind=\"fetch\"}", 1.0),
        (
            "batchd_batches_finished_total{kind=\"fetch\",status=\"failed\"}",
            1.0,
        ),
        (
            "batchd_batch_duration_seconds_count{kind=\"fetch\",status=\"failed\"}",
            1.0,
        ),
    ];
    for (series, value) in expect {
        assert_eq!(samples.get(series), Some(&value), "{series}\n{text}");
    }
    assert!(
        !samples.contains_key("batchd_jobs_succeeded_total{kind=\"webhook\"}"),
        "{text}"
    );
}

#[test]
fn labels_never_hold_user_or_batch_ids() {
    let metrics = Metrics::default();
    let batch = BatchId::new();
    metrics.record_event(&QueueEvent::JobProcessing(job_event("fetch", batch, 77)));
    metrics.record_event(&QueueEvent::BatchFinished(batch_finished(
        "fetch",
        batch,
        BatchStatus::Completed,
    )));
    metrics.observe_request(
        &format!("/v1/batches/{batch}"),
        "GET",
        200,
        Duration::from_millis(5),
    );
    metrics.observe_request("/v1/jobs/77", "get", 404, Duration::from_millis(5));
    metrics.rate_limit_rejected("submit_per_user");

    let text = metrics.encode();
    assert!(!text.contains(USER), "{text}");
    assert!(!text.contains(&batch.to_string()), "{text}");
    assert!(!text.contains("req-1"), "{text}");
    assert!(text.contains("route=\"/v1/batches/{id}\""), "{text}");
    assert!(
        text.contains("route=\"/v1/jobs/{id}\",method=\"GET\",status_class=\"4xx\""),
        "{text}"
    );
    assert!(
        text.contains("batchd_rate_limit_rejections_total{policy=\"submit_per_user\"} 1"),
        "{text}"
    );
}

#[test]
fn kind_labels_capped_at_limit() {
    let metrics = Metrics::default();
    let batch = BatchId::new();
    for index in 0..100 {
        let kind = format!("kind{index}");
        metrics.record_event(&QueueEvent::JobProcessing(job_event(&kind, batch, index)));
    }
    let (samples, _) = parse_exposition(&metrics.encode());
    let started: Vec<&String> = samples
        .keys()
        .filter(|series| series.starts_with("batchd_jobs_started_total"))
        .collect();
    assert_eq!(started.len(), 65);
    let other = format!("batchd_jobs_started_total{{kind=\"{OTHER_LABEL}\"}}");
    assert_eq!(samples.get(&other), Some(&36.0));
}

#[test]
fn gauges_set_and_read_at_encode() {
    let metrics = Metrics::default();
    metrics.set_queue_depth("fetch", JobStatus::Queued, 12);
    metrics.set_depth_source(|| {
        vec![QueueDepth {
            kind: "webhook".to_owned(),
            status: JobStatus::Retrying,
            depth: 4,
        }]
    });
    metrics.websocket_opened();
    metrics.websocket_opened();
    metrics.websocket_closed();

    let text = metrics.encode();
    let (samples, _) = parse_exposition(&text);
    assert_eq!(
        samples.get("batchd_queue_depth{kind=\"fetch\",status=\"queued\"}"),
        Some(&12.0),
        "{text}"
    );
    assert_eq!(
        samples.get("batchd_queue_depth{kind=\"webhook\",status=\"retrying\"}"),
        Some(&4.0),
        "{text}"
    );
    assert_eq!(samples.get("batchd_websocket_connections"), Some(&1.0));
    if cfg!(target_os = "linux") {
        let memory = samples["batchd_process_resident_memory_bytes"];
        assert!(memory > 0.0, "{text}");
    }
}

#[tokio::test]
async fn event_consumer_survives_lag() {
    let metrics = Arc::new(Metrics::default());
    let (sender, receiver) = broadcast::channel(4);
    let batch = BatchId::new();
    // Ten events into a channel of four: the consumer misses six.
    for job in 0..10 {
        sender
            .send(QueueEvent::JobCompleted(job_event("fetch", batch, job)))
            .unwrap();
    }
    drop(sender);

    record_queue_events(metrics.clone(), receiver).await;

    let (samples, _) = parse_exposition(&metrics.encode());
    assert_eq!(samples.get("batchd_queue_events_missed_total"), Some(&6.0));
    assert_eq!(
        samples.get("batchd_jobs_succeeded_total{kind=\"fetch\"}"),
        Some(&4.0)
    );
}

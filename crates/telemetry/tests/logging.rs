#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use domain::{Clock, ManualClock};
use serde_json::Value;
use telemetry::testing::{CaptureBuffer, capture_json};
use telemetry::{
    LogFormat, Metrics, REDACTED, Redacted, SLOW_TARGET, SlowThresholds, TelemetryConfig,
    TelemetryError, build, env_filter,
};

fn manual_clock() -> ManualClock {
    ManualClock::new(Utc.with_ymd_and_hms(2026, 12, 4, 10, 30, 0).unwrap())
}

fn config_with_clock(clock: &ManualClock) -> TelemetryConfig {
    TelemetryConfig {
        clock: Arc::new(clock.clone()),
        ..TelemetryConfig::default()
    }
}

fn run_with(config: &TelemetryConfig, rust_log: Option<&str>, f: impl FnOnce()) -> CaptureBuffer {
    let buffer = CaptureBuffer::new();
    let (dispatch, _guard) = build(config, buffer.make_writer(), rust_log).unwrap();
    tracing::dispatcher::with_default(&dispatch, f);
    buffer
}

fn read_lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn json_lines_carry_span_fields() {
    let clock = manual_clock();
    let output = run_with(&config_with_clock(&clock), None, || {
        let request = tracing::info_span!("request", correlation_id = "req-1", user_id = "alice");
        let _request = request.enter();
        tracing::info!(items = 3, "batch accepted");
        let job = tracing::info_span!(
            "job",
            job_id = 42,
            batch_id = "0190c1d2-7b3a-7c4d-8e5f-0123456789ab",
            attempt = 2,
            correlation_id = "req-1",
        );
        let _job = job.enter();
        tracing::warn!(duration_ms = 15, "attempt did not succeed");
    });

    let lines = output.json_lines();
    assert_eq!(lines.len(), 2, "{}", output.contents());

    let first = &lines[0];
    assert_eq!(first["timestamp"], "2026-12-04T10:30:00.000000Z");
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["target"], "logging");
    assert_eq!(first["message"], "batch accepted");
    assert_eq!(first["correlation_id"], "req-1");
    assert_eq!(first["user_id"], "alice");
    assert_eq!(first["items"], 3);
    assert_eq!(first["spans"], serde_json::json!(["request"]));

    let second = &lines[1];
    assert_eq!(second["level"], "WARN");
    assert_eq!(second["correlation_id"], "req-1");
    assert_eq!(second["user_id"], "alice");
    assert_eq!(second["job_id"], 42);
    assert_eq!(second["batch_id"], "0190c1d2-7b3a-7c4d-8e5f-0123456789ab");
    assert_eq!(second["attempt"], 2);
    assert_eq!(second["duration_ms"], 15);
    assert_eq!(second["spans"], serde_json::json!(["request", "job"]));
}

#[test]
fn json_span_fields_recorded_later() {
    let output = capture_json(|| {
        let span = tracing::info_span!("request", user_id = tracing::field::Empty);
        let _entered = span.enter();
        span.record("user_id", "bob");
        tracing::info!("authenticated");
    })
    .1;
    let lines = output.json_lines();
    assert_eq!(lines[0]["user_id"], "bob");
}

#[test]
fn json_escapes_and_reserved_names() {
    let output = capture_json(|| {
        tracing::info!(
            level = "custom",
            detail = "quote \" and\nnewline",
            "a \"quoted\" message"
        );
    })
    .1;
    let lines = output.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["level"], "INFO");
    assert_eq!(lines[0]["field.level"], "custom");
    assert_eq!(lines[0]["detail"], "quote \" and\nnewline");
    assert_eq!(lines[0]["message"], "a \"quoted\" message");
}

#[test]
fn secret_named_fields_redacted_in_json() {
    let (_, output) = capture_json(|| {
        let span = tracing::info_span!("request", api_key = "key-in-span");
        let _entered = span.enter();
        tracing::info!(
            token = "tok-123",
            password = %"pw-456",
            authorization = ?"Bearer abc.def",
            jwt_secret = "sec-789",
            user_id = "alice",
            "login"
        );
    });
    for secret in ["key-in-span", "tok-123", "pw-456", "abc.def", "sec-789"] {
        output.assert_not_logged(secret);
    }
    let line = &output.json_lines()[0];
    for name in [
        "token",
        "password",
        "authorization",
        "jwt_secret",
        "api_key",
    ] {
        assert_eq!(line[name], REDACTED, "{name}");
    }
    assert_eq!(line["user_id"], "alice");
}

#[test]
fn redacted_wrapper_hides_value_under_any_name() {
    let (_, output) = capture_json(|| {
        let value = Redacted::new("hunter2");
        tracing::info!(value = %value, debug = ?value, "wrapped {value}");
    });
    output.assert_not_logged("hunter2");
    let line = &output.json_lines()[0];
    assert_eq!(line["value"], REDACTED);
    assert_eq!(line["debug"], REDACTED);
    assert_eq!(line["message"], "wrapped [redacted]");
}

#[test]
fn pretty_format_redacts_secrets() {
    let config = TelemetryConfig {
        format: LogFormat::Pretty,
        ansi: Some(false),
        ..TelemetryConfig::default()
    };
    let output = run_with(&config, None, || {
        let span = tracing::info_span!("request", correlation_id = "req-9", token = "span-tok");
        let _entered = span.enter();
        tracing::info!(password = "pw-1", kind = "fetch", "signed in");
    });
    let text = output.contents();
    assert!(text.contains("signed in"), "{text}");
    assert!(
        text.contains("kind=\"fetch\"") || text.contains("kind=fetch"),
        "{text}"
    );
    assert!(text.contains("correlation_id=req-9"), "{text}");
    assert!(text.contains("password=[redacted]"), "{text}");
    output.assert_not_logged("pw-1");
    output.assert_not_logged("span-tok");
}

#[test]
fn rust_log_wins_over_config() {
    let config = TelemetryConfig {
        directives: vec!["noisy=debug".to_owned()],
        ..TelemetryConfig::default()
    };
    let output = run_with(&config, Some("noisy=warn"), || {
        tracing::debug!(target: "noisy", "debug from noisy");
        tracing::warn!(target: "noisy", "warn from noisy");
        tracing::info!(target: "quiet", "info from quiet");
        tracing::debug!(target: "quiet", "debug from quiet");
    });
    let messages: Vec<String> = output
        .json_lines()
        .iter()
        .map(|line| line["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, ["warn from noisy", "info from quiet"]);
}

#[test]
fn config_directive_applies_without_rust_log() {
    let config = TelemetryConfig {
        default_level: "warn".to_owned(),
        directives: vec!["chatty=debug".to_owned()],
        ..TelemetryConfig::default()
    };
    let output = run_with(&config, None, || {
        tracing::debug!(target: "chatty", "kept");
        tracing::info!(target: "other", "dropped");
    });
    let lines = output.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["message"], "kept");
}

#[test]
fn invalid_directives_rejected() {
    let config = TelemetryConfig {
        directives: vec!["queue=loud".to_owned()],
        ..TelemetryConfig::default()
    };
    let error = env_filter(&config, None).unwrap_err();
    assert!(
        matches!(error, TelemetryError::InvalidDirective { .. }),
        "{error}"
    );

    let error = env_filter(&TelemetryConfig::default(), Some("queue=loud")).unwrap_err();
    assert!(
        matches!(error, TelemetryError::InvalidRustLog { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("RUST_LOG"));
}

#[test]
fn security_events_only_in_security_file() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let config = TelemetryConfig {
        log_dir: Some(dir.path().to_path_buf()),
        ..config_with_clock(&clock)
    };
    let console = CaptureBuffer::new();
    let (dispatch, guard) = build(&config, console.make_writer(), None).unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        let span = tracing::info_span!("request", correlation_id = "req-7");
        let _entered = span.enter();
        tracing::info!("batch accepted");
        tracing::warn!(target: "security", code = "invalid_token", token = "tok-x", "authentication failed");
        tracing::info!(target: "security", user_id = "admin-1", flag = "beta", "feature flag changed");
    });

    let app_path = guard.app_log().unwrap().current_path();
    let security_path = guard.security_log().unwrap().current_path();
    assert_eq!(app_path, dir.path().join("batchd.2026-12-04.log"));
    assert_eq!(security_path, dir.path().join("security.2026-12-04.log"));

    let app = read_lines(&app_path);
    assert_eq!(app.len(), 1);
    assert_eq!(app[0]["message"], "batch accepted");

    let security = read_lines(&security_path);
    let messages: Vec<&str> = security
        .iter()
        .map(|line| line["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["authentication failed", "feature flag changed"]);
    for line in &security {
        assert_eq!(line["target"], "security");
        assert_eq!(line["correlation_id"], "req-7");
    }
    assert_eq!(security[0]["token"], REDACTED);
    assert!(
        !fs::read_to_string(&security_path)
            .unwrap()
            .contains("tok-x")
    );

    // Standard error still gets every event.
    assert_eq!(console.json_lines().len(), 3);
}

#[test]
fn rotation_over_three_days_keeps_two() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = [
        "notes.txt",
        "batchd.log",
        "batchd.2026-01-01.log.gz",
        "batchd-2026-01-01.log",
        "other.2026-01-01.log",
    ];
    for name in foreign {
        fs::write(dir.path().join(name), "keep me").unwrap();
    }
    fs::create_dir(dir.path().join("batchd.2026-01-02.log")).unwrap();
    // A file of this logger's pattern, far past retention.
    fs::write(dir.path().join("batchd.2026-01-03.log"), "old").unwrap();

    let clock = manual_clock();
    let config = TelemetryConfig {
        log_dir: Some(dir.path().to_path_buf()),
        app_retention_days: 2,
        security_retention_days: 3,
        ..config_with_clock(&clock)
    };
    let console = CaptureBuffer::new();
    let (dispatch, _guard) = build(&config, console.make_writer(), None).unwrap();

    assert!(!dir.path().join("batchd.2026-01-03.log").exists());

    tracing::dispatcher::with_default(&dispatch, || {
        for day in 0..3 {
            tracing::info!(day, "application event");
            tracing::warn!(target: "security", day, "authorization denied");
            if day < 2 {
                clock.advance(chrono::Duration::days(1));
            }
        }
    });

    let mut expected: Vec<String> = foreign.iter().map(|name| (*name).to_owned()).collect();
    expected.extend(
        [
            "batchd.2026-01-02.log",
            "batchd.2026-12-05.log",
            "batchd.2026-12-06.log",
            "security.2026-12-04.log",
            "security.2026-12-05.log",
            "security.2026-12-06.log",
        ]
        .map(str::to_owned),
    );
    expected.sort();
    assert_eq!(file_names(dir.path()), expected);

    for name in foreign {
        assert_eq!(
            fs::read_to_string(dir.path().join(name)).unwrap(),
            "keep me"
        );
    }
    let day_two = read_lines(&dir.path().join("batchd.2026-12-05.log"));
    assert_eq!(day_two.len(), 1);
    assert_eq!(day_two[0]["day"], 1);
    assert_eq!(day_two[0]["timestamp"], "2026-12-05T10:30:00.000000Z");
    let day_three = read_lines(&dir.path().join("batchd.2026-12-06.log"));
    assert_eq!(day_three.len(), 1);
    assert_eq!(day_three[0]["day"], 2);
}

#[test]
fn rotation_at_midnight() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 12, 4, 23, 59, 59).unwrap());
    let file =
        telemetry::DailyFile::open(dir.path(), "batchd", 14, Arc::new(clock.clone())).unwrap();
    let mut writer = tracing_subscriber::fmt::MakeWriter::make_writer(&file);
    std::io::Write::write_all(&mut writer, b"before\n").unwrap();
    clock.advance(chrono::Duration::seconds(1));
    assert_eq!(clock.now().to_rfc3339(), "2026-12-05T00:00:00+00:00");
    std::io::Write::write_all(&mut writer, b"after\n").unwrap();

    let before = fs::read_to_string(dir.path().join("batchd.2026-12-04.log")).unwrap();
    let after = fs::read_to_string(dir.path().join("batchd.2026-12-05.log")).unwrap();
    assert_eq!(before, "before\n");
    assert_eq!(after, "after\n");
}

#[test]
fn slow_request_logged_with_correlation() {
    let clock = manual_clock();
    let metrics = Arc::new(Metrics::new(SlowThresholds {
        request: Duration::from_secs(1),
        attempt: Duration::from_secs(30),
    }));
    let output = run_with(&config_with_clock(&clock), None, || {
        let span = tracing::info_span!("request", correlation_id = "req-slow");
        let _entered = span.enter();
        metrics.observe_request("/v1/batches/{id}", "GET", 200, Duration::from_millis(1500));
        metrics.observe_request("/v1/batches/{id}", "GET", 200, Duration::from_millis(20));
    });
    let lines = output.json_lines();
    assert_eq!(lines.len(), 1, "{}", output.contents());
    assert_eq!(lines[0]["target"], SLOW_TARGET);
    assert_eq!(lines[0]["level"], "WARN");
    assert_eq!(lines[0]["elapsed_ms"], 1500);
    assert_eq!(lines[0]["threshold_ms"], 1000);
    assert_eq!(lines[0]["route"], "/v1/batches/{id}");
    assert_eq!(lines[0]["correlation_id"], "req-slow");

    let text = metrics.encode();
    assert!(
        text.contains(
            "batchd_http_requests_total{route=\"/v1/batches/{id}\",method=\"GET\",status_class=\"2xx\"} 2"
        ),
        "{text}"
    );
}

#[test]
fn slow_job_span_timed_and_logged() {
    let clock = manual_clock();
    let metrics = Arc::new(Metrics::new(SlowThresholds::default()));
    let config = TelemetryConfig {
        metrics: Some(metrics.clone()),
        ..config_with_clock(&clock)
    };
    let output = run_with(&config, None, || {
        let span = tracing::info_span!(
            target: "queue::runtime",
            "job",
            job_id = 7,
            batch_id = "b-1",
            kind = "fetch",
            attempt = 1,
            correlation_id = "req-j",
        );
        let entered = span.enter();
        clock.advance(chrono::Duration::seconds(31));
        drop(entered);
        drop(span);

        let quick =
            tracing::info_span!(target: "queue::runtime", "job", kind = "fetch", attempt = 1);
        clock.advance(chrono::Duration::seconds(2));
        drop(quick);
    });

    let slow: Vec<Value> = output
        .json_lines()
        .into_iter()
        .filter(|line| line["target"] == SLOW_TARGET)
        .collect();
    assert_eq!(slow.len(), 1, "{}", output.contents());
    assert_eq!(slow[0]["message"], "slow job attempt");
    assert_eq!(slow[0]["job_id"], "7");
    assert_eq!(slow[0]["kind"], "fetch");
    assert_eq!(slow[0]["attempt"], 1);
    assert_eq!(slow[0]["correlation_id"], "req-j");
    assert_eq!(slow[0]["elapsed_ms"], 31_000);

    let text = metrics.encode();
    assert!(
        text.contains("batchd_job_attempt_duration_seconds_count{kind=\"fetch\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("batchd_job_attempt_duration_seconds_sum{kind=\"fetch\"} 33.0"),
        "{text}"
    );
}

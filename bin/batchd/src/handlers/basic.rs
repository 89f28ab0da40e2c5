//! The `noop` and `sleep` handlers, for demos, benchmarks and chaos tests.

use std::time::Duration;

use async_trait::async_trait;
use queue::{HandlerError, JobContext, JobHandler};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::attempt::Attempt;
use super::http::to_result;

/// Succeeds at once with no result.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopHandler;

#[async_trait]
impl JobHandler for NoopHandler {
    async fn run(&self, _job: JobContext) -> Result<Option<Box<RawValue>>, HandlerError> {
        Ok(None)
    }
}

/// Settings of the `sleep` handler. Config key: `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SleepSettings {
    /// Maximum sleep in milliseconds. A payload requesting more sleeps this
    /// long.
    pub max_ms: u64,
}

impl Default for SleepSettings {
    fn default() -> Self {
        Self { max_ms: 60_000 }
    }
}

/// The failure a `sleep` payload requests after sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestedFailure {
    Retryable,
    Permanent,
}

/// The `sleep` payload: `{"ms": 250}` or `{"ms": 250, "fail": "retryable"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepPayload {
    pub ms: u64,
    #[serde(default)]
    pub fail: Option<RequestedFailure>,
}

/// Progress reports during one sleep: at 25, 50, 75 and 100 percent.
const PROGRESS_STEPS: u32 = 4;

/// Sleeps for the payload's `ms` (capped by [`SleepSettings::max_ms`]),
/// reporting progress, then succeeds with `{"sleptMs": N}` or fails as the
/// payload requests.
#[derive(Debug, Clone, Copy)]
pub struct SleepHandler {
    settings: SleepSettings,
}

impl Default for SleepHandler {
    fn default() -> Self {
        Self::new(SleepSettings::default())
    }
}

impl SleepHandler {
    pub fn new(settings: SleepSettings) -> Self {
        Self { settings }
    }

    /// Runs one attempt; [`JobHandler::run`] calls this.
    pub async fn execute(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<Option<Box<RawValue>>, HandlerError> {
        let payload: SleepPayload = serde_json::from_str(attempt.payload).map_err(|error| {
            HandlerError::Permanent(format!(
                "invalid sleep payload: {error}; expected {{\"ms\": N}} with an optional \"fail\": \"retryable\" or \"permanent\""
            ))
        })?;
        let total = Duration::from_millis(payload.ms.min(self.settings.max_ms));
        let step = total / PROGRESS_STEPS;

        for done in 1..=PROGRESS_STEPS {
            tokio::select! {
                biased;
                () = attempt.cancel.cancelled() => return Err(HandlerError::Cancelled),
                () = tokio::time::sleep(step) => {}
            }
            let percent = u8::try_from(done * 100 / PROGRESS_STEPS).unwrap_or(100);
            attempt.report_progress(percent);
        }

        let slept_ms = u64::try_from(total.as_millis()).unwrap_or(u64::MAX);
        match payload.fail {
            None => to_result(&serde_json::json!({ "sleptMs": slept_ms })),
            Some(RequestedFailure::Retryable) => Err(HandlerError::Retryable(format!(
                "sleep failed after {slept_ms} ms because the payload requested a retryable failure"
            ))),
            Some(RequestedFailure::Permanent) => Err(HandlerError::Permanent(format!(
                "sleep failed after {slept_ms} ms because the payload requested a permanent failure"
            ))),
        }
    }
}

#[async_trait]
impl JobHandler for SleepHandler {
    async fn run(&self, job: JobContext) -> Result<Option<Box<RawValue>>, HandlerError> {
        let progress = |percent| job.report_progress(percent);
        self.execute(&Attempt::from_context(&job, &progress)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;
    use std::time::Instant;

    use domain::{BatchId, JobId};
    use tokio_util::sync::CancellationToken;

    use super::*;

    struct Run {
        result: Result<Option<Box<RawValue>>, HandlerError>,
        progress: Vec<u8>,
    }

    async fn run_sleep(handler: SleepHandler, payload: &str, cancel: &CancellationToken) -> Run {
        let reports = Mutex::new(Vec::new());
        let progress = |percent| reports.lock().unwrap().push(percent);
        let attempt = Attempt {
            job_id: JobId(1),
            batch_id: BatchId::new(),
            seq: 0,
            attempt: 1,
            correlation_id: None,
            traceparent: None,
            payload,
            cancel,
            progress: &progress,
        };
        let result = handler.execute(&attempt).await;
        Run {
            result,
            progress: reports.into_inner().unwrap(),
        }
    }

    #[tokio::test]
    async fn sleep_succeeds_with_progress() {
        let cancel = CancellationToken::new();
        let run = run_sleep(SleepHandler::default(), r#"{"ms": 40}"#, &cancel).await;
        let result = run.result.unwrap().unwrap();
        assert_eq!(result.get(), r#"{"sleptMs":40}"#);
        assert_eq!(run.progress, vec![25, 50, 75, 100]);
    }

    #[tokio::test]
    async fn sleep_capped_by_max() {
        let handler = SleepHandler::new(SleepSettings { max_ms: 20 });
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let run = run_sleep(handler, r#"{"ms": 600000}"#, &cancel).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(run.result.unwrap().unwrap().get(), r#"{"sleptMs":20}"#);
    }

    #[tokio::test]
    async fn sleep_fails_on_request() {
        let cancel = CancellationToken::new();
        let retryable = run_sleep(
            SleepHandler::default(),
            r#"{"ms": 0, "fail": "retryable"}"#,
            &cancel,
        )
        .await;
        assert!(matches!(retryable.result, Err(HandlerError::Retryable(_))));

        let permanent = run_sleep(
            SleepHandler::default(),
            r#"{"ms": 0, "fail": "permanent"}"#,
            &cancel,
        )
        .await;
        assert!(matches!(permanent.result, Err(HandlerError::Permanent(_))));
    }

    #[tokio::test]
    async fn sleep_rejects_invalid_payload() {
        let cancel = CancellationToken::new();
        for payload in [
            r#"{}"#,
            r#"{"ms": -1}"#,
            r#"{"ms": 5, "fail": "sometimes"}"#,
            r#""ms""#,
        ] {
            let run = run_sleep(SleepHandler::default(), payload, &cancel).await;
            match run.result {
                Err(HandlerError::Permanent(message)) => {
                    assert!(message.starts_with("invalid sleep payload"), "{message}")
                }
                other => panic!("{payload}: expected a permanent failure, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn sleep_stops_when_cancelled() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            trigger.cancel();
        });
        let started = Instant::now();
        let run = run_sleep(SleepHandler::default(), r#"{"ms": 30000}"#, &cancel).await;
        assert_eq!(run.result.unwrap_err(), HandlerError::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(run.progress.is_empty());
    }
}

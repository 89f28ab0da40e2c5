use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::{BatchId, ClaimedJob, JobId, UserId};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The code that runs one kind of job. Registered with the queue per kind.
///
/// A handler must be idempotent: delivery is at least once, so after a
/// crash a job that was running may run again.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Runs one attempt. `Ok` carries an optional JSON result stored on the
    /// job.
    async fn run(&self, job: JobContext) -> Result<Option<Box<RawValue>>, HandlerError>;
}

/// Failure of an attempt, as the handler reports it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    /// Worth another attempt (a timeout, a 503). Counts against the job's
    /// attempts; the last one dead-letters the job.
    #[error("{0}")]
    Retryable(String),
    /// No retry can fix it (a 400, a malformed payload). Dead-letters the
    /// job at once.
    #[error("{0}")]
    Permanent(String),
    /// Run again after `delay`, as an upstream 429 with Retry-After requests.
    /// Recorded in the history but not counted as a failed attempt.
    #[error("retry after {delay:?}: {reason}")]
    RetryAfter { delay: Duration, reason: String },
    /// The handler stopped because its cancellation token fired.
    #[error("cancelled")]
    Cancelled,
}

impl HandlerError {
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError::Retryable(message.into())
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError::Permanent(message.into())
    }
}

/// Everything a handler gets for one attempt.
#[derive(Debug)]
pub struct JobContext {
    job: ClaimedJob,
    cancel: CancellationToken,
    progress: ProgressReporter,
}

impl JobContext {
    pub(crate) fn new(
        job: ClaimedJob,
        cancel: CancellationToken,
        progress: ProgressReporter,
    ) -> Self {
        Self {
            job,
            cancel,
            progress,
        }
    }

    pub fn job_id(&self) -> JobId {
        self.job.id
    }

    pub fn batch_id(&self) -> BatchId {
        self.job.batch_id
    }

    /// Position of the item in its batch, from 0.
    pub fn seq(&self) -> u32 {
        self.job.seq
    }

    pub fn kind(&self) -> &str {
        &self.job.kind
    }

    pub fn owner(&self) -> &UserId {
        &self.job.owner
    }

    /// Attempt number, 1 for the first run.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    pub fn max_attempts(&self) -> u32 {
        self.job.max_attempts
    }

    /// Correlation id of the request that created the batch.
    pub fn correlation_id(&self) -> Option<&str> {
        self.job.correlation_id.as_deref()
    }

    /// W3C `traceparent` of the request that created the batch, for
    /// handlers that continue its trace in their own outgoing requests.
    pub fn traceparent(&self) -> Option<&str> {
        self.job.traceparent.as_deref()
    }

    pub fn payload(&self) -> &RawValue {
        &self.job.payload
    }

    /// Parses the payload; a payload of the wrong shape is a permanent
    /// failure, since no retry changes it.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.job.payload.get())
            .map_err(|error| HandlerError::Permanent(format!("invalid payload: {error}")))
    }

    /// Fires when the batch is cancelled, the lease is lost, the attempt
    /// times out or the process shuts down. Long handlers should select on
    /// it.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Reports progress, 0 to 100. Reports are coalesced, so calling this
    /// often is cheap.
    pub fn report_progress(&self, percent: u8) {
        self.progress.report(self.job.id, percent.min(100));
    }
}

/// Sends progress reports to the queue's progress writer.
#[derive(Debug, Clone)]
pub(crate) struct ProgressReporter {
    sender: mpsc::Sender<(JobId, u8)>,
}

impl ProgressReporter {
    pub(crate) fn new(sender: mpsc::Sender<(JobId, u8)>) -> Self {
        Self { sender }
    }

    fn report(&self, job: JobId, percent: u8) {
        // A full channel drops the report: a later one supersedes it.
        let _ = self.sender.try_send((job, percent));
    }
}

/// A handler built from an async closure, for tests and small programs.
pub struct FnHandler<F>(pub F);

impl<F> std::fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnHandler")
    }
}

#[async_trait]
impl<F, Fut> JobHandler for FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Option<Box<RawValue>>, HandlerError>> + Send + 'static,
{
    async fn run(&self, job: JobContext) -> Result<Option<Box<RawValue>>, HandlerError> {
        (self.0)(job).await
    }
}

/// Shared handle to a handler.
pub(crate) type SharedHandler = Arc<dyn JobHandler>;

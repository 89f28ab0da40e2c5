//! The inputs of one attempt, detached from [`JobContext`] so that the
//! handlers' core functions can run in tests without a queue.

use std::fmt;

use domain::{BatchId, JobId};
use queue::JobContext;
use tokio_util::sync::CancellationToken;

/// Everything a handler's core function reads from one attempt.
#[derive(Clone, Copy)]
pub struct Attempt<'a> {
    pub job_id: JobId,
    pub batch_id: BatchId,
    /// Position of the item in its batch, from 0.
    pub seq: u32,
    /// Attempt number, 1 for the first run.
    pub attempt: u32,
    /// Correlation id of the request that created the batch.
    pub correlation_id: Option<&'a str>,
    /// W3C `traceparent` of the request that created the batch.
    pub traceparent: Option<&'a str>,
    /// The item's payload, a JSON text.
    pub payload: &'a str,
    pub cancel: &'a CancellationToken,
    /// Receives progress from 0 to 100.
    pub progress: &'a (dyn Fn(u8) + Send + Sync),
}

impl<'a> Attempt<'a> {
    /// Takes the attempt's inputs from the queue's context. `progress`
    /// is usually `&|percent| job.report_progress(percent)`.
    pub fn from_context(job: &'a JobContext, progress: &'a (dyn Fn(u8) + Send + Sync)) -> Self {
        Self {
            job_id: job.job_id(),
            batch_id: job.batch_id(),
            seq: job.seq(),
            attempt: job.attempt(),
            correlation_id: job.correlation_id(),
            traceparent: job.traceparent(),
            payload: job.payload().get(),
            cancel: job.cancellation(),
            progress,
        }
    }

    pub fn report_progress(&self, percent: u8) {
        (self.progress)(percent.min(100));
    }
}

impl fmt::Debug for Attempt<'_> {
    // The payload is left out: it is user data and may be large.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
            .field("job_id", &self.job_id)
            .field("batch_id", &self.batch_id)
            .field("seq", &self.seq)
            .field("attempt", &self.attempt)
            .field("correlation_id", &self.correlation_id)
            .field("payload_bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

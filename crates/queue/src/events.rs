use chrono::{DateTime, Utc};
use domain::{BatchFinished, BatchId, BatchProgress, JobId, UserId};
use serde::{Deserialize, Serialize};

/// Something that happened to a job or a batch, published only after the
/// state it describes has been committed. Every event names its owner, so
/// a consumer can route it to that user alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum QueueEvent {
    #[serde(rename = "job.queued")]
    JobQueued(JobEvent),
    #[serde(rename = "job.processing")]
    JobProcessing(JobEvent),
    #[serde(rename = "job.progress")]
    JobProgress(JobEvent),
    #[serde(rename = "job.completed")]
    JobCompleted(JobEvent),
    /// The attempt failed and the job waits out its backoff.
    #[serde(rename = "job.retry")]
    JobRetry(JobEvent),
    /// The job is dead: dead-lettered after a permanent failure or its last
    /// attempt.
    #[serde(rename = "job.failed")]
    JobFailed(JobEvent),
    #[serde(rename = "job.cancelled")]
    JobCancelled(JobEvent),
    #[serde(rename = "batch.progress")]
    BatchProgress(BatchProgress),
    #[serde(rename = "batch.finished")]
    BatchFinished(BatchFinished),
}

impl QueueEvent {
    /// The user the event belongs to.
    pub fn owner(&self) -> &UserId {
        match self {
            QueueEvent::JobQueued(e)
            | QueueEvent::JobProcessing(e)
            | QueueEvent::JobProgress(e)
            | QueueEvent::JobCompleted(e)
            | QueueEvent::JobRetry(e)
            | QueueEvent::JobFailed(e)
            | QueueEvent::JobCancelled(e) => &e.owner,
            QueueEvent::BatchProgress(p) => &p.owner,
            QueueEvent::BatchFinished(f) => &f.owner,
        }
    }

    pub fn batch_id(&self) -> BatchId {
        match self {
            QueueEvent::JobQueued(e)
            | QueueEvent::JobProcessing(e)
            | QueueEvent::JobProgress(e)
            | QueueEvent::JobCompleted(e)
            | QueueEvent::JobRetry(e)
            | QueueEvent::JobFailed(e)
            | QueueEvent::JobCancelled(e) => e.batch_id,
            QueueEvent::BatchProgress(p) => p.batch_id,
            QueueEvent::BatchFinished(f) => f.batch_id,
        }
    }
}

/// Details of a job event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobEvent {
    pub job_id: JobId,
    pub batch_id: BatchId,
    pub owner: UserId,
    pub kind: String,
    pub seq: u32,
    pub attempt: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use domain::{BatchCounters, BatchProgress, BatchStatus};

    use super::*;

    /// Events cross process boundaries as JSON, so every variant must read
    /// back as what was written.
    #[test]
    fn events_round_trip_as_json() {
        let job = JobEvent {
            job_id: JobId(7),
            batch_id: BatchId::new(),
            owner: UserId::new("alice"),
            kind: "webhook".to_owned(),
            seq: 3,
            attempt: 2,
            progress: Some(40),
            error: Some("HTTP 503".to_owned()),
            run_at: Some(Utc::now()),
            correlation_id: Some("req-1".to_owned()),
        };
        let events = vec![
            QueueEvent::JobQueued(job.clone()),
            QueueEvent::JobRetry(job.clone()),
            QueueEvent::JobCompleted(JobEvent {
                progress: None,
                error: None,
                run_at: None,
                correlation_id: None,
                ..job
            }),
            QueueEvent::BatchProgress(BatchProgress {
                batch_id: BatchId::new(),
                owner: UserId::new("bob"),
                kind: "fetch".to_owned(),
                status: BatchStatus::Processing,
                counters: BatchCounters {
                    item_count: 10,
                    succeeded: 4,
                    failed: 1,
                    cancelled: 0,
                },
                correlation_id: None,
                revision: 9,
            }),
        ];
        let text = serde_json::to_string(&events).unwrap();
        let back: Vec<QueueEvent> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, events);
    }
}

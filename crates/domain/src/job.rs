use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::attempt::AttemptRecord;
use crate::error::TransitionError;
use crate::ids::{BatchId, JobId, LeaseOwner, UserId};
use crate::store::DependencyRef;

/// The state of one job. Stored as the lowercase name; the database checks
/// the same list.
///
/// ```text
///  scheduled --promote--> queued --claim--> processing --succeed--> succeeded
///      ^                    ^  ^               |  |  |
///      |                    |  +---release-----+  |  +--die / lease expired, no attempts left--> dead
///      +------defer---------)---------------------+  |                                            |
///                           |                        +--retry--> retrying --promote--> queued     |
///                           +-----------------------------redrive---------------------------------+
///  any non-terminal state --cancel--> cancelled
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for its `run_at`, either set by the submitter or after a
    /// rate-limit deferral. The store's promoter moves it to `queued` when
    /// due. Not terminal.
    Scheduled,
    /// Ready to run once its dependencies are met; workers claim from here.
    /// Not terminal.
    Queued,
    /// Claimed by a worker that holds a lease on it. The worker records the
    /// outcome; if the lease expires first, the reaper takes it back.
    /// Not terminal.
    Processing,
    /// Failed an attempt and waits out its backoff until `run_at`. The
    /// promoter moves it to `queued`. Not terminal.
    Retrying,
    /// The handler finished successfully. Terminal.
    Succeeded,
    /// Failed for good: a permanent error or no attempts left. Kept in the
    /// dead-letter set with its payload and attempt history. Terminal until
    /// an operator re-drives it.
    Dead,
    /// Cancelled by its batch's owner, or because a dependency died.
    /// Terminal.
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Scheduled,
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Retrying,
        JobStatus::Succeeded,
        JobStatus::Dead,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Scheduled => "scheduled",
            JobStatus::Queued => "queued",
            JobStatus::Processing => "processing",
            JobStatus::Retrying => "retrying",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Dead => "dead",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Returns true for states that no worker will move the job out of.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Dead | JobStatus::Cancelled
        )
    }

    /// Computes the state that `event` leads to, or rejects the transition.
    ///
    /// Every store runs each state change through this function (or through
    /// SQL whose WHERE clause names the same source states), so the rules
    /// live in one place.
    pub fn apply(self, event: JobEvent) -> Result<JobStatus, TransitionError> {
        use JobEvent as E;
        use JobStatus as S;

        let next = match (self, event) {
            (S::Scheduled | S::Retrying, E::Promote) => S::Queued,
            (S::Queued, E::Claim) => S::Processing,
            (S::Processing, E::Succeed) => S::Succeeded,
            (S::Processing, E::Retry) => S::Retrying,
            (S::Processing, E::Defer) => S::Scheduled,
            (S::Processing, E::Release) => S::Queued,
            (S::Processing, E::Die) => S::Dead,
            (
                S::Processing,
                E::LeaseExpired {
                    attempts_left: true,
                },
            ) => S::Queued,
            (
                S::Processing,
                E::LeaseExpired {
                    attempts_left: false,
                },
            ) => S::Dead,
            (S::Dead, E::Redrive) => S::Queued,
            (from, E::Cancel) if !from.is_terminal() => S::Cancelled,
            (from, event) => return Err(TransitionError { from, event }),
        };
        Ok(next)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = JobStatus::ALL
                    .iter()
                    .map(|status| status.as_str())
                    .collect();
                format!("unknown job status {s:?}; use one of: {}", known.join(", "))
            })
    }
}

/// Something that happens to a job and may change its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "event")]
pub enum JobEvent {
    /// Its `run_at` has passed.
    Promote,
    /// A worker took a lease on it.
    Claim,
    /// The handler returned success.
    Succeed,
    /// The handler failed and attempts remain, or it asked to run again later.
    Retry,
    /// A processing rate limit held it back before the handler ran.
    Defer,
    /// A worker shutting down gave the lease back without running it to the end.
    Release,
    /// The handler failed permanently, or the last attempt failed.
    Die,
    /// The lease ran out before the worker recorded an outcome.
    LeaseExpired { attempts_left: bool },
    /// An operator sent a dead job back to the queue.
    Redrive,
    /// The owner cancelled the batch, or a dependency died.
    Cancel,
}

/// One item of a batch as the submitter describes it.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The item's JSON, stored verbatim and handed to the handler.
    pub payload: Box<RawValue>,
    /// Jobs that must succeed before this one may run.
    pub depends_on: Vec<DependencyRef>,
}

impl NewJob {
    pub fn new(payload: Box<RawValue>) -> Self {
        Self {
            payload,
            depends_on: Vec::new(),
        }
    }

    /// Builds a job from any serializable value.
    pub fn from_value<T: Serialize>(value: &T) -> Result<Self, serde_json::Error> {
        Ok(Self::new(serde_json::value::to_raw_value(value)?))
    }
}

/// Fencing token of one attempt: only the holder of this exact lease may
/// record the attempt's outcome, extend it or give it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseRef {
    pub job_id: JobId,
    pub owner: LeaseOwner,
    /// The attempt number this lease was taken for (1 for the first run).
    pub attempt: u32,
}

/// A job handed to a worker by a claim, with everything the handler needs.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    pub batch_id: BatchId,
    pub seq: u32,
    pub kind: String,
    pub payload: Box<RawValue>,
    pub owner: UserId,
    pub correlation_id: Option<String>,
    /// W3C `traceparent` of the request that created the batch.
    pub traceparent: Option<String>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub priority: i32,
    pub lease: LeaseRef,
    pub lease_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Read model of one job, as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: JobId,
    pub batch_id: BatchId,
    pub seq: u32,
    pub kind: String,
    pub payload: Box<RawValue>,
    pub status: JobStatus,
    pub priority: i32,
    pub attempts: u32,
    pub max_attempts: u32,
    /// Dependencies (or an unfinished insert) that still hold the job back.
    pub blocked_by: u32,
    pub run_at: DateTime<Utc>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub progress: u8,
    pub last_error: Option<String>,
    pub errors: Vec<AttemptRecord>,
    pub result: Option<Box<RawValue>>,
    pub created_at: DateTime<Utc>,
    pub attempted_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_status() -> impl Strategy<Value = JobStatus> {
        proptest::sample::select(JobStatus::ALL.to_vec())
    }

    fn any_event() -> impl Strategy<Value = JobEvent> {
        proptest::sample::select(vec![
            JobEvent::Promote,
            JobEvent::Claim,
            JobEvent::Succeed,
            JobEvent::Retry,
            JobEvent::Defer,
            JobEvent::Release,
            JobEvent::Die,
            JobEvent::LeaseExpired {
                attempts_left: true,
            },
            JobEvent::LeaseExpired {
                attempts_left: false,
            },
            JobEvent::Redrive,
            JobEvent::Cancel,
        ])
    }

    #[test]
    fn status_names_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
        }
        assert!("done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn happy_path_reaches_succeeded() {
        let status = JobStatus::Queued.apply(JobEvent::Claim).unwrap();
        assert_eq!(status, JobStatus::Processing);
        assert_eq!(status.apply(JobEvent::Succeed), Ok(JobStatus::Succeeded));
    }

    #[test]
    fn succeeded_job_cannot_be_claimed_or_cancelled() {
        let err = JobStatus::Succeeded.apply(JobEvent::Claim).unwrap_err();
        assert_eq!(err.from, JobStatus::Succeeded);
        assert!(JobStatus::Succeeded.apply(JobEvent::Cancel).is_err());
    }

    #[test]
    fn lease_expiry_depends_on_attempts_left() {
        let retry = JobStatus::Processing.apply(JobEvent::LeaseExpired {
            attempts_left: true,
        });
        let dead = JobStatus::Processing.apply(JobEvent::LeaseExpired {
            attempts_left: false,
        });
        assert_eq!(retry, Ok(JobStatus::Queued));
        assert_eq!(dead, Ok(JobStatus::Dead));
    }

    #[test]
    fn only_dead_jobs_are_redriven() {
        assert_eq!(
            JobStatus::Dead.apply(JobEvent::Redrive),
            Ok(JobStatus::Queued)
        );
        assert!(JobStatus::Cancelled.apply(JobEvent::Redrive).is_err());
        assert!(JobStatus::Succeeded.apply(JobEvent::Redrive).is_err());
    }

    proptest! {
        /// Terminal states are left only by an operator's re-drive of a dead job.
        #[test]
        fn terminal_states_are_sticky(status in any_status(), event in any_event()) {
            if status.is_terminal() {
                let result = status.apply(event);
                let is_redrive = status == JobStatus::Dead && event == JobEvent::Redrive;
                prop_assert_eq!(result.is_ok(), is_redrive);
            }
        }

        /// A job succeeds only from processing, so an outcome needs a lease.
        #[test]
        fn success_needs_processing(status in any_status(), event in any_event()) {
            if let Ok(JobStatus::Succeeded) = status.apply(event) {
                prop_assert_eq!(status, JobStatus::Processing);
                prop_assert_eq!(event, JobEvent::Succeed);
            }
        }

        /// Any sequence of events, applied where legal, keeps a job in a
        /// known state and never moves a succeeded job again.
        #[test]
        fn random_walks_never_leave_success(events in proptest::collection::vec(any_event(), 0..64)) {
            let mut status = JobStatus::Queued;
            let mut succeeded = false;
            for event in events {
                if let Ok(next) = status.apply(event) {
                    prop_assert!(!succeeded, "a succeeded job moved to {next}");
                    status = next;
                    succeeded = status == JobStatus::Succeeded;
                }
            }
        }
    }
}

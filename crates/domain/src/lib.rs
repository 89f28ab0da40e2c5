//! The vocabulary of batchd: batches, jobs, their state machines, and the
//! store traits that every storage backend implements.
//!
//! Main types:
//! - [`JobStatus`] and [`BatchStatus`], each state documented where it is
//!   defined, with the transition functions [`JobStatus::apply`] and
//!   [`BatchCounters::status`] that every store and the queue go through.
//! - [`JobStore`], the worker's hot path (create, claim, heartbeat, record
//!   outcomes, promote due work, reap expired leases), and [`AdminStore`],
//!   the read models and operator actions (list, cancel, re-drive, prune).
//! - [`Clock`], so that time is an input: stores and the queue never read
//!   the wall clock behind a caller's back.
//!
//! What this crate never does: I/O of any kind, spawning tasks, or logging.
//! It depends on nothing heavier than serde, chrono and uuid.
//!
//! Invariants that every store must keep (the conformance suite in
//! `sqlite-store/tests` checks them):
//! - A batch's counters change in the same transaction as the job they
//!   count, so `succeeded + failed + cancelled` never drifts from the jobs.
//! - A job leaves a terminal state only by an explicit re-drive, and an
//!   attempt's outcome is recorded only by the lease holder of that attempt
//!   (fencing by lease owner and attempt number).
//! - A batch is visible only once every one of its items is durable.
//! - A batch reaches a finished state at most once per generation, and that
//!   transition writes exactly one outbox row.

mod attempt;
mod batch;
mod clock;
mod error;
mod flags;
mod ids;
mod job;
mod ratelimit;
mod store;

pub use attempt::{AttemptRecord, FailureKind, MAX_ATTEMPT_HISTORY};
pub use batch::{
    Batch, BatchCounters, BatchStatus, BatchSummary, MAX_IDEMPOTENCY_KEY_BYTES, MAX_KIND_BYTES,
    NewBatch,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{StoreError, TransitionError};
pub use flags::{
    AuditFilter, DEFAULT_AUDIT_PAGE, FeatureFlag, FlagAction, FlagAuditEntry, FlagChange,
    FlagListing, FlagName, FlagPatch, FlagStore, FlagStoreError, FlagValidationError,
    MAX_AUDIT_PAGE, MAX_FLAG_LIST_LEN, MAX_FLAG_METADATA_BYTES, MAX_FLAG_NAME_LEN,
    MAX_FLAG_USER_ID_LEN, NewFlag, Rollout, UserListKind, check_flag_version, validate_actor,
};
pub use ids::{BatchId, JobId, LeaseOwner, UserId};
pub use job::{ClaimedJob, Job, JobEvent, JobStatus, LeaseRef, NewJob};
pub use ratelimit::{GcraOutcome, GcraParams, GcraRequest, RateLimitStore};
pub use store::{
    AdminStore, AppliedOutcome, AttemptOutcome, BatchFilter, BatchFinished, BatchProgress,
    BeginOutcome, ChangeSet, ClaimRequest, CreatedBatch, DeadLetterFilter, DependencyRef,
    ItemFilter, JobChange, JobStore, KindControl, MAX_PAGE, OutcomeKind, OutcomeResult, Page,
    ProgressUpdate, PromoteReport, PruneReport, PruneRequest, QueueDepth, ReapReport,
    RedriveReport, RedriveSelection, Scope, StagingBatch, page_limit,
};

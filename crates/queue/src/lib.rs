//! The worker runtime of batchd: it claims jobs from a store, runs the
//! handler registered for each kind, and records what happened.
//!
//! Main types: [`Queue`] (built with [`QueueBuilder`]), the [`JobHandler`]
//! trait and its [`JobContext`], [`KindConfig`] and [`RetryPolicy`], and
//! [`QueueEvent`], published on a broadcast channel.
//!
//! How a job runs: a dispatcher per kind waits for a free slot (the kind's
//! concurrency), claims up to that many jobs with a lease, and starts one
//! task per job. The handler runs on its own task, so a panic becomes a
//! retryable failure, and under the kind's timeout, so a stuck attempt is
//! cancelled. Outcomes go to one recorder task, which writes them in groups
//! and only then publishes events. A heartbeat extends the leases of
//! running jobs; a reaper takes back expired leases of dead processes; a
//! promoter moves scheduled and retrying jobs to the queue when due.
//!
//! Invariants:
//! - An event is published only after the state it describes is committed.
//! - An outcome is recorded only under the lease it was run with: a worker
//!   that lost its lease records nothing (the store fences it).
//! - A processing rate limit defers a job without counting an attempt.
//! - Workers sleep until told of new work; the poll interval is only a
//!   safety net for work enqueued by other processes.
//!
//! What it never does: talk HTTP, know about users beyond the owner id on
//! each job, or write to the database except through the store traits.

mod config;
mod events;
mod handler;
mod runtime;
mod shared_rate;
mod throttle;

pub use config::{KindConfig, KindConfigs, QueueConfig, Rate, RetentionConfig, RetryPolicy};
pub use events::{JobEvent, QueueEvent};
pub use handler::{FnHandler, HandlerError, JobContext, JobHandler};
pub use runtime::{Queue, QueueBuilder, QueueError, ShutdownReport, Store};

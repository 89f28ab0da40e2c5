//! Feature flags for batchd: decides per user whether a feature is on, from
//! an in-memory snapshot that every process keeps in step with the store.
//!
//! Main types:
//! - [`FlagService`], started with [`FlagConfig`]: evaluation, the admin
//!   operations (create, update, delete, audit), and a background task that
//!   polls the store's flag revision.
//! - [`Evaluation`] and [`Reason`], the result and its cause.
//! - [`FlagSnapshot`], the immutable set of flags that evaluation reads.
//! - [`bucket`] and [`murmur3_x86_32`], the rollout hash.
//!
//! The model, its validation and the [`domain::FlagStore`] trait live in the
//! `domain` crate; `sqlite-store` implements the trait.
//!
//! Evaluation order for a flag and a user:
//! 1. the user is on the deny list: off (`deny_list`);
//! 2. the user is on the allow list: on (`allow_list`);
//! 3. the flag is disabled: off (`disabled`);
//! 4. otherwise on exactly when the user's bucket is at most the rollout
//!    percentage (`rollout`, with the bucket).
//!
//! A name with no flag evaluates to [`FlagConfig::unknown_flag_default`]
//! (off unless configured) with reason `unknown`, and each such name is
//! logged once, up to [`FlagConfig::max_logged_unknown_flags`] names.
//!
//! What it never does: touch the store on the evaluation path. Evaluation
//! reads the snapshot under a read lock and hashes; only the admin
//! operations, [`FlagService::refresh`] and the background task do I/O.
//!
//! Invariants:
//! - A change made through a service is in that service's snapshot when the
//!   call returns. The exception is a call whose future the caller drops
//!   after the store committed, and the next poll picks that change up.
//! - Every other change is in the snapshot within about one refresh
//!   interval (2 s by default) plus one reload, in every process that
//!   shares the database: the task reloads whenever the store's revision
//!   differs from the snapshot's.
//! - Snapshots are replaced whole, one at a time, so an evaluation sees
//!   either all of a reload or none of it.
//! - A failed poll keeps the last snapshot and is retried on the next tick.
//!   The first failure in a row is logged, then every 30th. The task stops
//!   only on cancellation or when the last clone of the service is dropped.
//!
//! Rollout hash: MurmurHash3 x86_32, seed 0, of `"<flag>:<user>"` in UTF-8,
//! then `hash % 100 + 1`, giving buckets 1 to 100. This is Unleash's
//! gradual-rollout normalization, chosen because it is published and
//! implemented in many languages, so another service or a support script can
//! compute the same bucket. Hashing the flag name with the user spreads each
//! flag's users independently, and a bucket never changes, so raising a
//! rollout only adds users.

mod error;
mod evaluate;
mod murmur3;
mod service;
mod snapshot;
mod unknown;

pub use error::FlagError;
pub use evaluate::{BUCKETS, CompiledFlag, Evaluation, Reason, bucket};
pub use murmur3::{Murmur3x86_32, murmur3_x86_32};
pub use service::{FlagConfig, FlagService};
pub use snapshot::FlagSnapshot;

//! Built-in job handlers: `webhook`, `fetch`, `noop` and `sleep`.
//!
//! Each handler has a core method that takes an [`Attempt`]: the payload,
//! ids, cancellation token and progress callback of one attempt. So the
//! core runs without a queue, and [`queue::JobHandler::run`] only builds
//! the `Attempt` from the `JobContext`. The outbound handlers, `webhook` and
//! `fetch`, connect only to addresses that the [`AddressPolicy`] allows
//! (see [`guard`]).

mod attempt;
mod basic;
mod fetch;
pub mod guard;
mod host_limit;
mod http;
mod settings;
mod webhook;

#[cfg(test)]
mod tests;

pub use basic::{NoopHandler, SleepHandler};
pub use fetch::{FetchHandler, FetchSettings};
pub use guard::AddressPolicy;
pub use webhook::{WebhookHandler, WebhookSettings};

#[allow(
    unused_imports,
    reason = "part of this module's API even where the binary does not name them"
)]
pub use {
    attempt::Attempt,
    basic::SleepSettings,
    host_limit::HostRateLimit,
    http::MAX_RETRY_AFTER,
    settings::SetupError,
    webhook::{SignatureError, sign, verify},
};

//! Request rate limits for batchd's HTTP API: named policies, the client
//! key a request is counted against, and two limiters that apply GCRA
//! (the generic cell rate algorithm) to them.
//!
//! Main types:
//! - [`Policy`] (`limit` units per `period`, plus `burst`) and
//!   [`PolicySet`], built from [`RateLimitConfig`]: the built-in policies,
//!   replaced or extended by configuration, and a route-to-policy map in
//!   which unassigned routes use `general`.
//! - [`ClientKeyRules::key_for`], a pure function from a [`ClientRequest`]
//!   to its key: `user:<id>`, or the client address behind trusted proxies,
//!   with IPv6 grouped by prefix (/64 by default).
//! - The [`RateLimiter`] trait and its [`Decision`]: verdict, limit,
//!   remaining, what fits now, reset time and retry time.
//! - [`InMemoryLimiter`] for one process, and [`StoreLimiter`] over a
//!   [`domain::RateLimitStore`] that processes on one database share.
//! - [`RouteLimiter`], which ties these together for a server and reads
//!   the time from an injected [`domain::Clock`].
//!
//! What it never does: read the wall clock itself (every check takes
//! `now`, and `RouteLimiter` reads the clock it was given), perform I/O
//! other than through a store it is handed, or spawn tasks. Pruning idle
//! state is a method the caller runs on its own timer.
//!
//! # The rule
//!
//! A policy has emission interval `T = ceil(period / limit)` in whole
//! milliseconds and tolerance `burst * T`. Each key keeps a theoretical
//! arrival time (TAT). A check of cost `n` at time `t` is admitted when
//! `max(TAT, t) + n*T - t <= (burst + 1) * T`, which sets the TAT to
//! `max(TAT, t) + n*T`. A denied check changes nothing. So a fresh key can
//! spend `burst + 1` units at once, and then one every `T`. The rule
//! itself is [`domain::GcraParams::check`], shared by both limiters and
//! every store.
//!
//! # Worst case
//!
//! The maximum number of units one key can get admitted in any half-open
//! interval `[s, s + period)` is
//!
//! ```text
//! W = burst + ceil(period / T)        (= limit + burst when T divides period)
//! ```
//!
//! Upper bound: let the admitted checks in the interval be at
//! `t1 <= ... <= tk` with costs summing to `S`. Each admitted check raises
//! the TAT by its cost times `T` from at least its previous value, and the
//! first from at least `t1`, so before the last check `TAT >= t1 + (S -
//! nk)*T`. Admitting it needs `TAT + nk*T - tk <= (burst + 1)*T`, so
//! `S*T <= (tk - t1) + (burst + 1)*T`. Times are whole milliseconds and
//! `tk - t1 <= period - 1`, which gives
//! `S <= burst + 1 + floor((period - 1) / T) = burst + ceil(period / T)`.
//!
//! The bound is reached: a fresh key spends `burst + 1` units at `s`, then
//! one at each `s + i*T` for `i = 1 .. ceil(period / T) - 1`, all before
//! `s + period`. A closed interval `[s, s + period]` admits one unit more.
//! [`Policy::worst_case`] computes `W`; the tests check the bound with
//! random arrivals for every default policy, and check that it is reached.
//!
//! Every built-in policy has `burst <= limit / 5` and a `T` that divides
//! its period, so `W <= 1.2 * limit`, and `auth` has no burst, so its `W`
//! is exactly its limit:
//!
//! | policy | limit per period | burst | W |
//! |---|---|---|---|
//! | general | 100 per 1m | 20 | 120 |
//! | auth | 5 per 15m | 0 | 5 |
//! | upload | 10 per 1h | 2 | 12 |
//! | participant_session | 1 per 5m | 0 | 1 |
//! | export | 20 per 1h | 4 | 24 |
//! | survey_creation | 50 per 1d | 10 | 60 |
//! | realtime | 30 per 1m | 6 | 36 |
//! | search | 200 per 1m | 40 | 240 |
//! | batch_creation | 10 per 1h | 2 | 12 |
//! | batch_items | 500 per 1m | 100 | 600 |
//!
//! Since one check admits at most `burst + 1` units, a batch of items
//! larger than that is denied with [`Verdict::CostTooLarge`], which says
//! how many fit now; the caller splits the batch.
//!
//! # Invariants
//!
//! - `W` holds per key for the store limiter, because each check is one
//!   atomic store operation. It holds for the in-memory limiter unless more
//!   than `max_keys` keys are active at once: it then evicts the active
//!   entries closest to full, which lets those keys through early, and
//!   logs and counts it.
//! - A denied check consumes nothing; `remaining` is never negative, and
//!   after N units at one instant a fresh key reports `limit - N`.
//! - The in-memory limiter never holds more than
//!   [`InMemoryLimiter::capacity`] entries (`max_keys` rounded up to a
//!   multiple of the shard count), whatever the stream of keys.
//!
//! # Why the in-memory limiter does not use `governor`
//!
//! `governor` 0.10 implements the same GCRA, but its limiters read time
//! from their own clock inside each check, so a `now` passed per call
//! would need a shared mutable clock that concurrent checks race on. Its
//! `StateSnapshot` exposes only the remaining burst capacity, not the TAT,
//! so neither `remaining` of the limit nor the reset time can be computed
//! exactly, and its keyed stores have no cap on keys. The crate therefore
//! runs its own GCRA and uses `governor` where it fits: as a reference in
//! the tests, which check that a keyed `governor` limiter on a fake clock
//! makes the same decisions for the same arrivals.

mod config;
mod decision;
mod key;
mod memory;
mod policy;
mod route;
mod store;

pub use config::{
    ClientKeyConfig, ConfigError, ConfigProblem, PolicyConfig, RateLimitConfig, format_period,
    parse_period,
};
pub use decision::{Decision, RateLimitError, RateLimiter, Verdict};
pub use key::{ClientKeyRules, ClientRequest, ProxyHeader};
pub use memory::{InMemoryLimiter, MemoryLimits};
pub use policy::{GENERAL, MAX_PERIOD, Policy, PolicySet};
pub use route::{RouteDecision, RouteLimiter};
pub use store::StoreLimiter;

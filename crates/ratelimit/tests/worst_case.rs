//! The documented worst case `W = burst + ceil(period / T)`: no sequence
//! of arrivals, random or adaptive, gets more through in any interval `[s, s + period)`, the
//! greedy sequence reaches it, and `governor` decides every arrival the
//! same way.

#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, TimeZone, Utc};
use governor::clock::{Clock, FakeRelativeClock};
use governor::{Quota, RateLimiter as Governor};
use proptest::prelude::*;
use ratelimit::{InMemoryLimiter, Policy, PolicySet};

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
}

fn policy(name: &str) -> Policy {
    PolicySet::defaults().get(name).unwrap().clone()
}

/// One arrival: milliseconds since the previous one, and its cost.
type Arrival = (i64, u32);

/// Arrivals that press against the limit: bursts at one instant, gaps of
/// exactly one emission interval and shorter, and rare long pauses. Costs
/// are mostly 1, sometimes the policy's max cost, and sometimes up to two
/// above it.
fn arrivals(policy: &Policy) -> impl Strategy<Value = Vec<Arrival>> + use<> {
    let interval = policy.gcra().emission_interval_ms;
    let period = i64::try_from(policy.period().as_millis()).unwrap();
    let max_cost = policy.max_cost();
    let gap = prop_oneof![
        10 => Just(0i64),
        10 => Just(interval),
        10 => 0..=interval,
        3 => interval..=interval * 3,
        1 => 0..=period,
    ];
    let cost = prop_oneof![
        8 => Just(1u32),
        1 => Just(max_cost),
        1 => 1..=max_cost + 2,
    ];
    prop::collection::vec((gap, cost), 1..600)
}

/// One move of an adversary that tries to get as much through as it can.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Let this many milliseconds pass.
    Wait(i64),
    /// Send one request of this cost now.
    Send(u32),
    /// Send `count` requests of `cost`, each at the earliest moment it
    /// fits: when one is denied, wait its `retry_after` and send it again.
    Greedy { count: u32, cost: u32 },
}

/// Adversaries mixing random waits and sends with greedy runs, which keep
/// the key at its limit for as long as they last.
fn steps(policy: &Policy) -> impl Strategy<Value = Vec<Step>> + use<> {
    let interval = policy.gcra().emission_interval_ms;
    let period = i64::try_from(policy.period().as_millis()).unwrap();
    let max_cost = policy.max_cost();
    let limit = policy.limit();
    let step = prop_oneof![
        3 => (0..=interval).prop_map(Step::Wait),
        1 => (interval..=interval * 3).prop_map(Step::Wait),
        1 => (0..=period).prop_map(Step::Wait),
        2 => Just(Step::Send(1)),
        1 => (1..=max_cost + 2).prop_map(Step::Send),
        2 => (1..=limit.saturating_mul(2), 1..=max_cost)
            .prop_map(|(count, cost)| Step::Greedy { count, cost }),
    ];
    prop::collection::vec(step, 1..40)
}

/// Runs an adversary against a fresh in-memory limiter and returns the
/// admitted requests as (time in ms, cost).
fn admitted_by_steps(policy: &Policy, steps: &[Step]) -> Vec<(i64, u32)> {
    let limiter = InMemoryLimiter::default();
    let mut now = start();
    let mut admitted = Vec::new();
    let mut send = |now: DateTime<Utc>, cost: u32| {
        let decision = limiter.check_sync(policy, "key", cost, now).unwrap();
        if decision.is_allowed() {
            admitted.push((now.timestamp_millis(), cost));
        }
        decision
    };
    for &step in steps {
        match step {
            Step::Wait(ms) => now += Duration::milliseconds(ms),
            Step::Send(cost) => {
                send(now, cost);
            }
            Step::Greedy { count, cost } => {
                for _ in 0..count {
                    if let Some(wait) = send(now, cost).retry_after() {
                        now += Duration::from_std(wait).unwrap();
                        send(now, cost);
                    }
                }
            }
        }
    }
    admitted
}

/// Runs arrivals, each a gap in milliseconds and a cost, against a fresh
/// in-memory limiter and returns the admitted ones as (time in ms, cost).
fn admitted(policy: &Policy, arrivals: &[Arrival]) -> Vec<(i64, u32)> {
    let steps: Vec<Step> = arrivals
        .iter()
        .flat_map(|&(gap, cost)| [Step::Wait(gap), Step::Send(cost)])
        .collect();
    admitted_by_steps(policy, &steps)
}

/// Returns the maximum number of units admitted in any half-open interval
/// of `period_ms`. A busiest interval can always be moved to start at an
/// admitted time, so only those starts are tried.
fn busiest_window(admitted: &[(i64, u32)], period_ms: i64) -> u64 {
    let mut best = 0;
    let mut sum = 0u64;
    let mut end = 0;
    for (index, &(start, _)) in admitted.iter().enumerate() {
        while end < admitted.len() && admitted[end].0 < start + period_ms {
            sum += u64::from(admitted[end].1);
            end += 1;
        }
        best = best.max(sum);
        sum -= u64::from(admitted[index].1);
    }
    best
}

fn assert_within_worst_case(policy: &Policy, steps: &[Step]) -> Result<(), TestCaseError> {
    let admitted = admitted_by_steps(policy, steps);
    let period_ms = i64::try_from(policy.period().as_millis()).unwrap();
    let busiest = busiest_window(&admitted, period_ms);
    prop_assert!(
        busiest <= policy.worst_case(),
        "{} admitted {} units in one period, worst case is {}",
        policy.name(),
        busiest,
        policy.worst_case()
    );
    Ok(())
}

macro_rules! worst_case_property {
    ($($test:ident => $name:literal),* $(,)?) => {
        proptest! {
            $(
                #[test]
                fn $test(steps in steps(&policy($name))) {
                    assert_within_worst_case(&policy($name), &steps)?;
                }
            )*
        }
    };
}

worst_case_property! {
    worst_case_general => "general",
    worst_case_auth => "auth",
    worst_case_upload => "upload",
    worst_case_participant_session => "participant_session",
    worst_case_export => "export",
    worst_case_survey_creation => "survey_creation",
    worst_case_realtime => "realtime",
    worst_case_search => "search",
    worst_case_batch_creation => "batch_creation",
    worst_case_batch_items => "batch_items",
}

/// Sends `burst + 1` at once, then one each emission interval, for one
/// period: the sequence that reaches the worst case.
fn greedy_admitted(policy: &Policy) -> Vec<(i64, u32)> {
    let interval = policy.gcra().emission_interval_ms;
    let period = i64::try_from(policy.period().as_millis()).unwrap();
    let mut arrivals: Vec<Arrival> = vec![(0, 1); policy.max_cost() as usize];
    let mut at = interval;
    while at < period {
        arrivals.push((interval, 1));
        at += interval;
    }
    admitted(policy, &arrivals)
}

#[test]
fn greedy_sequence_reaches_worst_case() {
    for policy in PolicySet::defaults().policies() {
        let admitted = greedy_admitted(policy);
        let period_ms = i64::try_from(policy.period().as_millis()).unwrap();
        assert_eq!(
            busiest_window(&admitted, period_ms),
            policy.worst_case(),
            "{}",
            policy.name()
        );
    }
}

#[test]
fn closed_interval_admits_one_more() {
    let auth = policy("auth");
    let limiter = InMemoryLimiter::default();
    let period = Duration::minutes(15);
    let interval = Duration::minutes(3);
    let mut admitted = 0;
    let mut at = start();
    while at <= start() + period {
        if limiter
            .check_sync(&auth, "key", 1, at)
            .unwrap()
            .is_allowed()
        {
            admitted += 1;
        }
        at += interval;
    }
    assert_eq!(admitted, auth.worst_case() + 1);
}

fn random_policy() -> impl Strategy<Value = Option<Policy>> {
    (1u32..=1_000, 1_000u64..=7_200_000, 0u32..=1_000).prop_map(|(limit, period_ms, burst)| {
        Policy::new(
            "random",
            limit,
            StdDuration::from_millis(period_ms),
            burst.min(limit),
            "slow down",
        )
        .ok()
    })
}

proptest! {
    /// The bound holds for any valid policy, including emission intervals
    /// rounded up to whole milliseconds.
    #[test]
    fn worst_case_any_policy(
        (policy, steps) in random_policy()
            .prop_filter("valid policy", Option::is_some)
            .prop_map(|policy| policy.unwrap())
            .prop_flat_map(|policy| {
                let steps = steps(&policy);
                (Just(policy), steps)
            })
    ) {
        assert_within_worst_case(&policy, &steps)?;
        let greedy = greedy_admitted(&policy);
        let period_ms = i64::try_from(policy.period().as_millis()).unwrap();
        prop_assert_eq!(busiest_window(&greedy, period_ms), policy.worst_case());
    }
}

fn assert_same_as_governor(policy: &Policy, arrivals: &[Arrival]) -> Result<(), TestCaseError> {
    let limiter = InMemoryLimiter::default();
    // A keyed governor limiter with the same emission interval and
    // burst + 1 cells of capacity, on a fake clock.
    let interval = StdDuration::from_millis(policy.gcra().emission_interval_ms.unsigned_abs());
    let quota = Quota::with_period(interval)
        .unwrap()
        .allow_burst(NonZeroU32::new(policy.max_cost()).unwrap());
    let clock = FakeRelativeClock::default();
    let reference = Governor::hashmap_with_clock(quota, clock.clone());
    let mut now = start();
    for (index, &(gap, cost)) in arrivals.iter().enumerate() {
        now += Duration::milliseconds(gap);
        clock.advance(StdDuration::from_millis(gap.unsigned_abs()));

        let ours = limiter.check_sync(policy, "key", cost, now).unwrap();
        let theirs = reference.check_key_n(&"key", NonZeroU32::new(cost).unwrap());
        match theirs {
            Ok(Ok(())) => prop_assert!(
                ours.is_allowed(),
                "arrival {} allowed by governor only",
                index
            ),
            Ok(Err(not_until)) => {
                prop_assert!(
                    !ours.is_allowed(),
                    "arrival {} denied by governor only",
                    index
                );
                prop_assert_eq!(
                    ours.retry_after(),
                    Some(not_until.wait_time_from(clock.now()))
                );
            }
            Err(_insufficient) => prop_assert!(
                cost > policy.max_cost() && !ours.is_allowed(),
                "arrival {} of cost {} never fits in governor",
                index,
                cost
            ),
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn same_decisions_as_governor_general(arrivals in arrivals(&policy("general"))) {
        assert_same_as_governor(&policy("general"), &arrivals)?;
    }

    #[test]
    fn same_decisions_as_governor_auth(arrivals in arrivals(&policy("auth"))) {
        assert_same_as_governor(&policy("auth"), &arrivals)?;
    }

    #[test]
    fn same_decisions_as_governor_batch_items(arrivals in arrivals(&policy("batch_items"))) {
        assert_same_as_governor(&policy("batch_items"), &arrivals)?;
    }
}

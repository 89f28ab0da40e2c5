//! Time of one flag evaluation from a snapshot, without the store.
//!
//! `cargo bench -p flags --bench evaluate` runs the full measurement and
//! prints nanoseconds per evaluation for each path. Under `cargo test` the
//! binary runs without `--bench` and only checks that each path works.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use domain::{FeatureFlag, FlagListing, FlagName, NewFlag, Rollout, UserId};
use flags::{FlagSnapshot, Reason};

/// Distinct users cycled through, so the hash gets varied input.
const USERS: usize = 1_024;
/// Entries in each list of the measured flag; the maximum a store accepts.
const LIST_LEN: usize = domain::MAX_FLAG_LIST_LEN;
const FULL_ITERATIONS: usize = 5_000_000;
const SMOKE_ITERATIONS: usize = 1_000;

struct Case {
    label: &'static str,
    flag: &'static str,
    users: Vec<String>,
    expected: Option<Reason>,
}

fn main() {
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let iterations = if measuring {
        FULL_ITERATIONS
    } else {
        SMOKE_ITERATIONS
    };
    let snapshot = build_snapshot();

    let rollout_users: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
    let allowed_users: Vec<String> = (0..LIST_LEN).map(|i| format!("allowed-{i}")).collect();
    let cases = [
        Case {
            label: "rollout (hash)",
            flag: "target.flag",
            users: rollout_users.clone(),
            expected: Some(Reason::Rollout),
        },
        Case {
            label: "allow list hit",
            flag: "target.flag",
            users: allowed_users,
            expected: Some(Reason::AllowList),
        },
        Case {
            label: "disabled",
            flag: "disabled.flag",
            users: rollout_users.clone(),
            expected: Some(Reason::Disabled),
        },
        Case {
            label: "unknown flag",
            flag: "no.such.flag",
            users: rollout_users,
            expected: None,
        },
    ];

    for case in &cases {
        let first = snapshot
            .evaluate(case.flag, &case.users[0])
            .map(|evaluation| evaluation.reason);
        assert_eq!(first, case.expected, "{}: unexpected reason", case.label);

        let started = Instant::now();
        let mut enabled = 0usize;
        for i in 0..iterations {
            let user = &case.users[i % case.users.len()];
            if let Some(evaluation) = snapshot.evaluate(black_box(case.flag), black_box(user)) {
                enabled += usize::from(evaluation.enabled);
            }
        }
        let elapsed = started.elapsed();
        black_box(enabled);

        if measuring {
            let per_evaluation = elapsed.as_nanos() as f64 / iterations as f64;
            println!(
                "{:<16} {per_evaluation:>8.1} ns/evaluation ({iterations} evaluations)",
                case.label
            );
        }
    }
}

/// 200 flags, with the measured one carrying full allow and deny lists.
fn build_snapshot() -> FlagSnapshot {
    let mut flags: Vec<FeatureFlag> = (0..200)
        .map(|i| flag(&format!("filler.{i}"), true, 50))
        .collect();

    let mut target = flag("target.flag", true, 50);
    target.allow_list = (0..LIST_LEN)
        .map(|i| UserId::new(format!("allowed-{i}")))
        .collect::<BTreeSet<_>>();
    target.deny_list = (0..LIST_LEN)
        .map(|i| UserId::new(format!("denied-{i}")))
        .collect::<BTreeSet<_>>();
    flags.push(target);
    flags.push(flag("disabled.flag", false, 100));

    FlagSnapshot::from_listing(FlagListing { revision: 1, flags })
}

fn flag(name: &str, enabled: bool, rollout: i64) -> FeatureFlag {
    let (Ok(name), Ok(rollout)) = (FlagName::parse(name), Rollout::new(rollout)) else {
        panic!("benchmark flag {name} is invalid");
    };
    let new = NewFlag {
        enabled,
        rollout,
        ..NewFlag::new(name)
    };
    FeatureFlag::from_new(new, chrono::DateTime::UNIX_EPOCH)
}

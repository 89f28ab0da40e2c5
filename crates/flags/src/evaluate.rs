//! Evaluation of one flag for one user, and the rollout bucket.

use std::collections::HashSet;

use domain::FeatureFlag;
use serde::Serialize;

use crate::murmur3::Murmur3x86_32;

/// Number of rollout buckets. Buckets run from 1 to this value, so a
/// rollout percentage compares directly against a bucket.
pub const BUCKETS: u32 = 100;

/// Returns the user's rollout bucket for a flag, from 1 to 100:
/// MurmurHash3 x86_32 with seed 0 of the UTF-8 bytes of `"<flag>:<user>"`,
/// then `hash % 100 + 1`.
///
/// This is the normalization of Unleash's gradual rollout (its `groupId`
/// defaults to the flag name), so for ASCII ids a user lands in the same
/// bucket here as there. Client libraries that hash UTF-16 code units
/// instead of UTF-8 bytes may disagree for other ids.
pub fn bucket(flag: &str, user: &str) -> u8 {
    let mut hasher = Murmur3x86_32::new(0);
    hasher.write(flag.as_bytes());
    hasher.write(b":");
    hasher.write(user.as_bytes());
    // The remainder is below 100, so it fits a u8.
    (hasher.finish() % BUCKETS) as u8 + 1
}

/// The cause of an evaluation's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The user is on the deny list: off, whatever the other settings are.
    DenyList,
    /// The user is on the allow list: on, even if the flag is disabled.
    AllowList,
    /// The flag is disabled and the user is on neither list.
    Disabled,
    /// The flag is enabled, and the user's bucket decided.
    Rollout,
    /// No flag has this name; the result is the configured default.
    Unknown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DenyList => "deny_list",
            Reason::AllowList => "allow_list",
            Reason::Disabled => "disabled",
            Reason::Rollout => "rollout",
            Reason::Unknown => "unknown",
        }
    }
}

/// The result of evaluating a flag for a user, with enough detail to
/// explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    pub enabled: bool,
    pub reason: Reason,
    /// The user's bucket (1 to 100). Set only when the reason is
    /// [`Reason::Rollout`], and then the flag was on when `bucket <= rollout`.
    pub bucket: Option<u8>,
}

impl Evaluation {
    /// Returns the result for a flag name that does not exist.
    pub fn unknown(default: bool) -> Self {
        Self {
            enabled: default,
            reason: Reason::Unknown,
            bucket: None,
        }
    }

    fn fixed(enabled: bool, reason: Reason) -> Self {
        Self {
            enabled,
            reason,
            bucket: None,
        }
    }
}

/// A flag with its lists in hash sets, ready for evaluation.
#[derive(Debug, Clone)]
pub struct CompiledFlag {
    flag: FeatureFlag,
    allow: HashSet<String>,
    deny: HashSet<String>,
}

impl CompiledFlag {
    pub fn new(flag: FeatureFlag) -> Self {
        let allow = flag
            .allow_list
            .iter()
            .map(|user| user.as_str().to_owned())
            .collect();
        let deny = flag
            .deny_list
            .iter()
            .map(|user| user.as_str().to_owned())
            .collect();
        Self { flag, allow, deny }
    }

    pub fn flag(&self) -> &FeatureFlag {
        &self.flag
    }

    /// Evaluates the flag for `user`: deny list, then allow list, then
    /// `enabled`, then the user's bucket against the rollout percentage.
    pub fn evaluate(&self, user: &str) -> Evaluation {
        if self.deny.contains(user) {
            return Evaluation::fixed(false, Reason::DenyList);
        }
        if self.allow.contains(user) {
            return Evaluation::fixed(true, Reason::AllowList);
        }
        if !self.flag.enabled {
            return Evaluation::fixed(false, Reason::Disabled);
        }
        let bucket = bucket(self.flag.name.as_str(), user);
        Evaluation {
            enabled: bucket <= self.flag.rollout.percent(),
            reason: Reason::Rollout,
            bucket: Some(bucket),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use chrono::DateTime;
    use domain::{FlagName, NewFlag, Rollout, UserId};

    use super::*;

    fn compiled(enabled: bool, rollout: i64, allow: &[&str], deny: &[&str]) -> CompiledFlag {
        let to_set = |ids: &[&str]| {
            ids.iter()
                .map(|id| UserId::new(*id))
                .collect::<BTreeSet<_>>()
        };
        let new = NewFlag {
            enabled,
            rollout: Rollout::new(rollout).unwrap(),
            allow_list: to_set(allow),
            deny_list: to_set(deny),
            ..NewFlag::new(FlagName::parse("checkout.v2").unwrap())
        };
        CompiledFlag::new(FeatureFlag::from_new(new, DateTime::UNIX_EPOCH))
    }

    fn users(count: usize) -> impl Iterator<Item = String> {
        (0..count).map(|i| format!("user-{i}"))
    }

    #[test]
    fn bucket_known_answers() {
        // Each computed as murmur3_x86_32("<flag>:<user>", 0) % 100 + 1 by a
        // separate C build of the reference algorithm.
        let cases = [
            ("batch_operations", "user-1", 52),
            ("batch_operations", "alice", 78),
            ("checkout.v2", "user-42", 18),
            ("new-ui", "bob", 70),
        ];
        for (flag, user, expected) in cases {
            assert_eq!(bucket(flag, user), expected, "flag {flag} user {user}");
        }
    }

    #[test]
    fn bucket_stays_in_range() {
        let mut seen = [false; 101];
        for user in users(10_000) {
            let bucket = bucket("range", &user);
            assert!((1..=100).contains(&bucket), "bucket {bucket} for {user}");
            seen[usize::from(bucket)] = true;
        }
        assert!(!seen[0]);
        assert!(seen[1..].iter().all(|hit| *hit), "every bucket is reached");
    }

    #[test]
    fn bucket_depends_on_flag_name() {
        let same = users(1_000)
            .filter(|user| bucket("flag.a", user) == bucket("flag.b", user))
            .count();
        // Independent buckets agree about 1 time in 100.
        assert!(
            same < 30,
            "{same} of 1000 users share a bucket across two flags"
        );
    }

    #[test]
    fn deny_list_wins() {
        let flag = compiled(true, 100, &[], &["mallory"]);
        assert_eq!(
            flag.evaluate("mallory"),
            Evaluation {
                enabled: false,
                reason: Reason::DenyList,
                bucket: None
            }
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let flag = compiled(true, 100, &["both"], &["both"]);
        let evaluation = flag.evaluate("both");
        assert!(!evaluation.enabled);
        assert_eq!(evaluation.reason, Reason::DenyList);
    }

    #[test]
    fn allow_list_beats_disabled() {
        let flag = compiled(false, 0, &["alice"], &[]);
        assert_eq!(
            flag.evaluate("alice"),
            Evaluation {
                enabled: true,
                reason: Reason::AllowList,
                bucket: None
            }
        );
    }

    #[test]
    fn allow_list_beats_rollout_zero() {
        let flag = compiled(true, 0, &["alice"], &[]);
        let evaluation = flag.evaluate("alice");
        assert!(evaluation.enabled);
        assert_eq!(evaluation.reason, Reason::AllowList);
    }

    #[test]
    fn disabled_ignores_rollout() {
        let flag = compiled(false, 100, &[], &[]);
        assert_eq!(
            flag.evaluate("anyone"),
            Evaluation {
                enabled: false,
                reason: Reason::Disabled,
                bucket: None
            }
        );
    }

    #[test]
    fn rollout_zero_admits_nobody() {
        let flag = compiled(true, 0, &[], &[]);
        for user in users(10_000) {
            let evaluation = flag.evaluate(&user);
            assert!(!evaluation.enabled, "{user} was admitted at rollout 0");
            assert_eq!(evaluation.reason, Reason::Rollout);
            assert!(evaluation.bucket.is_some());
        }
    }

    #[test]
    fn rollout_full_admits_everybody() {
        let flag = compiled(true, 100, &[], &[]);
        for user in users(10_000) {
            let evaluation = flag.evaluate(&user);
            assert!(evaluation.enabled, "{user} was left out at rollout 100");
            assert_eq!(evaluation.reason, Reason::Rollout);
        }
    }

    #[test]
    fn rollout_compares_bucket_inclusively() {
        let user = "user-42";
        let user_bucket = bucket("checkout.v2", user);
        let at = compiled(true, i64::from(user_bucket), &[], &[]).evaluate(user);
        assert!(at.enabled, "bucket equal to the rollout is in");
        assert_eq!(at.bucket, Some(user_bucket));
        let below = compiled(true, i64::from(user_bucket) - 1, &[], &[]).evaluate(user);
        assert!(!below.enabled, "bucket above the rollout is out");
    }

    #[test]
    fn empty_user_id_gets_a_bucket() {
        let evaluation = compiled(true, 50, &[], &[]).evaluate("");
        assert_eq!(evaluation.bucket, Some(bucket("checkout.v2", "")));
    }

    #[test]
    fn rollout_share_matches_percentage() {
        // The band is three binomial standard deviations of the share, in
        // percentage points: 1.5 at 50% and 0.3 at 1% for 10,000 users.
        const USERS: usize = 10_000;
        for percent in [1, 5, 10, 25, 33, 50, 75, 90, 99] {
            let flag = compiled(true, percent, &[], &[]);
            let admitted = users(USERS)
                .filter(|user| flag.evaluate(user).enabled)
                .count();
            let share = admitted as f64 * 100.0 / USERS as f64;

            let p = percent as f64 / 100.0;
            let tolerance = 3.0 * (p * (1.0 - p) / USERS as f64).sqrt() * 100.0;
            assert!(
                (share - percent as f64).abs() <= tolerance,
                "rollout {percent}% admitted {share:.2}% of {USERS} users, outside ±{tolerance:.2} points"
            );
        }
    }

    #[test]
    fn rollout_is_sticky_when_raised() {
        let at_10 = compiled(true, 10, &[], &[]);
        let at_20 = compiled(true, 20, &[], &[]);
        let mut admitted_at_10 = 0;
        for user in users(10_000) {
            if at_10.evaluate(&user).enabled {
                assert!(
                    at_20.evaluate(&user).enabled,
                    "{user} lost the flag when rollout rose to 20%"
                );
                admitted_at_10 += 1;
            }
        }
        assert!(
            admitted_at_10 > 800,
            "only {admitted_at_10} users were in at 10%"
        );
    }

    #[test]
    fn evaluation_is_deterministic() {
        let flag = compiled(true, 50, &[], &[]);
        for user in users(1_000) {
            assert_eq!(flag.evaluate(&user), flag.evaluate(&user));
        }
    }

    #[test]
    fn reason_serializes_in_snake_case() {
        let evaluation = Evaluation {
            enabled: true,
            reason: Reason::AllowList,
            bucket: None,
        };
        let json = serde_json::to_value(evaluation).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "enabled": true, "reason": "allow_list", "bucket": null })
        );
        for reason in [
            Reason::DenyList,
            Reason::AllowList,
            Reason::Disabled,
            Reason::Rollout,
            Reason::Unknown,
        ] {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::json!(reason.as_str())
            );
        }
    }
}

//! Built-in policies, their worst case, and settings read from TOML.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ratelimit::{ConfigProblem, GENERAL, Policy, PolicySet, RateLimitConfig};

fn parse(text: &str) -> RateLimitConfig {
    toml::from_str(text).unwrap()
}

fn build(text: &str) -> Result<PolicySet, ratelimit::ConfigError> {
    PolicySet::from_config(&parse(text))
}

#[test]
fn defaults_match_stated_rates() {
    let set = PolicySet::defaults();
    let expected: [(&str, u32, u64); 10] = [
        ("general", 100, 60),
        ("auth", 5, 15 * 60),
        ("upload", 10, 3_600),
        ("participant_session", 1, 5 * 60),
        ("export", 20, 3_600),
        ("survey_creation", 50, 86_400),
        ("realtime", 30, 60),
        ("search", 200, 60),
        ("batch_creation", 10, 3_600),
        ("batch_items", 500, 60),
    ];
    assert_eq!(set.policies().count(), expected.len());
    for (name, limit, period_secs) in expected {
        let policy = set.get(name).unwrap();
        assert_eq!(policy.limit(), limit, "{name} limit");
        assert_eq!(
            policy.period(),
            Duration::from_secs(period_secs),
            "{name} period"
        );
        assert!(!policy.message().is_empty(), "{name} message");
    }
}

#[test]
fn default_worst_cases() {
    let set = PolicySet::defaults();
    let expected: [(&str, u64); 10] = [
        ("general", 120),
        ("auth", 5),
        ("upload", 12),
        ("participant_session", 1),
        ("export", 24),
        ("survey_creation", 60),
        ("realtime", 36),
        ("search", 240),
        ("batch_creation", 12),
        ("batch_items", 600),
    ];
    for (name, worst) in expected {
        let policy = set.get(name).unwrap();
        assert_eq!(policy.worst_case(), worst, "{name} worst case");
        assert!(
            policy.worst_case() * 5 <= u64::from(policy.limit()) * 6,
            "{name} worst case {} exceeds 1.2 x {}",
            policy.worst_case(),
            policy.limit()
        );
    }
    assert_eq!(set.get("auth").unwrap().worst_case(), 5);
}

#[test]
fn default_intervals_divide_periods() {
    for policy in PolicySet::defaults().policies() {
        let interval = policy.emission_interval().as_millis();
        let period = policy.period().as_millis();
        assert_eq!(
            period % interval,
            0,
            "{} interval {interval} ms",
            policy.name()
        );
        assert_eq!(
            period / interval,
            u128::from(policy.limit()),
            "{}",
            policy.name()
        );
        assert_eq!(policy.max_cost(), policy.burst() + 1, "{}", policy.name());
    }
}

#[test]
fn worst_case_formula_with_rounded_interval() {
    // 7 per minute: T = ceil(60000 / 7) = 8572 ms, and ceil(60000 / 8572) = 7.
    let policy = Policy::new("odd", 7, Duration::from_secs(60), 2, "slow down").unwrap();
    assert_eq!(policy.emission_interval(), Duration::from_millis(8_572));
    assert_eq!(policy.worst_case(), 9);
}

#[test]
fn empty_config_gives_defaults() {
    let set = build("").unwrap();
    assert_eq!(set, PolicySet::defaults());
    assert_eq!(set.for_route("anything").name(), GENERAL);
}

#[test]
fn toml_overrides_and_routes() {
    let set = build(
        r#"
        [policies.auth]
        limit = 10
        period = "30m"

        [policies.reports]
        limit = 3
        period = "1h30m"
        burst = 1
        message = "reports are slow; try again later"

        [routes]
        "auth.login" = "auth"
        "reports.create" = "reports"
        "batches.create" = "batch_creation"
        "#,
    )
    .unwrap();

    let auth = set.for_route("auth.login");
    assert_eq!(auth.name(), "auth");
    assert_eq!(auth.limit(), 10);
    assert_eq!(auth.period(), Duration::from_secs(1_800));
    assert_eq!(auth.burst(), 0);
    // An override without a message keeps the built-in one.
    assert_eq!(
        auth.message(),
        PolicySet::defaults().get("auth").unwrap().message()
    );

    let reports = set.for_route("reports.create");
    assert_eq!(reports.period(), Duration::from_secs(5_400));
    assert_eq!(reports.burst(), 1);
    assert_eq!(reports.message(), "reports are slow; try again later");

    assert_eq!(set.for_route("batches.create").name(), "batch_creation");
    assert_eq!(set.for_route("unassigned").name(), GENERAL);
    assert_eq!(set.routes().count(), 3);
}

#[test]
fn general_can_be_overridden() {
    let set = build(
        r#"
        [policies.general]
        limit = 60
        period = "1m"
        burst = 5
        "#,
    )
    .unwrap();
    assert_eq!(set.general().limit(), 60);
    assert_eq!(set.for_route("unassigned").limit(), 60);
}

fn error_of(text: &str) -> ratelimit::ConfigError {
    build(text).unwrap_err()
}

#[test]
fn zero_period_names_key() {
    let error = error_of("[policies.auth]\nlimit = 5\nperiod = \"0s\"");
    assert_eq!(error.key, "policies.auth.period");
    assert_eq!(error.problem, ConfigProblem::ZeroPeriod);
}

#[test]
fn malformed_period_names_key() {
    let error = error_of("[policies.auth]\nlimit = 5\nperiod = \"15 minutes\"");
    assert_eq!(error.key, "policies.auth.period");
    assert!(matches!(error.problem, ConfigProblem::InvalidPeriod(_)));
    assert!(error.to_string().contains("\"15m\""), "{error}");
}

#[test]
fn zero_limit_names_key() {
    let error = error_of("[policies.search]\nlimit = 0\nperiod = \"1m\"");
    assert_eq!(error.key, "policies.search.limit");
    assert_eq!(error.problem, ConfigProblem::ZeroLimit);
}

#[test]
fn burst_above_limit_names_key() {
    let error = error_of("[policies.search]\nlimit = 10\nperiod = \"1m\"\nburst = 11");
    assert_eq!(error.key, "policies.search.burst");
    assert_eq!(
        error.problem,
        ConfigProblem::BurstAboveLimit {
            burst: 11,
            limit: 10
        }
    );
}

#[test]
fn unknown_route_policy_names_key() {
    let error = error_of("[routes]\n\"export.csv\" = \"exports\"");
    assert_eq!(error.key, "routes.\"export.csv\"");
    let ConfigProblem::UnknownPolicy { policy, known } = &error.problem else {
        panic!("unexpected problem {:?}", error.problem);
    };
    assert_eq!(policy, "exports");
    assert!(known.contains("export"), "{known}");
}

#[test]
fn empty_route_names_key() {
    let error = error_of("[routes]\n\"\" = \"general\"");
    assert_eq!(error.problem, ConfigProblem::EmptyRoute);
}

#[test]
fn too_long_period_names_key() {
    let error = error_of("[policies.slow]\nlimit = 1\nperiod = \"400d\"");
    assert_eq!(error.key, "policies.slow.period");
    assert!(matches!(error.problem, ConfigProblem::PeriodTooLong { .. }));
}

#[test]
fn imprecise_rate_names_key() {
    let error = error_of("[policies.fast]\nlimit = 7000\nperiod = \"1m\"");
    assert_eq!(error.key, "policies.fast.limit");
    assert!(matches!(error.problem, ConfigProblem::ImpreciseRate { .. }));
}

#[test]
fn invalid_policy_name_is_rejected() {
    let error = error_of("[policies.\"Bad Name\"]\nlimit = 1\nperiod = \"1m\"");
    assert_eq!(error.key, "policies");
    assert_eq!(
        error.problem,
        ConfigProblem::InvalidPolicyName("Bad Name".to_owned())
    );
}

#[test]
fn empty_message_is_rejected() {
    let error = error_of("[policies.auth]\nlimit = 5\nperiod = \"15m\"\nmessage = \" \"");
    assert_eq!(error.key, "policies.auth.message");
    assert_eq!(error.problem, ConfigProblem::EmptyMessage);
}

#[test]
fn unknown_fields_are_rejected_by_serde() {
    let result: Result<RateLimitConfig, _> =
        toml::from_str("[policies.auth]\nlimt = 5\nperiod = \"15m\"");
    let error = result.unwrap_err().to_string();
    assert!(error.contains("limt"), "{error}");
}

#[test]
fn numeric_period_is_rejected_by_serde() {
    let result: Result<RateLimitConfig, _> =
        toml::from_str("[policies.auth]\nlimit = 5\nperiod = 900");
    assert!(result.is_err());
}

#[test]
fn policy_new_checks_period_precision() {
    let error = Policy::new("x", 1, Duration::from_micros(1_500), 0, "m").unwrap_err();
    assert_eq!(error.key, "policies.x.period");
    assert!(matches!(
        error.problem,
        ConfigProblem::SubMillisecondPeriod(_)
    ));
}

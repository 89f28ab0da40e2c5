//! Policies, their GCRA parameters and worst case, and the set of policies
//! that routes are assigned to.

use std::collections::BTreeMap;
use std::time::Duration;

use domain::GcraParams;

use crate::config::{ConfigError, ConfigProblem, RateLimitConfig, format_period, parse_period};

/// The policy every route without an assignment uses.
pub const GENERAL: &str = "general";

/// Longest accepted period. It keeps every GCRA sum far inside `i64`
/// milliseconds.
pub const MAX_PERIOD: Duration = Duration::from_secs(365 * 86_400);

/// Largest share of the rate that rounding the emission interval up to a
/// whole millisecond may cost, in percent, before a policy is rejected.
const MAX_ROUNDING_LOSS_PERCENT: u128 = 1;

/// The built-in policies: name, limit, period in seconds, burst, message.
/// Each burst is at most a fifth of its limit, so no default lets more than
/// 1.2 times its limit through in one period. `auth` has no burst, so it
/// lets exactly its limit through.
const DEFAULTS: [(&str, u32, u64, u32, &str); 10] = [
    (GENERAL, 100, 60, 20, GENERAL_MESSAGE),
    (
        "auth",
        5,
        15 * 60,
        0,
        "too many sign-in attempts; wait before trying again",
    ),
    (
        "upload",
        10,
        3_600,
        2,
        "too many uploads; wait before uploading again",
    ),
    (
        "participant_session",
        1,
        5 * 60,
        0,
        "a session was started moments ago; wait before starting another",
    ),
    (
        "export",
        20,
        3_600,
        4,
        "too many exports; wait before exporting again",
    ),
    (
        "survey_creation",
        50,
        86_400,
        10,
        "too many surveys created today; try again later",
    ),
    (
        "realtime",
        30,
        60,
        6,
        "too many realtime requests; slow down",
    ),
    ("search", 200, 60, 40, "too many searches; slow down"),
    (
        "batch_creation",
        10,
        3_600,
        2,
        "too many batches created; wait before creating another",
    ),
    (
        "batch_items",
        500,
        60,
        100,
        "too many batch items submitted; wait, or submit fewer items at once",
    ),
];

const GENERAL_MESSAGE: &str =
    "too many requests; wait for the Retry-After delay before sending more";

/// A rate-limit policy: `limit` units per `period` at the sustained rate,
/// with `burst` extra units a key may use at once.
///
/// Valid by construction: [`Policy::new`] rejects every value that would
/// break the crate's arithmetic or its worst-case bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    name: String,
    limit: u32,
    period: Duration,
    burst: u32,
    message: String,
    gcra: GcraParams,
}

impl Policy {
    /// Creates a policy, checking every value. Errors name the setting as
    /// `policies.<name>.<field>`.
    pub fn new(
        name: impl Into<String>,
        limit: u32,
        period: Duration,
        burst: u32,
        message: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let name = name.into();
        let message = message.into();
        validate_name(&name)?;
        let key = |field: &str| format!("policies.{name}.{field}");

        if limit == 0 {
            return Err(ConfigError::new(key("limit"), ConfigProblem::ZeroLimit));
        }
        if period.is_zero() {
            return Err(ConfigError::new(key("period"), ConfigProblem::ZeroPeriod));
        }
        if !period.subsec_nanos().is_multiple_of(1_000_000) {
            return Err(ConfigError::new(
                key("period"),
                ConfigProblem::SubMillisecondPeriod(period),
            ));
        }
        if period > MAX_PERIOD {
            return Err(ConfigError::new(
                key("period"),
                ConfigProblem::PeriodTooLong {
                    period: format_period(period),
                    max: format_period(MAX_PERIOD),
                },
            ));
        }
        if burst > limit {
            return Err(ConfigError::new(
                key("burst"),
                ConfigProblem::BurstAboveLimit { burst, limit },
            ));
        }
        check_rounding(limit, period).map_err(|problem| ConfigError::new(key("limit"), problem))?;
        if message.trim().is_empty() {
            return Err(ConfigError::new(
                key("message"),
                ConfigProblem::EmptyMessage,
            ));
        }

        Ok(Self::build(name, limit, period, burst, message))
    }

    /// Computes the GCRA parameters of values already checked.
    fn build(name: String, limit: u32, period: Duration, burst: u32, message: String) -> Self {
        let period_ms = period_millis(period);
        let interval_ms = period_ms.div_ceil(u64::from(limit)).max(1);
        let gcra = GcraParams {
            emission_interval_ms: i64::try_from(interval_ms).unwrap_or(i64::MAX),
            tolerance_ms: i64::try_from(interval_ms.saturating_mul(u64::from(burst)))
                .unwrap_or(i64::MAX),
        };
        Self {
            name,
            limit,
            period,
            burst,
            message,
            gcra,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Units per period at the sustained rate.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Extra units a key may use at once beyond the sustained rate.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Text for the client when a request is denied.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// `T = ceil(period / limit)` in whole milliseconds: the time one unit
    /// of cost occupies.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_millis(self.gcra.emission_interval_ms.unsigned_abs())
    }

    /// Returns the GCRA parameters that every limiter and store applies for
    /// this policy.
    pub fn gcra(&self) -> GcraParams {
        self.gcra
    }

    /// Largest cost one check can ever admit: `burst + 1`. A batch larger
    /// than this has to be split.
    pub fn max_cost(&self) -> u32 {
        self.burst.saturating_add(1)
    }

    /// Returns the maximum number of units one key can get admitted in any
    /// half-open interval
    /// `[t, t + period)`: `burst + ceil(period / T)`, which is
    /// `limit + burst` whenever `T` divides the period exactly. The crate
    /// documentation derives it.
    pub fn worst_case(&self) -> u64 {
        let period_ms = period_millis(self.period);
        let interval_ms = self.gcra.emission_interval_ms.unsigned_abs().max(1);
        u64::from(self.burst) + period_ms.div_ceil(interval_ms)
    }
}

fn period_millis(period: Duration) -> u64 {
    u64::try_from(period.as_millis()).unwrap_or(u64::MAX)
}

fn validate_name(name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        });
    if valid {
        Ok(())
    } else {
        Err(ConfigError::new(
            "policies",
            ConfigProblem::InvalidPolicyName(name.to_owned()),
        ))
    }
}

/// Rejects a rate whose emission interval, rounded up to whole
/// milliseconds, lowers the sustained rate by more than
/// [`MAX_ROUNDING_LOSS_PERCENT`].
fn check_rounding(limit: u32, period: Duration) -> Result<(), ConfigProblem> {
    let period_ms = u128::from(period_millis(period));
    let limit_units = u128::from(limit);
    let interval_ms = period_ms.div_ceil(limit_units).max(1);
    let covered_ms = interval_ms * limit_units;
    // The rounded rate is period / covered of the exact one.
    if period_ms * 100 >= covered_ms * (100 - MAX_ROUNDING_LOSS_PERCENT) {
        return Ok(());
    }
    Err(ConfigProblem::ImpreciseRate {
        limit,
        period: format_period(period),
        exact_ms: period_ms as f64 / limit_units as f64,
        rounded_ms: u64::try_from(interval_ms).unwrap_or(u64::MAX),
        loss_percent: 100.0 * (1.0 - period_ms as f64 / covered_ms as f64),
    })
}

/// The policies in force and which routes use which. `general` is always
/// present and is used by every route without an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    policies: BTreeMap<String, Policy>,
    routes: BTreeMap<String, String>,
    general: Policy,
}

impl PolicySet {
    /// Returns the built-in policies with no route assignments.
    pub fn defaults() -> Self {
        let policies: BTreeMap<String, Policy> = DEFAULTS
            .iter()
            .map(|&(name, limit, period_secs, burst, message)| {
                let policy = Policy::build(
                    name.to_owned(),
                    limit,
                    Duration::from_secs(period_secs),
                    burst,
                    message.to_owned(),
                );
                (name.to_owned(), policy)
            })
            .collect();
        let general = default_general(&policies);
        Self {
            policies,
            routes: BTreeMap::new(),
            general,
        }
    }

    /// Builds the set from settings: the built-in policies, replaced or
    /// extended by `config.policies`, and the routes of `config.routes`.
    pub fn from_config(config: &RateLimitConfig) -> Result<Self, ConfigError> {
        let mut set = Self::defaults();

        for (name, settings) in &config.policies {
            validate_name(name)?;
            let period = parse_period(&settings.period).ok_or_else(|| {
                ConfigError::new(
                    format!("policies.{name}.period"),
                    ConfigProblem::InvalidPeriod(settings.period.clone()),
                )
            })?;
            let message = match &settings.message {
                Some(message) => message.clone(),
                None => set
                    .policies
                    .get(name)
                    .map_or(GENERAL_MESSAGE, |policy| policy.message())
                    .to_owned(),
            };
            let policy = Policy::new(
                name.clone(),
                settings.limit,
                period,
                settings.burst,
                message,
            )?;
            set.policies.insert(name.clone(), policy);
        }

        for (route, policy) in &config.routes {
            let key = format!("routes.{route:?}");
            if route.is_empty() {
                return Err(ConfigError::new(key, ConfigProblem::EmptyRoute));
            }
            if !set.policies.contains_key(policy) {
                let known = set.policies.keys().cloned().collect::<Vec<_>>().join(", ");
                return Err(ConfigError::new(
                    key,
                    ConfigProblem::UnknownPolicy {
                        policy: policy.clone(),
                        known,
                    },
                ));
            }
            set.routes.insert(route.clone(), policy.clone());
        }

        set.general = default_general(&set.policies);
        Ok(set)
    }

    /// Returns the policy called `name`, if it is defined.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    pub fn general(&self) -> &Policy {
        &self.general
    }

    /// Returns the policy assigned to `route_id`, or `general` for a route
    /// without an assignment.
    pub fn for_route(&self, route_id: &str) -> &Policy {
        self.routes
            .get(route_id)
            .and_then(|name| self.policies.get(name))
            .unwrap_or(&self.general)
    }

    /// Returns every policy, ordered by name.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    /// Returns every route assignment as `(route id, policy name)`,
    /// ordered by route id.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &str)> {
        self.routes
            .iter()
            .map(|(route, policy)| (route.as_str(), policy.as_str()))
    }
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::defaults()
    }
}

/// Returns `general` from the map, which always contains it because
/// configuration can replace a built-in policy but never remove one.
fn default_general(policies: &BTreeMap<String, Policy>) -> Policy {
    match policies.get(GENERAL) {
        Some(policy) => policy.clone(),
        None => Policy::build(
            GENERAL.to_owned(),
            100,
            Duration::from_secs(60),
            20,
            GENERAL_MESSAGE.to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn defaults_pass_validation() {
        for policy in PolicySet::defaults().policies() {
            let checked = Policy::new(
                policy.name(),
                policy.limit(),
                policy.period(),
                policy.burst(),
                policy.message(),
            )
            .unwrap();
            assert_eq!(&checked, policy);
        }
    }

    #[test]
    fn rounding_check_rejects_lossy_rates() {
        // 7 per minute: T = 8572 ms instead of 8571.43, a loss far below 1%.
        assert!(check_rounding(7, Duration::from_secs(60)).is_ok());
        // 7000 per minute: T = 9 ms instead of 8.57, a loss of 4.8%.
        let problem = check_rounding(7_000, Duration::from_secs(60)).unwrap_err();
        assert!(matches!(
            problem,
            ConfigProblem::ImpreciseRate { rounded_ms: 9, .. }
        ));
        // 2000 per second: T would be 0.5 ms.
        assert!(check_rounding(2_000, Duration::from_secs(1)).is_err());
        // 1000 per second: T = 1 ms exactly.
        assert!(check_rounding(1_000, Duration::from_secs(1)).is_ok());
    }
}

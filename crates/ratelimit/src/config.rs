//! The serde form of the rate-limit settings, period strings, and the
//! error that names an invalid setting.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::key::ProxyHeader;

/// Rate-limit settings as they appear in a TOML file:
///
/// ```toml
/// [policies.auth]
/// limit = 5
/// period = "15m"
/// burst = 0
/// message = "too many sign-in attempts; wait before trying again"
///
/// [routes]
/// "auth.login" = "auth"
///
/// [client_key]
/// trusted_proxies = ["192.0.2.10", "2001:db8::/48"]
/// proxy_header = "x-forwarded-for"
/// ipv6_prefix = 64
/// ```
///
/// Every section is optional. An entry under `policies` replaces the
/// built-in policy of that name or adds a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub policies: BTreeMap<String, PolicyConfig>,
    /// Route id to policy name; routes not listed use `general`.
    pub routes: BTreeMap<String, String>,
    pub client_key: ClientKeyConfig,
}

/// One policy's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Requests (or cost units) per period at the sustained rate.
    pub limit: u32,
    /// A duration string: whole numbers with the units `ms`, `s`, `m`,
    /// `h` or `d`, written together, such as `"15m"`, `"1h30m"` or `"1d"`.
    pub period: String,
    /// Extra units a key may use at once beyond the sustained rate; 0 by
    /// default. At most `limit`.
    #[serde(default)]
    pub burst: u32,
    /// Text for the client when a request is denied; the built-in text of
    /// the policy of the same name, or a general one, when missing.
    #[serde(default)]
    pub message: Option<String>,
}

/// Settings of client key derivation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// Addresses or CIDR blocks of the reverse proxies whose forwarding
    /// header is believed.
    pub trusted_proxies: Vec<String>,
    /// The header those proxies append the client address to.
    pub proxy_header: ProxyHeader,
    /// Prefix length IPv4 clients are grouped by; 32 keys each address.
    pub ipv4_prefix: u8,
    /// Prefix length IPv6 clients are grouped by; 64 by default, because
    /// one subscriber is usually assigned a whole /64.
    pub ipv6_prefix: u8,
}

impl Default for ClientKeyConfig {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            proxy_header: ProxyHeader::XForwardedFor,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

/// An invalid rate-limit setting. `key` is the setting's path in the
/// configuration, such as `policies.auth.period` or `routes."export.csv"`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid rate-limit setting {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: ConfigProblem,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, problem: ConfigProblem) -> Self {
        Self {
            key: key.into(),
            problem,
        }
    }
}

/// The problem with an invalid setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigProblem {
    #[error("policy name {0:?} must be 1 to 64 characters of a-z, 0-9, '_', '-' or '.'")]
    InvalidPolicyName(String),

    #[error(
        "{0:?} is not a duration; write whole numbers with the units ms, s, m, h or d, such as \"15m\" or \"1h30m\""
    )]
    InvalidPeriod(String),

    #[error("the period must be longer than zero")]
    ZeroPeriod,

    #[error("the period {0:?} has a part smaller than a millisecond; use whole milliseconds")]
    SubMillisecondPeriod(Duration),

    #[error("the period {period} is longer than the maximum of {max}; use a shorter period")]
    PeriodTooLong { period: String, max: String },

    #[error("the limit must be at least 1")]
    ZeroLimit,

    #[error("burst {burst} is larger than the limit {limit}; use a burst between 0 and the limit")]
    BurstAboveLimit { burst: u32, limit: u32 },

    #[error(
        "limit {limit} per {period} needs an emission interval of {exact_ms:.3} ms, and rounding it up to whole milliseconds ({rounded_ms} ms) would lower the rate by {loss_percent:.1}%; lower the limit or lengthen the period"
    )]
    ImpreciseRate {
        limit: u32,
        period: String,
        exact_ms: f64,
        rounded_ms: u64,
        loss_percent: f64,
    },

    #[error("the message must not be empty")]
    EmptyMessage,

    #[error("the route id must not be empty")]
    EmptyRoute,

    #[error("policy {policy:?} is not defined; define it under [policies] or use one of: {known}")]
    UnknownPolicy { policy: String, known: String },

    #[error("{0:?} is not an IP address or a CIDR block such as \"192.0.2.0/24\"")]
    InvalidProxy(String),

    #[error("prefix length {value} is outside 1 to {max}")]
    InvalidPrefix { value: u8, max: u8 },
}

/// Parses a period string such as `"15m"`, `"1h30m"`, `"500ms"` or `"1d"`.
/// Returns `None` when the text is not in that form or overflows.
pub fn parse_period(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];

        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_ms = total_ms.checked_add(value.checked_mul(unit_ms)?)?;
    }
    Some(Duration::from_millis(total_ms))
}

/// Writes a duration in the form [`parse_period`] reads, largest units
/// first: 90 minutes is `"1h30m"`. Parts below a millisecond are dropped.
pub fn format_period(period: Duration) -> String {
    let mut rest = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
    if rest == 0 {
        return "0ms".to_owned();
    }
    let mut text = String::new();
    for (unit, unit_ms) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if rest >= unit_ms {
            text.push_str(&format!("{}{unit}", rest / unit_ms));
            rest %= unit_ms;
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn period_parses_units() {
        assert_eq!(parse_period("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_period("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_period("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_period("1h"), Some(Duration::from_secs(3_600)));
        assert_eq!(parse_period("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_period("1h30m"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse_period(" 2m "), Some(Duration::from_secs(120)));
        assert_eq!(parse_period("0s"), Some(Duration::ZERO));
    }

    #[test]
    fn period_rejects_malformed_text() {
        for text in [
            "",
            "15",
            "m",
            "15 m",
            "1.5h",
            "-1m",
            "15min",
            "1h 30m",
            "15M",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_period(text), None, "{text:?} should be rejected");
        }
    }

    #[test]
    fn period_formats_round_trip() {
        for text in ["500ms", "30s", "15m", "1h", "1d", "1h30m", "1d2h3m4s5ms"] {
            let period = parse_period(text).unwrap();
            assert_eq!(format_period(period), text);
        }
        assert_eq!(format_period(Duration::ZERO), "0ms");
    }

    #[test]
    fn config_error_names_key() {
        let error = ConfigError::new("policies.auth.limit", ConfigProblem::ZeroLimit);
        assert_eq!(
            error.to_string(),
            "invalid rate-limit setting policies.auth.limit: the limit must be at least 1"
        );
    }
}

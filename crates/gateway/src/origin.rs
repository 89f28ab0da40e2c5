//! The policy of browser origins allowed to open a WebSocket connection.

use thiserror::Error;

/// An origin reduced to scheme, host and port, with the default port filled
/// in, so `https://a.example` and `https://a.example:443` compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// Parses a serialized origin as browsers send it: `scheme://host`
    /// with an optional `:port` and nothing after it. Scheme and host are
    /// compared case-insensitively.
    pub fn parse(value: &str) -> Result<Self, OriginError> {
        let invalid = || OriginError::Invalid(value.to_owned());
        let (scheme, rest) = value.split_once("://").ok_or_else(invalid)?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(invalid()),
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(invalid());
        }

        // A bracketed IPv6 host contains colons of its own.
        let (host, port) = if let Some(after_bracket) = rest.strip_prefix('[') {
            let (address, tail) = after_bracket.split_once(']').ok_or_else(invalid)?;
            let port = match tail {
                "" => None,
                _ => Some(tail.strip_prefix(':').ok_or_else(invalid)?),
            };
            (format!("[{address}]"), port)
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host.to_owned(), Some(port)),
                None => (rest.to_owned(), None),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err(invalid());
        }
        let port = match port {
            None => default_port,
            Some(port) => port.parse::<u16>().map_err(|_| invalid())?,
        };

        Ok(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// A rejected or unparsable `Origin` header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OriginError {
    #[error("invalid origin {0:?}: expected scheme://host[:port] with scheme http or https")]
    Invalid(String),
    #[error("origin {0:?} is not in the allowed origins")]
    NotAllowed(String),
    #[error(
        "the Origin header is missing; browsers always send it, and clients without it are not allowed"
    )]
    Missing,
}

/// The origins allowed to open a connection: an exact match of scheme, host
/// and port against a configured list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    allowed: Vec<Origin>,
    allow_missing: bool,
}

impl OriginPolicy {
    /// Builds a policy from origin strings such as `https://app.example`.
    /// With `allow_missing`, a request without an `Origin` header (a
    /// non-browser client) is accepted.
    pub fn new<S: AsRef<str>>(
        allowed: impl IntoIterator<Item = S>,
        allow_missing: bool,
    ) -> Result<Self, OriginError> {
        let allowed = allowed
            .into_iter()
            .map(|origin| Origin::parse(origin.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            allowed,
            allow_missing,
        })
    }

    /// Checks the value of a request's `Origin` header, `None` when absent.
    pub fn check(&self, origin: Option<&str>) -> Result<(), OriginError> {
        let Some(value) = origin else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginError::Missing)
            };
        };
        // Sandboxed documents send the literal "null", which matches nothing.
        let parsed =
            Origin::parse(value.trim()).map_err(|_| OriginError::NotAllowed(value.to_owned()))?;
        if self.allowed.contains(&parsed) {
            Ok(())
        } else {
            Err(OriginError::NotAllowed(value.to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn policy(allow_missing: bool) -> OriginPolicy {
        OriginPolicy::new(
            ["https://app.example.com", "http://localhost:3000"],
            allow_missing,
        )
        .unwrap()
    }

    #[test]
    fn origin_exact_match_allowed() {
        let policy = policy(false);
        assert_eq!(policy.check(Some("https://app.example.com")), Ok(()));
        assert_eq!(policy.check(Some("https://app.example.com:443")), Ok(()));
        assert_eq!(policy.check(Some("HTTPS://App.Example.com")), Ok(()));
        assert_eq!(policy.check(Some("http://localhost:3000")), Ok(()));
    }

    #[test]
    fn origin_mismatch_rejected() {
        let policy = policy(false);
        let rejected = [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evil.app.example.com",
            "https://app.example.com.evil.net",
            "http://localhost",
            "http://localhost:3001",
            "null",
            "https://app.example.com/path",
            "https://user@app.example.com",
            "",
        ];
        for origin in rejected {
            assert!(
                matches!(policy.check(Some(origin)), Err(OriginError::NotAllowed(_))),
                "origin {origin:?} should be rejected"
            );
        }
    }

    #[test]
    fn missing_origin_follows_setting() {
        assert_eq!(policy(false).check(None), Err(OriginError::Missing));
        assert_eq!(policy(true).check(None), Ok(()));
    }

    #[test]
    fn ipv6_origin_parses() {
        let policy = OriginPolicy::new(["http://[::1]:8080"], false).unwrap();
        assert_eq!(policy.check(Some("http://[::1]:8080")), Ok(()));
        assert!(policy.check(Some("http://[::1]")).is_err());
    }

    #[test]
    fn invalid_configured_origin_rejected() {
        for origin in [
            "app.example.com",
            "ftp://a.example",
            "https://",
            "https://a:99999",
        ] {
            assert_eq!(
                OriginPolicy::new([origin], false),
                Err(OriginError::Invalid(origin.to_owned())),
                "origin {origin:?}"
            );
        }
    }
}

//! Keeping secrets out of logs: a display wrapper for values and the rule
//! by which the formatters hide fields named like a secret.

use std::fmt;

/// Text written in place of a hidden value.
pub const REDACTED: &str = "[redacted]";

/// Substrings that mark a field name as a secret, matched without regard
/// to case: `token`, `access_token`, `Authorization`, `db_password`, ...
const SECRET_NAME_PARTS: [&str; 9] = [
    "token",
    "secret",
    "password",
    "passwd",
    "authorization",
    "api_key",
    "apikey",
    "cookie",
    "credential",
];

/// Checks whether the formatters hide the value of a field with this name.
///
/// The match is by substring, so `refresh_token` and `jwt_secret` are hidden
/// too. A secret logged under an unrelated name (`value = %token`) is not
/// caught by this rule: wrap it in [`Redacted`].
pub fn is_secret_field(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_NAME_PARTS.iter().any(|part| lower.contains(part))
}

/// A value that prints as `[redacted]` through both `Display` and `Debug`,
/// so it can be passed to a log macro or a `format!` without leaking.
///
/// ```
/// use telemetry::Redacted;
/// let token = Redacted::new("eyJhbGciOi...");
/// assert_eq!(format!("{token} {token:?}"), "[redacted] [redacted]");
/// assert_eq!(*token.expose(), "eyJhbGciOi...");
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Redacted<T>(T);

impl<T> Redacted<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The wrapped value, for the code that must use it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Display for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> From<T> for Redacted<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_detected() {
        for name in [
            "token",
            "access_token",
            "Authorization",
            "jwt_secret",
            "db_password",
            "x_api_key",
            "set_cookie",
        ] {
            assert!(is_secret_field(name), "{name}");
        }
    }

    #[test]
    fn ordinary_names_are_not_secret() {
        for name in [
            "correlation_id",
            "user_id",
            "batch_id",
            "message",
            "kind",
            "path",
        ] {
            assert!(!is_secret_field(name), "{name}");
        }
    }

    #[test]
    fn redacted_hides_value_in_display_and_debug() {
        let wrapped = Redacted::new(String::from("hunter2"));
        assert_eq!(wrapped.to_string(), REDACTED);
        assert_eq!(format!("{wrapped:?}"), REDACTED);
        assert_eq!(
            format!("{:#?}", Some(&wrapped)),
            "Some(\n    [redacted],\n)"
        );
        assert_eq!(wrapped.expose(), "hunter2");
    }
}

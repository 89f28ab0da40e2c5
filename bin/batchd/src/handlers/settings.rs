//! Deserialization helpers for the handler settings, and the error for
//! settings a handler cannot start with.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, de};
use url::Url;

use super::guard::GuardError;
use super::host_limit::InvalidRate;

/// Returns the `User-Agent` that the outbound handlers send unless one is
/// configured.
pub fn default_user_agent() -> String {
    format!("batchd/{}", env!("CARGO_PKG_VERSION"))
}

/// Reads a URL from a string.
pub fn deserialize_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Url, D::Error> {
    let text = String::deserialize(deserializer)?;
    Url::parse(&text).map_err(|error| de::Error::custom(format!("invalid URL: {error}")))
}

/// Reads a duration from a positive number of seconds, such as 10 or 0.5.
pub fn deserialize_seconds<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    let seconds = f64::deserialize(deserializer)?;
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| {
            de::Error::custom(format!(
                "invalid duration {seconds}: expected a positive number of seconds"
            ))
        })
}

/// Settings that a handler cannot start with. Raised by the handlers'
/// constructors, so a bad configuration stops the server at startup.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("invalid webhook url: {0}")]
    WebhookUrl(#[source] GuardError),
    #[error("the webhook secret is empty; set it to a random value, 32 bytes or longer")]
    EmptySecret,
    #[error("invalid timeout: it must be positive")]
    ZeroTimeout,
    #[error("invalid user agent {0:?}: it must be visible ASCII")]
    UserAgent(String),
    #[error(
        "invalid content type {0:?} in allowed_content_types: expected \"type/subtype\" or \"type/*\""
    )]
    ContentType(String),
    #[error("allowed_content_types is empty, so every document would be rejected")]
    NoContentTypes,
    #[error(transparent)]
    Rate(#[from] InvalidRate),
    #[error("creating directory {} failed: {source}; check that data_dir is writable", path.display())]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the HTTP client failed: {0}")]
    Client(#[source] reqwest::Error),
}

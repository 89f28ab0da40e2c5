//! The `webhook` handler: POSTs each item's payload to one configured URL,
//! signed with HMAC-SHA256.
//!
//! A receiver checks a request with [`verify`]: it recomputes the HMAC of
//! `"<timestamp>.<body>"` under the shared secret and compares it with the
//! `X-Batchd-Signature` header, and rejects old timestamps so a captured
//! request cannot be replayed later. Delivery is at least once, so the
//! receiver should also drop repeats by `Idempotency-Key`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use hmac::{Hmac, Mac};
use queue::{HandlerError, JobContext, JobHandler};
use reqwest::Client;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use url::Url;

use super::attempt::Attempt;
use super::guard::{AddressPolicy, check_url, resolve_checked};
use super::http::{
    build_client, drain_body, guard_failure, host_of, read_excerpt, request_failure,
    status_failure, to_result,
};
use super::settings::{SetupError, default_user_agent, deserialize_seconds, deserialize_url};

/// Unix time in seconds at which the request was signed.
pub const TIMESTAMP_HEADER: &str = "X-Batchd-Timestamp";
/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "X-Batchd-Signature";
pub const JOB_ID_HEADER: &str = "X-Batchd-Job-Id";
pub const BATCH_ID_HEADER: &str = "X-Batchd-Batch-Id";
/// Attempt number, 1 for the first delivery.
pub const ATTEMPT_HEADER: &str = "X-Batchd-Attempt";
/// `<batch id>:<item seq>`, the same for every attempt of one item.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
pub const CORRELATION_ID_HEADER: &str = "X-Correlation-ID";

/// Body bytes read from a 2xx response so the connection can be reused.
const DRAIN_LIMIT: usize = 16 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// Settings of the `webhook` handler. Config keys are snake_case:
/// `url`, `secret`, `timeout_seconds`, `policy`, `max_error_body`,
/// `user_agent`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Endpoint each item is POSTed to; http or https.
    #[serde(deserialize_with = "deserialize_url")]
    pub url: Url,
    /// HMAC-SHA256 signing key shared with the receiver.
    pub secret: String,
    /// Limit for one request, from connecting to the end of the response.
    #[serde(
        rename = "timeout_seconds",
        deserialize_with = "deserialize_seconds",
        default = "default_timeout"
    )]
    pub timeout: Duration,
    #[serde(default)]
    pub policy: AddressPolicy,
    /// Maximum bytes of a failed response's body quoted in the error.
    #[serde(default = "default_max_error_body")]
    pub max_error_body: usize,
    #[serde(default = "default_user_agent")]
    pub user_agent: String,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_error_body() -> usize {
    512
}

impl WebhookSettings {
    /// Settings for `url` and `secret` with defaults for the rest: a 10 s
    /// timeout, no loopback or private targets, 512 bytes of error body.
    pub fn new(url: Url, secret: impl Into<String>) -> Self {
        Self {
            url,
            secret: secret.into(),
            timeout: default_timeout(),
            policy: AddressPolicy::default(),
            max_error_body: default_max_error_body(),
            user_agent: default_user_agent(),
        }
    }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url_host", &host_of(&self.url))
            .field("secret", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("max_error_body", &self.max_error_body)
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

/// Delivers each item to the configured endpoint.
///
/// Outcomes: a 2xx response succeeds with `{"status": code}`. 429 and 503
/// with a valid `Retry-After` ask to run again after that delay (capped at
/// one hour). 408, 429, 5xx, timeouts and connection errors are
/// retryable. Any other status, including 3xx because redirects are not
/// followed, is permanent, with the status and the start of the body.
#[derive(Debug)]
pub struct WebhookHandler {
    settings: WebhookSettings,
    client: Client,
}

impl WebhookHandler {
    /// Checks the settings and builds the HTTP client. Fails on a URL that
    /// is not http(s), has userinfo or is an IP literal the policy blocks,
    /// on an empty secret, a zero timeout or an invalid user agent.
    pub fn new(settings: WebhookSettings) -> Result<Self, SetupError> {
        check_url(&settings.url, settings.policy).map_err(SetupError::WebhookUrl)?;
        if settings.secret.is_empty() {
            return Err(SetupError::EmptySecret);
        }
        if settings.timeout.is_zero() {
            return Err(SetupError::ZeroTimeout);
        }
        if HeaderValue::from_str(&settings.user_agent).is_err() {
            return Err(SetupError::UserAgent(settings.user_agent));
        }
        let client = build_client(settings.policy, settings.timeout, &settings.user_agent)
            .map_err(SetupError::Client)?;
        Ok(Self { settings, client })
    }

    /// Runs one attempt; [`JobHandler::run`] calls this.
    pub async fn deliver(
        &self,
        attempt: &Attempt<'_>,
    ) -> Result<Option<Box<RawValue>>, HandlerError> {
        tokio::select! {
            biased;
            () = attempt.cancel.cancelled() => Err(HandlerError::Cancelled),
            result = self.send(attempt) => result,
        }
    }

    async fn send(&self, attempt: &Attempt<'_>) -> Result<Option<Box<RawValue>>, HandlerError> {
        let url = &self.settings.url;
        let host = host_of(url);
        let target = format!("webhook to {host}");

        resolve_checked(url, self.settings.policy)
            .await
            .map_err(|error| guard_failure(&error, &target))?;

        let timestamp = Utc::now().timestamp();
        let body = attempt.payload.as_bytes();
        let signature = sign(self.settings.secret.as_bytes(), timestamp, body);

        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .header(JOB_ID_HEADER, attempt.job_id.to_string())
            .header(BATCH_ID_HEADER, attempt.batch_id.to_string())
            .header(ATTEMPT_HEADER, attempt.attempt.to_string())
            .header(
                IDEMPOTENCY_KEY_HEADER,
                format!("{}:{}", attempt.batch_id, attempt.seq),
            )
            .body(attempt.payload.to_owned());
        if let Some(correlation_id) = attempt.correlation_id {
            match HeaderValue::from_str(correlation_id) {
                Ok(value) => request = request.header(CORRELATION_ID_HEADER, value),
                Err(_) => tracing::warn!(
                    job_id = %attempt.job_id,
                    "correlation id is not a valid header value; sending the webhook without it"
                ),
            }
        }

        // The delivery is a new span in the trace of the request that
        // created the batch.
        if let Some(parent) = attempt
            .traceparent
            .and_then(|value| value.parse::<telemetry::correlation::TraceContext>().ok())
        {
            request = request.header("traceparent", parent.child().to_string());
        }

        let mut response = request
            .send()
            .await
            .map_err(|error| request_failure(&error, &target, self.settings.timeout))?;
        let status = response.status();
        tracing::debug!(
            job_id = %attempt.job_id,
            host,
            status = status.as_u16(),
            attempt = attempt.attempt,
            "webhook response received"
        );

        if status.is_success() {
            drain_body(&mut response, DRAIN_LIMIT).await;
            return to_result(&serde_json::json!({ "status": status.as_u16() }));
        }
        let excerpt = read_excerpt(&mut response, self.settings.max_error_body).await;
        Err(status_failure(
            status,
            response.headers(),
            &excerpt,
            &target,
            Utc::now(),
        ))
    }
}

#[async_trait]
impl JobHandler for WebhookHandler {
    async fn run(&self, job: JobContext) -> Result<Option<Box<RawValue>>, HandlerError> {
        let progress = |percent| job.report_progress(percent);
        self.deliver(&Attempt::from_context(&job, &progress)).await
    }
}

fn mac_for(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC hashes keys longer than the block size and pads shorter ones,
    // so every key length is valid.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Computes the `X-Batchd-Signature` value for a request body sent at
/// `timestamp` (Unix seconds): `v1=` and the lowercase hex
/// HMAC-SHA256 of `"<timestamp>.<body>"` under `secret`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mac = mac_for(secret, &timestamp.to_string(), body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Reason for which [`verify`] rejected a request.
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "for receivers and tests; the server only signs")
)]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("invalid {TIMESTAMP_HEADER} {0:?}: expected Unix seconds")]
    InvalidTimestamp(String),
    #[error(
        "{TIMESTAMP_HEADER} is {age_seconds} s from the receiver's clock, more than the {max_age_seconds} s allowed; check the clocks or reject the request as a replay"
    )]
    Expired {
        age_seconds: u64,
        max_age_seconds: u64,
    },
    #[error("{SIGNATURE_HEADER} has no v1= signature")]
    MissingSignature,
    #[error(
        "{SIGNATURE_HEADER} does not match the body; check that the secret is the same on both sides"
    )]
    Mismatch,
}

/// Checks a received request: `timestamp` and `signature` are the header
/// values, `body` the raw body bytes, `now` the receiver's Unix time. The
/// timestamp must lie within `max_age` of `now` in either direction. The
/// signature header may list several comma-separated `v1=` values, as
/// during a secret rotation; one match is enough. The comparison runs in
/// constant time.
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "for receivers and tests; the server only signs")
)]
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now: i64,
    max_age: Duration,
) -> Result<(), SignatureError> {
    let timestamp = timestamp.trim();
    let sent_at: i64 = timestamp
        .parse()
        .map_err(|_| SignatureError::InvalidTimestamp(timestamp.to_owned()))?;
    let age_seconds = now.abs_diff(sent_at);
    if age_seconds > max_age.as_secs() {
        return Err(SignatureError::Expired {
            age_seconds,
            max_age_seconds: max_age.as_secs(),
        });
    }

    let mut found = false;
    for candidate in signature.split(',') {
        let Some(hex_digest) = candidate.trim().strip_prefix("v1=") else {
            continue;
        };
        found = true;
        let Ok(digest) = hex::decode(hex_digest) else {
            continue;
        };
        if mac_for(secret, timestamp, body)
            .verify_slice(&digest)
            .is_ok()
        {
            return Ok(());
        }
    }
    if found {
        Err(SignatureError::Mismatch)
    } else {
        Err(SignatureError::MissingSignature)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SECRET: &[u8] = b"whsec-test";
    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn sign_matches_reference_value() {
        // Computed independently with Python's hmac module.
        assert_eq!(
            sign(SECRET, 1_700_000_000, br#"{"a":1}"#),
            "v1=fed7a1a6c799a6367d73724d76bc70c16678908a32a879cd1ded6565ac05cece"
        );
    }

    #[test]
    fn verify_accepts_own_signature() {
        let body = br#"{"order":42}"#;
        let signature = sign(SECRET, 1_000, body);
        assert_eq!(
            verify(SECRET, "1000", body, &signature, 1_030, MINUTE),
            Ok(())
        );
    }

    #[test]
    fn verify_rejects_changed_body_or_secret() {
        let signature = sign(SECRET, 1_000, b"{}");
        assert_eq!(
            verify(SECRET, "1000", b"{ }", &signature, 1_000, MINUTE),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"other", "1000", b"{}", &signature, 1_000, MINUTE),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(SECRET, "1001", b"{}", &signature, 1_000, MINUTE),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn verify_rejects_stale_and_future_timestamps() {
        let signature = sign(SECRET, 1_000, b"{}");
        assert!(matches!(
            verify(SECRET, "1000", b"{}", &signature, 1_061, MINUTE),
            Err(SignatureError::Expired {
                age_seconds: 61,
                ..
            })
        ));
        assert!(matches!(
            verify(SECRET, "1000", b"{}", &signature, 939, MINUTE),
            Err(SignatureError::Expired {
                age_seconds: 61,
                ..
            })
        ));
    }

    #[test]
    fn verify_accepts_any_listed_signature() {
        let good = sign(SECRET, 1_000, b"{}");
        let old = sign(b"previous-secret", 1_000, b"{}");
        let header = format!("{old}, {good}");
        assert_eq!(
            verify(SECRET, "1000", b"{}", &header, 1_000, MINUTE),
            Ok(())
        );
    }

    #[test]
    fn verify_rejects_malformed_headers() {
        assert_eq!(
            verify(SECRET, "soon", b"{}", "v1=00", 1_000, MINUTE),
            Err(SignatureError::InvalidTimestamp("soon".into()))
        );
        assert_eq!(
            verify(SECRET, "1000", b"{}", "v0=abcd", 1_000, MINUTE),
            Err(SignatureError::MissingSignature)
        );
        assert_eq!(
            verify(SECRET, "1000", b"{}", "v1=not-hex", 1_000, MINUTE),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn settings_debug_hides_secret() {
        let settings = WebhookSettings::new(
            Url::parse("https://hooks.example.com/in?token=abc").unwrap(),
            "super-secret-value",
        );
        let text = format!("{settings:?}");
        assert!(!text.contains("super-secret-value"), "{text}");
        assert!(!text.contains("token=abc"), "{text}");
    }

    #[test]
    fn settings_from_toml_style_keys() {
        let settings: WebhookSettings = serde_json::from_value(serde_json::json!({
            "url": "https://hooks.example.com/in",
            "secret": "s3cret",
            "timeout_seconds": 2.5,
            "policy": {"allow_private": true},
            "max_error_body": 64
        }))
        .unwrap();
        assert_eq!(settings.timeout, Duration::from_millis(2_500));
        assert!(settings.policy.allow_private);
        assert!(!settings.policy.allow_loopback);
        assert_eq!(settings.max_error_body, 64);
        assert!(settings.user_agent.starts_with("batchd/"));

        let zero = serde_json::from_value::<WebhookSettings>(serde_json::json!({
            "url": "https://hooks.example.com/in",
            "secret": "s3cret",
            "timeout_seconds": 0
        }));
        assert!(zero.is_err());
    }

    #[test]
    fn new_rejects_invalid_settings() {
        let url = Url::parse("https://hooks.example.com/in").unwrap();
        assert!(matches!(
            WebhookHandler::new(WebhookSettings::new(url.clone(), "")),
            Err(SetupError::EmptySecret)
        ));

        for text in [
            "ftp://hooks.example.com/",
            "https://u:p@hooks.example.com/",
            "http://169.254.169.254/",
        ] {
            let settings = WebhookSettings::new(Url::parse(text).unwrap(), "s");
            let error = WebhookHandler::new(settings).unwrap_err();
            assert!(
                matches!(error, SetupError::WebhookUrl(_)),
                "{text}: {error}"
            );
        }

        let mut settings = WebhookSettings::new(url, "s");
        settings.user_agent = "bad\nagent".into();
        assert!(matches!(
            WebhookHandler::new(settings),
            Err(SetupError::UserAgent(_))
        ));
    }
}

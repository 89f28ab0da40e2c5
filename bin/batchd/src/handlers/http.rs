//! HTTP pieces shared by the `webhook` and `fetch` handlers: the guarded
//! client, the mapping from responses and transport errors to
//! [`HandlerError`], `Retry-After` parsing and bounded body excerpts.

use std::error::Error as StdError;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use queue::HandlerError;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode, redirect};
use serde_json::value::RawValue;
use url::Url;

use super::guard::{AddressPolicy, GuardError, GuardedResolver};

/// Maximum delay taken from a `Retry-After` header. A longer delay is cut
/// to this, so a misconfigured server cannot park a job for days. The job
/// then sends its request again and gets a new delay.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// Builds the client for one handler: the guarded resolver, no redirects
/// followed, no proxy (a proxy would resolve the target itself and bypass
/// the address check), `timeout` per request including the body, and no
/// `Referer` header.
pub fn build_client(
    policy: AddressPolicy,
    timeout: Duration,
    user_agent: &str,
) -> Result<Client, reqwest::Error> {
    Client::builder()
        .dns_resolver(GuardedResolver::new(policy))
        .redirect(redirect::Policy::none())
        .no_proxy()
        .referer(false)
        .timeout(timeout)
        .user_agent(user_agent)
        .build()
}

/// Returns the host of a URL, for logs and messages. Never the full URL,
/// because its path or query may carry tokens.
pub fn host_of(url: &Url) -> &str {
    url.host_str().unwrap_or("<no host>")
}

/// Maps a non-2xx response to the handler error: 429 and 503 with a valid
/// `Retry-After` become [`HandlerError::RetryAfter`], other 408, 429 and
/// 5xx responses are retryable, and everything else (3xx, other 4xx) is
/// permanent. `target` names the request in the message, such as
/// "webhook to example.com".
pub fn status_failure(
    status: StatusCode,
    headers: &HeaderMap,
    excerpt: &str,
    target: &str,
    now: DateTime<Utc>,
) -> HandlerError {
    let reason = if excerpt.is_empty() {
        format!("{target} returned HTTP {status}")
    } else {
        format!("{target} returned HTTP {status}: {excerpt}")
    };

    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        let delay = headers
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| retry_after_delay(value, now));
        if let Some(delay) = delay {
            return HandlerError::RetryAfter { delay, reason };
        }
    }

    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        HandlerError::Retryable(reason)
    } else if status.is_redirection() {
        HandlerError::Permanent(format!("{reason} (this redirect is not followed)"))
    } else {
        HandlerError::Permanent(reason)
    }
}

/// Parses a `Retry-After` value, delta-seconds or an HTTP-date, into a
/// delay from `now`, capped at [`MAX_RETRY_AFTER`]. A date in the past
/// gives zero. Returns `None` for a value that is neither.
pub fn retry_after_delay(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        // A number too large for u64 is still a valid, very long delay.
        let seconds = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }

    let date = parse_http_date(value)?;
    let delay = (date - now).to_std().unwrap_or(Duration::ZERO);
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Parses the three HTTP-date forms that RFC 9110 section 5.6.7 requires a
/// recipient to accept: IMF-fixdate, the obsolete RFC 850 form and asctime.
fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(date) = DateTime::parse_from_rfc2822(value) {
        return Some(date.with_timezone(&Utc));
    }
    // RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT"; chrono reads a two-digit
    // year as 1970 to 2069.
    if let Ok(date) = NaiveDateTime::parse_from_str(value, "%A, %d-%b-%y %H:%M:%S GMT") {
        return Some(date.and_utc());
    }
    // asctime: "Sun Nov  6 08:49:37 1994".
    let collapsed = value.split_whitespace().collect::<Vec<_>>().join(" ");
    NaiveDateTime::parse_from_str(&collapsed, "%a %b %d %H:%M:%S %Y")
        .ok()
        .map(|date| date.and_utc())
}

/// Reads at most `max_bytes` of the response body and returns them as a
/// one-line excerpt for an error message. Stops reading once the limit is
/// reached, so a large body is never read in full. A read error ends the
/// excerpt early, because the status alone already decides the outcome.
pub async fn read_excerpt(response: &mut Response, max_bytes: usize) -> String {
    if max_bytes == 0 {
        return String::new();
    }
    let mut collected = Vec::new();
    let mut truncated = false;
    while collected.len() <= max_bytes {
        match response.chunk().await {
            Ok(Some(chunk)) => collected.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    if collected.len() > max_bytes {
        collected.truncate(max_bytes);
        truncated = true;
    }
    utf8_excerpt(&collected, truncated)
}

/// Reads and drops up to `max_bytes` of a body that is not needed, so a
/// short body leaves the connection reusable. Larger bodies are left
/// unread and the connection is closed when the response drops.
pub async fn drain_body(response: &mut Response, max_bytes: usize) {
    let mut read = 0;
    while read <= max_bytes {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
}

/// Turns bytes cut at an arbitrary point into one line of text. An
/// incomplete UTF-8 sequence at the cut is dropped rather than shown as a
/// replacement character. Invalid bytes elsewhere become U+FFFD. Control
/// characters such as newlines become spaces, so a response cannot forge
/// extra log lines. A cut excerpt ends with "…".
pub fn utf8_excerpt(bytes: &[u8], truncated: bool) -> String {
    let mut end = bytes.len();
    if truncated {
        // An incomplete sequence is at most 3 bytes of a 4-byte character.
        for back in 1..=3.min(bytes.len()) {
            let start = bytes.len() - back;
            if let Err(error) = std::str::from_utf8(&bytes[start..])
                && error.error_len().is_none()
                && error.valid_up_to() == 0
            {
                end = start;
            }
        }
    }

    let mut text: String = String::from_utf8_lossy(&bytes[..end])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed_len = text.trim_end().len();
    text.truncate(trimmed_len);
    if truncated {
        text.push('…');
    }
    text
}

/// Maps a transport error (no HTTP status) to the handler error. A
/// rejection by the guarded resolver is permanent; timeouts, connection
/// and other transport errors are retryable. `target` names the request,
/// as for [`status_failure`].
pub fn request_failure(error: &reqwest::Error, target: &str, timeout: Duration) -> HandlerError {
    if let Some(guard) = find_guard_error(error) {
        let message = format!("{target} was not sent: {guard}");
        return if guard.is_permanent() {
            HandlerError::Permanent(message)
        } else {
            HandlerError::Retryable(message)
        };
    }
    if error.is_timeout() {
        return HandlerError::Retryable(format!(
            "{target} timed out after {} ms",
            timeout.as_millis()
        ));
    }
    let message = format!("{target} failed: {}", describe_error(error));
    if error.is_builder() {
        HandlerError::Permanent(message)
    } else {
        HandlerError::Retryable(message)
    }
}

/// Maps an error from the address check of one hop to the handler error.
pub fn guard_failure(error: &GuardError, target: &str) -> HandlerError {
    let message = format!("{target} was not sent: {error}");
    if error.is_permanent() {
        HandlerError::Permanent(message)
    } else {
        HandlerError::Retryable(message)
    }
}

fn find_guard_error(error: &reqwest::Error) -> Option<&GuardError> {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(current) = source {
        if let Some(guard) = current.downcast_ref::<GuardError>() {
            return Some(guard);
        }
        source = current.source();
    }
    None
}

/// Joins the error and its sources with ": ". Leaves out the URL, which
/// may carry tokens, and repeated messages.
fn describe_error(error: &reqwest::Error) -> String {
    let mut parts = vec![strip_url(error)];
    let mut source = error.source();
    while let Some(current) = source {
        let text = current.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = current.source();
    }
    parts.join(": ")
}

fn strip_url(error: &reqwest::Error) -> String {
    let text = error.to_string();
    match error.url() {
        Some(url) => text.replace(&format!(" for url ({url})"), ""),
        None => text,
    }
}

/// Serializes a handler result.
pub fn to_result(value: &serde_json::Value) -> Result<Option<Box<RawValue>>, HandlerError> {
    serde_json::value::to_raw_value(value)
        .map(Some)
        .map_err(|error| {
            HandlerError::Permanent(format!("serializing the job result failed: {error}"))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::TimeZone;
    use reqwest::header::HeaderValue;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(1994, 11, 6, 8, 49, 7).unwrap()
    }

    fn headers(retry_after: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(retry_after_delay("2", now()), Some(Duration::from_secs(2)));
        assert_eq!(retry_after_delay(" 0 ", now()), Some(Duration::ZERO));
        assert_eq!(retry_after_delay("7200", now()), Some(MAX_RETRY_AFTER));
        assert_eq!(
            retry_after_delay("99999999999999999999999", now()),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_http_dates() {
        let thirty = Some(Duration::from_secs(30));
        assert_eq!(
            retry_after_delay("Sun, 06 Nov 1994 08:49:37 GMT", now()),
            thirty
        );
        assert_eq!(
            retry_after_delay("Sunday, 06-Nov-94 08:49:37 GMT", now()),
            thirty
        );
        assert_eq!(retry_after_delay("Sun Nov  6 08:49:37 1994", now()), thirty);
    }

    #[test]
    fn retry_after_past_date_is_zero() {
        assert_eq!(
            retry_after_delay("Sat, 05 Nov 1994 08:49:37 GMT", now()),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_far_date_is_capped() {
        assert_eq!(
            retry_after_delay("Wed, 06 Nov 2024 08:49:37 GMT", now()),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_rejects_garbage() {
        for value in ["", "soon", "-5", "1.5", "Sun, 06 Nov 1994"] {
            assert_eq!(retry_after_delay(value, now()), None, "{value:?}");
        }
    }

    #[test]
    fn status_mapping() {
        let retryable = [408, 429, 500, 502, 503, 504, 599];
        for code in retryable {
            let status = StatusCode::from_u16(code).unwrap();
            let error = status_failure(status, &headers(None), "", "test", now());
            assert!(
                matches!(error, HandlerError::Retryable(_)),
                "{code}: {error:?}"
            );
        }
        let permanent = [300, 301, 302, 304, 307, 400, 401, 403, 404, 410, 413, 422];
        for code in permanent {
            let status = StatusCode::from_u16(code).unwrap();
            let error = status_failure(status, &headers(None), "", "test", now());
            assert!(
                matches!(error, HandlerError::Permanent(_)),
                "{code}: {error:?}"
            );
        }
    }

    #[test]
    fn retry_after_only_on_429_and_503() {
        for code in [429, 503] {
            let status = StatusCode::from_u16(code).unwrap();
            let error = status_failure(status, &headers(Some("5")), "", "test", now());
            match error {
                HandlerError::RetryAfter { delay, .. } => {
                    assert_eq!(delay, Duration::from_secs(5), "{code}")
                }
                other => panic!("{code}: expected RetryAfter, got {other:?}"),
            }
        }
        for code in [500, 502, 408] {
            let status = StatusCode::from_u16(code).unwrap();
            let error = status_failure(status, &headers(Some("5")), "", "test", now());
            assert!(
                matches!(error, HandlerError::Retryable(_)),
                "{code}: {error:?}"
            );
        }
        let invalid = status_failure(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(Some("later")),
            "",
            "test",
            now(),
        );
        assert!(matches!(invalid, HandlerError::Retryable(_)), "{invalid:?}");
    }

    #[test]
    fn status_message_has_status_and_excerpt() {
        let error = status_failure(
            StatusCode::BAD_REQUEST,
            &headers(None),
            "missing field",
            "webhook to example.com",
            now(),
        );
        assert_eq!(
            error,
            HandlerError::Permanent(
                "webhook to example.com returned HTTP 400 Bad Request: missing field".into()
            )
        );
    }

    #[test]
    fn excerpt_drops_cut_multibyte_character() {
        // "é" is two bytes and "€" three; cut each after its first byte.
        assert_eq!(utf8_excerpt(&"abé".as_bytes()[..3], true), "ab…");
        assert_eq!(utf8_excerpt(&"ab€".as_bytes()[..4], true), "ab…");
        assert_eq!(utf8_excerpt(&"ab😀".as_bytes()[..5], true), "ab…");
        assert_eq!(utf8_excerpt("abé".as_bytes(), false), "abé");
    }

    #[test]
    fn excerpt_replaces_invalid_and_control_bytes() {
        assert_eq!(utf8_excerpt(b"a\xffb", false), "a\u{fffd}b");
        assert_eq!(utf8_excerpt(b"line1\nline2\r\n", false), "line1 line2");
        // An incomplete sequence is kept as U+FFFD when nothing was cut.
        assert_eq!(utf8_excerpt(b"ab\xc3", false), "ab\u{fffd}");
    }
}

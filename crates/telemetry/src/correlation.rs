//! Correlation ids and W3C trace context (`traceparent`).
//!
//! A correlation id is kept from a valid incoming `X-Correlation-ID` header
//! or created as a UUID v4. A `traceparent` header follows the W3C Trace
//! Context recommendation: `VERSION-TRACEID-PARENTID-FLAGS` in lowercase hex.

use std::fmt::{self, Write as _};
use std::str::FromStr;

/// Header that carries the correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Header that carries the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Maximum length of an incoming correlation id that is kept, in bytes.
pub const MAX_CORRELATION_ID_LEN: usize = 128;

/// Checks whether `id` may be used as a correlation id as it is: 1 to 128
/// characters from `A-Z a-z 0-9 . _ : -`, so it can go into logs and
/// headers unescaped.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CORRELATION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Returns the incoming id when [`is_valid`], else a new UUID v4.
pub fn accept(incoming: Option<&str>) -> String {
    match incoming {
        Some(id) if is_valid(id) => id.to_owned(),
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// Reason a `traceparent` value was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceparentError {
    #[error("invalid traceparent: expected VERSION-TRACEID-PARENTID-FLAGS (55 characters)")]
    Malformed,
    #[error("invalid traceparent: fields must be lowercase hex")]
    NotHex,
    #[error("invalid traceparent: version ff is forbidden")]
    ForbiddenVersion,
    #[error("invalid traceparent: trace id is all zeros")]
    ZeroTraceId,
    #[error("invalid traceparent: parent id is all zeros")]
    ZeroParentId,
}

/// A W3C trace context: the trace this request belongs to, the span that
/// sent it, and the trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// The `sampled` bit of the trace flags.
pub const FLAG_SAMPLED: u8 = 0x01;

impl TraceContext {
    /// Starts a new trace with random ids and the `sampled` flag set.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_nonzero_16(),
            parent_id: random_nonzero_8(),
            flags: FLAG_SAMPLED,
        }
    }

    /// Parses a `traceparent` header value.
    ///
    /// Version `00` must be exactly 55 characters. A higher version may
    /// carry more fields after a `-`, which are ignored; its first four
    /// fields are read as version `00`. Version `ff` is rejected.
    pub fn parse(value: &str) -> Result<Self, TraceparentError> {
        let value = value.trim_matches([' ', '\t']);
        let bytes = value.as_bytes();
        if bytes.len() < 55 {
            return Err(TraceparentError::Malformed);
        }

        let version = parse_hex::<1>(&bytes[0..2])?[0];
        if version == 0xff {
            return Err(TraceparentError::ForbiddenVersion);
        }
        let length_ok = if version == 0 {
            bytes.len() == 55
        } else {
            bytes.len() == 55 || bytes[55] == b'-'
        };
        if !length_ok || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceparentError::Malformed);
        }

        let trace_id = parse_hex::<16>(&bytes[3..35])?;
        let parent_id = parse_hex::<8>(&bytes[36..52])?;
        let flags = parse_hex::<1>(&bytes[53..55])?[0];
        if trace_id == [0; 16] {
            return Err(TraceparentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceparentError::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Parses an optional incoming header, starting a new trace when it is
    /// missing or invalid.
    pub fn accept(incoming: Option<&str>) -> Self {
        incoming
            .and_then(|value| Self::parse(value).ok())
            .unwrap_or_else(Self::new_root)
    }

    /// Creates the context for an outgoing request made while handling this
    /// one: the same trace id and flags with a new random parent id. Format it
    /// with `to_string()` for the `traceparent` header.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            parent_id: random_nonzero_8(),
            flags: self.flags,
        }
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// Formats the trace id as 32 lowercase hex digits, as logs usually show it.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    pub fn parent_id_hex(&self) -> String {
        to_hex(&self.parent_id)
    }
}

impl fmt::Display for TraceContext {
    /// Writes the version `00` header value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

impl FromStr for TraceContext {
    type Err = TraceparentError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn parse_hex<const N: usize>(bytes: &[u8]) -> Result<[u8; N], TraceparentError> {
    if bytes.len() != N * 2 {
        return Err(TraceparentError::Malformed);
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Ok(out)
}

/// Decodes one lowercase hex digit. The recommendation forbids uppercase.
fn hex_digit(b: u8) -> Result<u8, TraceparentError> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        _ => Err(TraceparentError::NotHex),
    }
}

fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn random_nonzero_16() -> [u8; 16] {
    loop {
        let bytes = *uuid::Uuid::new_v4().as_bytes();
        if bytes != [0; 16] {
            return bytes;
        }
    }
}

fn random_nonzero_8() -> [u8; 8] {
    loop {
        let random = uuid::Uuid::new_v4().as_u128().to_le_bytes();
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&random[..8]);
        if bytes != [0; 8] {
            return bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_incoming_id_is_kept() {
        assert_eq!(accept(Some("req-42.a:b_c")), "req-42.a:b_c");
        let longest = "a".repeat(128);
        assert_eq!(accept(Some(&longest)), longest);
    }

    #[test]
    fn invalid_incoming_id_is_replaced() {
        let too_long = "a".repeat(129);
        for bad in ["", "a b", "x\ny", "<script>", "é", "a/b", too_long.as_str()] {
            let replaced = accept(Some(bad));
            assert_ne!(replaced, bad);
            let parsed = uuid::Uuid::parse_str(&replaced).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 4);
        }
    }

    #[test]
    fn missing_id_gets_uuid_v4() {
        let id = accept(None);
        let parsed = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 4);
        assert!(is_valid(&id));
    }

    #[test]
    fn traceparent_parses_and_formats_back() {
        let context = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(context.flags, 0x01);
        assert!(context.is_sampled());
        assert_eq!(context.to_string(), EXAMPLE);
    }

    #[test]
    fn traceparent_unsampled_flags_kept() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let context: TraceContext = value.parse().expect("valid");
        assert!(!context.is_sampled());
        assert_eq!(context.to_string(), value);
    }

    #[test]
    fn traceparent_future_version_reads_known_fields() {
        let value = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let context = TraceContext::parse(value).expect("valid");
        assert_eq!(context.to_string(), EXAMPLE);
        let no_dash = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert_eq!(
            TraceContext::parse(no_dash),
            Err(TraceparentError::Malformed)
        );
    }

    #[test]
    fn traceparent_invalid_examples_rejected() {
        let cases: [(&str, TraceparentError); 10] = [
            ("", TraceparentError::Malformed),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                TraceparentError::Malformed,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
                TraceparentError::Malformed,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceparentError::Malformed,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                TraceparentError::ForbiddenVersion,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                TraceparentError::NotHex,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                TraceparentError::NotHex,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                TraceparentError::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                TraceparentError::ZeroParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
                TraceparentError::NotHex,
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(TraceContext::parse(value), Err(expected), "{value:?}");
        }
    }

    #[test]
    fn traceparent_non_ascii_rejected_without_panic() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01";
        assert!(TraceContext::parse(value).is_err());
        let value = "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(TraceContext::parse(value).is_err());
    }

    #[test]
    fn child_keeps_trace_and_flags() {
        let parent = TraceContext::parse(EXAMPLE).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_ne!(child.parent_id, parent.parent_id);
        assert_ne!(child.parent_id, [0; 8]);
        let header = child.to_string();
        assert_eq!(TraceContext::parse(&header), Ok(child));
    }

    #[test]
    fn accept_starts_trace_on_invalid_header() {
        let context = TraceContext::accept(Some("garbage"));
        assert_ne!(context.trace_id, [0; 16]);
        assert!(context.is_sampled());
        let kept = TraceContext::accept(Some(EXAMPLE));
        assert_eq!(kept.to_string(), EXAMPLE);
    }
}

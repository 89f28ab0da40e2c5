//! The rate-limit key of a request: `user:<id>` for an authenticated
//! request, otherwise the client's address, grouped by prefix.
//!
//! The client address is the direct peer, unless the peer is a trusted
//! proxy. Then the proxy's forwarding header is read from the right, the
//! end that proxies append to, skipping trusted proxies, and the first
//! other address is the client. Entries left of it were written by the
//! client or by untrusted proxies, so they are never read, and a
//! malformed entry there changes nothing. A malformed or unknown entry in
//! the part that is read makes the key fall back to the peer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

use crate::config::{ClientKeyConfig, ConfigError, ConfigProblem};

/// The header the trusted proxies append the client address to. Only this
/// one header is read: a header the proxies pass through unchanged is
/// written by the client, so believing it would let any client pick its
/// own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyHeader {
    /// `X-Forwarded-For: <client>, <proxy1>, <proxy2>`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=<client>;proto=https, for=<proxy1>`.
    Forwarded,
}

/// The inputs of key derivation, as plain values taken from the request.
#[derive(Debug, Clone, Copy)]
pub struct ClientRequest<'a> {
    /// The address of the TCP peer (`SocketAddr::ip()`).
    pub peer: IpAddr,
    /// The authenticated user's id, if the request is authenticated.
    pub user_id: Option<&'a str>,
    /// Every `X-Forwarded-For` header line, in the order received.
    pub x_forwarded_for: &'a [&'a str],
    /// Every `Forwarded` header line, in the order received.
    pub forwarded: &'a [&'a str],
}

impl<'a> ClientRequest<'a> {
    /// Creates a request from `peer` with no user and no forwarding headers.
    pub fn from_peer(peer: IpAddr) -> Self {
        Self {
            peer,
            user_id: None,
            x_forwarded_for: &[],
            forwarded: &[],
        }
    }
}

/// Rules of key derivation: trusted proxies, the header they write, and the
/// prefix lengths clients are grouped by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKeyRules {
    trusted_proxies: Vec<IpNet>,
    proxy_header: ProxyHeader,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

impl Default for ClientKeyRules {
    /// No trusted proxies; IPv4 clients keyed by address, IPv6 by /64.
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            proxy_header: ProxyHeader::XForwardedFor,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

impl ClientKeyRules {
    /// Builds the rules from settings. Errors name the setting, such as
    /// `client_key.trusted_proxies[1]`.
    pub fn from_config(config: &ClientKeyConfig) -> Result<Self, ConfigError> {
        let mut trusted_proxies = Vec::with_capacity(config.trusted_proxies.len());
        for (index, text) in config.trusted_proxies.iter().enumerate() {
            let net = parse_net(text).ok_or_else(|| {
                ConfigError::new(
                    format!("client_key.trusted_proxies[{index}]"),
                    ConfigProblem::InvalidProxy(text.clone()),
                )
            })?;
            trusted_proxies.push(net);
        }
        check_prefix("client_key.ipv4_prefix", config.ipv4_prefix, 32)?;
        check_prefix("client_key.ipv6_prefix", config.ipv6_prefix, 128)?;

        Ok(Self {
            trusted_proxies,
            proxy_header: config.proxy_header,
            ipv4_prefix: config.ipv4_prefix,
            ipv6_prefix: config.ipv6_prefix,
        })
    }

    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted_proxies
    }

    pub fn proxy_header(&self) -> ProxyHeader {
        self.proxy_header
    }

    /// Derives the rate-limit key: `user:<id>` when `request.user_id` is a
    /// non-empty id, otherwise the client address in its group, such as
    /// `203.0.113.7` or `2001:db8:1:2::/64`.
    pub fn key_for(&self, request: &ClientRequest<'_>) -> String {
        if let Some(user) = request.user_id.filter(|user| !user.is_empty()) {
            return format!("user:{user}");
        }
        self.address_key(self.client_ip(request))
    }

    /// Returns the client's address: the peer, or, when the peer is a
    /// trusted proxy, the right-most address in the forwarding header that is not
    /// itself a trusted proxy. IPv4-mapped IPv6 addresses are returned as
    /// IPv4.
    pub fn client_ip(&self, request: &ClientRequest<'_>) -> IpAddr {
        let peer = request.peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let forwarded = match self.proxy_header {
            ProxyHeader::XForwardedFor => self.walk(x_forwarded_for_hops(request.x_forwarded_for)),
            ProxyHeader::Forwarded => self.walk(forwarded_hops(request.forwarded)),
        };
        forwarded.unwrap_or(peer)
    }

    /// Walks hops from the right and returns the first one that is not a
    /// trusted proxy, or the left-most hop when every hop is trusted.
    /// Returns `None` when there are no hops, or when an unusable hop comes
    /// before the client address.
    fn walk(&self, hops: impl Iterator<Item = Hop>) -> Option<IpAddr> {
        let mut left_most = None;
        for hop in hops {
            let Hop::Address(ip) = hop else {
                return None;
            };
            let ip = ip.to_canonical();
            if !self.is_trusted(ip) {
                return Some(ip);
            }
            left_most = Some(ip);
        }
        left_most
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    fn address_key(&self, ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) if self.ipv4_prefix >= 32 => v4.to_string(),
            IpAddr::V4(v4) => match Ipv4Net::new(v4, self.ipv4_prefix) {
                Ok(net) => net.trunc().to_string(),
                Err(_) => v4.to_string(),
            },
            IpAddr::V6(v6) if self.ipv6_prefix >= 128 => v6.to_string(),
            IpAddr::V6(v6) => match Ipv6Net::new(v6, self.ipv6_prefix) {
                Ok(net) => net.trunc().to_string(),
                Err(_) => v6.to_string(),
            },
        }
    }
}

fn check_prefix(key: &str, value: u8, max: u8) -> Result<(), ConfigError> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            ConfigProblem::InvalidPrefix { value, max },
        ))
    }
}

/// Parses `192.0.2.0/24`, `2001:db8::/32`, or a bare address as a single
/// host.
fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        return Some(net.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

/// One entry of a forwarding header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Address(IpAddr),
    /// `unknown`, an obfuscated identifier, a missing `for`, or text that
    /// does not parse: nothing to key on.
    Unusable,
}

/// Returns the entries of every `X-Forwarded-For` line, right-most first.
fn x_forwarded_for_hops<'a>(lines: &'a [&'a str]) -> impl Iterator<Item = Hop> + 'a {
    lines
        .iter()
        .rev()
        .flat_map(|line| line.rsplit(','))
        .map(|entry| match parse_node(entry.trim()) {
            Some(ip) => Hop::Address(ip),
            None => Hop::Unusable,
        })
}

/// Parses an address as proxies write it: `192.0.2.1`, `192.0.2.1:8080`,
/// `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:8080`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let v6: Ipv6Addr = inside.parse().ok()?;
        return match after {
            "" => Some(IpAddr::V6(v6)),
            port => port
                .strip_prefix(':')
                .filter(|port| is_port(port))
                .map(|_| IpAddr::V6(v6)),
        };
    }
    let (host, port) = text.split_once(':')?;
    let v4: Ipv4Addr = host.parse().ok()?;
    is_port(port).then_some(IpAddr::V4(v4))
}

/// Returns whether `text` is a port number from 0 to 65535, or an
/// obfuscated port as RFC 7239 allows it: `_` followed by letters, digits,
/// `.`, `_` or `-`.
fn is_port(text: &str) -> bool {
    let number = text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u16>().is_ok();
    number || is_obfuscated(text)
}

fn is_obfuscated(text: &str) -> bool {
    text.len() > 1
        && text.starts_with('_')
        && text[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Returns the `for` nodes of every `Forwarded` line, right-most element
/// first.
fn forwarded_hops<'a>(lines: &'a [&'a str]) -> impl Iterator<Item = Hop> + 'a {
    lines
        .iter()
        .rev()
        .flat_map(|line| ElementsFromRight::new(line))
        .map(|element| match element.and_then(forwarded_for) {
            Some(ip) => Hop::Address(ip),
            None => Hop::Unusable,
        })
}

/// Splits a `Forwarded` line at the commas outside quoted strings, from
/// the right. Yields `None` for a part it cannot split, then stops.
struct ElementsFromRight<'a> {
    text: &'a str,
    end: Option<usize>,
}

impl<'a> ElementsFromRight<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            end: Some(text.len()),
        }
    }
}

impl<'a> Iterator for ElementsFromRight<'a> {
    type Item = Option<&'a str>;

    fn next(&mut self) -> Option<Self::Item> {
        let end = self.end?;
        let bytes = self.text.as_bytes();
        let mut index = end;
        let mut in_quotes = false;
        while index > 0 {
            let byte = bytes[index - 1];
            if byte == b'"' && !is_escaped(bytes, index - 1) {
                in_quotes = !in_quotes;
            } else if byte == b',' && !in_quotes {
                break;
            }
            index -= 1;
        }
        if in_quotes {
            self.end = None;
            return Some(None);
        }
        self.end = index.checked_sub(1);
        Some(Some(&self.text[index..end]))
    }
}

/// Returns whether the quote at `at` is preceded by an odd number of
/// backslashes.
fn is_escaped(bytes: &[u8], at: usize) -> bool {
    let backslashes = bytes[..at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    backslashes % 2 == 1
}

/// Returns the address in a `Forwarded` element's `for` parameter, or
/// `None` when it is missing, repeated, `unknown`, obfuscated or malformed.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut node = None;
    for pair in split_pairs(element)? {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair.split_once('=')?;
        if !is_token(name) {
            return None;
        }
        let value = parse_value(value)?;
        if name.eq_ignore_ascii_case("for") {
            if node.is_some() {
                return None;
            }
            node = Some(value);
        }
    }
    parse_node(&node?)
}

/// Splits an element at the semicolons outside quoted strings. Returns
/// `None` when a quoted string is not closed.
fn split_pairs(element: &str) -> Option<Vec<&str>> {
    let mut pairs = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (index, ch) in element.char_indices() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_quotes = false;
            }
        } else if ch == '"' {
            in_quotes = true;
        } else if ch == ';' {
            pairs.push(&element[start..index]);
            start = index + 1;
        }
    }
    if in_quotes {
        return None;
    }
    pairs.push(&element[start..]);
    Some(pairs)
}

/// Parses a parameter value: a quoted string, which is unescaped, or a bare
/// value. Bare values may contain `:`, `[` and `]`, which RFC 7239 wants quoted but
/// some proxies send bare, because nothing else can be meant by them.
fn parse_value(value: &str) -> Option<String> {
    if let Some(quoted) = value.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        let mut text = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(ch) = chars.next() {
            match ch {
                '\\' => text.push(chars.next()?),
                '"' => return None,
                other => text.push(other),
            }
        }
        return Some(text);
    }
    let bare = !value.is_empty()
        && value
            .bytes()
            .all(|b| is_tchar(b) || matches!(b, b':' | b'[' | b']'));
    bare.then(|| value.to_owned())
}

fn is_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(is_tchar)
}

/// Returns whether `byte` is a token character of RFC 9110.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn node_forms_parse() {
        assert_eq!(parse_node("192.0.2.1"), Some(ip("192.0.2.1")));
        assert_eq!(parse_node("192.0.2.1:8080"), Some(ip("192.0.2.1")));
        assert_eq!(parse_node("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node("[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node("[2001:db8::1]:4711"), Some(ip("2001:db8::1")));
        assert_eq!(parse_node("[2001:db8::1]:_abc"), Some(ip("2001:db8::1")));
        for bad in [
            "",
            "unknown",
            "_hidden",
            "192.0.2.1:",
            "192.0.2.1:123456",
            "[2001:db8::1",
            "[192.0.2.1]",
            "host.example:80",
        ] {
            assert_eq!(parse_node(bad), None, "{bad:?} should not parse");
        }
    }

    #[test]
    fn forwarded_element_reads_for() {
        assert_eq!(
            forwarded_for("for=192.0.2.60;proto=http;by=203.0.113.43"),
            Some(ip("192.0.2.60"))
        );
        assert_eq!(
            forwarded_for("For=\"[2001:db8:cafe::17]:4711\""),
            Some(ip("2001:db8:cafe::17"))
        );
        assert_eq!(
            forwarded_for(" proto=https ; for=192.0.2.1 "),
            Some(ip("192.0.2.1"))
        );
        assert_eq!(
            forwarded_for("for=\"192.0.2.1\";host=\"a;b\""),
            Some(ip("192.0.2.1"))
        );
        assert_eq!(forwarded_for("for=\"\\192.0.2.1\""), Some(ip("192.0.2.1")));
    }

    #[test]
    fn forwarded_element_rejects_unusable() {
        for element in [
            "proto=https",
            "for=unknown",
            "for=_hidden",
            "for=192.0.2.1;for=192.0.2.2",
            "for=\"192.0.2.1",
            "for=",
            "for 192.0.2.1",
            "f r=1;for=192.0.2.1",
            "for=\"192.0.2.1\"x",
            "for=192.0.2.1\"",
        ] {
            assert_eq!(
                forwarded_for(element),
                None,
                "{element:?} should be unusable"
            );
        }
    }

    #[test]
    fn elements_split_from_right_outside_quotes() {
        let line = "for=192.0.2.1, for=\"[2001:db8::1]\";host=\"a,b\", for=198.51.100.2";
        let elements: Vec<_> = ElementsFromRight::new(line).collect();
        assert_eq!(
            elements,
            vec![
                Some(" for=198.51.100.2"),
                Some(" for=\"[2001:db8::1]\";host=\"a,b\""),
                Some("for=192.0.2.1"),
            ]
        );
    }

    #[test]
    fn elements_stop_at_unbalanced_quote() {
        let line = "for=\"garbage, for=198.51.100.2";
        let elements: Vec<_> = ElementsFromRight::new(line).collect();
        assert_eq!(elements, vec![Some(" for=198.51.100.2"), None]);
    }

    #[test]
    fn escaped_quote_stays_inside_string() {
        let line = r#"for=192.0.2.1;x="a\",b", for=198.51.100.2"#;
        let elements: Vec<_> = ElementsFromRight::new(line).collect();
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[1], Some(r#"for=192.0.2.1;x="a\",b""#));
    }
}

//! The outbound address policy: which IP addresses the `webhook` and
//! `fetch` handlers may connect to.
//!
//! A job names its target by URL, so without a policy any batch owner could
//! make the server request its own admin ports, the internal network or the
//! cloud metadata service (server-side request forgery). The rule is an
//! allowlist in effect: an address is accepted only when it is public
//! unicast, or loopback or private and the policy allows that range.
//! Link-local addresses, the cloud metadata addresses, documentation,
//! benchmarking, multicast and reserved ranges are rejected under every
//! policy.
//!
//! # Pinning against DNS rebinding
//!
//! Checking a name's addresses and then letting the HTTP client resolve the
//! name again would leave a window: a hostile DNS server can answer the
//! check with a public address and the connection with 169.254.169.254. So
//! the clients built by the handlers use [`GuardedResolver`] as their
//! resolver. It resolves the name, rejects the whole result if any address
//! is blocked, and hands reqwest exactly the addresses it checked. The
//! address connected to is therefore always one that passed the check.
//!
//! reqwest skips the resolver for IP literals, so every hop also goes
//! through [`resolve_checked`] before it is sent. That call checks the
//! scheme, the userinfo and a literal address before any connection
//! exists, and gives a clear error for a blocked name. A name is thus
//! resolved twice per request, once there and once by the resolver when a
//! new connection is opened. Pooled connections are reused only for the
//! host they were opened to, after that host's check passed. The clients
//! also ignore proxy settings, because a proxy would resolve the target
//! itself and bypass the check.
//!
//! A shared client with this resolver keeps connection pooling and one TLS
//! configuration, which a client built per request with fixed addresses
//! (`ClientBuilder::resolve_to_addrs`) would lose.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::Deserialize;
use url::{Host, Url};

/// Non-public address ranges that outbound requests may reach. Both are
/// off by default. Config keys: `allow_loopback`, `allow_private`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AddressPolicy {
    /// Allow loopback: 127.0.0.0/8 and ::1. For tests and demos on one
    /// machine.
    pub allow_loopback: bool,
    /// Allow private ranges: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16,
    /// the shared (CGNAT) range 100.64.0.0/10, IPv6 unique local fc00::/7
    /// and the deprecated site-local fec0::/10. Link-local and metadata
    /// addresses stay blocked.
    pub allow_private: bool,
}

/// The range that makes an address non-public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRange {
    Loopback,
    Private,
    /// A cloud instance metadata address, such as 169.254.169.254 or
    /// fd00:ec2::254.
    Metadata,
    LinkLocal,
    /// 0.0.0.0/8 or ::, which some systems route to the local host.
    Unspecified,
    Broadcast,
    Multicast,
    Documentation,
    Benchmarking,
    /// Reserved or special-purpose space with no public hosts, including
    /// tunnels whose real endpoint cannot be read from the address.
    Reserved,
}

impl AddressRange {
    /// Returns whether `policy` lets requests reach this range.
    pub fn is_allowed_by(self, policy: AddressPolicy) -> bool {
        match self {
            AddressRange::Loopback => policy.allow_loopback,
            AddressRange::Private => policy.allow_private,
            _ => false,
        }
    }

    fn description(self) -> &'static str {
        match self {
            AddressRange::Loopback => "a loopback address",
            AddressRange::Private => "a private address",
            AddressRange::Metadata => "a cloud metadata address",
            AddressRange::LinkLocal => "a link-local address",
            AddressRange::Unspecified => "an unspecified address",
            AddressRange::Broadcast => "the broadcast address",
            AddressRange::Multicast => "a multicast address",
            AddressRange::Documentation => "a documentation address",
            AddressRange::Benchmarking => "a benchmarking address",
            AddressRange::Reserved => "a reserved address",
        }
    }

    fn remedy(self) -> &'static str {
        match self {
            AddressRange::Loopback => "; set allow_loopback to permit it",
            AddressRange::Private => "; set allow_private to permit it",
            _ => "",
        }
    }
}

/// An address that the policy rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct BlockedAddress {
    pub ip: IpAddr,
    /// The IPv4 address the verdict is based on, when `ip` is an IPv6
    /// address that embeds one (mapped, compatible, NAT64 or 6to4).
    pub embedded: Option<Ipv4Addr>,
    pub range: AddressRange,
}

impl fmt::Display for BlockedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.embedded {
            Some(v4) => write!(
                f,
                "{} embeds {v4}, which is {}{}",
                self.ip,
                self.range.description(),
                self.range.remedy()
            ),
            None => write!(
                f,
                "{} is {}{}",
                self.ip,
                self.range.description(),
                self.range.remedy()
            ),
        }
    }
}

/// Error from checking or resolving an outbound URL.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("unsupported URL scheme {scheme:?}: only http and https are allowed")]
    UnsupportedScheme { scheme: String },
    #[error("URLs with a user name or password are not allowed; send credentials another way")]
    UserInfo,
    #[error("the URL has no host")]
    MissingHost,
    #[error("resolving host {host} failed: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("host {host} resolved to no addresses")]
    NoAddresses { host: String },
    #[error("host {host} is blocked by the outbound address policy: {address}")]
    Blocked {
        host: String,
        address: BlockedAddress,
    },
}

impl GuardError {
    /// Returns whether no retry can fix the error. Resolution failures may
    /// be transient; everything else depends only on the URL, the policy or
    /// what the name points to.
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            GuardError::Resolve { .. } | GuardError::NoAddresses { .. }
        )
    }
}

/// Checks one IP address against the policy. Pure: no I/O.
pub fn check_ip(ip: IpAddr, policy: AddressPolicy) -> Result<(), BlockedAddress> {
    let (range, embedded) = match ip {
        IpAddr::V4(v4) => (classify_v4(v4), None),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => (classify_v4(v4), Some(v4)),
            None => (classify_v6(v6), None),
        },
    };
    match range {
        Some(range) if !range.is_allowed_by(policy) => Err(BlockedAddress {
            ip,
            embedded,
            range,
        }),
        _ => Ok(()),
    }
}

/// Checks the parts of a URL that need no DNS: the scheme is http or
/// https, there is no userinfo, there is a host, and a host given as an IP
/// literal passes [`check_ip`]. Returns the host as it must be resolved,
/// or `None` for an IP literal that passed.
pub fn check_url(url: &Url, policy: AddressPolicy) -> Result<Option<&str>, GuardError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(GuardError::UnsupportedScheme {
            scheme: url.scheme().to_owned(),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(GuardError::UserInfo);
    }
    let ip = match url.host() {
        None => return Err(GuardError::MissingHost),
        Some(Host::Domain(name)) => return Ok(Some(name)),
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
    };
    check_ip(ip, policy).map_err(|address| GuardError::Blocked {
        host: ip.to_string(),
        address,
    })?;
    Ok(None)
}

/// Checks a URL with [`check_url`], resolves its host, and returns the
/// socket addresses. Fails if any resolved address is blocked, so a
/// result that mixes public and blocked addresses is rejected as a whole.
pub async fn resolve_checked(
    url: &Url,
    policy: AddressPolicy,
) -> Result<Vec<SocketAddr>, GuardError> {
    let port = url.port_or_known_default().unwrap_or(80);
    match check_url(url, policy)? {
        Some(name) => resolve_host_checked(name, port, policy).await,
        None => match url.host() {
            Some(Host::Ipv4(v4)) => Ok(vec![SocketAddr::new(IpAddr::V4(v4), port)]),
            Some(Host::Ipv6(v6)) => Ok(vec![SocketAddr::new(IpAddr::V6(v6), port)]),
            _ => Err(GuardError::MissingHost),
        },
    }
}

/// Resolves a host name and checks every address it resolves to.
pub async fn resolve_host_checked(
    host: &str,
    port: u16,
    policy: AddressPolicy,
) -> Result<Vec<SocketAddr>, GuardError> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| GuardError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    if addresses.is_empty() {
        return Err(GuardError::NoAddresses {
            host: host.to_owned(),
        });
    }
    for address in &addresses {
        check_ip(address.ip(), policy).map_err(|blocked| GuardError::Blocked {
            host: host.to_owned(),
            address: blocked,
        })?;
    }
    Ok(addresses)
}

/// The resolver of the handlers' HTTP clients: every connection goes to an
/// address that [`resolve_host_checked`] accepted in the same lookup (see
/// the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    policy: AddressPolicy,
}

impl GuardedResolver {
    pub fn new(policy: AddressPolicy) -> Self {
        Self { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        Box::pin(async move {
            // With port 0, reqwest uses the URL's port or the scheme's
            // default.
            let addresses = resolve_host_checked(name.as_str(), 0, policy).await?;
            let addresses: Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// Classifies an IPv4 address; `None` means public unicast.
fn classify_v4(ip: Ipv4Addr) -> Option<AddressRange> {
    let [a, b, c, d] = ip.octets();
    let range = match (a, b, c) {
        (0, _, _) => AddressRange::Unspecified,
        (127, _, _) => AddressRange::Loopback,
        (169, 254, 169) if d == 254 => AddressRange::Metadata,
        (169, 254, _) => AddressRange::LinkLocal,
        // Alibaba Cloud's metadata service sits inside the shared range.
        (100, 100, 100) if d == 200 => AddressRange::Metadata,
        (10, _, _) => AddressRange::Private,
        (172, 16..=31, _) => AddressRange::Private,
        (192, 168, _) => AddressRange::Private,
        (100, 64..=127, _) => AddressRange::Private,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressRange::Documentation,
        (198, 18..=19, _) => AddressRange::Benchmarking,
        // IETF protocol assignments and the former 6to4 relay anycast.
        (192, 0, 0) | (192, 88, 99) => AddressRange::Reserved,
        (224..=239, _, _) => AddressRange::Multicast,
        (255, 255, 255) if d == 255 => AddressRange::Broadcast,
        (240..=255, _, _) => AddressRange::Reserved,
        _ => return None,
    };
    Some(range)
}

/// Returns the IPv4 address that decides where an IPv6 address really leads:
/// IPv4-mapped (::ffff:0:0/96), IPv4-compatible (::/96, except :: and
/// ::1), NAT64 (64:ff9b::/96) and 6to4 (2002::/16).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = ip.segments();
    let octets = ip.octets();
    let last_four = Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
    match segments {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(last_four),
        [0, 0, 0, 0, 0, 0, 0, 0] | [0, 0, 0, 0, 0, 0, 0, 1] => None,
        [0, 0, 0, 0, 0, 0, _, _] => Some(last_four),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last_four),
        [0x2002, _, _, _, _, _, _, _] => {
            Some(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]))
        }
        _ => None,
    }
}

/// Classifies an IPv6 address without an embedded IPv4 address; `None`
/// means global unicast.
fn classify_v6(ip: Ipv6Addr) -> Option<AddressRange> {
    // AWS's IPv6 metadata endpoint lies inside the unique local range.
    const AWS_METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);

    if ip.is_unspecified() {
        return Some(AddressRange::Unspecified);
    }
    if ip.is_loopback() {
        return Some(AddressRange::Loopback);
    }
    if ip == AWS_METADATA {
        return Some(AddressRange::Metadata);
    }
    let segments = ip.segments();
    let first = segments[0];
    let range = if first & 0xff00 == 0xff00 {
        AddressRange::Multicast
    } else if first & 0xffc0 == 0xfe80 {
        AddressRange::LinkLocal
    } else if first & 0xffc0 == 0xfec0 || first & 0xfe00 == 0xfc00 {
        AddressRange::Private
    } else if first == 0x2001 && segments[1] == 0x0db8 {
        AddressRange::Documentation
    } else if first == 0x2001 && segments[1] == 0x0002 && segments[2] == 0 {
        AddressRange::Benchmarking
    } else if first == 0x2001 && segments[1] == 0 {
        // Teredo hides the real IPv4 endpoint, so it cannot be judged.
        AddressRange::Reserved
    } else if first & 0xe000 == 0x2000 {
        return None;
    } else {
        // Outside 2000::/3 nothing is assigned for global unicast: this
        // covers the discard prefix 100::/64 and local-use NAT64
        // 64:ff9b:1::/48.
        AddressRange::Reserved
    };
    Some(range)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NONE: AddressPolicy = AddressPolicy {
        allow_loopback: false,
        allow_private: false,
    };
    const LOOPBACK: AddressPolicy = AddressPolicy {
        allow_loopback: true,
        allow_private: false,
    };
    const PRIVATE: AddressPolicy = AddressPolicy {
        allow_loopback: false,
        allow_private: true,
    };
    const BOTH: AddressPolicy = AddressPolicy {
        allow_loopback: true,
        allow_private: true,
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn range_of(text: &str, policy: AddressPolicy) -> Option<AddressRange> {
        check_ip(ip(text), policy)
            .err()
            .map(|blocked| blocked.range)
    }

    #[test]
    fn public_addresses_pass() {
        for text in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:82a::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(range_of(text, NONE), None, "{text} should be public");
        }
    }

    #[test]
    fn loopback_needs_allow_loopback() {
        for text in ["127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(range_of(text, NONE), Some(AddressRange::Loopback), "{text}");
            assert_eq!(
                range_of(text, PRIVATE),
                Some(AddressRange::Loopback),
                "{text}"
            );
            assert_eq!(range_of(text, LOOPBACK), None, "{text}");
        }
    }

    #[test]
    fn private_needs_allow_private() {
        for text in [
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "fc00::1",
            "fd12:3456:789a::1",
            "fec0::1",
        ] {
            assert_eq!(range_of(text, NONE), Some(AddressRange::Private), "{text}");
            assert_eq!(
                range_of(text, LOOPBACK),
                Some(AddressRange::Private),
                "{text}"
            );
            assert_eq!(range_of(text, PRIVATE), None, "{text}");
        }
    }

    #[test]
    fn link_local_and_metadata_never_pass() {
        let cases = [
            ("169.254.0.1", AddressRange::LinkLocal),
            ("169.254.255.255", AddressRange::LinkLocal),
            ("169.254.169.254", AddressRange::Metadata),
            ("100.100.100.200", AddressRange::Metadata),
            ("fe80::1", AddressRange::LinkLocal),
            ("febf:ffff::1", AddressRange::LinkLocal),
            ("fd00:ec2::254", AddressRange::Metadata),
            ("::ffff:169.254.169.254", AddressRange::Metadata),
        ];
        for (text, range) in cases {
            assert_eq!(range_of(text, NONE), Some(range), "{text}");
            assert_eq!(
                range_of(text, BOTH),
                Some(range),
                "{text} with both allowed"
            );
        }
    }

    #[test]
    fn special_ranges_never_pass() {
        let cases = [
            ("0.0.0.0", AddressRange::Unspecified),
            ("0.1.2.3", AddressRange::Unspecified),
            ("::", AddressRange::Unspecified),
            ("255.255.255.255", AddressRange::Broadcast),
            ("224.0.0.1", AddressRange::Multicast),
            ("239.255.255.250", AddressRange::Multicast),
            ("ff02::1", AddressRange::Multicast),
            ("ff0e::1", AddressRange::Multicast),
            ("192.0.2.1", AddressRange::Documentation),
            ("198.51.100.7", AddressRange::Documentation),
            ("203.0.113.9", AddressRange::Documentation),
            ("2001:db8::1", AddressRange::Documentation),
            ("198.18.0.1", AddressRange::Benchmarking),
            ("198.19.255.255", AddressRange::Benchmarking),
            ("2001:2::1", AddressRange::Benchmarking),
            ("192.0.0.8", AddressRange::Reserved),
            ("192.88.99.1", AddressRange::Reserved),
            ("240.0.0.1", AddressRange::Reserved),
            ("255.255.255.254", AddressRange::Reserved),
            ("2001::1", AddressRange::Reserved),
            ("100::1", AddressRange::Reserved),
            ("64:ff9b:1::1", AddressRange::Reserved),
            ("4000::1", AddressRange::Reserved),
        ];
        for (text, range) in cases {
            assert_eq!(range_of(text, BOTH), Some(range), "{text}");
        }
    }

    #[test]
    fn ipv4_mapped_judged_by_embedded() {
        let cases = [
            ("::ffff:10.0.0.1", AddressRange::Private),
            ("::ffff:192.168.1.1", AddressRange::Private),
            ("::ffff:169.254.1.1", AddressRange::LinkLocal),
            ("::ffff:0.0.0.0", AddressRange::Unspecified),
            ("::ffff:224.0.0.1", AddressRange::Multicast),
        ];
        for (text, range) in cases {
            let blocked = check_ip(ip(text), NONE).unwrap_err();
            assert_eq!(blocked.range, range, "{text}");
            assert!(
                blocked.embedded.is_some(),
                "{text} should report the embedded address"
            );
        }
        let blocked = check_ip(ip("::ffff:127.0.0.1"), NONE).unwrap_err();
        assert_eq!(blocked.embedded, Some(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn ipv4_compatible_judged_by_embedded() {
        let cases = [
            ("::127.0.0.1", AddressRange::Loopback),
            ("::10.1.2.3", AddressRange::Private),
            ("::169.254.169.254", AddressRange::Metadata),
            ("::0.0.0.2", AddressRange::Unspecified),
        ];
        for (text, range) in cases {
            assert_eq!(range_of(text, NONE), Some(range), "{text}");
        }
        assert_eq!(range_of("::8.8.4.4", NONE), None);
    }

    #[test]
    fn nat64_judged_by_embedded() {
        let cases = [
            ("64:ff9b::7f00:1", AddressRange::Loopback),
            ("64:ff9b::a00:1", AddressRange::Private),
            ("64:ff9b::a9fe:a9fe", AddressRange::Metadata),
            ("64:ff9b::c0a8:101", AddressRange::Private),
        ];
        for (text, range) in cases {
            assert_eq!(range_of(text, NONE), Some(range), "{text}");
        }
        assert_eq!(range_of("64:ff9b::7f00:1", LOOPBACK), None);
    }

    #[test]
    fn six_to_four_judged_by_embedded() {
        let cases = [
            ("2002:7f00:1::", AddressRange::Loopback),
            ("2002:a00:1::1", AddressRange::Private),
            ("2002:a9fe:a9fe::1", AddressRange::Metadata),
            ("2002:c0a8:101:1::1", AddressRange::Private),
        ];
        for (text, range) in cases {
            let blocked = check_ip(ip(text), NONE).unwrap_err();
            assert_eq!(blocked.range, range, "{text}");
        }
        let blocked = check_ip(ip("2002:a9fe:a9fe::1"), NONE).unwrap_err();
        assert_eq!(blocked.embedded, Some(Ipv4Addr::new(169, 254, 169, 254)));
    }

    #[test]
    fn blocked_message_names_address_and_remedy() {
        let blocked = check_ip(ip("10.1.2.3"), NONE).unwrap_err();
        let message = blocked.to_string();
        assert!(
            message.contains("10.1.2.3 is a private address"),
            "{message}"
        );
        assert!(message.contains("allow_private"), "{message}");

        let mapped = check_ip(ip("::ffff:169.254.169.254"), NONE).unwrap_err();
        let message = mapped.to_string();
        assert!(message.contains("embeds 169.254.169.254"), "{message}");
        assert!(!message.contains("allow_"), "{message}");
    }

    #[test]
    fn check_url_rejects_schemes_and_userinfo() {
        for text in [
            "file:///etc/passwd",
            "ftp://example.com/a.pdf",
            "gopher://example.com/",
            "data:text/plain,hello",
        ] {
            let url = Url::parse(text).unwrap();
            let error = check_url(&url, BOTH).unwrap_err();
            assert!(
                matches!(error, GuardError::UnsupportedScheme { .. }),
                "{text}: {error}"
            );
            assert!(error.is_permanent());
        }
        for text in [
            "https://alice@example.com/",
            "https://alice:hunter2@example.com/",
            "https://:hunter2@example.com/",
        ] {
            let url = Url::parse(text).unwrap();
            let error = check_url(&url, BOTH).unwrap_err();
            assert!(matches!(error, GuardError::UserInfo), "{text}: {error}");
            let message = error.to_string();
            assert!(!message.contains("alice"), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn check_url_judges_ip_literals() {
        let cases = [
            ("http://127.0.0.1:8080/", Some(AddressRange::Loopback)),
            ("http://[::1]/", Some(AddressRange::Loopback)),
            (
                "http://169.254.169.254/latest/meta-data/",
                Some(AddressRange::Metadata),
            ),
            ("http://[::ffff:a9fe:a9fe]/", Some(AddressRange::Metadata)),
            ("http://[fe80::1]/", Some(AddressRange::LinkLocal)),
            ("http://10.0.0.1/", Some(AddressRange::Private)),
            // The URL parser reads these IPv4 spellings as 127.0.0.1.
            ("http://2130706433/", Some(AddressRange::Loopback)),
            ("http://0x7f.1/", Some(AddressRange::Loopback)),
            ("https://8.8.8.8/", None),
        ];
        for (text, expected) in cases {
            let url = Url::parse(text).unwrap();
            let result = check_url(&url, NONE);
            match expected {
                Some(range) => match result {
                    Err(GuardError::Blocked { address, .. }) => {
                        assert_eq!(address.range, range, "{text}")
                    }
                    other => panic!("{text}: expected a blocked address, got {other:?}"),
                },
                None => assert_eq!(result.unwrap(), None, "{text}"),
            }
        }
    }

    #[test]
    fn check_url_returns_domain_to_resolve() {
        let url = Url::parse("https://Example.COM./doc.pdf").unwrap();
        assert_eq!(check_url(&url, NONE).unwrap(), Some("example.com."));
    }

    #[tokio::test]
    async fn resolve_checked_returns_literal_without_lookup() {
        let url = Url::parse("http://127.0.0.1:9/").unwrap();
        let addresses = resolve_checked(&url, LOOPBACK).await.unwrap();
        assert_eq!(
            addresses,
            vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]
        );

        let blocked = resolve_checked(&url, NONE).await.unwrap_err();
        assert!(matches!(blocked, GuardError::Blocked { .. }), "{blocked}");
    }

    #[tokio::test]
    async fn resolve_checked_rejects_localhost_name() {
        // "localhost" resolves through the system resolver to loopback
        // addresses only; no connection is made.
        let url = Url::parse("http://localhost:9/").unwrap();
        let error = resolve_checked(&url, NONE).await.unwrap_err();
        match error {
            GuardError::Blocked { host, address } => {
                assert_eq!(host, "localhost");
                assert_eq!(address.range, AddressRange::Loopback);
            }
            other => panic!("expected a blocked address, got {other:?}"),
        }
        let addresses = resolve_checked(&url, LOOPBACK).await.unwrap();
        assert!(addresses.iter().all(|address| address.ip().is_loopback()));
        assert!(addresses.iter().all(|address| address.port() == 9));
    }

    #[tokio::test]
    async fn guarded_resolver_rejects_blocked_name() {
        let name: Name = "localhost".parse().unwrap();
        let error = match GuardedResolver::new(NONE).resolve(name).await {
            Ok(_) => panic!("localhost passed a policy without loopback"),
            Err(error) => error,
        };
        let guard = error.downcast_ref::<GuardError>().unwrap();
        assert!(matches!(guard, GuardError::Blocked { .. }), "{guard}");

        let name: Name = "localhost".parse().unwrap();
        let addresses: Vec<SocketAddr> = match GuardedResolver::new(LOOPBACK).resolve(name).await {
            Ok(addresses) => addresses.collect(),
            Err(error) => panic!("localhost failed with loopback allowed: {error}"),
        };
        assert!(!addresses.is_empty());
    }
}

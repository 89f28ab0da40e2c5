//! Key derivation: users, trusted and untrusted proxies, spoofed and
//! malformed headers, RFC 7239 syntax, and address grouping. Every address
//! is from the documentation ranges of RFC 5737 and RFC 3849.

#![allow(clippy::unwrap_used)]

use std::net::IpAddr;

use ratelimit::{ClientKeyConfig, ClientKeyRules, ClientRequest, ConfigProblem, ProxyHeader};

const PROXY: &str = "192.0.2.10";
const CLIENT: &str = "198.51.100.7";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn rules(trusted: &[&str], header: ProxyHeader) -> ClientKeyRules {
    ClientKeyRules::from_config(&ClientKeyConfig {
        trusted_proxies: trusted.iter().map(|s| (*s).to_owned()).collect(),
        proxy_header: header,
        ..ClientKeyConfig::default()
    })
    .unwrap()
}

fn behind_proxy() -> ClientKeyRules {
    rules(&["192.0.2.0/28"], ProxyHeader::XForwardedFor)
}

fn behind_forwarding_proxy() -> ClientKeyRules {
    rules(
        &["192.0.2.0/28", "2001:db8:ffff::/48"],
        ProxyHeader::Forwarded,
    )
}

fn xff_key(rules: &ClientKeyRules, peer: &str, lines: &[&str]) -> String {
    rules.key_for(&ClientRequest {
        peer: ip(peer),
        user_id: None,
        x_forwarded_for: lines,
        forwarded: &[],
    })
}

fn forwarded_key(rules: &ClientKeyRules, peer: &str, lines: &[&str]) -> String {
    rules.key_for(&ClientRequest {
        peer: ip(peer),
        user_id: None,
        x_forwarded_for: &[],
        forwarded: lines,
    })
}

#[test]
fn authenticated_request_keys_by_user() {
    let request = ClientRequest {
        peer: ip(CLIENT),
        user_id: Some("42"),
        x_forwarded_for: &["203.0.113.9"],
        forwarded: &[],
    };
    assert_eq!(behind_proxy().key_for(&request), "user:42");
}

#[test]
fn empty_user_id_keys_by_address() {
    let request = ClientRequest {
        user_id: Some(""),
        ..ClientRequest::from_peer(ip(CLIENT))
    };
    assert_eq!(behind_proxy().key_for(&request), CLIENT);
}

#[test]
fn direct_client_keys_by_peer() {
    let request = ClientRequest::from_peer(ip(CLIENT));
    assert_eq!(ClientKeyRules::default().key_for(&request), CLIENT);
}

#[test]
fn untrusted_peer_ignores_spoofed_xff() {
    assert_eq!(xff_key(&behind_proxy(), CLIENT, &["203.0.113.9"]), CLIENT);
    assert_eq!(
        xff_key(&ClientKeyRules::default(), CLIENT, &["203.0.113.9"]),
        CLIENT
    );
}

#[test]
fn untrusted_peer_ignores_spoofed_forwarded() {
    let key = forwarded_key(&behind_forwarding_proxy(), CLIENT, &["for=203.0.113.9"]);
    assert_eq!(key, CLIENT);
}

#[test]
fn trusted_peer_uses_xff_client() {
    assert_eq!(xff_key(&behind_proxy(), PROXY, &[CLIENT]), CLIENT);
}

#[test]
fn trusted_chain_is_skipped_from_right() {
    let key = xff_key(&behind_proxy(), PROXY, &["198.51.100.7, 192.0.2.11"]);
    assert_eq!(key, CLIENT);
}

#[test]
fn spoofed_left_entries_are_ignored() {
    // The client sent "203.0.113.9"; the proxy appended the real address.
    let key = xff_key(&behind_proxy(), PROXY, &["203.0.113.9, 198.51.100.7"]);
    assert_eq!(key, CLIENT);
    let key = xff_key(&behind_proxy(), PROXY, &["192.0.2.11, 198.51.100.7"]);
    assert_eq!(
        key, CLIENT,
        "a spoofed trusted address on the left changes nothing"
    );
}

#[test]
fn multiple_xff_lines_are_read_in_order() {
    let key = xff_key(
        &behind_proxy(),
        PROXY,
        &["203.0.113.9", "198.51.100.7, 192.0.2.11"],
    );
    assert_eq!(key, CLIENT);
}

#[test]
fn all_trusted_chain_uses_left_most() {
    let key = xff_key(&behind_proxy(), PROXY, &["192.0.2.12, 192.0.2.11"]);
    assert_eq!(key, "192.0.2.12");
}

#[test]
fn malformed_right_most_entry_falls_back_to_peer() {
    for lines in [
        &["198.51.100.7, not-an-address"][..],
        &["198.51.100.7,"][..],
        &[""][..],
        &["unknown"][..],
        &["198.51.100.7:99999"][..],
    ] {
        assert_eq!(xff_key(&behind_proxy(), PROXY, lines), PROXY, "{lines:?}");
    }
}

#[test]
fn malformed_left_entries_are_ignored() {
    let key = xff_key(&behind_proxy(), PROXY, &["garbage, \"quoted, 198.51.100.7"]);
    assert_eq!(key, CLIENT);
}

#[test]
fn missing_header_falls_back_to_peer() {
    assert_eq!(xff_key(&behind_proxy(), PROXY, &[]), PROXY);
}

#[test]
fn xff_accepts_ports_and_brackets() {
    assert_eq!(
        xff_key(&behind_proxy(), PROXY, &["198.51.100.7:51000"]),
        CLIENT
    );
    assert_eq!(
        xff_key(&behind_proxy(), PROXY, &["[2001:db8:1:2::99]:443"]),
        "2001:db8:1:2::/64"
    );
    assert_eq!(
        xff_key(&behind_proxy(), PROXY, &[" 2001:db8:1:2::99 "]),
        "2001:db8:1:2::/64"
    );
}

#[test]
fn forwarded_header_is_read() {
    let rules = behind_forwarding_proxy();
    assert_eq!(
        forwarded_key(
            &rules,
            PROXY,
            &["for=198.51.100.7;proto=https;by=192.0.2.10"]
        ),
        CLIENT
    );
    assert_eq!(forwarded_key(&rules, PROXY, &["FOR=198.51.100.7"]), CLIENT);
    assert_eq!(
        forwarded_key(&rules, PROXY, &["for=\"[2001:db8:1:2::99]:4711\""]),
        "2001:db8:1:2::/64"
    );
    assert_eq!(
        forwarded_key(&rules, PROXY, &["for=\"198.51.100.7:8080\""]),
        CLIENT
    );
}

#[test]
fn forwarded_chain_is_skipped_from_right() {
    let rules = behind_forwarding_proxy();
    let line = "for=203.0.113.9, for=198.51.100.7;proto=https, for=\"[2001:db8:ffff::1]\"";
    assert_eq!(forwarded_key(&rules, PROXY, &[line]), CLIENT);
    let lines = ["for=203.0.113.9", "for=198.51.100.7, for=192.0.2.11"];
    assert_eq!(forwarded_key(&rules, PROXY, &lines), CLIENT);
}

#[test]
fn forwarded_quoted_commas_do_not_split() {
    let rules = behind_forwarding_proxy();
    let line = "for=198.51.100.7;host=\"a,b;c\", for=192.0.2.11";
    assert_eq!(forwarded_key(&rules, PROXY, &[line]), CLIENT);
}

#[test]
fn forwarded_unusable_node_falls_back_to_peer() {
    let rules = behind_forwarding_proxy();
    for line in [
        "for=unknown",
        "for=_hidden",
        "proto=https",
        "for=198.51.100.7;for=198.51.100.8",
        "for=\"198.51.100.7",
        "for=not-an-address",
        "",
    ] {
        assert_eq!(forwarded_key(&rules, PROXY, &[line]), PROXY, "{line:?}");
    }
}

#[test]
fn forwarded_garbage_left_of_client_is_ignored() {
    let rules = behind_forwarding_proxy();
    let line = "for=\"unterminated, for=198.51.100.7";
    assert_eq!(forwarded_key(&rules, PROXY, &[line]), CLIENT);
}

#[test]
fn only_configured_header_is_read() {
    // A Forwarded proxy passes X-Forwarded-For through from the client.
    let request = ClientRequest {
        peer: ip(PROXY),
        user_id: None,
        x_forwarded_for: &["203.0.113.9"],
        forwarded: &["for=198.51.100.7"],
    };
    assert_eq!(behind_forwarding_proxy().key_for(&request), CLIENT);
    // And the other way round.
    let request = ClientRequest {
        peer: ip(PROXY),
        user_id: None,
        x_forwarded_for: &["198.51.100.7"],
        forwarded: &["for=203.0.113.9"],
    };
    assert_eq!(behind_proxy().key_for(&request), CLIENT);
}

#[test]
fn ipv6_clients_share_their_64() {
    let rules = ClientKeyRules::default();
    let first = rules.key_for(&ClientRequest::from_peer(ip("2001:db8:1:2::1")));
    let second = rules.key_for(&ClientRequest::from_peer(ip(
        "2001:db8:1:2:ffff:ffff:ffff:ffff",
    )));
    let other = rules.key_for(&ClientRequest::from_peer(ip("2001:db8:1:3::1")));
    assert_eq!(first, "2001:db8:1:2::/64");
    assert_eq!(second, first);
    assert_ne!(other, first);
}

#[test]
fn prefix_lengths_are_configurable() {
    let config = ClientKeyConfig {
        ipv4_prefix: 24,
        ipv6_prefix: 56,
        ..ClientKeyConfig::default()
    };
    let rules = ClientKeyRules::from_config(&config).unwrap();
    assert_eq!(
        rules.key_for(&ClientRequest::from_peer(ip(CLIENT))),
        "198.51.100.0/24"
    );
    assert_eq!(
        rules.key_for(&ClientRequest::from_peer(ip("2001:db8:1:2ff::1"))),
        "2001:db8:1:200::/56"
    );

    let full = ClientKeyConfig {
        ipv6_prefix: 128,
        ..ClientKeyConfig::default()
    };
    let rules = ClientKeyRules::from_config(&full).unwrap();
    assert_eq!(
        rules.key_for(&ClientRequest::from_peer(ip("2001:db8::1"))),
        "2001:db8::1"
    );
}

#[test]
fn ipv4_mapped_peer_is_ipv4() {
    let rules = behind_proxy();
    let mapped = ClientRequest {
        peer: ip("::ffff:192.0.2.10"),
        user_id: None,
        x_forwarded_for: &["::ffff:198.51.100.7"],
        forwarded: &[],
    };
    assert_eq!(rules.client_ip(&mapped), ip(CLIENT));
    assert_eq!(rules.key_for(&mapped), CLIENT);
}

#[test]
fn ipv6_trusted_proxy() {
    let rules = rules(&["2001:db8:ffff::/48"], ProxyHeader::XForwardedFor);
    assert_eq!(xff_key(&rules, "2001:db8:ffff::5", &[CLIENT]), CLIENT);
    assert_eq!(
        xff_key(&rules, "2001:db8:fffe::5", &[CLIENT]),
        "2001:db8:fffe::/64"
    );
}

#[test]
fn invalid_proxy_names_its_index() {
    let config = ClientKeyConfig {
        trusted_proxies: vec!["192.0.2.0/24".to_owned(), "192.0.2.0/33".to_owned()],
        ..ClientKeyConfig::default()
    };
    let error = ClientKeyRules::from_config(&config).unwrap_err();
    assert_eq!(error.key, "client_key.trusted_proxies[1]");
    assert_eq!(
        error.problem,
        ConfigProblem::InvalidProxy("192.0.2.0/33".to_owned())
    );
}

#[test]
fn invalid_prefix_names_key() {
    for (config, key, max) in [
        (
            ClientKeyConfig {
                ipv6_prefix: 129,
                ..ClientKeyConfig::default()
            },
            "client_key.ipv6_prefix",
            128,
        ),
        (
            ClientKeyConfig {
                ipv4_prefix: 0,
                ..ClientKeyConfig::default()
            },
            "client_key.ipv4_prefix",
            32,
        ),
    ] {
        let error = ClientKeyRules::from_config(&config).unwrap_err();
        assert_eq!(error.key, key);
        assert!(matches!(error.problem, ConfigProblem::InvalidPrefix { max: m, .. } if m == max));
    }
}

#[test]
fn toml_client_key_section() {
    let config: ratelimit::RateLimitConfig = toml::from_str(
        r#"
        [client_key]
        trusted_proxies = ["192.0.2.10", "2001:db8:ffff::/48"]
        proxy_header = "forwarded"
        ipv6_prefix = 48
        "#,
    )
    .unwrap();
    let rules = ClientKeyRules::from_config(&config.client_key).unwrap();
    assert_eq!(rules.proxy_header(), ProxyHeader::Forwarded);
    assert_eq!(rules.trusted_proxies().len(), 2);
    assert_eq!(
        forwarded_key(&rules, PROXY, &["for=\"[2001:db8:1:2::1]\""]),
        "2001:db8:1::/48"
    );
}

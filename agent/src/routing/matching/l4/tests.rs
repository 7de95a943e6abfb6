//! Tests of `tcp` and `tls` route matching, each naming the Istio (or Envoy) rule it checks.

use std::net::SocketAddr;

use super::*;
use crate::routing::matching::tests::{dest, labels_of, workload};
use crate::routing::{L4Match, TcpRoute, TlsMatch, TlsRoute};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("test subnet")
}

fn tls(hosts: &[&str]) -> TlsMatch {
    TlsMatch {
        sni_hosts: hosts.iter().map(|h| h.to_string()).collect(),
        l4: L4Match::default(),
    }
}

fn tcp_route(host: &str, matches: Vec<L4Match>) -> TcpRoute {
    TcpRoute {
        matches,
        destinations: vec![dest(host, 100)],
    }
}

fn tls_route(host: &str, matches: Vec<TlsMatch>) -> TlsRoute {
    TlsRoute {
        matches,
        destinations: vec![dest(host, 100)],
    }
}

fn host_of_tcp(r: Option<&TcpRoute>) -> Option<&str> {
    r.map(|r| &*r.destinations[0].cluster.host)
}

fn host_of_tls(r: Option<&TlsRoute>) -> Option<&str> {
    r.map(|r| &*r.destinations[0].cluster.host)
}

#[test]
fn destination_subnets_contain_the_destination_ip() {
    // Istio L4MatchAttributes.destinationSubnets: "IPv4 or IPv6 ip addresses of destination with
    // optional subnet".
    let m = L4Match {
        destination_subnets: vec![net("10.0.0.0/16"), net("fd00::/64")],
        ..Default::default()
    };
    assert!(l4_matches(&m, addr("10.0.3.4:27017"), None, "default"));
    assert!(l4_matches(&m, addr("[fd00::5]:27017"), None, "default"));
    assert!(!l4_matches(&m, addr("10.1.0.1:27017"), None, "default"));
    // A dual-stack socket reports IPv4 destinations as IPv4-mapped IPv6.
    assert!(l4_matches(
        &m,
        addr("[::ffff:10.0.0.9]:27017"),
        None,
        "default"
    ));
    assert!(
        l4_matches(&L4Match::default(), addr("1.2.3.4:1"), None, "default"),
        "none set"
    );
}

#[test]
fn port_is_the_destination_port() {
    // Istio L4MatchAttributes.port: "the port on the host that is being addressed".
    let m = L4Match {
        port: Some(27017),
        ..Default::default()
    };
    assert!(l4_matches(&m, addr("10.0.0.1:27017"), None, "default"));
    assert!(!l4_matches(&m, addr("10.0.0.1:27018"), None, "default"));
}

#[test]
fn source_labels_and_namespace_select_the_client() {
    // Istio L4MatchAttributes.sourceLabels / sourceNamespace: the client workload's labels
    // include these; the client is in that namespace.
    let m = L4Match {
        source_labels: labels_of(&[("app", "reviews")]),
        source_namespace: Some("prod".into()),
        ..Default::default()
    };
    let dst = addr("10.0.0.1:3306");
    let reviews = workload(&[("app", "reviews"), ("version", "v1")], "prod");
    assert!(l4_matches(&m, dst, Some(&reviews), "prod"));
    assert!(!l4_matches(&m, dst, Some(&reviews), "default"));
    let ratings = workload(&[("app", "ratings")], "prod");
    assert!(!l4_matches(&m, dst, Some(&ratings), "prod"));
    assert!(
        !l4_matches(&m, dst, None, "prod"),
        "no client workload, no labels"
    );
}

#[test]
fn sni_hosts_exact_without_case() {
    // Istio TLSMatchAttributes.sniHosts: SNI to match; DNS names compare without case.
    let m = tls(&["login.bookinfo.com"]);
    let dst = addr("10.0.0.1:443");
    assert!(tls_matches(
        &m,
        Some("login.bookinfo.com"),
        dst,
        None,
        "default"
    ));
    assert!(tls_matches(
        &m,
        Some("LOGIN.Bookinfo.com"),
        dst,
        None,
        "default"
    ));
    assert!(!tls_matches(&m, Some("bookinfo.com"), dst, None, "default"));
    assert!(
        !tls_matches(&m, None, dst, None, "default"),
        "no SNI, no name to match"
    );
}

#[test]
fn sni_wildcard_matches_names_below_the_suffix() {
    // Envoy FilterChainMatch.server_names: "www.example.com will be first matched against
    // www.example.com, then *.example.com, then *.com"; so `*.bookinfo.com` covers any depth.
    let hosts = vec!["*.bookinfo.com".to_string()];
    assert!(sni_matches(&hosts, Some("reviews.bookinfo.com")));
    assert!(sni_matches(&hosts, Some("a.b.BOOKINFO.com")));
    assert!(!sni_matches(&hosts, Some("bookinfo.com")));
    assert!(!sni_matches(&hosts, Some("xbookinfo.com")));
    assert!(
        !sni_matches(&hosts, Some(".bookinfo.com")),
        "a label must precede the suffix"
    );
}

#[test]
fn sni_star_matches_every_connection() {
    // Istio: "If we have a host with *, it effectively means match anything, i.e. no SNI based
    // matching for this host" (no server_names, so connections without SNI match too).
    let hosts = vec!["a.com".to_string(), "*".to_string()];
    assert!(sni_matches(&hosts, Some("anything.org")));
    assert!(sni_matches(&hosts, None));
}

#[test]
fn tls_match_needs_its_l4_conditions_too() {
    // Istio TLSMatchAttributes: sniHosts and the L4 attributes are ANDed.
    let m = TlsMatch {
        l4: L4Match {
            port: Some(443),
            ..Default::default()
        },
        ..tls(&["a.com"])
    };
    assert!(tls_matches(
        &m,
        Some("a.com"),
        addr("1.1.1.1:443"),
        None,
        "default"
    ));
    assert!(!tls_matches(
        &m,
        Some("a.com"),
        addr("1.1.1.1:8443"),
        None,
        "default"
    ));
}

#[test]
fn first_tcp_route_that_matches_wins() {
    // Istio VirtualService.tcp: "The first rule matching an incoming request is used"; a route
    // without match blocks matches every connection.
    let routes = vec![
        tcp_route(
            "mongo-a",
            vec![
                L4Match {
                    port: Some(1),
                    ..Default::default()
                },
                L4Match {
                    port: Some(27017),
                    ..Default::default()
                },
            ],
        ),
        tcp_route("any", vec![]),
    ];
    let pick = |a: &str| host_of_tcp(select_tcp(&routes, addr(a), None, "default"));
    assert_eq!(pick("10.0.0.1:27017"), Some("mongo-a"), "blocks are ORed");
    assert_eq!(pick("10.0.0.1:5000"), Some("any"));
    let only = vec![tcp_route(
        "a",
        vec![L4Match {
            port: Some(1),
            ..Default::default()
        }],
    )];
    assert!(select_tcp(&only, addr("10.0.0.1:2"), None, "default").is_none());
}

#[test]
fn first_tls_route_that_matches_wins() {
    // Istio VirtualService.tls: routes for unterminated TLS, by SNI, in order.
    let routes = vec![
        tls_route("login", vec![tls(&["login.bookinfo.com"])]),
        tls_route("wild", vec![tls(&["*.bookinfo.com"])]),
    ];
    let dst = addr("10.0.0.1:443");
    let pick = |sni| host_of_tls(select_tls(&routes, sni, dst, None, "default"));
    assert_eq!(pick(Some("login.bookinfo.com")), Some("login"));
    assert_eq!(pick(Some("reviews.bookinfo.com")), Some("wild"));
    assert_eq!(pick(Some("example.com")), None);
    assert_eq!(pick(None), None);
}

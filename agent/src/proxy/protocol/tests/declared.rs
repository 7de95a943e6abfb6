//! Declared protocols, table-driven: each row names the Istio rule it checks
//! (`ConvertProtocol` for Service ports, `protocol.Parse` for ServiceEntry ports).

use super::super::Protocol::{self, *};
use crate::config::istio::service_entry;
use crate::state::{ServicePort, TargetPort};

fn port(name: Option<&str>, app: Option<&str>, protocol: &str, number: u16) -> ServicePort {
    ServicePort {
        name: name.map(str::to_owned),
        port: number,
        protocol: protocol.to_owned(),
        app_protocol: app.map(str::to_owned),
        target_port: TargetPort::Number(number),
    }
}

/// (rule, port name, appProtocol, Kubernetes protocol, port number, expected)
type Row = (
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
    u16,
    Protocol,
);

#[test]
fn service_ports_follow_istios_convert_protocol() {
    #[rustfmt::skip]
    let cases: &[Row] = &[
        ("name: exact protocol", Some("http"), None, "TCP", 80, Http),
        ("name: <protocol>-<suffix>", Some("http-web"), None, "TCP", 80, Http),
        ("name: http2 is not http", Some("http2"), None, "TCP", 80, Http2),
        ("name: http2 with a suffix", Some("http2-api"), None, "TCP", 80, Http2),
        ("name: the prefix must be a whole protocol", Some("httpx"), None, "TCP", 80, Unknown),
        ("name: the prefix ends at the first '-'", Some("httpx-web"), None, "TCP", 80, Unknown),
        ("name: case-insensitive", Some("HTTP"), None, "TCP", 80, Http),
        ("name: case-insensitive with a suffix", Some("Http-Web"), None, "TCP", 80, Http),
        ("name: grpc", Some("grpc"), None, "TCP", 9090, Grpc),
        ("name: grpc with a suffix", Some("grpc-api"), None, "TCP", 9090, Grpc),
        ("name: grpc-web before the '-' split", Some("grpc-web"), None, "TCP", 8080, GrpcWeb),
        ("name: grpc-web with a suffix", Some("grpc-web-api"), None, "TCP", 8080, GrpcWeb),
        ("name: grpc-web, any case", Some("GRPC-Web"), None, "TCP", 8080, GrpcWeb),
        ("name: grpc-web is a prefix match", Some("grpc-webx"), None, "TCP", 8080, GrpcWeb),
        ("name: grpc-w is grpc with a suffix", Some("grpc-w"), None, "TCP", 8080, Grpc),
        ("name: https", Some("https-admin"), None, "TCP", 443, Https),
        ("name: tls", Some("tls"), None, "TCP", 443, Tls),
        ("name: tcp with a suffix", Some("tcp-foo"), None, "TCP", 9000, Tcp),
        ("name: mongo", Some("mongo"), None, "TCP", 9001, Mongo),
        ("name: mysql", Some("mysql-primary"), None, "TCP", 9002, MySql),
        ("name: redis", Some("redis"), None, "TCP", 6379, Redis),
        ("name: udp names UDP", Some("udp-dns"), None, "TCP", 5353, Udp),
        ("name: empty", Some(""), None, "TCP", 80, Unknown),
        ("name: none", None, None, "TCP", 80, Unknown),
        ("name: an empty prefix", Some("-http"), None, "TCP", 80, Unknown),
        ("name: not a protocol", Some("web"), None, "TCP", 80, Unknown),
        ("name: h2c is an appProtocol value only", Some("h2c"), None, "TCP", 80, Unknown),
        ("appProtocol: takes precedence over the name", Some("tcp"), Some("http"), "TCP", 80, Http),
        ("appProtocol: http2", Some("web"), Some("http2"), "TCP", 80, Http2),
        ("appProtocol: case-insensitive", None, Some("GRPC"), "TCP", 80, Grpc),
        ("appProtocol: grpc-web", None, Some("grpc-web"), "TCP", 80, GrpcWeb),
        ("appProtocol: split at '-' as a name", None, Some("http-foo"), "TCP", 80, Http),
        ("appProtocol: mysql", Some("database"), Some("mysql"), "TCP", 3306, MySql),
        ("appProtocol: http_proxy", None, Some("http_proxy"), "TCP", 3128, HttpProxy),
        ("appProtocol: tls", Some("http"), Some("tls"), "TCP", 443, Tls),
        ("appProtocol: kubernetes.io/h2c is HTTP2", Some("tcp"), Some("kubernetes.io/h2c"), "TCP", 80, Http2),
        ("appProtocol: kubernetes.io/ws is HTTP", None, Some("kubernetes.io/ws"), "TCP", 80, Http),
        ("appProtocol: kubernetes.io/wss is HTTPS", None, Some("kubernetes.io/wss"), "TCP", 443, Https),
        ("appProtocol: kubernetes.io/* is case-sensitive", None, Some("kubernetes.io/H2C"), "TCP", 80, Unknown),
        ("appProtocol: unknown, the name is not consulted", Some("http"), Some("example.com/custom"), "TCP", 80, Unknown),
        ("appProtocol: empty, the name is not consulted", Some("http"), Some(""), "TCP", 80, Unknown),
        ("UDP: the Kubernetes protocol wins", Some("http"), Some("http"), "UDP", 53, Udp),
        ("SCTP: only UDP is special", Some("http"), None, "SCTP", 80, Http),
        ("well-known port: SMTP undeclared is TCP", None, None, "TCP", 25, Tcp),
        ("well-known port: DNS undeclared is TCP", Some("dns"), None, "TCP", 53, Tcp),
        ("well-known port: MySQL undeclared is TCP", Some("db"), None, "TCP", 3306, Tcp),
        ("well-known port: MongoDB undeclared is TCP", None, None, "TCP", 27017, Tcp),
        ("well-known port: an unknown appProtocol is TCP", None, Some("example.com/x"), "TCP", 3306, Tcp),
        ("well-known port: a declared protocol stands", Some("http"), None, "TCP", 3306, Http),
    ];
    let mut wrong = Vec::new();
    for &(rule, name, app, k8s, number, expected) in cases {
        let got = Protocol::for_service_port(&port(name, app, k8s, number));
        if got != expected {
            wrong.push(format!(
                "{rule}: name {name:?}, appProtocol {app:?}, {k8s} {number} → {got}, expected {expected}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn service_entry_ports_parse_the_whole_protocol() {
    // (rule, protocol, expected)
    let cases: &[(&str, &str, Protocol)] = &[
        ("upper case, as the API documents", "HTTP", Http),
        ("any case", "http", Http),
        ("http2", "HTTP2", Http2),
        ("grpc", "GRPC", Grpc),
        ("grpc-web", "GRPC-WEB", GrpcWeb),
        ("https", "HTTPS", Https),
        ("tls", "TLS", Tls),
        ("tcp", "TCP", Tcp),
        ("mongo", "MONGO", Mongo),
        ("http_proxy", "HTTP_PROXY", HttpProxy),
        ("no <protocol>-<suffix> rule", "HTTP-api", Unknown),
        ("empty: sniffed", "", Unknown),
        ("unknown", "QUIC", Unknown),
    ];
    let mut wrong = Vec::new();
    for &(rule, protocol, expected) in cases {
        let p = service_entry::ServicePort {
            number: 3306,
            protocol: protocol.to_owned(),
            name: "p".to_owned(),
            target_port: 0,
        };
        // No well-known-port rule for ServiceEntry ports (port 3306 above).
        let got = Protocol::for_service_entry_port(&p);
        if got != expected {
            wrong.push(format!("{rule}: {protocol:?} → {got}, expected {expected}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn each_protocol_says_how_the_proxy_handles_it() {
    // (protocol, is_http, is_tls_routed, wants_h2_upstream, is_sniffed): Istio IsHTTP, IsTLS,
    // IsHTTP2, IsUnsupported.
    #[rustfmt::skip]
    let cases: &[(Protocol, bool, bool, bool, bool)] = &[
        (Http, true, false, false, false),
        (Http2, true, false, true, false),
        (HttpProxy, true, false, false, false),
        (Grpc, true, false, true, false),
        (GrpcWeb, true, false, true, false),
        (Https, false, true, false, false),
        (Tls, false, true, false, false),
        (Tcp, false, false, false, false),
        (Mongo, false, false, false, false),
        (MySql, false, false, false, false),
        (Redis, false, false, false, false),
        (Udp, false, false, false, false),
        (Unknown, false, false, false, true),
    ];
    for &(p, http, tls, h2, sniffed) in cases {
        let got = (
            p.is_http(),
            p.is_tls_routed(),
            p.wants_h2_upstream(),
            p.is_sniffed(),
        );
        assert_eq!(got, (http, tls, h2, sniffed), "{p}");
        // Istio's names parse back (Unknown has none).
        if p != Unknown {
            assert_eq!(Protocol::parse(p.as_str()), p, "{p}");
        }
    }
}

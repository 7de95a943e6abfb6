//! Protocol selection (Istio's "Protocol Selection" page): what a destination port carries, so the
//! outbound stage knows whether to route a connection per request (HTTP), by SNI (TLS) or as
//! opaque TCP. A port's protocol is declared (a Service's `appProtocol` or port name, a
//! ServiceEntry's `protocol`) or, when it is not, detected from the client's first bytes
//! ([`sniff`]). `detect` decides from bytes alone; `sniff` waits for them on a socket without
//! consuming them.

mod detect;
mod sniff;

#[cfg(test)]
mod tests;

use std::fmt;

pub use detect::{HTTP1_MAX_REQUEST_LINE, TLS_MAX_CLIENT_HELLO};
pub use sniff::{client_hello_sni, decide, sniff, SniffError, Sniffed, DEFAULT_SNIFF_TIMEOUT};

use crate::config::istio::service_entry;
use crate::state::ServicePort;

/// The protocols Istio distinguishes on a port (Istio `protocol.Instance`), plus [`Unknown`]
/// for a port that declares none Istio knows: that one is sniffed.
///
/// [`Unknown`]: Protocol::Unknown
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1 (Istio: "Plaintext HTTP/1.1 traffic").
    Http,
    /// Plaintext HTTP/2 with prior knowledge (h2c).
    Http2,
    /// A generic outbound HTTP proxy port (Istio: `HTTP_PROXY`, meant for Sidecar egress
    /// listeners); HTTP for routing.
    HttpProxy,
    /// gRPC (Istio: "same as http2").
    Grpc,
    /// gRPC-Web (Istio: "same as http2").
    GrpcWeb,
    /// TLS carrying HTTP. The proxy does not decrypt it: Istio: "Because the Sidecar does not
    /// decrypt TLS traffic, this is the same as tls".
    Https,
    /// TLS, routed by the ClientHello's SNI.
    Tls,
    /// An opaque byte stream.
    Tcp,
    /// Istio's experimental protocol filters; opaque TCP here, as in Istio when the filter is
    /// not enabled.
    Mongo,
    MySql,
    Redis,
    /// Declared UDP: Istio does not proxy it (and ambit captures TCP only).
    Udp,
    /// Undeclared, or a name Istio does not know (Istio: `UnsupportedProtocol`): sniffed.
    Unknown,
}

/// Istio `ConvertProtocol`: ports without a protocol that default to TCP instead of being
/// sniffed, because their servers speak first (SMTP, DNS, MySQL, MongoDB).
const WELL_KNOWN_TCP_PORTS: [u16; 4] = [25, 53, 3306, 27017];

impl Protocol {
    /// The protocol of a Kubernetes Service port, by Istio's `ConvertProtocol`.
    pub fn for_service_port(p: &ServicePort) -> Protocol {
        // Istio: a UDP port is UDP whatever its name says.
        if p.protocol.eq_ignore_ascii_case("UDP") {
            return Protocol::Udp;
        }
        // Istio: "If both are defined, appProtocol takes precedence over the port name" (and an
        // appProtocol Istio does not know is not looked past: the port is sniffed).
        let name = match &p.app_protocol {
            Some(app) => match app.as_str() {
                // Istio: Kubernetes' standard appProtocol values (exact, case-sensitive).
                "kubernetes.io/h2c" => return Protocol::Http2,
                "kubernetes.io/ws" => return Protocol::Http,
                "kubernetes.io/wss" => return Protocol::Https,
                app => app,
            },
            None => p.name.as_deref().unwrap_or(""),
        };
        let declared = Protocol::from_prefix(name);
        if declared == Protocol::Unknown && WELL_KNOWN_TCP_PORTS.contains(&p.port) {
            return Protocol::Tcp;
        }
        declared
    }

    /// The protocol of a ServiceEntry port: its `protocol` field, the whole value, any case
    /// (Istio `protocol.Parse`, no `-suffix`); empty means sniffed.
    pub fn for_service_entry_port(p: &service_entry::ServicePort) -> Protocol {
        Protocol::parse(&p.protocol)
    }

    /// Istio's port-name rule `<protocol>[-<suffix>]`, applied to `appProtocol` too.
    fn from_prefix(name: &str) -> Protocol {
        // Istio: "grpc-web" is checked first since it contains the separator (a prefix match, so
        // `grpc-webx` is gRPC-Web too).
        if name
            .get(..GRPC_WEB.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(GRPC_WEB))
        {
            return Protocol::GrpcWeb;
        }
        let prefix = name.split_once('-').map_or(name, |(prefix, _)| prefix);
        Protocol::parse(prefix)
    }

    /// Istio `protocol.Parse`: a whole protocol name, case-insensitive.
    pub fn parse(s: &str) -> Protocol {
        match s.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "http2" => Protocol::Http2,
            "http_proxy" => Protocol::HttpProxy,
            "grpc" => Protocol::Grpc,
            GRPC_WEB => Protocol::GrpcWeb,
            "https" => Protocol::Https,
            "tls" => Protocol::Tls,
            "tcp" => Protocol::Tcp,
            "mongo" => Protocol::Mongo,
            "mysql" => Protocol::MySql,
            "redis" => Protocol::Redis,
            "udp" => Protocol::Udp,
            _ => Protocol::Unknown,
        }
    }

    /// Routed per request at L7 (Istio `IsHTTP`).
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Protocol::Http
                | Protocol::Http2
                | Protocol::HttpProxy
                | Protocol::Grpc
                | Protocol::GrpcWeb
        )
    }

    /// TLS passed through and routed by SNI (Istio `IsTLS`).
    pub fn is_tls_routed(&self) -> bool {
        matches!(self, Protocol::Https | Protocol::Tls)
    }

    /// Requests go upstream over HTTP/2 whatever the client spoke (Istio `IsHTTP2`, which sets
    /// the cluster's HTTP/2 options; gRPC-Web included).
    pub fn wants_h2_upstream(&self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb)
    }

    /// Nothing declared: the outbound stage sniffs the first bytes (Istio: "automatic protocol
    /// selection").
    pub fn is_sniffed(&self) -> bool {
        *self == Protocol::Unknown
    }

    /// Istio's name of the protocol (`protocol.Instance`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::HttpProxy => "HTTP_PROXY",
            Protocol::Grpc => "GRPC",
            Protocol::GrpcWeb => "GRPC-Web",
            Protocol::Https => "HTTPS",
            Protocol::Tls => "TLS",
            Protocol::Tcp => "TCP",
            Protocol::Mongo => "Mongo",
            Protocol::MySql => "MySQL",
            Protocol::Redis => "Redis",
            Protocol::Udp => "UDP",
            Protocol::Unknown => "UnsupportedProtocol",
        }
    }
}

const GRPC_WEB: &str = "grpc-web";

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

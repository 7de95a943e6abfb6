//! Matching of `tcp` and `tls` routes: by destination address and port, client workload, and
//! (TLS) the SNI the client sent.

use std::net::SocketAddr;

use super::super::{L4Match, TcpRoute, TlsMatch, TlsRoute};
use super::source_matches;
use crate::state::Workload;

#[cfg(test)]
mod tests;

/// Whether an `L4MatchAttributes` block holds for a connection to `dst` from `source` (`None`: a
/// client that is not a known workload) in `source_namespace`.
pub fn l4_matches(
    m: &L4Match,
    dst: SocketAddr,
    source: Option<&Workload>,
    source_namespace: &str,
) -> bool {
    // A dual-stack socket reports an IPv4 peer as `::ffff:a.b.c.d`; subnets are written as IPv4.
    let ip = dst.ip().to_canonical();
    (m.destination_subnets.is_empty() || m.destination_subnets.iter().any(|n| n.contains(&ip)))
        && m.port.is_none_or(|p| p == dst.port())
        && source_matches(
            &m.source_labels,
            m.source_namespace.as_deref(),
            source,
            source_namespace,
        )
}

/// Whether a `TLSMatchAttributes` block holds: one of its `sniHosts` names the SNI, and its L4
/// conditions hold.
pub fn tls_matches(
    m: &TlsMatch,
    sni: Option<&str>,
    dst: SocketAddr,
    source: Option<&Workload>,
    source_namespace: &str,
) -> bool {
    sni_matches(&m.sni_hosts, sni) && l4_matches(&m.l4, dst, source, source_namespace)
}

/// `sniHosts` against the SNI, without ASCII case (DNS names). `*.example.com` matches any name
/// below `example.com` (Envoy's `server_names` wildcard tries every parent domain), not
/// `example.com` itself. Istio: a `*` among them (or none listed) matches every connection, with
/// or without SNI (it then sets no `server_names`).
pub fn sni_matches(hosts: &[String], sni: Option<&str>) -> bool {
    if hosts.is_empty() || hosts.iter().any(|h| h == "*") {
        return true;
    }
    let Some(sni) = sni else { return false };
    hosts.iter().any(|h| match h.strip_prefix('*') {
        // `suffix` keeps its leading dot, so at least one label must precede it.
        Some(suffix) if suffix.starts_with('.') => {
            sni.len() > suffix.len()
                && super::ends_with_ignore_ascii_case(sni.as_bytes(), suffix.as_bytes())
        }
        _ => h.eq_ignore_ascii_case(sni),
    })
}

/// The first `tcp` route whose match blocks (ORed; none: every connection) hold.
pub fn select_tcp<'r>(
    routes: &'r [TcpRoute],
    dst: SocketAddr,
    source: Option<&Workload>,
    source_namespace: &str,
) -> Option<&'r TcpRoute> {
    routes.iter().find(|r| {
        r.matches.is_empty()
            || r.matches
                .iter()
                .any(|m| l4_matches(m, dst, source, source_namespace))
    })
}

/// The first `tls` route whose match blocks (ORed; none: every connection) hold.
pub fn select_tls<'r>(
    routes: &'r [TlsRoute],
    sni: Option<&str>,
    dst: SocketAddr,
    source: Option<&Workload>,
    source_namespace: &str,
) -> Option<&'r TlsRoute> {
    routes.iter().find(|r| {
        r.matches.is_empty()
            || r.matches
                .iter()
                .any(|m| tls_matches(m, sni, dst, source, source_namespace))
    })
}

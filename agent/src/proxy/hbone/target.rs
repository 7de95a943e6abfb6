//! Where an HBONE CONNECT goes, decided as ztunnel's `Inbound::build_inbound_request` and
//! `find_inbound_upstream` decide it (istio/ztunnel `src/proxy/inbound.rs`):
//!
//! - the `:authority` is `ip:port` of the pod the client reached, or a Service hostname
//!   (`name.ns.svc.cluster.local:port`, as gateways and waypoints send), whose port is mapped to
//!   the pod's target port;
//! - the tunnel always ends at the pod the client reached (its own 15008 listener), never at
//!   another address;
//! - a target port that is one of the proxy's own is refused: a tunnel into the proxy itself.
//!
//! Answers as ztunnel's: 400 for a request that is not a CONNECT, an `:authority` that is neither
//! form, or an address other than the pod's; 503 for a hostname no Service has, a Service port
//! that cannot be mapped, and a call to the proxy's own ports.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use http::{Method, Request, StatusCode};
use thiserror::Error;

use crate::proxy::addr::{canonical, OrigDst};
use crate::snapshot::Snapshot;
use crate::state::{Service, TargetPort};

/// Istio's health (readiness) port, where the agent serves `/healthz/ready` as ztunnel does
/// (`--readiness-addr`); Istio reserves it for its proxies, and applications must not use it.
pub const ISTIO_HEALTH_PORT: u16 = 15021;

/// The ports of the proxy itself, which no CONNECT may target. ztunnel refuses its 15001, 15006
/// and 15008 ("HBONE doesn't have redirection, so we cannot have loops, but this would allow
/// multiple layers of HBONE"); its admin and stats ports too, as Istio reserves them
/// (istio.io, "Application requirements: ports used by Istio"). The admin ports are the
/// defaults of `--admin-addr` and `--metrics-addr`.
pub const OWN_PORTS: [u16; 6] = [
    OUTBOUND_PORT,
    INBOUND_PORT,
    HBONE_PORT,
    crate::admin::debug::DEFAULT_PORT,
    crate::admin::DEFAULT_PORT,
    ISTIO_HEALTH_PORT,
];

/// Why a CONNECT is refused; [`TargetError::status`] is the answer. The texts of the 503s are
/// ztunnel's.
#[derive(Debug, Error)]
pub enum TargetError {
    #[error("{method} is not CONNECT")]
    NotConnect { method: Method },
    #[error("CONNECT without :authority")]
    NoAuthority,
    #[error("no valid authority pseudo header: {authority}")]
    InvalidAuthority { authority: String },
    #[error(
        ":authority {authority} names another address than the pod the client reached ({reached})"
    )]
    OtherAddress {
        authority: SocketAddr,
        reached: IpAddr,
    },
    #[error("the listener's address {local} is not one of the pod's (its addresses changed)")]
    NotThePod { local: SocketAddr },
    #[error("no service or workload for hostname: {host}")]
    NoHostname { host: String },
    #[error("requested service {host}:{port} found, but cannot resolve port")]
    NoPortForService { host: String, port: u16 },
    #[error("attempted recursive call to ourselves (port {port})")]
    SelfCall { port: u16 },
}

impl TargetError {
    /// ztunnel's answer: 400 while reading the request, 503 once the upstream cannot be found.
    pub fn status(&self) -> StatusCode {
        match self {
            TargetError::NotConnect { .. }
            | TargetError::NoAuthority
            | TargetError::InvalidAuthority { .. }
            | TargetError::OtherAddress { .. }
            | TargetError::NotThePod { .. } => StatusCode::BAD_REQUEST,
            TargetError::NoHostname { .. }
            | TargetError::NoPortForService { .. }
            | TargetError::SelfCall { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// For counters and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TargetError::NotConnect { .. } => "not_connect",
            TargetError::NoAuthority => "no_authority",
            TargetError::InvalidAuthority { .. } => "invalid_authority",
            TargetError::OtherAddress { .. } => "other_address",
            TargetError::NotThePod { .. } => "not_the_pod",
            TargetError::NoHostname { .. } => "no_hostname",
            TargetError::NoPortForService { .. } => "no_port_for_service",
            TargetError::SelfCall { .. } => "self_call",
        }
    }
}

/// The pod whose 15008 the client reached.
#[derive(Debug, Clone, Copy)]
pub struct Reached<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub ips: &'a [IpAddr],
    /// The accepted socket's local address.
    pub local: SocketAddr,
    /// The proxy's own ports ([`own_ports`]), which no CONNECT may target.
    pub own: &'a [u16],
}

/// The ports no CONNECT may target on this agent: [`OWN_PORTS`] (Istio reserves them whatever
/// the agent's flags say) and the ports of the agent's metrics and admin addresses as configured
/// (`--metrics-addr`, `--readiness-addr`, `--admin-addr`), as ztunnel refuses its own configured ports.
pub fn own_ports(configured: impl IntoIterator<Item = std::net::SocketAddr>) -> Arc<[u16]> {
    let mut ports: Vec<u16> = OWN_PORTS.to_vec();
    for addr in configured {
        if addr.port() != 0 && !ports.contains(&addr.port()) {
            ports.push(addr.port());
        }
    }
    ports.into()
}

/// Where the tunnel goes: the app's address in the pod, and the Service the client named when it
/// named one by hostname.
#[derive(Debug, Clone)]
pub struct Target {
    pub dst: OrigDst,
    pub service: Option<Arc<Service>>,
}

/// Decides where a CONNECT goes, from this snapshot.
pub fn resolve<B>(
    req: &Request<B>,
    pod: Reached<'_>,
    snap: &Snapshot,
) -> Result<Target, TargetError> {
    if req.method() != Method::CONNECT {
        return Err(TargetError::NotConnect {
            method: req.method().clone(),
        });
    }
    let authority = req.uri().authority().ok_or(TargetError::NoAuthority)?;
    let reached = canonical(pod.local.ip());
    if !pod.ips.iter().any(|ip| canonical(*ip) == reached) {
        // The listener is the pod's own; a local address that is not the pod's is a race with
        // a change of its addresses.
        return Err(TargetError::NotThePod { local: pod.local });
    }
    let (port, service) = match authority.as_str().parse::<SocketAddr>() {
        Ok(addr) => {
            if canonical(addr.ip()) != reached {
                return Err(TargetError::OtherAddress {
                    authority: addr,
                    reached,
                });
            }
            (addr.port(), None)
        }
        Err(_) => {
            let invalid = || TargetError::InvalidAuthority {
                authority: authority.to_string(),
            };
            let port = authority.port_u16().ok_or_else(invalid)?;
            let host = authority.host();
            if host.is_empty() {
                return Err(invalid());
            }
            let (service, target) = service_port(snap, pod, host, port)?;
            (target, Some(service))
        }
    };
    if pod.own.contains(&port) {
        return Err(TargetError::SelfCall { port });
    }
    Ok(Target {
        dst: OrigDst(SocketAddr::new(reached, port)),
        service,
    })
}

/// The Service named `host` and the port of the reached pod its port `port` forwards to: a number
/// as written, a name through the pod's container ports (as the EndpointSlice controller maps it).
/// ztunnel keeps the reached pod as the destination whatever endpoints the Service lists.
fn service_port(
    snap: &Snapshot,
    pod: Reached<'_>,
    host: &str,
    port: u16,
) -> Result<(Arc<Service>, u16), TargetError> {
    // DNS names are case-insensitive; Kubernetes writes them in lower case.
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let Some(service) = snap.state.service_by_host(&host) else {
        return Err(TargetError::NoHostname { host });
    };
    let no_port = |host: String| TargetError::NoPortForService { host, port };
    let Some(sp) = service.port(port) else {
        return Err(no_port(host));
    };
    let target = match &sp.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Named(name) => snap
            .state
            .workloads
            .get(&crate::state::key(pod.namespace, pod.name))
            .and_then(|w| w.named_ports.get(name).copied()),
    };
    match target {
        Some(t) if t != 0 => Ok((service, t)),
        _ => Err(no_port(host)),
    }
}

#[cfg(test)]
mod tests;

//! Where a request goes, decided on one snapshot and nothing else: the host it names (`:authority`
//! or `Host`) → the VirtualService routing that host for the client's namespace, or the Service
//! itself → the cluster (host, subset, port) with its endpoints and DestinationRule policy.
//!
//! Host names resolve as an Istio sidecar's route configuration lists them: the fully qualified
//! name, `name.namespace`, `name.namespace.svc`, the bare `name` within the client's own namespace,
//! and the Service's cluster IPs, each with or without the port. A host that names nothing known
//! goes where the connection was going (Istio's `allow_any` passthrough), without a
//! VirtualService.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::routing::entries::Entry;
use crate::routing::{Cluster, ClusterKey, TrafficPolicy, VirtualHost};
use crate::snapshot::Snapshot;
use crate::state::{Destination, Service};

/// What the request's host resolved to.
#[derive(Debug)]
pub enum Target<'s> {
    /// A VirtualService routes the host (it has `http` routes).
    Virtual {
        host: &'s Arc<VirtualHost>,
        /// The Service the host names, if it is one (for telemetry on local replies).
        service: Option<Arc<Service>>,
    },
    /// A Service (or the Service the connection was addressed to) without a VirtualService: all
    /// its endpoints on the request's port.
    Service(Arc<Service>),
    /// Nothing known: to the original destination, as the connection would have gone.
    Passthrough,
}

/// Splits `host[:port]` (IPv6 in brackets), lowercased, without a trailing dot.
pub fn split_authority(authority: &str) -> (Cow<'_, str>, Option<u16>) {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => match p.parse() {
                Ok(port) => (h, Some(port)),
                Err(_) => (authority, None),
            },
            _ => (authority, None),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    (host, port)
}

/// Resolves the request's host for a client in `namespace` whose connection was going to `dst`.
pub fn resolve<'s>(
    snap: &'s Snapshot,
    namespace: &str,
    host: Option<&str>,
    dst: SocketAddr,
) -> Target<'s> {
    if let Some(host) = host.filter(|h| !h.is_empty()) {
        if let Some(target) = by_host(snap, namespace, host) {
            return target;
        }
    }
    match snap.state.destination(dst) {
        Some(Destination::Service { service, .. }) => Target::Service(service),
        Some(Destination::Workload(_)) => Target::Passthrough,
        // A ServiceEntry address (or one of its CIDRs), as the client's namespace sees it.
        _ => match entry_at(snap, namespace, dst) {
            Some(e) => Target::Service(e.service.clone()),
            None => Target::Passthrough,
        },
    }
}

/// The ServiceEntry visible to `namespace` whose `addresses` include `dst`'s address and whose
/// ports include its port.
pub fn entry_at<'s>(
    snap: &'s Snapshot,
    namespace: &str,
    dst: SocketAddr,
) -> Option<&'s Arc<Entry>> {
    snap.routes
        .entries_of(namespace)
        .find(|e| e.has_address(dst.ip()) && e.service.port(dst.port()).is_some())
}

/// The Service, or the ServiceEntry host's Service-shaped view, that `host` names for clients
/// of `namespace`.
fn backend(snap: &Snapshot, namespace: &str, host: &str) -> Option<Arc<Service>> {
    snap.state.service_by_host(host).or_else(|| {
        snap.routes
            .entry(namespace, host)
            .map(|e| e.service.clone())
    })
}

fn by_host<'s>(snap: &'s Snapshot, namespace: &str, host: &str) -> Option<Target<'s>> {
    let state = &snap.state;
    if let Ok(ip) = host.parse::<IpAddr>() {
        // A cluster IP names its Service (Envoy lists the VIPs among a virtual host's domains).
        let service = state
            .service_by_vip
            .get(&ip)
            .and_then(|k| state.services.get(k))?
            .clone();
        return Some(with_routes(
            snap,
            namespace,
            &service.hostname.clone(),
            Some(service),
        ));
    }
    let domain = &*state.domain;
    let dots = host.bytes().filter(|b| *b == b'.').count();
    let expanded = match dots {
        0 => Some(format!("{host}.{namespace}.svc.{domain}")),
        1 => Some(format!("{host}.svc.{domain}")),
        2 if host.ends_with(".svc") => Some(format!("{host}.{domain}")),
        _ => None,
    };
    for candidate in expanded.iter().map(String::as_str).chain([host]) {
        let service = backend(snap, namespace, candidate);
        let routed = snap
            .routes
            .virtual_host(namespace, candidate)
            .filter(|v| !v.http.is_empty());
        match (routed, service) {
            (Some(v), service) => return Some(Target::Virtual { host: v, service }),
            (None, Some(service)) => return Some(Target::Service(service)),
            (None, None) => {}
        }
    }
    None
}

fn with_routes<'s>(
    snap: &'s Snapshot,
    namespace: &str,
    host: &str,
    service: Option<Arc<Service>>,
) -> Target<'s> {
    match (
        snap.routes
            .virtual_host(namespace, host)
            .filter(|v| !v.http.is_empty()),
        service,
    ) {
        (Some(v), service) => Target::Virtual { host: v, service },
        (None, Some(s)) => Target::Service(s),
        (None, None) => Target::Passthrough,
    }
}

/// A cluster as the data path reads it: shaped by a DestinationRule (compiled), or a Service
/// port's endpoints as they are (built here, without copying the endpoint lists).
#[derive(Debug)]
pub enum ClusterRef<'s> {
    Shaped(&'s Arc<Cluster>),
    Plain(Box<Cluster>),
}

impl std::ops::Deref for ClusterRef<'_> {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        match self {
            ClusterRef::Shaped(c) => c,
            ClusterRef::Plain(c) => c,
        }
    }
}

/// Why no cluster: Envoy's `NC` (cluster not found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoCluster {
    /// No Service (or ServiceEntry) has the host.
    UnknownHost,
    /// The Service has no such port (or several, and the route named none).
    UnknownPort,
    /// No DestinationRule visible to the client defines the subset.
    UnknownSubset,
}

impl NoCluster {
    pub fn describe(&self) -> &'static str {
        match self {
            NoCluster::UnknownHost => "no Service has the destination host",
            NoCluster::UnknownPort => "the destination Service has no such port",
            NoCluster::UnknownSubset => "no DestinationRule defines the subset",
        }
    }
}

/// The cluster `key` names for a client of `namespace`. A port of 0 (a destination that names
/// none) is the Service's only port, else the port the request came in on (`request_port`), as
/// Istio documents.
pub fn cluster<'s>(
    snap: &'s Snapshot,
    namespace: &str,
    key: &ClusterKey,
    request_port: u16,
) -> Result<ClusterRef<'s>, NoCluster> {
    let service = backend(snap, namespace, &key.host);
    let port = match (key.port, &service) {
        (0, Some(s)) if s.ports.len() == 1 => s.ports[0].port,
        (0, _) => request_port,
        (p, _) => p,
    };
    let resolved;
    let key = if port == key.port {
        key
    } else {
        resolved = ClusterKey {
            port,
            ..key.clone()
        };
        &resolved
    };
    if let Some(shaped) = snap.routes.shaped_cluster(namespace, key) {
        return Ok(ClusterRef::Shaped(shaped));
    }
    if key.subset.is_some() {
        return Err(NoCluster::UnknownSubset);
    }
    let service = service.ok_or(NoCluster::UnknownHost)?;
    if service.port(port).is_none() {
        return Err(NoCluster::UnknownPort);
    }
    Ok(ClusterRef::Plain(Box::new(plain(
        snap, namespace, service, port,
    ))))
}

/// A Service port's (or ServiceEntry host port's) cluster without a DestinationRule.
pub fn plain(snap: &Snapshot, namespace: &str, service: Arc<Service>, port: u16) -> Cluster {
    let entry = snap
        .state
        .service_by_host(&service.hostname)
        .is_none()
        .then(|| snap.routes.entry(namespace, &service.hostname))
        .flatten();
    let endpoints = match entry {
        Some(e) => e.endpoints.get(&port).cloned(),
        None => snap.state.endpoints_of(&service, port).cloned(),
    };
    Cluster {
        key: ClusterKey {
            host: Arc::from(service.hostname.as_str()),
            subset: None,
            port,
        },
        endpoints: endpoints.unwrap_or_default(),
        passthrough: entry.is_some_and(|e| e.is_passthrough()),
        service: Some(service),
        policy: TrafficPolicy::default(),
        destination_rule: None,
    }
}

/// The cluster of a Service the request reached without a VirtualService: the shaped one if a
/// DestinationRule applies, else the plain one.
pub fn service_cluster<'s>(
    snap: &'s Snapshot,
    namespace: &str,
    service: &Arc<Service>,
    port: u16,
) -> Result<ClusterRef<'s>, NoCluster> {
    let key = ClusterKey {
        host: Arc::from(service.hostname.as_str()),
        subset: None,
        port,
    };
    cluster(snap, namespace, &key, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_forms() {
        assert_eq!(
            split_authority("Reviews:9080"),
            ("reviews".into(), Some(9080))
        );
        assert_eq!(split_authority("reviews"), ("reviews".into(), None));
        assert_eq!(split_authority("a.b.c."), ("a.b.c".into(), None));
        assert_eq!(
            split_authority("[fd00::1]:80"),
            ("fd00::1".into(), Some(80))
        );
        assert_eq!(split_authority("[fd00::1]"), ("fd00::1".into(), None));
        assert_eq!(split_authority("fd00::1"), ("fd00::1".into(), None));
        assert_eq!(
            split_authority("host:notaport"),
            ("host:notaport".into(), None)
        );
    }
}

//! DestinationRules → the clusters they shape for one client namespace: Istio's lookup path
//! (client namespace, host namespace, root), subsets by labels, and the traffic policy merged
//! from the rule, the subset and the port-level settings.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderName;

use super::entries::Entry;
use super::objects::{exported_to, Obj, Spec};
use super::{Cluster, ClusterKey, HashKey, HashRing, LbPolicy, TrafficPolicy};
use crate::config::istio::destination_rule::{
    effective_simple_lb, DestinationRule, LoadBalancerSettings, SimpleLb,
};
use crate::config::{Kind, ObjectError};
use crate::state::{fqdn, istio_key, PortEndpoints, Service, State};

/// The clusters the DestinationRules visible to `client` shape: for each rule's host, each port
/// of its Service (or ServiceEntry), without a subset and for each subset.
pub(super) fn shaped_clusters(
    state: &State,
    root: &str,
    client: &str,
    rules: &[Obj<'_, DestinationRule>],
    entries: &HashMap<Arc<str>, Arc<Entry>>,
    notes: &mut Vec<ObjectError>,
) -> HashMap<ClusterKey, Arc<Cluster>> {
    // host → the rule that applies: the lookup path's first namespace holding one, oldest first.
    let mut chosen: HashMap<String, &Obj<'_, DestinationRule>> = HashMap::new();
    for r in rules {
        if !exported_to(r.obj.spec.export_to(), r.namespace, client) {
            continue;
        }
        let host = fqdn(
            &r.obj.spec.host.to_ascii_lowercase(),
            r.namespace,
            &state.domain,
        );
        let rank = |ns: &str, host: &str| lookup_rank(ns, client, host_namespace(host), root);
        match chosen.get(&host) {
            Some(prev) if rank(prev.namespace, &host) <= rank(r.namespace, &host) => {}
            _ => {
                chosen.insert(host, r);
            }
        }
    }
    let mut out = HashMap::new();
    for (host, rule) in chosen {
        // A Service's host, else a ServiceEntry's visible to the client.
        let (service, entry) = match state.service_by_host(&host) {
            Some(service) => (service, None),
            None => match entries.get(host.as_str()) {
                Some(e) => (e.service.clone(), Some(e)),
                None => continue,
            },
        };
        let spec = &rule.obj.spec;
        let dr_key = istio_key(Kind::DestinationRule, rule.namespace, rule.obj.name());
        let subsets = std::iter::once(None).chain(spec.subsets.iter().map(Some));
        for subset in subsets {
            for port in &service.ports {
                let policy = effective_policy(spec, subset, port.port);
                let endpoints = match (subset, entry) {
                    (None, None) => state
                        .endpoints_of(&service, port.port)
                        .cloned()
                        .unwrap_or_default(),
                    (Some(s), None) => subset_endpoints(state, &service, port.port, &s.labels),
                    (None, Some(e)) => e.endpoints.get(&port.port).cloned().unwrap_or_default(),
                    (Some(s), Some(e)) => e.subset(port.port, &s.labels),
                };
                let key = ClusterKey {
                    host: Arc::from(host.as_str()),
                    subset: subset.map(|s| Arc::from(s.name.as_str())),
                    port: port.port,
                };
                if matches!(policy.lb, LbPolicy::Passthrough) && subset.is_some() {
                    notes.push(ObjectError::new(
                        &rule.oref,
                        "spec.subsets.trafficPolicy.loadBalancer.simple",
                        "PASSTHROUGH sends to the original destination, so the subset's endpoints are not used",
                    ));
                }
                out.insert(
                    key.clone(),
                    Arc::new(Cluster {
                        key,
                        service: Some(service.clone()),
                        endpoints,
                        policy,
                        destination_rule: Some(dr_key.clone()),
                        passthrough: entry.is_some_and(|e| e.is_passthrough()),
                    }),
                );
            }
        }
    }
    out
}

/// The namespace of a `name.namespace.svc...` host, if it is one.
fn host_namespace(host: &str) -> Option<&str> {
    let mut parts = host.split('.');
    let _name = parts.next()?;
    let ns = parts.next()?;
    (parts.next() == Some("svc")).then_some(ns)
}

/// Istio's DestinationRule lookup path: client namespace (0), the host's namespace (1), the root
/// namespace (2), anything else exported (3).
fn lookup_rank(rule_ns: &str, client: &str, host_ns: Option<&str>, root: &str) -> u8 {
    if rule_ns == client {
        0
    } else if Some(rule_ns) == host_ns {
        1
    } else if rule_ns == root {
        2
    } else {
        3
    }
}

/// The endpoints of a Service port whose pods carry every label of the subset.
fn subset_endpoints(
    state: &State,
    service: &Service,
    port: u16,
    labels: &BTreeMap<String, String>,
) -> PortEndpoints {
    let Some(all) = state.endpoints_of(service, port) else {
        return PortEndpoints::default();
    };
    let keep = |addrs: &[SocketAddr]| -> Arc<[SocketAddr]> {
        addrs
            .iter()
            .filter(|a| {
                state
                    .workload_by_ip(a.ip())
                    .is_some_and(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            })
            .copied()
            .collect()
    };
    PortEndpoints {
        v4: keep(&all.v4),
        v6: keep(&all.v6),
    }
}

/// The policy of one cluster: the subset's traffic policy replaces the rule's field by field,
/// and the port-level settings of the cluster's port replace both (Istio MergeTrafficPolicy).
fn effective_policy(
    rule: &DestinationRule,
    subset: Option<&crate::config::istio::destination_rule::Subset>,
    port: u16,
) -> TrafficPolicy {
    let top = rule.traffic_policy.as_ref();
    let sub = subset.and_then(|s| s.traffic_policy.as_ref());
    let mut lb = sub
        .and_then(|t| t.load_balancer.as_ref())
        .or(top.and_then(|t| t.load_balancer.as_ref()));
    let mut pool = sub
        .and_then(|t| t.connection_pool.as_ref())
        .or(top.and_then(|t| t.connection_pool.as_ref()));
    let mut outlier = sub
        .and_then(|t| t.outlier_detection.as_ref())
        .or(top.and_then(|t| t.outlier_detection.as_ref()));
    let port_level = sub
        .filter(|t| !t.port_level_settings.is_empty())
        .or(top)
        .into_iter()
        .flat_map(|t| t.port_level_settings.iter())
        .find(|p| p.port.is_some_and(|p| p.number == u32::from(port)));
    if let Some(p) = port_level {
        lb = p.load_balancer.as_ref().or(lb);
        pool = p.connection_pool.as_ref().or(pool);
        outlier = p.outlier_detection.as_ref().or(outlier);
    }
    TrafficPolicy {
        lb: lb_policy(lb),
        connection_pool: pool.cloned(),
        outlier_detection: outlier.cloned(),
    }
}

fn lb_policy(lb: Option<&LoadBalancerSettings>) -> LbPolicy {
    if let Some(ch) = lb.and_then(|l| l.consistent_hash.as_ref()) {
        let key = if let Some(h) = &ch.http_header_name {
            // Envoy's header map answers `host` for `:authority`.
            let h = if h == ":authority" {
                "host"
            } else {
                h.as_str()
            };
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map(HashKey::Header)
                .unwrap_or(HashKey::SourceIp)
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl,
            }
        } else if let Some(q) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(q.clone())
        } else {
            HashKey::SourceIp
        };
        let ring = match (&ch.maglev, &ch.ring_hash) {
            (Some(m), _) => HashRing::Maglev {
                table_size: m.table_size.unwrap_or(65537),
            },
            (None, r) => HashRing::RingHash {
                minimum_ring_size: r
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .unwrap_or(1024),
            },
        };
        return LbPolicy::ConsistentHash { key, ring };
    }
    match effective_simple_lb(lb) {
        SimpleLb::RoundRobin => LbPolicy::RoundRobin,
        SimpleLb::Random => LbPolicy::Random,
        SimpleLb::Passthrough => LbPolicy::Passthrough,
        _ => LbPolicy::LeastRequest,
    }
}

//! ServiceEntry hosts as routing targets, compiled once per change on the control runtime: each
//! host of each ServiceEntry becomes an [`Entry`] with a Service-shaped view (for routing and
//! telemetry) and its endpoints per port, as Istio's `resolution` says:
//! - `STATIC`: the `endpoints` (their addresses, with a port mapped by name or the target port),
//!   or the pods a `workloadSelector` selects in the entry's namespace;
//! - `DNS` / `DNS_ROUND_ROBIN`: the addresses the node's resolver gave for each endpoint address
//!   (or, without endpoints, for the host), resolved apart (`crate::dns`), never on the data path;
//!   `DNS_ROUND_ROBIN` uses the first address only, as Envoy's logical DNS cluster does;
//! - `NONE`: no endpoints; a connection goes to its original destination (passthrough).
//!
//! Which entries a client namespace sees follows `exportTo`; when several define one host, the
//! client's own namespace wins, then the oldest (the others are reported).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::objects::objects;
use crate::config::istio::service_entry::{Resolution, ServiceEntry};
use crate::config::istio::IstioObject;
use crate::config::{Kind, ObjectRef};
use crate::state::{Key, PortEndpoints, Service, ServicePort, State, TargetPort};

/// What a DNS-resolved name had as addresses when the snapshot was built.
pub use crate::dns::DnsAnswers;

/// One host of one ServiceEntry, as clients route to it.
#[derive(Debug)]
pub struct Entry {
    /// `ServiceEntry/namespace/name`.
    pub object: Key,
    pub oref: ObjectRef,
    /// A Service-shaped view: `hostname` is the host, `namespace` the entry's, `vips` its
    /// addresses that are IPs, each port's protocol in `app_protocol` (empty: detected).
    pub service: Arc<Service>,
    /// `addresses` as networks (a plain IP is a /32 or /128).
    pub addresses: Vec<ipnet::IpNet>,
    pub resolution: Resolution,
    /// Endpoints by the entry's port number.
    pub endpoints: BTreeMap<u16, PortEndpoints>,
    /// Labels of each endpoint address (WorkloadEntry labels, or the selected pod's), for
    /// DestinationRule subsets.
    pub labels: HashMap<IpAddr, BTreeMap<String, String>>,
}

impl Entry {
    /// `resolution: NONE`: to the original destination.
    pub fn is_passthrough(&self) -> bool {
        self.resolution == Resolution::None
    }

    /// Whether the entry's `addresses` include `ip`.
    pub fn has_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.addresses.iter().any(|n| n.contains(&ip))
    }

    /// The endpoints of `port` whose labels include all of `labels` (a subset).
    pub fn subset(&self, port: u16, labels: &BTreeMap<String, String>) -> PortEndpoints {
        let Some(all) = self.endpoints.get(&port) else {
            return PortEndpoints::default();
        };
        let keep = |addrs: &[SocketAddr]| -> Arc<[SocketAddr]> {
            addrs
                .iter()
                .filter(|a| {
                    self.labels
                        .get(&a.ip())
                        .is_some_and(|l| labels.iter().all(|(k, v)| l.get(k) == Some(v)))
                })
                .copied()
                .collect()
        };
        PortEndpoints {
            v4: keep(&all.v4),
            v6: keep(&all.v6),
        }
    }
}

/// The names DNS resolution is needed for, each with the ServiceEntries needing it: each
/// `DNS`/`DNS_ROUND_ROBIN` entry's endpoint addresses that are not IPs, or its hosts when it lists
/// no endpoints.
pub fn dns_names(state: &State) -> BTreeMap<String, Vec<ObjectRef>> {
    let mut out: BTreeMap<String, Vec<ObjectRef>> = BTreeMap::new();
    for o in objects::<ServiceEntry>(state, Kind::ServiceEntry) {
        let spec = &o.obj.spec;
        if !matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
            continue;
        }
        let names: Vec<String> = if spec.endpoints.is_empty() {
            spec.hosts
                .iter()
                .filter(|h| !h.starts_with('*'))
                .map(|h| h.to_ascii_lowercase())
                .collect()
        } else {
            spec.endpoints
                .iter()
                .filter(|e| !e.address.is_empty() && e.address.parse::<IpAddr>().is_err())
                .filter(|e| !e.address.starts_with("unix://"))
                .map(|e| e.address.to_ascii_lowercase())
                .collect()
        };
        for name in names {
            let users = out.entry(name).or_default();
            if !users.contains(&o.oref) {
                users.push(o.oref.clone());
            }
        }
    }
    out
}

/// The entries of one ServiceEntry, one per host.
pub fn compile_entry(
    state: &State,
    namespace: &str,
    key: &Key,
    se: &IstioObject<ServiceEntry>,
    dns: &DnsAnswers,
) -> Vec<(String, Arc<Entry>)> {
    let spec = &se.spec;
    let oref = ObjectRef::new(crate::config::Kind::ServiceEntry, namespace, se.name());
    let addresses: Vec<ipnet::IpNet> = spec
        .addresses
        .iter()
        .filter_map(|a| {
            a.parse::<ipnet::IpNet>()
                .ok()
                .or_else(|| a.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
        })
        .collect();
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .filter_map(|p| {
            Some(ServicePort {
                name: (!p.name.is_empty()).then(|| p.name.clone()),
                port: u16::try_from(p.number).ok()?,
                protocol: "TCP".into(),
                // Istio reads a ServiceEntry port's `protocol` whole; empty means detected.
                app_protocol: Some(p.protocol.clone()),
                target_port: TargetPort::Number(u16::try_from(p.target_port()).ok()?),
            })
        })
        .collect();
    let selector = spec
        .workload_selector
        .as_ref()
        .map(|s| s.labels.clone())
        .unwrap_or_default();
    spec.hosts
        .iter()
        .map(|host| {
            let host = host.to_ascii_lowercase();
            let service = Arc::new(Service {
                name: host.clone(),
                namespace: namespace.to_string(),
                hostname: host.clone(),
                vips: addresses
                    .iter()
                    .filter(|n| n.prefix_len() == n.max_prefix_len())
                    .map(|n| n.addr())
                    .collect(),
                headless: false,
                ports: ports.clone(),
                selector: selector.clone(),
            });
            let (endpoints, labels) = endpoints(state, namespace, spec, &host, dns);
            let entry = Entry {
                object: key.clone(),
                oref: oref.clone(),
                service,
                addresses: addresses.clone(),
                resolution: spec.resolution,
                endpoints,
                labels,
            };
            (host, Arc::new(entry))
        })
        .collect()
}

type Endpoints = (
    BTreeMap<u16, PortEndpoints>,
    HashMap<IpAddr, BTreeMap<String, String>>,
);

/// The endpoints of one host of an entry, per port, with each address's labels.
fn endpoints(
    state: &State,
    namespace: &str,
    spec: &ServiceEntry,
    host: &str,
    dns: &DnsAnswers,
) -> Endpoints {
    let mut per_port: BTreeMap<u16, Vec<SocketAddr>> = BTreeMap::new();
    let mut labels = HashMap::new();
    let round_robin = spec.resolution == Resolution::DnsRoundRobin;
    let resolved = |name: &str| -> Vec<IpAddr> {
        match name.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let answers = dns.get(&name.to_ascii_lowercase()).map(|a| a.to_vec());
                let mut answers = answers.unwrap_or_default();
                if round_robin {
                    answers.truncate(1);
                }
                answers
            }
        }
    };
    match spec.resolution {
        Resolution::None => {}
        Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin => {
            if let Some(sel) = spec
                .workload_selector
                .as_ref()
                .filter(|_| spec.endpoints.is_empty())
            {
                for w in state.workloads.values() {
                    if w.namespace != namespace
                        || !w.running
                        || !sel.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    {
                        continue;
                    }
                    for ip in &w.ips {
                        labels.insert(*ip, w.labels.clone());
                        for p in &spec.ports {
                            let (Ok(port), Ok(target)) =
                                (u16::try_from(p.number), u16::try_from(p.target_port()))
                            else {
                                continue;
                            };
                            per_port
                                .entry(port)
                                .or_default()
                                .push(SocketAddr::new(*ip, target));
                        }
                    }
                }
            } else if spec.endpoints.is_empty() {
                // DNS without endpoints: the host itself.
                if spec.resolution != Resolution::Static {
                    for ip in resolved(host) {
                        for p in &spec.ports {
                            let (Ok(port), Ok(target)) =
                                (u16::try_from(p.number), u16::try_from(p.target_port()))
                            else {
                                continue;
                            };
                            per_port
                                .entry(port)
                                .or_default()
                                .push(SocketAddr::new(ip, target));
                        }
                    }
                }
            } else {
                for e in &spec.endpoints {
                    if e.address.starts_with("unix://") {
                        continue;
                    }
                    for ip in resolved(&e.address) {
                        labels.insert(ip, e.labels.clone());
                        for p in &spec.ports {
                            let (Ok(port), Ok(target)) =
                                (u16::try_from(p.number), u16::try_from(e.port_for(p)))
                            else {
                                continue;
                            };
                            per_port
                                .entry(port)
                                .or_default()
                                .push(SocketAddr::new(ip, target));
                        }
                    }
                }
            }
        }
    }
    let endpoints = per_port
        .into_iter()
        .map(|(port, mut addrs)| {
            addrs.sort();
            addrs.dedup();
            let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) =
                addrs.into_iter().partition(SocketAddr::is_ipv4);
            (
                port,
                PortEndpoints {
                    v4: v4.into(),
                    v6: v6.into(),
                },
            )
        })
        .collect();
    (endpoints, labels)
}

#[cfg(test)]
mod tests;

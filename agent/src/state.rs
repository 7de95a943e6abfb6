//! The one immutable snapshot the data path reads: workloads, services and their endpoints,
//! namespaces, and (from the config-model work on) Istio objects, with the indexes the proxy needs.
//! Built only by [`store::Store`] from validated objects; published through `arc-swap`. The maps are
//! persistent (`imbl`), so a snapshot clone is O(1) and a single change costs O(log n): a new
//! snapshot per change stays cheap at 50,000 pods.

pub mod convert;
pub mod store;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use imbl::{HashMap, OrdSet};

use crate::config::istio::IstioConfig;
use crate::config::{Kind, PolicyScope, DATAPLANE_MODE_LABEL};

/// `namespace/name`.
pub type Key = Arc<str>;

pub fn key(namespace: &str, name: &str) -> Key {
    Arc::from(format!("{namespace}/{name}"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A pod, with only what ambit uses (the rest is dropped at conversion to keep memory low).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: Option<String>,
    pub host_network: bool,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Container ports by name, for Services' named target ports.
    pub named_ports: BTreeMap<String, u16>,
    /// Annotations ambit acts on (netns path in local mode, port exclusions).
    pub annotations: BTreeMap<String, String>,
    /// False once the pod has finished (phase Succeeded or Failed): its containers are gone.
    pub running: bool,
    /// A graceful delete is under way (`metadata.deletionTimestamp`): the pod stays enrolled while
    /// its sandbox lives, so its traffic during shutdown (preStop hooks, draining) stays meshed.
    pub terminating: bool,
    /// Its values in Istio's standard metric labels, derived once when the pod is read.
    pub istio: Arc<IstioLabels>,
}

/// A workload's values in Istio's standard metric labels (`source_*`/`destination_*`), as Istio
/// derives them from the pod: "unknown" where a label is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct IstioLabels {
    /// The workload's name: its Deployment (the ReplicaSet name without its pod-template-hash),
    /// CronJob, or other controller; the pod's own name without one.
    pub workload: String,
    pub namespace: String,
    pub service_account: String,
    /// The `app` label.
    pub app: String,
    /// The `version` label.
    pub version: String,
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else the
    /// workload name.
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`,
    /// else `latest`.
    pub canonical_revision: String,
}

impl IstioLabels {
    pub fn new(
        workload: &str,
        namespace: &str,
        service_account: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
        IstioLabels {
            workload: workload.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            app: first(&["app"]).unwrap_or_else(|| UNKNOWN.into()),
            version: first(&["version"]).unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: first(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .unwrap_or_else(|| workload.to_string()),
            canonical_revision: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
        }
    }
}

/// Istio's value for a metric label it cannot know.
pub const UNKNOWN: &str = "unknown";

/// The annotation the sidecar injector sets on every pod it injected.
pub use ambit_cni::enrolment::SIDECAR_STATUS_ANNOTATION;

impl Workload {
    pub fn key(&self) -> Key {
        key(&self.namespace, &self.name)
    }

    /// An Istio sidecar was injected (`sidecar.istio.io/status`): Istio never puts such a pod in
    /// ambient as well.
    pub fn has_sidecar(&self) -> bool {
        self.annotations.contains_key(SIDECAR_STATUS_ANNOTATION)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    pub app_protocol: Option<String>,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.<domain>`.
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
}

impl Service {
    pub fn key(&self) -> Key {
        key(&self.namespace, &self.name)
    }
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// One endpoint of one EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: bool,
    /// `namespace/name` of the backing pod, when the slice names it.
    pub pod: Option<Key>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// The owning Service (`kubernetes.io/service-name`).
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// An AuthorizationPolicy the config layer could not accept (malformed, a value ambit does not
/// know, or CUSTOM). The workloads it would have selected deny every connection: a policy that
/// cannot be read fails closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedPolicy {
    pub namespace: String,
    pub name: String,
    pub scope: PolicyScope,
    /// Why it was rejected (the first error), for the denial reason.
    pub reason: String,
}

/// A Service's ready endpoints, per Service port and address family: sorted, without duplicates,
/// compiled by the store when the Service or one of its slices changes, never per connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEndpoints {
    pub ports: BTreeMap<u16, PortEndpoints>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortEndpoints {
    pub v4: Arc<[SocketAddr]>,
    pub v6: Arc<[SocketAddr]>,
}

impl PortEndpoints {
    /// The endpoints of `dst`'s family; of the other family if it has none (a single-stack
    /// Service dialled through an address of the other family).
    pub fn for_family_of(&self, dst: SocketAddr) -> &[SocketAddr] {
        let (same, other) = if dst.is_ipv4() {
            (&self.v4, &self.v6)
        } else {
            (&self.v6, &self.v4)
        };
        if same.is_empty() {
            other
        } else {
            same
        }
    }
}

/// What a destination address belongs to.
#[derive(Debug, Clone)]
pub enum Destination {
    Service {
        service: Arc<Service>,
        port: Option<ServicePort>,
    },
    Workload(Arc<Workload>),
    /// A ServiceEntry whose `addresses` include the IP.
    ServiceEntry(Arc<IstioConfig>),
}

/// Key of an Istio object: `Kind/namespace/name`.
pub fn istio_key(kind: Kind, namespace: &str, name: &str) -> Key {
    Arc::from(format!("{kind}/{namespace}/{name}"))
}

/// Istio: a short host name is relative to the namespace of the object naming it
/// (`reviews` in `default` is `reviews.default.svc.cluster.local`); names with dots, and wildcards,
/// are taken as written.
pub fn fqdn(host: &str, namespace: &str, domain: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

/// The snapshot.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub domain: Arc<str>,
    pub namespaces: HashMap<Arc<str>, Arc<Namespace>>,
    pub workloads: HashMap<Key, Arc<Workload>>,
    pub workload_by_ip: HashMap<IpAddr, Key>,
    pub services: HashMap<Key, Arc<Service>>,
    pub service_by_vip: HashMap<IpAddr, Key>,
    pub service_by_host: HashMap<Arc<str>, Key>,
    /// Service key → slice name → slice.
    pub slices: HashMap<Key, HashMap<Arc<str>, Arc<EndpointSlice>>>,
    /// Validated Istio objects by [`istio_key`].
    pub istio: HashMap<Key, Arc<IstioConfig>>,
    /// (kind, fully qualified host) → objects naming that host: VirtualService `hosts`,
    /// DestinationRule `host`, ServiceEntry `hosts`.
    pub istio_by_host: HashMap<(Kind, Arc<str>), OrdSet<Key>>,
    /// (kind, namespace) → Istio objects in that namespace (policies are scoped by namespace).
    pub istio_by_namespace: HashMap<(Kind, Arc<str>), OrdSet<Key>>,
    pub service_entry_by_address: HashMap<IpAddr, Key>,
    /// AuthorizationPolicies currently rejected, by `namespace/name`: each replaces any accepted
    /// (last good) version of the same name and fails closed for what it would select.
    pub rejected_policies: HashMap<Key, Arc<RejectedPolicy>>,
    /// Service key → its compiled ready endpoints (`ServiceEndpoints`).
    pub endpoints: HashMap<Key, Arc<ServiceEndpoints>>,
    /// Kinds whose complete current set the sources have delivered (a first list, or a CRD that
    /// discovery positively saw is not served). Until every kind is here the view is incomplete and
    /// the data path fails closed: nothing is known to be absent before it has been listed.
    pub synced: OrdSet<Kind>,
}

impl State {
    pub fn new(domain: &str) -> Self {
        State {
            domain: Arc::from(domain),
            ..Default::default()
        }
    }

    /// Every kind has been listed: the snapshot is a complete view of the cluster.
    pub fn is_complete(&self) -> bool {
        Kind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// Kinds not listed yet, in `Kind::ALL` order.
    pub fn unsynced(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| !self.synced.contains(k))
            .collect()
    }

    /// What `addr` is: a Service VIP (with the port's definition, if the port is declared) or a
    /// pod IP. O(1).
    pub fn destination(&self, addr: SocketAddr) -> Option<Destination> {
        if let Some(k) = self.service_by_vip.get(&addr.ip()) {
            let service = self.services.get(k)?.clone();
            let port = service.port(addr.port()).cloned();
            return Some(Destination::Service { service, port });
        }
        if let Some(k) = self.workload_by_ip.get(&addr.ip()) {
            return self.workloads.get(k).cloned().map(Destination::Workload);
        }
        let k = self.service_entry_by_address.get(&addr.ip())?;
        self.istio.get(k).cloned().map(Destination::ServiceEntry)
    }

    /// Istio objects of `kind` naming `host` (fully qualified), in a stable order.
    pub fn istio_for_host(&self, kind: Kind, host: &str) -> Vec<Arc<IstioConfig>> {
        self.istio_by_host
            .get(&(kind, Arc::from(host)))
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.istio.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Istio objects of `kind` in `namespace`, in a stable order.
    pub fn istio_in_namespace(&self, kind: Kind, namespace: &str) -> Vec<Arc<IstioConfig>> {
        self.istio_by_namespace
            .get(&(kind, Arc::from(namespace)))
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.istio.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a DestinationRule for `host` (as written in an object of `namespace`) defines
    /// `subset`.
    pub fn has_subset(&self, host: &str, namespace: &str, subset: &str) -> bool {
        self.istio_for_host(Kind::DestinationRule, &fqdn(host, namespace, &self.domain))
            .iter()
            .any(|dr| matches!(&**dr, IstioConfig::DestinationRule(d) if d.spec.subset(subset).is_some()))
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workloads.get(self.workload_by_ip.get(&ip)?).cloned()
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&key(namespace, name)).cloned()
    }

    pub fn service_by_host(&self, host: &str) -> Option<Arc<Service>> {
        self.services.get(self.service_by_host.get(host)?).cloned()
    }

    /// Ready endpoints of a Service on one of its ports, as socket addresses: the target port is
    /// resolved per endpoint (named target ports through the slice's port names, as kube-proxy does).
    /// Sorted, without duplicates. The data path reads the compiled `endpoints` instead.
    pub fn ready_endpoints(&self, service: &Service, port: u16) -> Vec<SocketAddr> {
        let Some(sp) = service.port(port) else {
            return Vec::new();
        };
        let Some(slices) = self.slices.get(&service.key()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for slice in slices.values() {
            // EndpointSlice ports carry the Service port's name with the resolved target port.
            let target = slice
                .ports
                .iter()
                .find(|p| p.name == sp.name)
                .map(|p| p.port)
                .or(match &sp.target_port {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Named(_) => None,
                });
            let Some(target) = target else { continue };
            out.extend(
                slice
                    .endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .map(|ep| SocketAddr::new(ep.ip, target)),
            );
        }
        out.sort();
        out.dedup();
        out
    }

    /// Compiles a Service's endpoint sets from its slices.
    pub fn compile_endpoints(&self, service: &Service) -> ServiceEndpoints {
        let ports = service
            .ports
            .iter()
            .map(|p| {
                let all = self.ready_endpoints(service, p.port);
                let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) =
                    all.into_iter().partition(SocketAddr::is_ipv4);
                (
                    p.port,
                    PortEndpoints {
                        v4: v4.into(),
                        v6: v6.into(),
                    },
                )
            })
            .collect();
        ServiceEndpoints { ports }
    }

    /// The compiled ready endpoints of `service` on `port`.
    pub fn endpoints_of(&self, service: &Service, port: u16) -> Option<&PortEndpoints> {
        self.endpoints.get(&service.key())?.ports.get(&port)
    }

    /// Istio's enrolment rule: the namespace is labelled ambient and the pod did not opt out.
    pub fn is_enrolled(&self, w: &Workload) -> bool {
        // Istio's rule, shared with the CNI plugin's own decision while the agent is down.
        let rule = ambit_cni::enrolment::Enrolment {
            namespace_mode: self
                .namespaces
                .get(w.namespace.as_str())
                .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL))
                .map(String::as_str),
            pod_mode: w.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str),
            has_sidecar: w.has_sidecar(),
            host_network: w.host_network,
        };
        rule.meshed() && w.running
    }

    /// Enrolled workloads scheduled on `node`.
    pub fn enrolled_on(&self, node: &str) -> Vec<Arc<Workload>> {
        let mut out: Vec<_> = self
            .workloads
            .values()
            .filter(|w| w.node.as_deref() == Some(node) && self.is_enrolled(w))
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }
}

#[cfg(test)]
mod tests;

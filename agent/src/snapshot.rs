//! The one thing the data path reads: an immutable [`Snapshot`] of the cluster state and of what
//! the control runtime compiled from it for this node, published once per change through
//! arc-swap. A connection loads one `Arc<Snapshot>` and reads nothing else, so the policies, the
//! endpoints and the state it sees always belong together.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::istio::IstioConfig;
use crate::config::mesh::{MeshConfig, MESH_CONFIG_MAP};
use crate::config::telemetry::{self as telemetry, EffectiveTelemetry, TelemetryObject};
use crate::config::{Kind, ObjectError, ObjectRef};
use crate::policy::CompiledPolicies;
use crate::routing::entries::DnsAnswers;
use crate::routing::{Cluster, ClusterKey, Routes};
use crate::state::{key, Key, Service, State, TargetPort, Workload};

#[derive(Debug, Default)]
pub struct Snapshot {
    /// Workloads, Services with their compiled endpoint sets, Istio objects (`state::Store`).
    pub state: Arc<State>,
    /// The policies of this node's enrolled workloads, compiled from `state`.
    pub policies: CompiledPolicies,
    /// For each enrolled workload of this node, the Services that select it, by target port: what
    /// an inbound connection to that port was addressed to (`destination_service`).
    pub local_services: HashMap<Key, Vec<(u16, Arc<Service>)>>,
    /// The routes this node's clients see (VirtualServices, DestinationRules), per namespace.
    pub routes: Routes,
    /// What compiling the routes found wrong, each naming the object and field.
    pub route_problems: Vec<ObjectError>,
    /// Observability settings of each enrolled workload of this node (MeshConfig and Telemetry,
    /// `config::telemetry::resolve`), by workload key.
    pub telemetry: HashMap<Key, Arc<EffectiveTelemetry>>,
    /// The settings of a workload no Telemetry selects: the mesh defaults with the root and…
    /// nothing else (for peers that are not enrolled here).
    pub default_telemetry: Arc<EffectiveTelemetry>,
    /// Telemetry objects left out (an unknown provider), each naming the object and field.
    pub telemetry_problems: Vec<ObjectError>,
    /// Whether any workload of this node has settings that change its TCP connections (an
    /// access log, a TCP metric turned off): when none has, a connection looks nothing up.
    pub tcp_telemetry: bool,
}

/// Where the data path loads the latest snapshot from.
pub type SnapshotReader = Arc<ArcSwap<Snapshot>>;

/// An empty snapshot: nothing listed, so everything fails closed until the first real one.
pub fn reader() -> SnapshotReader {
    Arc::new(ArcSwap::from_pointee(Snapshot::default()))
}

impl Snapshot {
    /// Compiles what `node` needs from `state` (control runtime, once per change), with no DNS
    /// answers (ServiceEntries resolved by DNS have no endpoints).
    pub fn build(state: Arc<State>, root_namespace: &str, node: &str) -> Snapshot {
        Snapshot::build_with_dns(state, root_namespace, node, &DnsAnswers::default())
    }

    /// As [`Snapshot::build`], with what the node's resolver answered for the names
    /// ServiceEntries ask to resolve (`crate::dns`).
    pub fn build_with_dns(
        state: Arc<State>,
        root_namespace: &str,
        node: &str,
        dns: &DnsAnswers,
    ) -> Snapshot {
        let policies = CompiledPolicies::build_for_node(&state, root_namespace, node);
        let local = state.enrolled_on(node);
        let local_services = services_of(&state, &local);
        let namespaces: std::collections::BTreeSet<&str> =
            local.iter().map(|w| w.namespace.as_str()).collect();
        let (routes, route_problems) =
            crate::routing::compile(&state, root_namespace, namespaces, dns);
        let (mesh, objects, telemetry_problems) = telemetry_inputs(&state, root_namespace);
        let telemetry: HashMap<Key, Arc<EffectiveTelemetry>> = local
            .iter()
            .map(|w| {
                let t =
                    telemetry::resolve(&mesh, &objects, root_namespace, &w.namespace, &w.labels);
                (w.key(), Arc::new(t))
            })
            .collect();
        let default_telemetry = Arc::new(telemetry::resolve(
            &mesh,
            &objects,
            root_namespace,
            root_namespace,
            &Default::default(),
        ));
        let tcp_telemetry = telemetry
            .values()
            .any(|t| t.client.shapes_tcp() || t.server.shapes_tcp());
        Snapshot {
            state,
            policies,
            local_services,
            routes,
            route_problems,
            telemetry,
            default_telemetry,
            telemetry_problems,
            tcp_telemetry,
        }
    }

    /// The observability settings of the workload `key` (`namespace/name`) of this node (the
    /// defaults for any other).
    pub fn telemetry_of(&self, key: &str) -> &Arc<EffectiveTelemetry> {
        self.telemetry.get(key).unwrap_or(&self.default_telemetry)
    }

    /// Whether `key` names a cluster of this snapshot: one a DestinationRule shapes for a client
    /// namespace here, or a Service port's own. Load-balancer state of other clusters is dropped.
    pub fn has_cluster(&self, key: &ClusterKey) -> bool {
        self.routes
            .namespaces
            .values()
            .any(|n| n.clusters.contains_key(key))
            || (key.subset.is_none()
                && self
                    .state
                    .service_by_host(&key.host)
                    .is_some_and(|s| s.port(key.port).is_some()))
    }

    /// The shaped clusters whose load balancer builds a table (consistent hash), so the control
    /// side can build it before the data path needs it.
    pub fn hashed_clusters(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.routes
            .namespaces
            .values()
            .flat_map(|n| n.clusters.values())
            .filter(|c| matches!(c.policy.lb, crate::routing::LbPolicy::ConsistentHash { .. }))
    }

    /// The Service an inbound connection to `pod`'s `port` was addressed to, if one selects it.
    pub fn local_service(&self, namespace: &str, name: &str, port: u16) -> Option<&Arc<Service>> {
        self.local_services
            .get(&key(namespace, name))?
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, s)| s)
    }
}

/// The mesh config (the `istio` ConfigMap of the root namespace, else Istio's defaults), the
/// Telemetry objects whose providers it defines (oldest first), and one problem per provider
/// reference it does not define: such an object is left out whole, the others apply.
pub fn telemetry_inputs(
    state: &State,
    root_namespace: &str,
) -> (MeshConfig, Vec<Arc<TelemetryObject>>, Vec<ObjectError>) {
    let mesh = state
        .istio
        .get(&crate::state::istio_key(
            Kind::ConfigMap,
            root_namespace,
            MESH_CONFIG_MAP,
        ))
        .and_then(|c| match &**c {
            IstioConfig::MeshConfig(m) => Some(m.mesh.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for c in state.istio.values() {
        let IstioConfig::Telemetry(t) = &**c else {
            continue;
        };
        let errors = telemetry::unknown_providers(&mesh, &t.spec);
        if errors.is_empty() {
            objects.push(Arc::new((**t).clone()));
        } else {
            let oref = ObjectRef::new(
                Kind::Telemetry,
                t.namespace().unwrap_or("default"),
                t.name(),
            );
            problems.extend(
                errors
                    .into_iter()
                    .map(|e| ObjectError::new(&oref, e.field, e.message)),
            );
        }
    }
    telemetry::sort_by_creation(&mut objects);
    problems.sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
    (mesh, objects, problems)
}

/// The Services selecting each of `pods`, by the target port each Service port resolves to.
fn services_of(state: &State, pods: &[Arc<Workload>]) -> HashMap<Key, Vec<(u16, Arc<Service>)>> {
    let mut by_ns: HashMap<&str, Vec<&Arc<Workload>>> = HashMap::new();
    for w in pods {
        by_ns.entry(w.namespace.as_str()).or_default().push(w);
    }
    let mut out: HashMap<Key, Vec<(u16, Arc<Service>)>> = HashMap::new();
    if by_ns.is_empty() {
        return out;
    }
    for svc in state.services.values() {
        let Some(pods) = by_ns.get(svc.namespace.as_str()) else {
            continue;
        };
        // Kubernetes: a Service without a selector selects no pod.
        if svc.selector.is_empty() {
            continue;
        }
        for w in pods {
            if !svc.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
                continue;
            }
            for p in &svc.ports {
                let target = match &p.target_port {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Named(name) => w.named_ports.get(name).copied(),
                };
                if let Some(target) = target {
                    out.entry(w.key()).or_default().push((target, svc.clone()));
                }
            }
        }
    }
    for services in out.values_mut() {
        // Stable: the first Service by name wins when several select the same port.
        services.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    }
    out
}

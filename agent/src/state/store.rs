//! Applies source events to the state: converts each object through the validated path, keeps
//! the last good version of an object that is rejected, and publishes snapshots atomically.
//! Readers (`Store::reader`) never block the store and never see a half-applied batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::debug;

use super::convert::{convert, item_ref, Item};
use super::{fqdn, istio_key, key, Key, RejectedPolicy, State};
use crate::config::istio::{undefined_subsets, IstioConfig};
use crate::config::{Kind, Object, ObjectError, ObjectRef, PolicyScope, Rejected, SourceEvent};

/// The latest published snapshot, shared with the data path.
pub type StateReader = Arc<ArcSwap<State>>;

/// What a current problem with an object means for the data path: said in the one log line and
/// the status, so an operator reads the consequence and not only the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Accepted; only the feature the field controls is off.
    Warning,
    /// Rejected; the version applied before stays in force.
    KeptLastGood,
    /// Rejected, and no earlier version was ever applied.
    NotApplied,
    /// A rejected AuthorizationPolicy: the workloads it selects deny every connection.
    FailClosed,
}

impl Effect {
    pub fn describe(self) -> &'static str {
        match self {
            Effect::Warning => "accepted without this setting",
            Effect::KeptLastGood => "rejected; its last good version stays in force",
            Effect::NotApplied => "rejected; not applied",
            Effect::FailClosed => {
                "rejected; fail closed: the workloads it selects deny every connection until it is fixed"
            }
        }
    }
}

pub struct Store {
    state: State,
    /// Current problems per object (rejections, and warnings on accepted objects), with what each
    /// does to the data path.
    errors: BTreeMap<ObjectRef, (Effect, Vec<ObjectError>)>,
    /// EndpointSlice → the Service key it is filed under.
    slice_owner: BTreeMap<ObjectRef, Key>,
    rejected_total: u64,
    published: StateReader,
    changed: bool,
    /// Services whose endpoint sets must be compiled again before the next publish.
    dirty_endpoints: BTreeSet<Key>,
}

impl Store {
    pub fn new(domain: &str) -> Self {
        let state = State::new(domain);
        Store {
            published: Arc::new(ArcSwap::from_pointee(state.clone())),
            state,
            errors: BTreeMap::new(),
            slice_owner: BTreeMap::new(),
            rejected_total: 0,
            changed: false,
            dirty_endpoints: BTreeSet::new(),
        }
    }

    pub fn reader(&self) -> StateReader {
        self.published.clone()
    }

    /// The working state (not yet published changes included).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Every current problem, ordered by object.
    pub fn errors(&self) -> Vec<ObjectError> {
        self.errors
            .values()
            .flat_map(|(_, e)| e.iter().cloned())
            .collect()
    }

    /// Every current problem with what it does to the data path, ordered by object.
    pub fn problems(&self) -> Vec<(ObjectError, Effect)> {
        self.errors
            .values()
            .flat_map(|(effect, errors)| errors.iter().map(move |e| (e.clone(), *effect)))
            .collect()
    }

    /// Objects rejected since start (a counter for metrics).
    pub fn rejected_total(&self) -> u64 {
        self.rejected_total
    }

    /// Publishes the working state if anything changed since the last publish. Returns whether it
    /// did. O(1): the persistent maps are shared, not copied.
    pub fn publish(&mut self) -> bool {
        if !std::mem::take(&mut self.changed) {
            return false;
        }
        self.compile_endpoints();
        self.published.store(Arc::new(self.state.clone()));
        true
    }

    /// Compiles the endpoint sets of the Services whose Service object or slices changed: work in
    /// proportion to what changed, not to the cluster.
    fn compile_endpoints(&mut self) {
        for k in std::mem::take(&mut self.dirty_endpoints) {
            match self.state.services.get(&k).cloned() {
                Some(svc) => {
                    let compiled = self.state.compile_endpoints(&svc);
                    if self.state.endpoints.get(&k).map(|e| &**e) != Some(&compiled) {
                        self.state.endpoints.insert(k, Arc::new(compiled));
                    }
                }
                None => {
                    self.state.endpoints.remove(&k);
                }
            }
        }
    }

    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Apply(obj) => self.apply_one(obj, None),
            SourceEvent::Reject(r) => self.reject(r),
            SourceEvent::Delete(oref) => {
                self.errors.remove(&oref);
                self.unbreak(&oref);
                self.remove(&oref);
            }
            SourceEvent::Replace {
                kinds,
                objects,
                rejected,
                origins,
            } => {
                let present: BTreeSet<ObjectRef> = objects
                    .iter()
                    .map(|o| o.object_ref())
                    .chain(rejected.iter().map(|r| r.object.clone()))
                    .collect();
                for gone in self
                    .refs_of(&kinds)
                    .into_iter()
                    .filter(|r| !present.contains(r))
                {
                    self.errors.remove(&gone);
                    self.unbreak(&gone);
                    self.remove(&gone);
                }
                if kinds.contains(&Kind::AuthorizationPolicy) {
                    let stale: Vec<ObjectRef> = self
                        .state
                        .rejected_policies
                        .values()
                        .map(|p| ObjectRef::new(Kind::AuthorizationPolicy, &*p.namespace, &*p.name))
                        .filter(|r| !present.contains(r))
                        .collect();
                    for r in stale {
                        self.unbreak(&r);
                    }
                }
                // Problems of objects no longer listed at all are stale too.
                self.errors
                    .retain(|r, _| !kinds.contains(&r.kind) || present.contains(r));
                // VirtualServices last: their subsets are checked against this batch's DestinationRules.
                let (vs, rest): (Vec<Object>, Vec<Object>) = objects
                    .into_iter()
                    .partition(|o| matches!(o, Object::Istio(IstioConfig::VirtualService(_))));
                for o in rest.into_iter().chain(vs) {
                    let origin = origins.get(&o.object_ref()).cloned();
                    self.apply_one(o, origin);
                }
                for r in rejected {
                    self.reject(r);
                }
                // A Replace is the complete set of its kinds: from now on, absence means absence.
                for kind in kinds {
                    if self.state.synced.insert(kind).is_none() {
                        self.changed = true;
                    }
                }
            }
        }
    }

    fn apply_one(&mut self, obj: Object, origin: Option<String>) {
        let oref = obj.object_ref();
        // Cross-object rule: a route to a subset no DestinationRule defines is rejected.
        if let Object::Istio(IstioConfig::VirtualService(vs)) = &obj {
            let ns = oref.namespace.clone();
            let missing = undefined_subsets(&vs.spec, |host, subset| {
                self.state.has_subset(host, &ns, subset)
            });
            if !missing.is_empty() {
                let errors: Vec<ObjectError> = missing
                    .into_iter()
                    .map(|e| ObjectError {
                        location: origin.clone(),
                        ..ObjectError::new(&oref, e.field, e.message)
                    })
                    .collect();
                return self.reject(Rejected::new(oref, errors));
            }
        }
        let locate = |mut list: Vec<ObjectError>| {
            for e in &mut list {
                e.location = e.location.take().or_else(|| origin.clone());
            }
            list
        };
        match convert(&obj, &self.state.domain) {
            Ok(c) => {
                let warnings = locate(c.warnings);
                if warnings.is_empty() {
                    self.errors.remove(&oref);
                } else {
                    self.errors
                        .insert(oref.clone(), (Effect::Warning, warnings));
                }
                self.unbreak(&oref);
                self.insert(oref, c.item);
            }
            Err(errors) => {
                // Failed validation after parsing: the selector is known from the typed object.
                let scope = match &obj {
                    Object::Istio(IstioConfig::AuthorizationPolicy(ap)) => {
                        Some(match &ap.spec.selector {
                            Some(sel) if !sel.match_labels.is_empty() => {
                                PolicyScope::Selector(sel.match_labels.clone())
                            }
                            _ if ap.spec.target_ref.is_some()
                                || !ap.spec.target_refs.is_empty() =>
                            {
                                PolicyScope::TargetRefs
                            }
                            _ => PolicyScope::Namespace,
                        })
                    }
                    _ => None,
                };
                self.reject(Rejected {
                    object: oref,
                    errors: locate(errors),
                    scope,
                })
            }
        }
    }

    /// Records why an object was rejected; its last good version (if any) stays in force, except
    /// for an AuthorizationPolicy, which fails closed for what it would select (with no readable
    /// scope, its namespace). Logged by whoever reports problems (once each).
    fn reject(&mut self, rejected: Rejected) {
        let Rejected {
            object: oref,
            errors,
            scope,
        } = rejected;
        let effect = if oref.kind == Kind::AuthorizationPolicy {
            Effect::FailClosed
        } else if self.contains(&oref) {
            Effect::KeptLastGood
        } else {
            Effect::NotApplied
        };
        debug!(object = %oref, ?effect, "config object rejected");
        self.rejected_total += 1;
        if oref.kind == Kind::AuthorizationPolicy {
            let policy = RejectedPolicy {
                namespace: oref.namespace.clone(),
                name: oref.name.clone(),
                scope: scope.unwrap_or(PolicyScope::Namespace),
                reason: errors
                    .first()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .unwrap_or_else(|| "rejected".into()),
            };
            let k = key(&oref.namespace, &oref.name);
            if self.state.rejected_policies.get(&k).map(|p| &**p) != Some(&policy) {
                self.state.rejected_policies.insert(k, Arc::new(policy));
                self.changed = true;
            }
        }
        self.errors.insert(oref, (effect, errors));
    }

    /// `oref` is no longer a rejected policy.
    fn unbreak(&mut self, oref: &ObjectRef) {
        if oref.kind == Kind::AuthorizationPolicy
            && self
                .state
                .rejected_policies
                .remove(&key(&oref.namespace, &oref.name))
                .is_some()
        {
            self.changed = true;
        }
    }

    /// Whether the working state holds `oref` (its last good version).
    fn contains(&self, oref: &ObjectRef) -> bool {
        let s = &self.state;
        let k = key(&oref.namespace, &oref.name);
        match oref.kind {
            Kind::Namespace => s.namespaces.contains_key(oref.name.as_str()),
            Kind::Pod => s.workloads.contains_key(&k),
            Kind::Service => s.services.contains_key(&k),
            Kind::EndpointSlice => self.slice_owner.contains_key(oref),
            istio => s
                .istio
                .contains_key(&istio_key(istio, &oref.namespace, &oref.name)),
        }
    }

    /// References of every object of these kinds now in the state.
    fn refs_of(&self, kinds: &[Kind]) -> BTreeSet<ObjectRef> {
        let mut out = BTreeSet::new();
        for kind in kinds {
            match kind {
                Kind::Namespace => out.extend(
                    self.state
                        .namespaces
                        .keys()
                        .map(|n| ObjectRef::new(Kind::Namespace, "", n.to_string())),
                ),
                Kind::Pod => out.extend(
                    self.state
                        .workloads
                        .values()
                        .map(|w| ObjectRef::new(Kind::Pod, w.namespace.clone(), w.name.clone())),
                ),
                Kind::Service => {
                    out.extend(self.state.services.values().map(|s| {
                        ObjectRef::new(Kind::Service, s.namespace.clone(), s.name.clone())
                    }))
                }
                Kind::EndpointSlice => out.extend(self.slice_owner.keys().cloned()),
                istio => out.extend(
                    self.state
                        .istio
                        .values()
                        .map(|c| super::convert::item_ref(&Item::Istio(c.clone())))
                        .filter(|r| r.kind == *istio),
                ),
            }
        }
        out
    }

    fn insert(&mut self, oref: ObjectRef, item: Item) {
        debug_assert_eq!(item_ref(&item), oref);
        let s = &mut self.state;
        match item {
            Item::Namespace(n) => {
                if s.namespaces
                    .get(n.name.as_str())
                    .is_some_and(|old| **old == n)
                {
                    return;
                }
                s.namespaces.insert(Arc::from(n.name.as_str()), Arc::new(n));
            }
            Item::Workload(w) => {
                let k = w.key();
                if s.workloads.get(&k).is_some_and(|old| **old == w) {
                    return;
                }
                self.remove(&oref);
                let s = &mut self.state;
                for ip in &w.ips {
                    s.workload_by_ip.insert(*ip, k.clone());
                }
                s.workloads.insert(k, Arc::new(w));
            }
            Item::Service(svc) => {
                let k = svc.key();
                if s.services.get(&k).is_some_and(|old| **old == svc) {
                    return;
                }
                self.remove(&oref);
                let s = &mut self.state;
                for ip in &svc.vips {
                    s.service_by_vip.insert(*ip, k.clone());
                }
                s.service_by_host
                    .insert(Arc::from(svc.hostname.as_str()), k.clone());
                self.dirty_endpoints.insert(k.clone());
                s.services.insert(k, Arc::new(svc));
            }
            Item::Slice(slice) => {
                let owner = key(&slice.namespace, &slice.service);
                let name: Arc<str> = Arc::from(slice.name.as_str());
                if s.slices
                    .get(&owner)
                    .and_then(|m| m.get(&name))
                    .is_some_and(|old| **old == slice)
                {
                    return;
                }
                self.remove(&oref);
                let s = &mut self.state;
                let mut slices = s.slices.get(&owner).cloned().unwrap_or_default();
                slices.insert(name, Arc::new(slice));
                s.slices.insert(owner.clone(), slices);
                self.dirty_endpoints.insert(owner.clone());
                self.slice_owner.insert(oref, owner);
            }
            Item::Istio(config) => {
                let k = istio_key(oref.kind, &oref.namespace, &oref.name);
                if s.istio.get(&k).is_some_and(|old| **old == *config) {
                    return;
                }
                self.remove(&oref);
                let s = &mut self.state;
                for host in istio_hosts(&config, &oref.namespace, &s.domain) {
                    let entry = (oref.kind, Arc::from(host.as_str()));
                    let mut set = s.istio_by_host.get(&entry).cloned().unwrap_or_default();
                    set.insert(k.clone());
                    s.istio_by_host.insert(entry, set);
                }
                let entry = (oref.kind, Arc::from(oref.namespace.as_str()));
                let mut set = s
                    .istio_by_namespace
                    .get(&entry)
                    .cloned()
                    .unwrap_or_default();
                set.insert(k.clone());
                s.istio_by_namespace.insert(entry, set);
                if let IstioConfig::ServiceEntry(se) = &*config {
                    for ip in se
                        .spec
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
                    {
                        s.service_entry_by_address.insert(ip, k.clone());
                    }
                }
                s.istio.insert(k, config);
            }
        }
        self.changed = true;
    }

    fn remove(&mut self, oref: &ObjectRef) {
        let s = &mut self.state;
        let k = key(&oref.namespace, &oref.name);
        let removed = match oref.kind {
            Kind::Namespace => s.namespaces.remove(oref.name.as_str()).is_some(),
            Kind::Pod => match s.workloads.remove(&k) {
                Some(old) => {
                    for ip in &old.ips {
                        // Only if the index still points here: a replacement pod may reuse the IP.
                        if s.workload_by_ip.get(ip) == Some(&k) {
                            s.workload_by_ip.remove(ip);
                        }
                    }
                    true
                }
                None => false,
            },
            Kind::Service => match s.services.remove(&k) {
                Some(old) => {
                    for ip in &old.vips {
                        if s.service_by_vip.get(ip) == Some(&k) {
                            s.service_by_vip.remove(ip);
                        }
                    }
                    if s.service_by_host.get(old.hostname.as_str()) == Some(&k) {
                        s.service_by_host.remove(old.hostname.as_str());
                    }
                    self.dirty_endpoints.insert(k.clone());
                    true
                }
                None => false,
            },
            Kind::EndpointSlice => match self.slice_owner.remove(oref) {
                Some(owner) => {
                    self.dirty_endpoints.insert(owner.clone());
                    if let Some(mut slices) = s.slices.get(&owner).cloned() {
                        slices.remove(oref.name.as_str());
                        if slices.is_empty() {
                            s.slices.remove(&owner);
                        } else {
                            s.slices.insert(owner, slices);
                        }
                    }
                    true
                }
                None => false,
            },
            istio => {
                let k = istio_key(istio, &oref.namespace, &oref.name);
                match s.istio.remove(&k) {
                    Some(old) => {
                        for host in istio_hosts(&old, &oref.namespace, &s.domain) {
                            let entry = (istio, Arc::from(host.as_str()));
                            if let Some(mut set) = s.istio_by_host.get(&entry).cloned() {
                                set.remove(&k);
                                if set.is_empty() {
                                    s.istio_by_host.remove(&entry);
                                } else {
                                    s.istio_by_host.insert(entry, set);
                                }
                            }
                        }
                        let entry = (istio, Arc::from(oref.namespace.as_str()));
                        if let Some(mut set) = s.istio_by_namespace.get(&entry).cloned() {
                            set.remove(&k);
                            if set.is_empty() {
                                s.istio_by_namespace.remove(&entry);
                            } else {
                                s.istio_by_namespace.insert(entry, set);
                            }
                        }
                        s.service_entry_by_address.retain(|_, v| *v != k);
                        true
                    }
                    None => {
                        debug!(object = %oref, "delete of an object not in the state");
                        false
                    }
                }
            }
        };
        self.changed |= removed;
    }
}

/// Fully qualified hosts an Istio object is indexed under.
fn istio_hosts(config: &IstioConfig, namespace: &str, domain: &str) -> Vec<String> {
    let hosts: Vec<&String> = match config {
        IstioConfig::VirtualService(o) => o.spec.hosts.iter().collect(),
        IstioConfig::DestinationRule(o) => vec![&o.spec.host],
        IstioConfig::ServiceEntry(o) => o.spec.hosts.iter().collect(),
        IstioConfig::AuthorizationPolicy(_)
        | IstioConfig::PeerAuthentication(_)
        | IstioConfig::Telemetry(_)
        | IstioConfig::MeshConfig(_) => Vec::new(),
    };
    hosts
        .into_iter()
        .map(|h| fqdn(h, namespace, domain))
        .collect()
}

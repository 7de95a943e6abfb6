//! State snapshot → per-workload policy: which AuthorizationPolicies apply to each enrolled
//! workload (compiled to L4 matchers once, shared between workloads) and its effective
//! PeerAuthentication mode per port.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{EffectiveMtls, PolicyNote};
use crate::config::istio::security::{Condition, Operation, Rule, Source};
use crate::config::istio::{
    Action, AuthorizationPolicy, IstioConfig, MtlsMode, PeerAuthentication,
};
use crate::config::{Kind, PolicyScope};
use crate::state::{key, Key, State, Workload};

/// Policies of every enrolled workload, built from one snapshot.
#[derive(Debug, Default)]
pub struct CompiledPolicies {
    /// namespace → name → policy: looked up by `&str` without building a key per connection.
    by_workload: HashMap<Arc<str>, HashMap<Arc<str>, Arc<WorkloadPolicy>>>,
    notes: Vec<PolicyNote>,
}

/// Everything [`super::evaluate`] needs for one workload, and nothing else.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicy {
    pub mtls: PeerAuthnView,
    /// CUSTOM and broken policies selecting the workload: any makes it deny.
    pub(super) fail_closed: Vec<Arc<Authz>>,
    pub(super) deny: Vec<Arc<Authz>>,
    pub(super) allow: Vec<Arc<Authz>>,
    pub(super) audit: Vec<Arc<Authz>>,
}

impl WorkloadPolicy {
    /// `namespace/name` of every AuthorizationPolicy (and broken policy) that applies, sorted.
    pub fn authorization_policies(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = [&self.fail_closed, &self.deny, &self.allow, &self.audit]
            .into_iter()
            .flatten()
            .map(|a| a.key.clone())
            .collect();
        keys.sort();
        keys
    }
}

/// The effective mTLS mode of a workload: one for the workload, overridden per port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthnView {
    pub workload: EffectiveMtls,
    /// Sorted by port.
    pub ports: Vec<(u16, EffectiveMtls)>,
}

impl Default for PeerAuthnView {
    fn default() -> Self {
        PeerAuthnView {
            // Istio: with no PeerAuthentication at all, PERMISSIVE.
            workload: EffectiveMtls {
                mode: MtlsMode::Permissive,
                source: None,
            },
            ports: Vec::new(),
        }
    }
}

impl PeerAuthnView {
    pub fn for_port(&self, port: u16) -> &EffectiveMtls {
        match self.ports.binary_search_by_key(&port, |(p, _)| *p) {
            Ok(i) => &self.ports[i].1,
            Err(_) => &self.workload,
        }
    }
}

/// One AuthorizationPolicy compiled to L4 matchers.
#[derive(Debug)]
pub(super) struct Authz {
    pub key: Key,
    pub action: CompiledAction,
    /// ORed; a policy without rules matches nothing.
    pub rules: Vec<CRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CompiledAction {
    Allow,
    Deny,
    Audit,
    /// CUSTOM, or a policy ambit rejected: the reason.
    FailClosed(Arc<str>),
}

/// ANDed clauses; no clauses (rule `{}`) matches everything.
#[derive(Debug, Default)]
pub(super) struct CRule {
    pub clauses: Vec<Vec<Match>>,
}

/// One source, operation or condition: fields ANDed, values within a field ORed; `not_*` lists
/// match when no value matches. Empty matches everything.
#[derive(Debug, Default, Clone)]
pub(super) struct Match {
    pub src_ips: Vec<IpNet>,
    pub not_src_ips: Vec<IpNet>,
    pub dst_ips: Vec<IpNet>,
    pub not_dst_ips: Vec<IpNet>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub principals: Vec<StrMatch>,
    pub not_principals: Vec<StrMatch>,
    pub namespaces: Vec<StrMatch>,
    pub not_namespaces: Vec<StrMatch>,
    /// `(namespace, service account)`.
    pub service_accounts: Vec<(String, String)>,
    pub not_service_accounts: Vec<(String, String)>,
}

/// Istio's string match: `*` (present), `*suffix`, `prefix*`, exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StrMatch {
    /// istiod stringToMatch: `*` first, then a leading `*`, then a trailing one.
    pub(super) fn parse(v: &str) -> StrMatch {
        if v == "*" {
            StrMatch::Presence
        } else if let Some(s) = v.strip_prefix('*') {
            StrMatch::Suffix(s.to_string())
        } else if let Some(p) = v.strip_suffix('*') {
            StrMatch::Prefix(p.to_string())
        } else {
            StrMatch::Exact(v.to_string())
        }
    }
}

type Selector = Arc<BTreeMap<String, String>>;

/// Selector-scoped entries indexed by the first `matchLabels` pair (key → value → entries), so a
/// workload only looks at selectors that share at least that label with it.
struct LabelIndex<T>(HashMap<String, HashMap<String, Vec<(Selector, T)>>>);

impl<T> Default for LabelIndex<T> {
    fn default() -> Self {
        LabelIndex(HashMap::new())
    }
}

impl<T: Clone> LabelIndex<T> {
    fn insert(&mut self, selector: Selector, item: T) {
        let Some((k, v)) = selector.iter().next() else {
            return;
        };
        let (k, v) = (k.clone(), v.clone());
        self.0
            .entry(k)
            .or_default()
            .entry(v)
            .or_default()
            .push((selector, item));
    }

    /// Every entry whose selector is a subset of `labels`. Each entry is indexed once, so it is
    /// returned at most once.
    fn matching<'a>(
        &'a self,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a T> + 'a {
        labels
            .iter()
            .filter_map(|(k, v)| self.0.get(k.as_str())?.get(v.as_str()))
            .flatten()
            .filter(|(sel, _)| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|(_, item)| item)
    }
}

/// Where a policy applies: the whole scope, or workloads matching a selector.
struct Scoped<T> {
    all: Vec<T>,
    selected: LabelIndex<T>,
}

impl<T> Default for Scoped<T> {
    fn default() -> Self {
        Scoped {
            all: Vec::new(),
            selected: LabelIndex::default(),
        }
    }
}

impl<T: Clone> Scoped<T> {
    fn add(&mut self, selector: Option<&BTreeMap<String, String>>, item: T) {
        match selector {
            // Istio: a selector without labels selects like no selector.
            Some(s) if !s.is_empty() => self.selected.insert(Arc::new(s.clone()), item),
            _ => self.all.push(item),
        }
    }

    fn for_workload<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a T> + 'a {
        self.all.iter().chain(self.selected.matching(&w.labels))
    }
}

/// PeerAuthentication ordering: Istio picks the oldest (creationTimestamp); ambit breaks ties,
/// and orders objects without a timestamp (local files), by name. A missing timestamp sorts
/// first, as Go's zero time does in istiod's `Before`.
#[derive(Clone)]
struct PaRef {
    age: (Option<Time>, String),
    key: Key,
    spec: Arc<PeerAuthentication>,
}

fn oldest<'a>(candidates: impl Iterator<Item = &'a PaRef>) -> Option<&'a PaRef> {
    candidates.min_by(|a, b| a.age.cmp(&b.age))
}

impl CompiledPolicies {
    /// Compiles the policies of every enrolled workload in `state`. A rejected AuthorizationPolicy
    /// (`state.rejected_policies`) replaces an accepted (last good) version of the same name.
    pub fn build(state: &State, root_namespace: &str) -> Self {
        Self::build_where(state, root_namespace, |_| true)
    }

    /// As [`Self::build`], for the enrolled workloads scheduled on `node` only.
    pub fn build_for_node(state: &State, root_namespace: &str, node: &str) -> Self {
        Self::build_where(state, root_namespace, |w| w.node.as_deref() == Some(node))
    }

    fn build_where(state: &State, root: &str, wanted: impl Fn(&Workload) -> bool) -> Self {
        let mut b = Builder::new(root);
        b.add_rejected(state);
        // One pass over the policies, through the state's namespace index.
        for ((kind, ns), keys) in state.istio_by_namespace.iter() {
            let configs = keys.iter().filter_map(|k| state.istio.get(k));
            match kind {
                Kind::AuthorizationPolicy => b.add_authorization_policies(state, ns, configs),
                Kind::PeerAuthentication => b.add_peer_authentications(ns, configs),
                _ => {}
            }
        }
        let unknown = unlisted_policies(state);
        let mut by_workload: HashMap<Arc<str>, HashMap<Arc<str>, Arc<WorkloadPolicy>>> =
            HashMap::new();
        for w in state.workloads.values() {
            if !state.is_enrolled(w) || !wanted(w) {
                continue;
            }
            let mut policy = b.workload_policy(w);
            policy.fail_closed.extend(unknown.clone());
            by_workload
                .entry(Arc::from(w.namespace.as_str()))
                .or_default()
                .insert(Arc::from(w.name.as_str()), Arc::new(policy));
        }
        let mut notes = b.notes;
        notes.sort_by_key(|n| n.to_string());
        notes.dedup();
        CompiledPolicies { by_workload, notes }
    }

    /// The policy of one enrolled workload; `None` for a workload the snapshot does not enrol.
    pub fn for_workload(&self, namespace: &str, name: &str) -> Option<Arc<WorkloadPolicy>> {
        self.by_workload.get(namespace)?.get(name).cloned()
    }

    /// Number of workloads with a compiled policy.
    pub fn len(&self) -> usize {
        self.by_workload.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What an operator should know about the policies (log each once per build).
    pub fn notes(&self) -> &[PolicyNote] {
        &self.notes
    }
}

/// Root-namespace policies are mesh-wide; a selector there selects in every namespace (Istio
/// AuthorizationPolicy reference: "If the authorization policy is in the root namespace, the
/// selector will additionally match with workloads in all namespaces").
/// Policies indexed by where they apply, while one snapshot is compiled.
struct Builder<'s> {
    root: &'s str,
    mesh_authz: Scoped<Arc<Authz>>,
    ns_authz: HashMap<&'s str, Scoped<Arc<Authz>>>,
    mesh_pa: Vec<PaRef>,
    ns_pa: HashMap<&'s str, Vec<PaRef>>,
    ns_pa_selected: HashMap<&'s str, LabelIndex<PaRef>>,
    /// Rejected policies: their accepted (last good) versions are not used.
    rejected: HashSet<Key>,
    notes: Vec<PolicyNote>,
}

impl<'s> Builder<'s> {
    fn new(root: &'s str) -> Self {
        Builder {
            root,
            mesh_authz: Scoped::default(),
            ns_authz: HashMap::new(),
            mesh_pa: Vec::new(),
            ns_pa: HashMap::new(),
            ns_pa_selected: HashMap::new(),
            rejected: HashSet::new(),
            notes: Vec::new(),
        }
    }

    fn authz_scope(&mut self, ns: &'s str) -> &mut Scoped<Arc<Authz>> {
        if ns == self.root {
            &mut self.mesh_authz
        } else {
            self.ns_authz.entry(ns).or_default()
        }
    }

    /// Every rejected AuthorizationPolicy fails closed for what it would select.
    fn add_rejected(&mut self, state: &'s State) {
        for (k, p) in state.rejected_policies.iter() {
            self.rejected.insert(k.clone());
            let selector = match &p.scope {
                PolicyScope::TargetRefs => {
                    self.notes
                        .push(PolicyNote::TargetRefsAtWaypoint { policy: k.clone() });
                    continue;
                }
                PolicyScope::Selector(s) => Some(s),
                PolicyScope::Namespace => None,
            };
            self.notes.push(PolicyNote::FailClosed {
                policy: k.clone(),
                reason: p.reason.clone(),
            });
            let authz = Arc::new(Authz {
                key: k.clone(),
                action: CompiledAction::FailClosed(Arc::from(format!(
                    "AuthorizationPolicy {}/{} was rejected: {}",
                    p.namespace, p.name, p.reason
                ))),
                rules: Vec::new(),
            });
            self.authz_scope(&p.namespace).add(selector, authz);
        }
    }

    fn add_authorization_policies(
        &mut self,
        state: &State,
        ns: &'s str,
        configs: impl Iterator<Item = &'s Arc<IstioConfig>>,
    ) {
        let _ = state;
        for config in configs {
            let IstioConfig::AuthorizationPolicy(o) = &**config else {
                continue;
            };
            let k = key(ns, o.name());
            if self.rejected.contains(&k) {
                continue;
            }
            let ap = &o.spec;
            if ap.target_ref.is_some() || !ap.target_refs.is_empty() {
                // istiod convertAuthorizationPolicy: "TargetRef is not intended for ztunnel".
                self.notes
                    .push(PolicyNote::TargetRefsAtWaypoint { policy: k });
                continue;
            }
            let authz = Arc::new(compile_authz(k, ns, ap, &mut self.notes));
            let selector = ap.selector.as_ref().map(|s| &s.match_labels);
            self.authz_scope(ns).add(selector, authz);
        }
    }

    fn add_peer_authentications(
        &mut self,
        ns: &'s str,
        configs: impl Iterator<Item = &'s Arc<IstioConfig>>,
    ) {
        for config in configs {
            let IstioConfig::PeerAuthentication(o) = &**config else {
                continue;
            };
            let r = PaRef {
                age: (o.metadata.creation_timestamp.clone(), o.name().to_string()),
                key: key(ns, o.name()),
                spec: Arc::new(o.spec.clone()),
            };
            match o.spec.selector.as_ref().map(|s| &s.match_labels) {
                Some(l) if !l.is_empty() => {
                    if ns == self.root {
                        // istiod convertedSelectorPeerAuthentications skips workload-selector
                        // policies in the root namespace.
                        self.notes.push(PolicyNote::PeerAuthnIgnored {
                            policy: r.key,
                            reason: "a workload selector in the root namespace is ignored in ambient mode",
                        });
                        continue;
                    }
                    let sel = Arc::new(l.clone());
                    self.ns_pa_selected.entry(ns).or_default().insert(sel, r);
                }
                _ if ns == self.root => self.mesh_pa.push(r),
                _ => self.ns_pa.entry(ns).or_default().push(r),
            }
        }
    }

    /// The authorization policies and the mTLS view that apply to one workload.
    fn workload_policy(&self, w: &Workload) -> WorkloadPolicy {
        let ns = w.namespace.as_str();
        let mut policy = WorkloadPolicy::default();
        let local = self.ns_authz.get(ns);
        let applying = self
            .mesh_authz
            .for_workload(w)
            .chain(local.into_iter().flat_map(|s| s.for_workload(w)));
        for a in applying {
            let list = match a.action {
                CompiledAction::Allow => &mut policy.allow,
                CompiledAction::Deny => &mut policy.deny,
                CompiledAction::Audit => &mut policy.audit,
                CompiledAction::FailClosed(_) => &mut policy.fail_closed,
            };
            list.push(a.clone());
        }
        for list in [
            &mut policy.fail_closed,
            &mut policy.deny,
            &mut policy.allow,
            &mut policy.audit,
        ] {
            list.sort_by(|a, b| a.key.cmp(&b.key));
        }
        let (ns_level, workload_level) = if ns == self.root {
            (None, None)
        } else {
            (
                oldest(self.ns_pa.get(ns).into_iter().flatten()),
                oldest(
                    self.ns_pa_selected
                        .get(ns)
                        .into_iter()
                        .flat_map(|i| i.matching(&w.labels)),
                ),
            )
        };
        policy.mtls = resolve_mtls(oldest(self.mesh_pa.iter()), ns_level, workload_level);
        policy
    }
}

/// Policies that have not been listed yet cannot be known to be absent: every workload denies
/// until they are (issue 9: a pod is never served with an empty policy set that later fills in).
fn unlisted_policies(state: &State) -> Option<Arc<Authz>> {
    let unlisted: Vec<&str> = [Kind::AuthorizationPolicy, Kind::PeerAuthentication]
        .into_iter()
        .filter(|k| !state.synced.contains(k))
        .map(Kind::as_str)
        .collect();
    (!unlisted.is_empty()).then(|| {
        Arc::new(Authz {
            key: Arc::from("(policies not listed yet)"),
            action: CompiledAction::FailClosed(Arc::from(format!(
                "{} not listed yet: policies cannot be known",
                unlisted.join(" and ")
            ))),
            rules: Vec::new(),
        })
    })
}

/// Istio: mesh (root namespace) → namespace → workload, the most specific set mode wins; UNSET
/// inherits; port-level modes override the workload's for that port (UNSET there inherits the
/// workload's). Mirrors istiod convertedSelectorPeerAuthentications / convertPeerAuthentication.
fn resolve_mtls(
    mesh: Option<&PaRef>,
    namespace: Option<&PaRef>,
    workload: Option<&PaRef>,
) -> PeerAuthnView {
    let mut effective = PeerAuthnView::default().workload;
    for level in [mesh, namespace, workload].into_iter().flatten() {
        let mode = level.spec.mode();
        if mode != MtlsMode::Unset {
            effective = EffectiveMtls {
                mode,
                source: Some(level.key.clone()),
            };
        }
    }
    let ports = workload
        .map(|w| {
            w.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, m)| {
                    let port = u16::try_from(*port).ok()?;
                    let e = match m.mode {
                        MtlsMode::Unset => effective.clone(),
                        mode => EffectiveMtls {
                            mode,
                            source: Some(w.key.clone()),
                        },
                    };
                    Some((port, e))
                })
                .collect()
        })
        .unwrap_or_default();
    PeerAuthnView {
        workload: effective,
        ports,
    }
}

const FOR_ALLOW: &str = "rules using them never match (more restrictive than written)";
const FOR_DENY: &str =
    "they are ignored, so the DENY rules match more (more restrictive than written)";

/// istiod handleRule's L4 `when` keys; every other key needs HTTP or is not sent to ztunnel.
const L4_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn compile_authz(
    key: Key,
    ns: &str,
    ap: &AuthorizationPolicy,
    notes: &mut Vec<PolicyNote>,
) -> Authz {
    let action = match ap.action {
        Action::Allow => CompiledAction::Allow,
        Action::Deny => CompiledAction::Deny,
        Action::Audit => CompiledAction::Audit,
        Action::Custom => {
            // ambit has no external authorizer; CUSTOM is also a validation error upstream.
            let reason = "action CUSTOM is not supported by ambit (no external authorizer)";
            notes.push(PolicyNote::FailClosed {
                policy: key.clone(),
                reason: reason.to_string(),
            });
            return Authz {
                action: CompiledAction::FailClosed(Arc::from(format!(
                    "AuthorizationPolicy {key}: {reason}"
                ))),
                key,
                rules: Vec::new(),
            };
        }
    };
    let mut http = Vec::new();
    let mut rules = Vec::new();
    for rule in &ap.rules {
        match compile_rule(rule, &action, ns, &mut http) {
            Ok(Some(r)) => rules.push(r),
            Ok(None) => {}
            Err(reason) => {
                notes.push(PolicyNote::FailClosed {
                    policy: key.clone(),
                    reason: reason.clone(),
                });
                return Authz {
                    action: CompiledAction::FailClosed(Arc::from(format!(
                        "AuthorizationPolicy {key}: {reason}"
                    ))),
                    key,
                    rules: Vec::new(),
                };
            }
        }
    }
    if !http.is_empty() {
        http.sort();
        http.dedup();
        let effect = if action == CompiledAction::Deny {
            FOR_DENY
        } else {
            FOR_ALLOW
        };
        notes.push(PolicyNote::HttpAttributes {
            policy: key.clone(),
            fields: http.join(", "),
            effect,
        });
    }
    Authz { key, action, rules }
}

/// One rule → ANDed clauses (`to`, `from`, then one per `when`), as istiod handleRule builds
/// them. `Ok(None)`: an ALLOW/AUDIT rule with HTTP attributes, which never matches.
fn compile_rule(
    rule: &Rule,
    action: &CompiledAction,
    ns: &str,
    http: &mut Vec<String>,
) -> Result<Option<CRule>, String> {
    let before = http.len();
    let mut clauses = Vec::new();
    if !rule.to.is_empty() {
        let mut any = Vec::new();
        for to in &rule.to {
            let op = to.operation.clone().unwrap_or_default();
            any.push(operation_match(&op, http)?);
        }
        clauses.push(any);
    }
    if !rule.from.is_empty() {
        let mut any = Vec::new();
        for from in &rule.from {
            let src = from.source.clone().unwrap_or_default();
            any.push(source_match(&src, ns, http)?);
        }
        clauses.push(any);
    }
    for c in &rule.when {
        clauses.push(vec![condition_match(c, http)?]);
    }
    if http.len() > before && *action != CompiledAction::Deny {
        // istiod: "L7 policies never match for ALLOW".
        return Ok(None);
    }
    // DENY: the HTTP parts were left out of their Match. ambit differs from ztunnel here: ztunnel
    // skips a Match left empty, so a DENY entry with only HTTP attributes never fires (fail open,
    // istio/istio#61126); ambit lets an empty Match match everything (fail closed).
    Ok(Some(CRule { clauses }))
}

fn operation_match(op: &Operation, http: &mut Vec<String>) -> Result<Match, String> {
    let l7 = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    note_http(&l7, http);
    Ok(Match {
        ports: ports(&op.ports)?,
        not_ports: ports(&op.not_ports)?,
        ..Match::default()
    })
}

fn source_match(s: &Source, ns: &str, http: &mut Vec<String>) -> Result<Match, String> {
    // istiod httpSources: remoteIpBlocks come from X-Forwarded-For / PROXY protocol, so ztunnel
    // treats them as HTTP attributes.
    let l7 = [
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ];
    note_http(&l7, http);
    Ok(Match {
        src_ips: nets(&s.ip_blocks)?,
        not_src_ips: nets(&s.not_ip_blocks)?,
        principals: s.principals.iter().map(|v| StrMatch::parse(v)).collect(),
        not_principals: s
            .not_principals
            .iter()
            .map(|v| StrMatch::parse(v))
            .collect(),
        namespaces: s.namespaces.iter().map(|v| StrMatch::parse(v)).collect(),
        not_namespaces: s
            .not_namespaces
            .iter()
            .map(|v| StrMatch::parse(v))
            .collect(),
        service_accounts: service_accounts(&s.service_accounts, ns),
        not_service_accounts: service_accounts(&s.not_service_accounts, ns),
        ..Match::default()
    })
}

fn condition_match(c: &Condition, http: &mut Vec<String>) -> Result<Match, String> {
    if !L4_WHEN_KEYS.contains(&c.key.as_str()) {
        http.push(c.key.clone());
        return Ok(Match::default());
    }
    let strs = |v: &[String]| v.iter().map(|v| StrMatch::parse(v)).collect::<Vec<_>>();
    let mut m = Match::default();
    match c.key.as_str() {
        "source.ip" => {
            m.src_ips = nets(&c.values)?;
            m.not_src_ips = nets(&c.not_values)?;
        }
        "destination.ip" => {
            m.dst_ips = nets(&c.values)?;
            m.not_dst_ips = nets(&c.not_values)?;
        }
        "destination.port" => {
            m.ports = ports(&c.values)?;
            m.not_ports = ports(&c.not_values)?;
        }
        "source.namespace" => {
            m.namespaces = strs(&c.values);
            m.not_namespaces = strs(&c.not_values);
        }
        _ => {
            m.principals = strs(&c.values);
            m.not_principals = strs(&c.not_values);
        }
    }
    Ok(m)
}

fn note_http(fields: &[(&str, &Vec<String>)], http: &mut Vec<String>) {
    for (name, values) in fields {
        if !values.is_empty() {
            http.push(name.to_string());
        }
    }
}

/// istiod stringToPort. Values were validated; one that still does not parse makes the policy
/// fail closed rather than silently match less.
fn ports(values: &[String]) -> Result<Vec<u16>, String> {
    values
        .iter()
        .map(|v| {
            v.parse::<u16>()
                .map_err(|_| format!("port {v:?} is not a number in 0..65535"))
        })
        .collect()
}

/// istiod stringToIP: a CIDR, or one address as a full-length prefix.
fn nets(values: &[String]) -> Result<Vec<IpNet>, String> {
    values
        .iter()
        .map(|v| {
            let net = if v.contains('/') {
                v.parse::<IpNet>().ok().map(|n| n.trunc())
            } else {
                v.parse::<IpAddr>().ok().map(IpNet::from)
            };
            net.ok_or_else(|| format!("{v:?} is not an IP address or CIDR"))
        })
        .collect()
}

/// istiod stringToServiceAccountMatch: `ns/sa`, or `sa` in the policy's namespace.
fn service_accounts(values: &[String], ns: &str) -> Vec<(String, String)> {
    values
        .iter()
        .map(|v| match v.split_once('/') {
            Some((n, sa)) => (n.to_string(), sa.to_string()),
            None => (ns.to_string(), v.clone()),
        })
        .collect()
}

#[cfg(test)]
impl WorkloadPolicy {
    /// A workload's policy from AuthorizationPolicy specs that all apply to it (no selection),
    /// for property tests of the decision algebra.
    pub(super) fn from_specs(ns: &str, specs: &[(String, AuthorizationPolicy)]) -> WorkloadPolicy {
        let mut p = WorkloadPolicy::default();
        for (name, spec) in specs {
            let a = Arc::new(compile_authz(key(ns, name), ns, spec, &mut Vec::new()));
            match a.action {
                CompiledAction::Allow => p.allow.push(a),
                CompiledAction::Deny => p.deny.push(a),
                CompiledAction::Audit => p.audit.push(a),
                CompiledAction::FailClosed(_) => p.fail_closed.push(a),
            }
        }
        p
    }
}

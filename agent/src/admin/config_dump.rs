//! Builds [`ConfigDump`] from what the agent really holds: the published [`Snapshot`] (state,
//! compiled policies, compiled routes), the certificate manager's certificates, and the
//! balancers' outlier state. Pure: every input is passed in, so a test builds the same dump the
//! endpoint serves.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;

use super::dump::*;
use crate::config::istio::IstioConfig;
use crate::config::PolicyScope;
use crate::identity::{CertState, Identity};
use crate::policy::EffectiveMtls;
use crate::routing::{
    Action, Cluster, ClusterKey, HashRing, L4Match, LbPolicy, NamespaceRoutes, RequestMatch,
    StrMatch, TlsMatch, VirtualHost,
};
use crate::snapshot::Snapshot;
use crate::state::{PortEndpoints, State, TargetPort};

/// One cluster's outlier state, read from the balancers (`proxy::http::balance::Balancers::
/// ejections`); the app converts it, so this module does not import the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterOutliers {
    /// `outbound|port|subset|host`.
    pub cluster: String,
    /// By detector (`consecutive_5xx`, ...).
    pub ejections_total: BTreeMap<String, u64>,
    pub ejected: Vec<EjectedEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EjectedEndpoint {
    pub address: SocketAddr,
    pub ejections: u32,
    /// Until it returns.
    pub remaining: Duration,
}

/// Everything the dump is built from.
#[derive(Debug)]
pub struct DumpInputs<'a> {
    pub node: &'a str,
    pub trust_domain: &'a str,
    pub root_namespace: &'a str,
    pub snapshot: &'a Snapshot,
    pub certificates: &'a [(Identity, CertState)],
    /// The trust bundle's roots.
    pub roots: &'a [CertificateDer<'static>],
    pub outliers: &'a [ClusterOutliers],
    pub now: SystemTime,
}

pub fn build(i: &DumpInputs<'_>) -> ConfigDump {
    let state = &i.snapshot.state;
    let roots: Vec<CertDump> = i
        .roots
        .iter()
        .map(|der| cert_dump(der, "Root", true))
        .collect();
    ConfigDump {
        node: i.node.to_string(),
        trust_domain: i.trust_domain.to_string(),
        workloads: workloads(state),
        services: services(state),
        policies: policies(state, i.root_namespace),
        peer_authentications: peer_authentications(state, i.root_namespace),
        workload_policies: workload_policies(i.snapshot, i.node),
        routes: routes(i.snapshot),
        clusters: clusters(i.snapshot, i.outliers, i.now),
        certificates: certificates(i.certificates, i.roots, &roots, i.now),
        trust_bundle: roots,
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn workloads(state: &State) -> Vec<WorkloadDump> {
    let mut out: Vec<WorkloadDump> = state
        .workloads
        .values()
        .map(|w| {
            let enrolled = state.is_enrolled(w);
            WorkloadDump {
                uid: w.uid.clone(),
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                node: w.node.clone().unwrap_or_default(),
                workload_ips: w.ips.iter().map(ToString::to_string).collect(),
                service_account: w.service_account.clone(),
                protocol: if enrolled { "HBONE" } else { "TCP" }.into(),
                enrolled,
                workload_name: w.istio.workload.clone(),
                canonical_name: w.istio.canonical_service.clone(),
                canonical_revision: w.istio.canonical_revision.clone(),
                status: if w.running { "Healthy" } else { "Unhealthy" }.into(),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn services(state: &State) -> Vec<ServiceDump> {
    let mut out: Vec<ServiceDump> = state
        .services
        .values()
        .map(|s| {
            let mut endpoints: Vec<EndpointDump> = state
                .slices
                .get(&s.key())
                .into_iter()
                .flat_map(|slices| slices.values())
                .flat_map(|slice| slice.endpoints.iter())
                .map(|e| EndpointDump {
                    address: e.ip.to_string(),
                    workload: e.pod.as_deref().map(str::to_string),
                    node: e.node.clone(),
                    ready: e.ready,
                })
                .collect();
            endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            // The same address in two slices (during a rollout) is one endpoint.
            endpoints.dedup_by(|a, b| a.address == b.address);
            ServiceDump {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
                vips: s.vips.iter().map(ToString::to_string).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| ServicePortDump {
                        port: p.port,
                        name: p.name.clone(),
                        target_port: match &p.target_port {
                            TargetPort::Number(n) => n.to_string(),
                            TargetPort::Named(n) => n.clone(),
                        },
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
                endpoints,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

/// ztunnel's scope names.
fn scope_name(
    selector: Option<&BTreeMap<String, String>>,
    targeted: bool,
    namespace: &str,
    root: &str,
) -> &'static str {
    if targeted {
        "TargetRefs"
    } else if selector.is_some_and(|s| !s.is_empty()) {
        "WorkloadSelector"
    } else if namespace == root {
        "Global"
    } else {
        "Namespace"
    }
}

/// `ALLOW` as ztunnel prints it: `Allow`.
fn title_case(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut chars = lower.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

fn policies(state: &State, root: &str) -> Vec<PolicyDump> {
    let mut out: Vec<PolicyDump> = Vec::new();
    for obj in state.istio.values() {
        let IstioConfig::AuthorizationPolicy(p) = &**obj else {
            continue;
        };
        let namespace = p.namespace().unwrap_or_default().to_string();
        let selector = p.spec.selector.as_ref().map(|s| &s.match_labels);
        let targeted = p.spec.target_ref.is_some() || !p.spec.target_refs.is_empty();
        if state
            .rejected_policies
            .contains_key(&crate::state::key(&namespace, p.name()))
        {
            continue; // listed below, as rejected
        }
        out.push(PolicyDump {
            name: p.name().to_string(),
            scope: scope_name(selector, targeted, &namespace, root).into(),
            namespace,
            action: title_case(p.spec.action.as_str()),
            selector: selector.cloned().unwrap_or_default(),
            rules: p.spec.rules.len(),
            rejected: None,
        });
    }
    for r in state.rejected_policies.values() {
        let (selector, targeted) = match &r.scope {
            PolicyScope::Selector(s) => (Some(s), false),
            PolicyScope::Namespace => (None, false),
            PolicyScope::TargetRefs => (None, true),
        };
        out.push(PolicyDump {
            name: r.name.clone(),
            namespace: r.namespace.clone(),
            scope: scope_name(selector, targeted, &r.namespace, root).into(),
            action: "Deny".into(),
            selector: selector.cloned().unwrap_or_default(),
            rules: 0,
            rejected: Some(r.reason.clone()),
        });
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn peer_authentications(state: &State, root: &str) -> Vec<PeerAuthnDump> {
    let mut out: Vec<PeerAuthnDump> = state
        .istio
        .values()
        .filter_map(|obj| {
            let IstioConfig::PeerAuthentication(p) = &**obj else {
                return None;
            };
            let namespace = p.namespace().unwrap_or_default().to_string();
            let selector = p.spec.selector.as_ref().map(|s| &s.match_labels);
            Some(PeerAuthnDump {
                name: p.name().to_string(),
                scope: scope_name(selector, false, &namespace, root).into(),
                namespace,
                mode: p.spec.mode().as_str().into(),
                port_level_mtls: p
                    .spec
                    .port_level_mtls
                    .iter()
                    .map(|(port, m)| (*port, m.mode.as_str().to_string()))
                    .collect(),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

fn mtls_dump(m: &EffectiveMtls) -> MtlsDump {
    MtlsDump {
        mode: m.mode.as_str().into(),
        source: m.source.as_deref().map(str::to_string),
    }
}

fn workload_policies(snapshot: &Snapshot, node: &str) -> Vec<WorkloadPolicyDump> {
    snapshot
        .state
        .enrolled_on(node)
        .iter()
        .filter_map(|w| {
            let p = snapshot.policies.for_workload(&w.namespace, &w.name)?;
            Some(WorkloadPolicyDump {
                workload: format!("{}/{}", w.namespace, w.name),
                mtls: mtls_dump(&p.mtls.workload),
                port_mtls: p
                    .mtls
                    .ports
                    .iter()
                    .map(|(port, m)| (*port, mtls_dump(m)))
                    .collect(),
                authorization_policies: p
                    .authorization_policies()
                    .iter()
                    .map(|k| k.to_string())
                    .collect(),
            })
        })
        .collect()
}

fn str_match(m: &StrMatch) -> String {
    match m {
        StrMatch::Exact(v) => format!("exact {v}"),
        StrMatch::Prefix(v) => format!("prefix {v}"),
        StrMatch::Regex(r) => format!("regex {}", r.as_str()),
    }
}

fn request_match(m: &RequestMatch) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, v: &Option<StrMatch>| {
        if let Some(v) = v {
            out.push(format!("{name} {}", str_match(v)));
        }
    };
    field("uri", &m.uri);
    field("scheme", &m.scheme);
    field("method", &m.method);
    field("authority", &m.authority);
    for h in &m.headers {
        out.push(match &h.value {
            Some(v) => format!("header {} {}", h.name, str_match(v)),
            None => format!("header {} present", h.name),
        });
    }
    for h in &m.without_headers {
        out.push(format!("withoutHeader {}", h.name));
    }
    for (name, v) in &m.query_params {
        out.push(match v {
            Some(v) => format!("query {name} {}", str_match(v)),
            None => format!("query {name} present"),
        });
    }
    if m.ignore_uri_case {
        out.push("ignoreUriCase".into());
    }
    out.extend(l4_parts(
        m.port,
        &m.source_labels,
        m.source_namespace.as_deref(),
    ));
    out
}

fn l4_parts(
    port: Option<u16>,
    labels: &BTreeMap<String, String>,
    namespace: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = port {
        out.push(format!("port {p}"));
    }
    for (k, v) in labels {
        out.push(format!("sourceLabel {k}={v}"));
    }
    if let Some(ns) = namespace {
        out.push(format!("sourceNamespace {ns}"));
    }
    out
}

fn l4_match(m: &L4Match) -> Vec<String> {
    let mut out: Vec<String> = m
        .destination_subnets
        .iter()
        .map(|n| format!("destinationSubnet {n}"))
        .collect();
    out.extend(l4_parts(
        m.port,
        &m.source_labels,
        m.source_namespace.as_deref(),
    ));
    out
}

fn tls_match(m: &TlsMatch) -> Vec<String> {
    let mut out: Vec<String> = m.sni_hosts.iter().map(|h| format!("sni {h}")).collect();
    out.extend(l4_match(&m.l4));
    out
}

/// Istio: a lone destination receives all traffic whatever its weight (usually unset, 0), so it
/// shows as 100, what it gets; with several, each shows its weight.
fn destinations(d: &[crate::routing::WeightedDestination]) -> Vec<DestinationDump> {
    let lone = d.len() == 1;
    d.iter()
        .map(|d| DestinationDump {
            cluster: d.cluster.to_string(),
            weight: if lone { 100 } else { d.weight },
        })
        .collect()
}

fn virtual_host(hosts: Vec<String>, v: &VirtualHost) -> VirtualHostDump {
    let http = v
        .http
        .iter()
        .map(|r| {
            let mut d = RouteDump {
                name: r.name.as_deref().map(str::to_string),
                matches: r.matches.iter().map(request_match).collect(),
                timeout: r.timeout.map(|t| humantime::format_duration(t).to_string()),
                retries: r.retry.as_ref().map(|p| p.retries),
                mirrors: r.mirrors.iter().map(|m| m.cluster.to_string()).collect(),
                ..RouteDump::default()
            };
            match &r.action {
                Action::Route(dests) => d.destinations = destinations(dests),
                Action::Redirect(re) => {
                    d.redirect = Some(format!(
                        "{} {}{}",
                        re.status.as_u16(),
                        re.authority.as_deref().unwrap_or(""),
                        re.uri.as_deref().unwrap_or("")
                    ))
                }
                Action::DirectResponse { status, .. } => d.direct_response = Some(status.as_u16()),
            }
            d
        })
        .collect();
    VirtualHostDump {
        hosts,
        virtual_service: v.virtual_service.to_string(),
        http,
        tcp: v
            .tcp
            .iter()
            .map(|r| RouteDump {
                matches: r.matches.iter().map(l4_match).collect(),
                destinations: destinations(&r.destinations),
                ..RouteDump::default()
            })
            .collect(),
        tls: v
            .tls
            .iter()
            .map(|r| RouteDump {
                matches: r.matches.iter().map(tls_match).collect(),
                destinations: destinations(&r.destinations),
                ..RouteDump::default()
            })
            .collect(),
    }
}

fn namespace_routes(namespace: &str, r: &NamespaceRoutes) -> NamespaceRoutesDump {
    // One VirtualService naming several hosts is one virtual host with all of them.
    let mut by_vs: HashMap<*const VirtualHost, (Vec<String>, &Arc<VirtualHost>)> = HashMap::new();
    let wildcards = r.wildcards.iter().map(|(suffix, v)| {
        let host = if &**suffix == "*" {
            "*".to_string()
        } else {
            format!("*{suffix}")
        };
        (host, v)
    });
    for (host, v) in r
        .exact
        .iter()
        .map(|(h, v)| (h.to_string(), v))
        .chain(wildcards)
    {
        by_vs
            .entry(Arc::as_ptr(v))
            .or_insert_with(|| (Vec::new(), v))
            .0
            .push(host);
    }
    let mut virtual_hosts: Vec<VirtualHostDump> = by_vs
        .into_values()
        .map(|(mut hosts, v)| {
            hosts.sort();
            virtual_host(hosts, v)
        })
        .collect();
    virtual_hosts
        .sort_by(|a, b| (&a.virtual_service, &a.hosts).cmp(&(&b.virtual_service, &b.hosts)));
    NamespaceRoutesDump {
        namespace: namespace.to_string(),
        virtual_hosts,
    }
}

fn routes(snapshot: &Snapshot) -> Vec<NamespaceRoutesDump> {
    let mut out: Vec<NamespaceRoutesDump> = snapshot
        .routes
        .namespaces
        .iter()
        .map(|(ns, r)| namespace_routes(ns, r))
        .collect();
    out.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    out
}

fn lb_name(lb: &LbPolicy) -> &'static str {
    match lb {
        LbPolicy::LeastRequest => "LEAST_REQUEST",
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::Random => "RANDOM",
        LbPolicy::Passthrough => "PASSTHROUGH",
        LbPolicy::ConsistentHash {
            ring: HashRing::RingHash { .. },
            ..
        } => "RING_HASH",
        LbPolicy::ConsistentHash {
            ring: HashRing::Maglev { .. },
            ..
        } => "MAGLEV",
    }
}

/// A cluster's endpoints with their outlier state at `now`.
fn cluster_dump(
    name: String,
    namespace: Option<String>,
    endpoints: &PortEndpoints,
    cluster: Option<&Cluster>,
    outliers: Option<&ClusterOutliers>,
    now: SystemTime,
) -> ClusterDump {
    let ejected: HashMap<SocketAddr, &EjectedEndpoint> = outliers
        .map(|o| o.ejected.iter().map(|e| (e.address, e)).collect())
        .unwrap_or_default();
    let mut addrs: Vec<SocketAddr> = endpoints
        .v4
        .iter()
        .chain(endpoints.v6.iter())
        .copied()
        .collect();
    // An ejected endpoint gone from the config stays listed until it returns.
    addrs.extend(
        ejected
            .keys()
            .filter(|a| !addrs.contains(a))
            .copied()
            .collect::<Vec<_>>(),
    );
    addrs.sort();
    let endpoints = addrs
        .iter()
        .map(|a| match ejected.get(a) {
            Some(e) => ClusterEndpointDump {
                address: a.to_string(),
                status: EJECTED.into(),
                ejections: e.ejections,
                ejected_until: Some(rfc3339(now + e.remaining)),
            },
            None => ClusterEndpointDump {
                address: a.to_string(),
                status: HEALTHY.into(),
                ejections: 0,
                ejected_until: None,
            },
        })
        .collect();
    ClusterDump {
        name,
        namespace,
        destination_rule: cluster.and_then(|c| c.destination_rule.as_deref().map(str::to_string)),
        lb_policy: lb_name(&cluster.map(|c| c.policy.lb.clone()).unwrap_or_default()).into(),
        outlier_detection: cluster.is_some_and(|c| c.policy.outlier_detection.is_some()),
        endpoints,
        ejections_active: ejected.len() as u64,
        ejections_total: outliers
            .map(|o| o.ejections_total.clone())
            .unwrap_or_default(),
    }
}

/// The clusters DestinationRules shape (per client namespace), then every Service port's own,
/// then any cluster only the balancers still know (an ejection outliving its config).
fn clusters(
    snapshot: &Snapshot,
    outliers: &[ClusterOutliers],
    now: SystemTime,
) -> Vec<ClusterDump> {
    let by_name: HashMap<&str, &ClusterOutliers> =
        outliers.iter().map(|o| (o.cluster.as_str(), o)).collect();
    let mut out = Vec::new();
    let mut shaped: Vec<(&Arc<str>, &ClusterKey, &Arc<Cluster>)> = snapshot
        .routes
        .namespaces
        .iter()
        .flat_map(|(ns, r)| r.clusters.iter().map(move |(k, c)| (ns, k, c)))
        .collect();
    shaped.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
    for (ns, key, c) in shaped {
        let name = key.to_string();
        let o = by_name.get(name.as_str()).copied();
        out.push(cluster_dump(
            name,
            Some(ns.to_string()),
            &c.endpoints,
            Some(c),
            o,
            now,
        ));
    }
    let state = &snapshot.state;
    let mut plain: Vec<(ClusterKey, PortEndpoints)> = Vec::new();
    for s in state.services.values() {
        let compiled = state.endpoints.get(&s.key());
        for p in &s.ports {
            let key = ClusterKey {
                host: Arc::from(s.hostname.as_str()),
                subset: None,
                port: p.port,
            };
            let eps = compiled
                .and_then(|c| c.ports.get(&p.port))
                .cloned()
                .unwrap_or_default();
            plain.push((key, eps));
        }
    }
    plain.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, eps) in plain {
        let name = key.to_string();
        let o = by_name.get(name.as_str()).copied();
        out.push(cluster_dump(name, None, &eps, None, o, now));
    }
    for o in outliers {
        if !out.iter().any(|c| c.name == o.cluster) {
            out.push(cluster_dump(
                o.cluster.clone(),
                None,
                &PortEndpoints::default(),
                None,
                Some(o),
                now,
            ));
        }
    }
    out
}

/// SHA-256 of a certificate, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn cert_dump(der: &CertificateDer<'_>, kind: &str, with_fingerprint: bool) -> CertDump {
    let mut d = CertDump {
        kind: kind.into(),
        fingerprint_sha256: with_fingerprint.then(|| fingerprint(der)),
        ..CertDump::default()
    };
    if let Ok((_, x)) = x509_parser::parse_x509_certificate(der) {
        d.serial_number = x.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
        let at = |t: &x509_parser::time::ASN1Time| {
            let secs = u64::try_from(t.timestamp()).unwrap_or(0);
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        };
        d.valid_from = at(&x.validity().not_before);
        d.expiration_time = at(&x.validity().not_after);
    }
    d
}

/// Raw (subject, issuer) of a certificate, to find the root a chain ends at.
fn subject_issuer(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, x) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((x.subject().as_raw().to_vec(), x.issuer().as_raw().to_vec()))
}

fn certificates(
    certs: &[(Identity, CertState)],
    roots: &[CertificateDer<'static>],
    root_dumps: &[CertDump],
    now: SystemTime,
) -> Vec<CertsDump> {
    let root_subjects: Vec<Option<Vec<u8>>> = roots
        .iter()
        .map(|r| subject_issuer(r).map(|(s, _)| s))
        .collect();
    certs
        .iter()
        .map(|(id, state)| {
            let mut d = CertsDump {
                identity: id.to_string(),
                ..CertsDump::default()
            };
            match state {
                CertState::Initializing => d.state = "Initializing".into(),
                CertState::Unavailable(why) => d.state = format!("Unavailable: {why}"),
                CertState::Available(cert) => {
                    d.state = "Available".into();
                    d.cert_chain = cert
                        .chain
                        .iter()
                        .enumerate()
                        .map(|(n, der)| {
                            let self_signed = subject_issuer(der).is_some_and(|(s, i)| s == i);
                            let kind = match (n, self_signed) {
                                (0, _) => "Leaf",
                                (_, true) => "Root",
                                _ => "Intermediate",
                            };
                            cert_dump(der, kind, kind == "Root")
                        })
                        .collect();
                    let top_issuer = cert
                        .chain
                        .last()
                        .and_then(|c| subject_issuer(c))
                        .map(|(_, i)| i);
                    d.root_fingerprint = top_issuer.and_then(|issuer| {
                        let i = root_subjects
                            .iter()
                            .position(|s| s.as_ref() == Some(&issuer))?;
                        root_dumps[i].fingerprint_sha256.clone()
                    });
                    d.root_certs = root_dumps
                        .iter()
                        .filter(|r| {
                            !d.cert_chain.iter().any(|c| {
                                c.fingerprint_sha256.is_some()
                                    && c.fingerprint_sha256 == r.fingerprint_sha256
                            })
                        })
                        .cloned()
                        .collect();
                    d.expires_in_seconds = Some(match cert.not_after.duration_since(now) {
                        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
                    });
                }
            }
            d
        })
        .collect()
}

/// The section names `/config_dump` has (and `ambit zc` asks for), for error messages.
pub const SECTIONS: &[&str] = &[
    "workloads",
    "services",
    "policies",
    "peerAuthentications",
    "workloadPolicies",
    "routes",
    "clusters",
    "certificates",
    "trustBundle",
];

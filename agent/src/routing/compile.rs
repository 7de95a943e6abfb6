//! VirtualServices, DestinationRules and ServiceEntries → [`Routes`] for the client namespaces of
//! this node, with Istio's rules:
//! - visibility: a VirtualService or DestinationRule applies to a client namespace it is exported
//!   to (`exportTo`: absent or `*` all, `.` its own, `~` none, or names);
//! - hosts: a short name is relative to the namespace of the object naming it; hosts are
//!   compared lowercase; an exact host beats a wildcard, a longer wildcard a shorter one;
//! - several VirtualServices for one host (Istio's IST0109 conflict for the mesh gateway): one in
//!   the client's own namespace first, then the oldest; the others are reported;
//! - DestinationRule lookup path: the client's namespace, then the host's, then the root
//!   namespace; the most specific host there; a subset's traffic policy replaces the rule's field
//!   by field, and port-level settings replace both for their port.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use super::clusters::shaped_clusters;
use super::entries::{compile_entry, DnsAnswers, Entry};
use super::objects::{exported_to, objects, Obj, Spec};
use super::resilience;
use super::{
    Action, ClusterKey, Cors, HeaderEdits, HeaderMatch, HeaderOps, HttpRoute, L4Match,
    NamespaceRoutes, Redirect, RedirectPort, RequestMatch, Rewrite, Routes, StrMatch, TcpRoute,
    TlsMatch, TlsRoute, VirtualHost, WeightedDestination,
};
use crate::config::istio::destination_rule::DestinationRule;
use crate::config::istio::service_entry::ServiceEntry;
use crate::config::istio::virtual_service::{self as vs, VirtualService};
use crate::config::{Kind, ObjectError, ObjectRef};
use crate::state::{fqdn, istio_key, State};

/// Compiles the routes clients in `namespaces` see. Problems found (a conflicting VirtualService,
/// a destination host no Service or ServiceEntry defines, a header value that is not valid) are
/// returned, each naming the object and field; the rest compiles.
pub fn compile<'a>(
    state: &State,
    root: &str,
    namespaces: impl IntoIterator<Item = &'a str>,
    dns: &DnsAnswers,
) -> (Routes, Vec<ObjectError>) {
    let mut notes = Vec::new();
    let virtual_services = objects::<VirtualService>(state, Kind::VirtualService);
    let destination_rules = objects::<DestinationRule>(state, Kind::DestinationRule);
    // Every ServiceEntry's hosts, compiled once, oldest entry first.
    let service_entries: Vec<EntryHosts<'_>> = objects::<ServiceEntry>(state, Kind::ServiceEntry)
        .into_iter()
        .map(|o| {
            let hosts = compile_entry(state, o.namespace, &o.key, o.obj, dns);
            (o, hosts)
        })
        .collect();
    let inputs = Inputs {
        state,
        root,
        virtual_services,
        destination_rules,
        service_entries,
    };
    let mut routes = Routes::default();
    let mut compiled: HashMap<Arc<str>, Arc<VirtualHost>> = HashMap::new();
    for ns in namespaces {
        if routes.namespaces.contains_key(ns) {
            continue;
        }
        let ns_routes = namespace_routes(&inputs, ns, &mut compiled, &mut notes);
        routes.namespaces.insert(Arc::from(ns), Arc::new(ns_routes));
    }
    notes.sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
    notes.dedup();
    (routes, notes)
}

/// A ServiceEntry and its compiled hosts.
type EntryHosts<'a> = (Obj<'a, ServiceEntry>, Vec<(String, Arc<Entry>)>);

/// What every client namespace's routes are compiled from.
struct Inputs<'a> {
    state: &'a State,
    root: &'a str,
    virtual_services: Vec<Obj<'a, VirtualService>>,
    destination_rules: Vec<Obj<'a, DestinationRule>>,
    service_entries: Vec<EntryHosts<'a>>,
}

fn namespace_routes(
    inputs: &Inputs<'_>,
    client: &str,
    compiled: &mut HashMap<Arc<str>, Arc<VirtualHost>>,
    notes: &mut Vec<ObjectError>,
) -> NamespaceRoutes {
    let Inputs {
        state,
        root,
        virtual_services,
        destination_rules,
        service_entries,
    } = inputs;
    let (state, root) = (*state, *root);
    let mut out = NamespaceRoutes::default();
    entries_for(client, service_entries, &mut out, notes);
    // Istio: a client's own namespace's VirtualServices first, then the others, oldest first.
    let visible = virtual_services
        .iter()
        .filter(|v| v.obj.spec.applies_to_mesh())
        .filter(|v| exported_to(v.obj.spec.export_to(), v.namespace, client));
    let (own, others): (Vec<_>, Vec<_>) = visible.partition(|v| v.namespace == client);
    let mut wildcards: Vec<(Arc<str>, Arc<VirtualHost>)> = Vec::new();
    for v in own.into_iter().chain(others) {
        let vhost = compiled
            .entry(v.key.clone())
            .or_insert_with(|| Arc::new(virtual_host(state, v, notes)))
            .clone();
        for (i, host) in v.obj.spec.hosts.iter().enumerate() {
            let host = fqdn(&host.to_ascii_lowercase(), v.namespace, &state.domain);
            let taken = match host.strip_prefix('*') {
                Some(suffix) => {
                    let suffix: Arc<str> = Arc::from(if suffix.is_empty() { "*" } else { suffix });
                    if wildcards.iter().any(|(s, _)| *s == suffix) {
                        true
                    } else {
                        wildcards.push((suffix, vhost.clone()));
                        false
                    }
                }
                None => match out.exact.entry(Arc::from(host.as_str())) {
                    std::collections::hash_map::Entry::Occupied(_) => true,
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(vhost.clone());
                        false
                    }
                },
            };
            if taken {
                notes.push(ObjectError::new(
                    &v.oref,
                    format!("spec.hosts[{i}]"),
                    format!("host {host:?} is already routed by another VirtualService for clients in namespace {client} (Istio IST0109); this one is ignored for it"),
                ));
            }
        }
    }
    // The most specific wildcard first; `*` last.
    wildcards.sort_by(|(a, _), (b, _)| match (&**a, &**b) {
        ("*", "*") => std::cmp::Ordering::Equal,
        ("*", _) => std::cmp::Ordering::Greater,
        (_, "*") => std::cmp::Ordering::Less,
        _ => b.len().cmp(&a.len()),
    });
    out.wildcards = wildcards;
    out.clusters = shaped_clusters(state, root, client, destination_rules, &out.entries, notes);
    out
}

/// The ServiceEntry hosts `client` sees: its own namespace's entries first, then the others
/// exported to it, oldest first; a host a previous entry took is reported for the later one.
fn entries_for(
    client: &str,
    service_entries: &[EntryHosts<'_>],
    out: &mut NamespaceRoutes,
    notes: &mut Vec<ObjectError>,
) {
    let visible = service_entries
        .iter()
        .filter(|(o, _)| exported_to(o.obj.spec.export_to(), o.namespace, client));
    let (own, others): (Vec<_>, Vec<_>) = visible.partition(|(o, _)| o.namespace == client);
    for (o, hosts) in own.into_iter().chain(others) {
        for (i, (host, entry)) in hosts.iter().enumerate() {
            let taken = match host.strip_prefix('*') {
                Some(suffix) => {
                    if out.entry_wildcards.iter().any(|(s, _)| &**s == suffix) {
                        true
                    } else {
                        out.entry_wildcards.push((Arc::from(suffix), entry.clone()));
                        false
                    }
                }
                None => match out.entries.entry(Arc::from(host.as_str())) {
                    std::collections::hash_map::Entry::Occupied(_) => true,
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(entry.clone());
                        false
                    }
                },
            };
            if taken {
                notes.push(ObjectError::new(
                    &o.oref,
                    format!("spec.hosts[{i}]"),
                    format!("host {host:?} is already defined by another ServiceEntry for clients in namespace {client}; this one is ignored for it"),
                ));
            }
        }
    }
    out.entry_wildcards
        .sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
}

fn virtual_host(
    state: &State,
    v: &Obj<'_, VirtualService>,
    notes: &mut Vec<ObjectError>,
) -> VirtualHost {
    let spec = &v.obj.spec;
    let mut cx = Cx {
        state,
        oref: &v.oref,
        namespace: v.namespace,
        notes,
    };
    let http = spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, r)| cx.http_route(i, r))
        .collect();
    let tcp = spec
        .tcp
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let matches: Vec<L4Match> = r
                .matches
                .iter()
                .filter(|m| for_mesh(&m.gateways))
                .map(|m| cx.l4_match(m.into(), !m.gateways.is_empty()))
                .collect();
            // Istio: a route whose every match block is for other gateways is not a route here.
            if matches.is_empty() && !r.matches.is_empty() {
                return None;
            }
            Some(TcpRoute {
                matches,
                destinations: cx.destinations(
                    &format!("spec.tcp[{i}].route"),
                    r.route.iter().map(|d| (&d.destination, d.weight, None)),
                ),
            })
        })
        .collect();
    let tls = spec
        .tls
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let matches: Vec<TlsMatch> = r
                .matches
                .iter()
                .filter(|m| for_mesh(&m.gateways))
                .map(|m| TlsMatch {
                    sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    l4: cx.l4_match(
                        L4Fields {
                            destination_subnets: &m.destination_subnets,
                            port: m.port,
                            source_labels: &m.source_labels,
                            source_namespace: &m.source_namespace,
                        },
                        !m.gateways.is_empty(),
                    ),
                })
                .collect();
            if matches.is_empty() && !r.matches.is_empty() {
                return None;
            }
            Some(TlsRoute {
                matches,
                destinations: cx.destinations(
                    &format!("spec.tls[{i}].route"),
                    r.route.iter().map(|d| (&d.destination, d.weight, None)),
                ),
            })
        })
        .collect();
    VirtualHost {
        virtual_service: istio_key(Kind::VirtualService, v.namespace, v.obj.name()),
        http,
        tcp,
        tls,
    }
}

/// A match block applies to this node's clients when it names no gateway, or `mesh`.
fn for_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == vs::MESH_GATEWAY)
}

static EMPTY_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The L4 match fields TCP and TLS matches share.
struct L4Fields<'a> {
    destination_subnets: &'a [String],
    port: u32,
    source_labels: &'a BTreeMap<String, String>,
    source_namespace: &'a str,
}

impl<'a> From<&'a vs::L4MatchAttributes> for L4Fields<'a> {
    fn from(m: &'a vs::L4MatchAttributes) -> Self {
        L4Fields {
            destination_subnets: &m.destination_subnets,
            port: m.port,
            source_labels: &m.source_labels,
            source_namespace: &m.source_namespace,
        }
    }
}

/// Compiling one VirtualService: its namespace resolves short names; problems name its fields.
struct Cx<'s, 'n> {
    state: &'s State,
    oref: &'s ObjectRef,
    namespace: &'s str,
    notes: &'n mut Vec<ObjectError>,
}

impl Cx<'_, '_> {
    fn note(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.notes.push(ObjectError::new(self.oref, field, message));
    }

    /// One `http` route; None when every match block names gateways other than `mesh` (Istio
    /// leaves such a route out of a sidecar's routes).
    fn http_route(&mut self, i: usize, r: &vs::HttpRoute) -> Option<HttpRoute> {
        let field = format!("spec.http[{i}]");
        let matches: Vec<RequestMatch> = r
            .matches
            .iter()
            .enumerate()
            .filter(|(_, m)| for_mesh(&m.gateways))
            .map(|(j, m)| self.request_match(&format!("{field}.match[{j}]"), m))
            .collect();
        if matches.is_empty() && !r.matches.is_empty() {
            return None;
        }
        let action = if let Some(redirect) = &r.redirect {
            Action::Redirect(self.redirect(redirect))
        } else if let Some(direct) = &r.direct_response {
            Action::DirectResponse {
                status: StatusCode::from_u16(u16::try_from(direct.status).unwrap_or(500))
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body: direct_body(direct),
            }
        } else {
            Action::Route(
                self.destinations(
                    &format!("{field}.route"),
                    r.route
                        .iter()
                        .map(|d| (&d.destination, d.weight, d.headers.as_ref())),
                ),
            )
        };
        Some(HttpRoute {
            name: (!r.name.is_empty()).then(|| Arc::from(r.name.as_str())),
            matches,
            action,
            rewrite: r.rewrite.as_ref().map(|rw| self.rewrite(&field, rw)),
            headers: self.header_ops(&format!("{field}.headers"), r.headers.as_ref()),
            cors: r.cors_policy.as_ref().map(|c| self.cors(&field, c)),
            timeout: r.timeout.filter(|t| !t.is_zero()),
            retry: resilience::retry_policy(r.retries.as_ref()),
            fault: resilience::fault(r.fault.as_ref()),
            mirrors: resilience::mirrors(r, |f, d| self.cluster_key(&format!("{field}.{f}"), d)),
        })
    }

    fn str_match(
        &mut self,
        field: &str,
        m: Option<&crate::config::istio::common::StringMatch>,
    ) -> Option<StrMatch> {
        let m = m?;
        match StrMatch::from_config(m) {
            Ok(m) => m,
            Err(e) => {
                // Validation compiled it already; never expected, but a bad one must not match.
                self.note(field, format!("{e}"));
                Some(never())
            }
        }
    }

    fn request_match(&mut self, field: &str, m: &vs::HttpMatchRequest) -> RequestMatch {
        let headers =
            |cx: &mut Self,
             which: &str,
             list: &BTreeMap<String, crate::config::istio::common::StringMatch>| {
                list.iter()
                    .filter_map(|(name, value)| {
                        let f = format!("{field}.{which}[{name}]");
                        let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                        else {
                            cx.note(f, "not a valid header name");
                            return None;
                        };
                        let value = cx.str_match(&f, Some(value));
                        Some(HeaderMatch { name, value })
                    })
                    .collect::<Vec<_>>()
            };
        RequestMatch {
            name: (!m.name.is_empty()).then(|| Arc::from(m.name.as_str())),
            uri: self.str_match(&format!("{field}.uri"), m.uri.as_ref()),
            scheme: self.str_match(&format!("{field}.scheme"), m.scheme.as_ref()),
            method: self.str_match(&format!("{field}.method"), m.method.as_ref()),
            authority: self.str_match(&format!("{field}.authority"), m.authority.as_ref()),
            headers: headers(self, "headers", &m.headers),
            without_headers: headers(self, "withoutHeaders", &m.without_headers),
            query_params: m
                .query_params
                .iter()
                .map(|(k, v)| {
                    let f = format!("{field}.queryParams[{k}]");
                    (k.clone(), self.str_match(&f, Some(v)))
                })
                .collect(),
            ignore_uri_case: m.ignore_uri_case,
            port: u16::try_from(m.port).ok().filter(|p| *p != 0),
            // Istio `sourceMatchHTTP`: a block naming gateways (`mesh` among them, or it would
            // have been left out) is not narrowed by the client's labels or namespace.
            source_labels: if m.gateways.is_empty() {
                m.source_labels.clone()
            } else {
                BTreeMap::new()
            },
            source_namespace: (m.gateways.is_empty() && !m.source_namespace.is_empty())
                .then(|| m.source_namespace.clone()),
        }
    }

    /// An L4 match block; `gateways_listed`: it names gateways (`mesh` among them), so, as in
    /// Istio, the client's labels and namespace do not narrow it.
    fn l4_match(&mut self, m: L4Fields<'_>, gateways_listed: bool) -> L4Match {
        let m = if gateways_listed {
            L4Fields {
                source_labels: &EMPTY_LABELS,
                source_namespace: "",
                ..m
            }
        } else {
            m
        };
        L4Match {
            destination_subnets: m
                .destination_subnets
                .iter()
                .filter_map(|s| {
                    s.parse::<ipnet::IpNet>()
                        .ok()
                        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
                })
                .collect(),
            port: u16::try_from(m.port).ok().filter(|p| *p != 0),
            source_labels: m.source_labels.clone(),
            source_namespace: (!m.source_namespace.is_empty())
                .then(|| m.source_namespace.to_string()),
        }
    }

    /// Weighted destinations; a host no Service or ServiceEntry defines is reported (requests
    /// to it get 503 UH, as in Istio).
    fn destinations<'d>(
        &mut self,
        field: &str,
        list: impl Iterator<Item = (&'d vs::Destination, i32, Option<&'d vs::Headers>)>,
    ) -> Vec<WeightedDestination> {
        list.enumerate()
            .map(|(j, (d, weight, headers))| WeightedDestination {
                cluster: self.cluster_key(&format!("{field}[{j}].destination"), d),
                weight: u32::try_from(weight.max(0)).unwrap_or(0),
                headers: self.header_ops(&format!("{field}[{j}].headers"), headers),
            })
            .collect()
    }

    /// The cluster a destination names; a host that no Service or ServiceEntry defines is noted.
    fn cluster_key(&mut self, field: &str, d: &vs::Destination) -> ClusterKey {
        let host = fqdn(
            &d.host.to_ascii_lowercase(),
            self.namespace,
            &self.state.domain,
        );
        if !self.state.service_by_host.contains_key(host.as_str())
            && !self
                .state
                .istio_by_host
                .contains_key(&(Kind::ServiceEntry, Arc::from(host.as_str())))
        {
            self.note(
                format!("{field}.host"),
                format!("no Service or ServiceEntry defines host {host:?}: requests routed to it fail with 503"),
            );
        }
        ClusterKey {
            host: Arc::from(host),
            subset: (!d.subset.is_empty()).then(|| Arc::from(d.subset.as_str())),
            // 0: the request's port (Istio: optional when the service has one port).
            port: d
                .port
                .and_then(|p| u16::try_from(p.number).ok())
                .unwrap_or(0),
        }
    }

    fn header_ops(&mut self, field: &str, h: Option<&vs::Headers>) -> HeaderOps {
        let Some(h) = h else {
            return HeaderOps::default();
        };
        HeaderOps {
            request: self.header_edits(&format!("{field}.request"), h.request.as_ref()),
            response: self.header_edits(&format!("{field}.response"), h.response.as_ref()),
        }
    }

    fn header_edits(&mut self, field: &str, ops: Option<&vs::HeaderOperations>) -> HeaderEdits {
        let Some(ops) = ops else {
            return HeaderEdits::default();
        };
        let mut pairs = |which: &str, map: &BTreeMap<String, String>| {
            map.iter()
                .filter_map(|(k, v)| {
                    match (
                        HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        (Ok(k), Ok(v)) => Some((k, v)),
                        _ => {
                            self.note(
                                format!("{field}.{which}[{k}]"),
                                "not a valid header name or value; ignored",
                            );
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        };
        let set = pairs("set", &ops.set);
        let add = pairs("add", &ops.add);
        let remove = ops
            .remove
            .iter()
            .filter_map(|k| HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        HeaderEdits { set, add, remove }
    }

    fn redirect(&mut self, r: &vs::HttpRedirect) -> Redirect {
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Redirect {
            uri: nonempty(&r.uri),
            authority: nonempty(&r.authority),
            port: match (r.port, r.derive_port) {
                (Some(p), _) => RedirectPort::Fixed(u16::try_from(p).unwrap_or(0)),
                (None, Some(vs::RedirectPortSelection::FromRequestPort)) => {
                    RedirectPort::FromRequest
                }
                _ => RedirectPort::ProtocolDefault,
            },
            scheme: nonempty(&r.scheme),
            status: StatusCode::from_u16(u16::try_from(r.code()).unwrap_or(301))
                .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        }
    }

    fn rewrite(&mut self, field: &str, rw: &vs::HttpRewrite) -> Rewrite {
        let authority = (!rw.authority.is_empty())
            .then(|| HeaderValue::from_str(&rw.authority))
            .and_then(|v| {
                v.map_err(|_| {
                    self.note(
                        format!("{field}.rewrite.authority"),
                        "not a valid authority; ignored",
                    )
                })
                .ok()
            });
        let uri_regex = rw.uri_regex_rewrite.as_ref().and_then(|r| {
            match regex::Regex::new(&r.pattern) {
                // The substitution stays in RE2's syntax (`\1`): `rewrite_path` expands it.
                Ok(re) => Some((re, r.rewrite.clone())),
                Err(e) => {
                    self.note(
                        format!("{field}.rewrite.uriRegexRewrite.match"),
                        e.to_string(),
                    );
                    None
                }
            }
        });
        Rewrite {
            uri: (!rw.uri.is_empty()).then(|| rw.uri.clone()),
            authority,
            uri_regex,
        }
    }

    fn cors(&mut self, field: &str, c: &vs::CorsPolicy) -> Cors {
        let mut origins: Vec<StrMatch> = c
            .allow_origin
            .iter()
            .map(|o| StrMatch::Exact(o.clone()))
            .collect();
        for (i, o) in c.allow_origins.iter().enumerate() {
            if let Some(m) =
                self.str_match(&format!("{field}.corsPolicy.allowOrigins[{i}]"), Some(o))
            {
                origins.push(m);
            }
        }
        Cors {
            allow_origins: origins,
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age: c.max_age,
            allow_credentials: c.allow_credentials,
        }
    }
}

/// A match no request can satisfy (NUL never appears in a valid header value or path), for a
/// match that could not be compiled: it fails closed instead of matching everything.
fn never() -> StrMatch {
    StrMatch::Exact("\u{0}".into())
}

fn direct_body(d: &vs::HttpDirectResponse) -> Bytes {
    use base64::Engine as _;
    match &d.body {
        Some(vs::HttpBody {
            string: Some(s), ..
        }) => Bytes::from(s.clone()),
        Some(vs::HttpBody { bytes: Some(b), .. }) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map(Bytes::from)
            .unwrap_or_default(),
        _ => Bytes::new(),
    }
}

#[cfg(test)]
mod tests;

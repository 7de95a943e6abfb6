//! Routing as Istio's sidecars do it, on the client side: VirtualServices, DestinationRules and
//! ServiceEntries compiled (on the control runtime, once per change, `compile`) into what the data
//! path matches per request (`matching`). Istio's order of decisions, in code order:
//! destination host → VirtualService route (first match) → weighted destination (host, subset,
//! port) → DestinationRule traffic policy (subset, then port level) → load balancer → endpoint.
//!
//! What a client sees depends on its namespace (`exportTo`, short host names, the DestinationRule
//! lookup path), so routes are compiled per namespace of this node's pods.

mod clusters;
pub mod compile;
pub mod entries;
pub mod matching;
mod objects;
pub mod resilience;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::config::istio::destination_rule::{ConnectionPoolSettings, OutlierDetection};
use crate::state::{Key, Service, Workload};

pub use compile::compile;

/// What this node's clients route by, per client namespace.
#[derive(Debug, Default)]
pub struct Routes {
    pub namespaces: HashMap<Arc<str>, Arc<NamespaceRoutes>>,
}

/// What one client namespace sees: its VirtualServices by the host they name, and the clusters
/// a DestinationRule shapes (visible to it). A cluster no DestinationRule shapes is a Service
/// port's endpoints as they are (`Snapshot::cluster` makes it on demand).
#[derive(Debug, Default)]
pub struct NamespaceRoutes {
    /// Fully qualified (or as written, for non-service hosts like `bookinfo.com`), lowercase.
    pub exact: HashMap<Arc<str>, Arc<VirtualHost>>,
    /// `*.example.com` hosts as their suffix (`.example.com`), the most specific (longest) first;
    /// `*` last.
    pub wildcards: Vec<(Arc<str>, Arc<VirtualHost>)>,
    pub clusters: HashMap<ClusterKey, Arc<Cluster>>,
    /// ServiceEntry hosts visible to the namespace (lowercase, as written).
    pub entries: HashMap<Arc<str>, Arc<entries::Entry>>,
    /// Wildcard ServiceEntry hosts as their suffix (`.example.com`), longest first.
    pub entry_wildcards: Vec<(Arc<str>, Arc<entries::Entry>)>,
}

/// The routes of one VirtualService for the hosts it names.
#[derive(Debug)]
pub struct VirtualHost {
    /// `VirtualService/namespace/name`, for logs, metrics and the access log's route name.
    pub virtual_service: Key,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<TcpRoute>,
    pub tls: Vec<TlsRoute>,
}

/// One `http` route: first match wins.
#[derive(Debug)]
pub struct HttpRoute {
    pub name: Option<Arc<str>>,
    /// ORed; empty matches every request.
    pub matches: Vec<RequestMatch>,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    /// Route-level header operations (each destination may add its own).
    pub headers: HeaderOps,
    pub cors: Option<Cors>,
    /// Whole-request timeout (Istio: none by default; `0s` is none).
    pub timeout: Option<Duration>,
    /// None: `attempts: 0`; a route without `retries` has Istio's default policy.
    pub retry: Option<resilience::RetryPolicy>,
    pub fault: Option<resilience::Fault>,
    pub mirrors: Vec<resilience::Mirror>,
}

#[derive(Debug)]
pub enum Action {
    /// Weighted destinations (weights are relative; a lone destination takes all).
    Route(Vec<WeightedDestination>),
    Redirect(Redirect),
    DirectResponse {
        status: StatusCode,
        body: Bytes,
    },
}

#[derive(Debug, Clone)]
pub struct WeightedDestination {
    pub cluster: ClusterKey,
    pub weight: u32,
    pub headers: HeaderOps,
}

/// A cluster, as Envoy calls it: (host, subset, port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    /// Fully qualified host of a Service or ServiceEntry.
    pub host: Arc<str>,
    pub subset: Option<Arc<str>>,
    pub port: u16,
}

impl std::fmt::Display for ClusterKey {
    /// Istio's cluster name: `outbound|<port>|<subset>|<host>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "outbound|{}|{}|{}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.host
        )
    }
}

/// A compiled string match. A regex matches the whole value (RE2 full match, as Envoy's
/// `safe_regex`).
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

/// A header (or query parameter) condition: a value match, or presence alone (`{}`).
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: Option<StrMatch>,
}

/// One `match` block of an HTTP route: every condition set must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    pub name: Option<Arc<str>>,
    pub uri: Option<StrMatch>,
    pub scheme: Option<StrMatch>,
    pub method: Option<StrMatch>,
    pub authority: Option<StrMatch>,
    pub headers: Vec<HeaderMatch>,
    pub without_headers: Vec<HeaderMatch>,
    /// (name, value match; None = present).
    pub query_params: Vec<(String, Option<StrMatch>)>,
    /// `exact` and `prefix` URI matches ignore case.
    pub ignore_uri_case: bool,
    /// The destination port.
    pub port: Option<u16>,
    /// The client workload's labels must include these.
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// What matching looks at: one request, where it was going, and who sent it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a http::Method,
    /// `http` or `https` (`x-forwarded-proto` when the client set it, else the connection's).
    pub scheme: &'a str,
    /// `:authority` / `Host`, as sent.
    pub authority: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    /// The destination port.
    pub port: u16,
    pub source: Option<&'a Workload>,
    pub source_namespace: &'a str,
}

/// Header operations of a route or destination, in Istio's order: set, add, remove.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub request: HeaderEdits,
    pub response: HeaderEdits,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits: set replaces, add appends a value, remove deletes.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Redirect {
    /// Replaces the path (and query) when set.
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: RedirectPort,
    pub scheme: Option<String>,
    /// Istio: 301 by default.
    pub status: StatusCode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectPort {
    /// The scheme's default port (the `Location` carries none).
    ProtocolDefault,
    /// The port the request came in on.
    FromRequest,
    Fixed(u16),
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    /// Replaces the matched prefix (prefix match) or the whole path.
    pub uri: Option<String>,
    pub authority: Option<HeaderValue>,
    /// `uriRegexRewrite`: every match of the pattern in the path replaced (RE2 `\1` groups).
    pub uri_regex: Option<(regex::Regex, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct Cors {
    pub allow_origins: Vec<StrMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
}

/// A `tcp` route: the first that matches decides.
#[derive(Debug)]
pub struct TcpRoute {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedDestination>,
}

/// A `tls` route: by SNI.
#[derive(Debug)]
pub struct TlsRoute {
    pub matches: Vec<TlsMatch>,
    pub destinations: Vec<WeightedDestination>,
}

#[derive(Debug, Clone, Default)]
pub struct L4Match {
    pub destination_subnets: Vec<ipnet::IpNet>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct TlsMatch {
    /// As written: exact names or `*.suffix` wildcards.
    pub sni_hosts: Vec<String>,
    pub l4: L4Match,
}

/// A cluster: where requests sent to (host, subset, port) go, and how.
#[derive(Debug)]
pub struct Cluster {
    pub key: ClusterKey,
    /// The Service (or ServiceEntry-backed service) it belongs to, for telemetry.
    pub service: Option<Arc<Service>>,
    /// Ready endpoints by family (the pod behind each is found by address in the snapshot).
    pub endpoints: crate::state::PortEndpoints,
    pub policy: TrafficPolicy,
    /// The DestinationRule that decided the policy, for logs.
    pub destination_rule: Option<Key>,
    /// A ServiceEntry with `resolution: NONE` (or `PASSTHROUGH`): to the original destination.
    pub passthrough: bool,
}

/// A DestinationRule's traffic policy as it applies to one cluster: the subset's, else the
/// rule's, then the port-level settings for the cluster's port.
#[derive(Debug, Clone, Default)]
pub struct TrafficPolicy {
    pub lb: LbPolicy,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum LbPolicy {
    /// Istio's default.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// To the original destination address, not an endpoint.
    Passthrough,
    ConsistentHash {
        key: HashKey,
        ring: HashRing,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie {
        name: String,
        path: String,
        /// When the cookie is absent, one is generated with this lifetime (`Some(0)`: session
        /// cookie); None: no cookie is generated.
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashRing {
    /// Istio: `minimumRingSize` 1024 by default.
    RingHash { minimum_ring_size: u64 },
    /// Istio: `tableSize` 65537 by default.
    Maglev { table_size: u64 },
}

impl Routes {
    /// The VirtualService a client of `namespace` routes `host` (lowercase, fully qualified or as
    /// written) by: an exact host first, then the most specific wildcard (Istio's precedence).
    pub fn virtual_host(&self, namespace: &str, host: &str) -> Option<&Arc<VirtualHost>> {
        let routes = self.namespaces.get(namespace)?;
        routes.exact.get(host).or_else(|| {
            routes
                .wildcards
                .iter()
                .find(|(suffix, _)| &**suffix == "*" || host.ends_with(&**suffix))
                .map(|(_, v)| v)
        })
    }

    /// The ServiceEntry host `host` names for clients of `namespace`: an exact host, then the
    /// longest wildcard.
    pub fn entry(&self, namespace: &str, host: &str) -> Option<&Arc<entries::Entry>> {
        let routes = self.namespaces.get(namespace)?;
        routes.entries.get(host).or_else(|| {
            routes
                .entry_wildcards
                .iter()
                .find(|(suffix, _)| host.ends_with(&**suffix))
                .map(|(_, e)| e)
        })
    }

    /// The entries visible to `namespace` (each once, though it may have several hosts).
    pub fn entries_of(&self, namespace: &str) -> impl Iterator<Item = &Arc<entries::Entry>> {
        self.namespaces.get(namespace).into_iter().flat_map(|r| {
            r.entries
                .values()
                .chain(r.entry_wildcards.iter().map(|(_, e)| e))
        })
    }

    /// The cluster a DestinationRule visible to `namespace` shapes, if one does.
    pub fn shaped_cluster(&self, namespace: &str, key: &ClusterKey) -> Option<&Arc<Cluster>> {
        self.namespaces.get(namespace)?.clusters.get(key)
    }
}

//! VirtualService (networking.istio.io): HTTP, TLS and TCP routing rules for a set of hosts, their
//! documented defaults, and the subset cross-reference the state layer runs against
//! DestinationRules. Validation lives in `route_validation`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::common::{istio_enum, opt_duration, Percent, PortSelector, StringMatch};
use super::FieldError;

/// Traffic routing rules applied when a host is addressed.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VirtualService {
    /// Destination hosts (DNS names, possibly wildcard-prefixed, or IPs). Empty only for a delegate
    /// VirtualService, which a root VirtualService's `delegate` refers to.
    pub hosts: Vec<String>,
    /// Gateways and sidecars that apply these routes. Istio: absent means `mesh` (all sidecars).
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tls: Vec<TlsRoute>,
    pub tcp: Vec<TcpRoute>,
    /// Namespaces this VirtualService is visible to. Istio: absent means all namespaces (`*`).
    pub export_to: Vec<String>,
}

/// Istio's reserved gateway name for all sidecars (and, in ambient mode, waypoints).
pub const MESH_GATEWAY: &str = "mesh";

impl VirtualService {
    /// The gateways the routes apply to, with Istio's default `mesh` when none are listed.
    pub fn effective_gateways(&self) -> Vec<&str> {
        if self.gateways.is_empty() {
            vec![MESH_GATEWAY]
        } else {
            self.gateways.iter().map(String::as_str).collect()
        }
    }

    pub(crate) fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == MESH_GATEWAY)
    }
}

/// The service (and optional subset and port) a request or connection is sent to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Destination {
    pub host: String,
    /// Subset name, defined in the DestinationRule for `host`.
    pub subset: String,
    /// Port on `host`; may be omitted when the service exposes one port.
    pub port: Option<PortSelector>,
}

/// Match conditions and actions for HTTP/1.1, HTTP/2 and gRPC traffic.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: String,
    /// Match blocks are ORed, conditions inside one block ANDed; empty matches everything.
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<HttpRouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub delegate: Option<Delegate>,
    pub rewrite: Option<HttpRewrite>,
    /// Request timeout. Istio: default is disabled.
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub mirror: Option<Destination>,
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<u32>,
    pub mirror_percentage: Option<Percent>,
    pub cors_policy: Option<CorsPolicy>,
    pub headers: Option<Headers>,
}

impl HttpRoute {
    /// Percentage of traffic copied to `mirror`. Istio: absent means 100%.
    pub fn mirror_percentage(&self) -> f64 {
        match (self.mirror_percentage, self.mirror_percent) {
            (Some(p), _) => p.value,
            (None, Some(p)) => f64::from(p),
            (None, None) => 100.0,
        }
    }
}

/// Request header manipulation before forwarding, response manipulation before returning.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct HeaderOperations {
    /// Overwrite these headers.
    pub set: BTreeMap<String, String>,
    /// Append to these headers (a comma-separated list).
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// One match block of an HTTP route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: String,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header keys are lowercase. Istio: `{}` checks only that the header is present.
    pub headers: BTreeMap<String, StringMatch>,
    pub port: u32,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive matching of `exact` and `prefix` URI matches.
    pub ignore_uri_case: bool,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub source_namespace: String,
    pub stat_prefix: String,
}

/// A weighted HTTP destination.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct HttpRouteDestination {
    pub destination: Destination,
    /// Relative weight: a destination receives weight/(sum of weights) of the requests. Istio: a
    /// lone destination receives all traffic whatever its weight; otherwise 0 receives none.
    pub weight: i32,
    pub headers: Option<Headers>,
}

/// A weighted TCP or TLS destination.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct TlsRoute {
    /// Required: SNI-based routing needs at least one match.
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct L4MatchAttributes {
    /// Destination IPs or CIDRs.
    pub destination_subnets: Vec<String>,
    pub port: u32,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub source_namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TlsMatchAttributes {
    /// Required. Each must fall within the VirtualService's hosts.
    pub sni_hosts: Vec<String>,
    pub destination_subnets: Vec<String>,
    pub port: u32,
    pub source_labels: BTreeMap<String, String>,
    pub gateways: Vec<String>,
    pub source_namespace: String,
}

istio_enum! {
    pub enum RedirectPortSelection {
        #[default]
        FromProtocolDefault = "FROM_PROTOCOL_DEFAULT",
        FromRequestPort = "FROM_REQUEST_PORT",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: String,
    pub authority: String,
    /// Oneof with `derivePort`.
    pub port: Option<u32>,
    pub derive_port: Option<RedirectPortSelection>,
    pub scheme: String,
    pub redirect_code: u32,
}

impl HttpRedirect {
    /// The redirect status. Istio: default 301 (Moved Permanently).
    pub fn code(&self) -> u32 {
        if self.redirect_code == 0 {
            301
        } else {
            self.redirect_code
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct HttpDirectResponse {
    pub status: u32,
    pub body: Option<HttpBody>,
}

/// Oneof: a string, or base64-encoded bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Delegate {
    pub name: String,
    /// Istio: defaults to the root VirtualService's namespace.
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: String,
    pub authority: String,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries allowed; 0 disables retries. At most 1 + attempts requests are made.
    pub attempts: i32,
    /// Istio: default is the route's `timeout`.
    #[serde(deserialize_with = "opt_duration")]
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated Envoy retry policies and HTTP status codes.
    pub retry_on: String,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    #[serde(deserialize_with = "opt_duration")]
    pub backoff: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CorsPolicy {
    /// Deprecated: use `allowOrigins`.
    pub allow_origin: Vec<String>,
    pub allow_origins: Vec<StringMatch>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    #[serde(deserialize_with = "opt_duration")]
    pub max_age: Option<Duration>,
    pub allow_credentials: Option<bool>,
}

/// Client-side fault injection: a delay, an abort, or both.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct HttpFaultInjection {
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Delay {
    /// Deprecated integer form of `percentage`.
    pub percent: Option<i32>,
    #[serde(deserialize_with = "opt_duration")]
    pub fixed_delay: Option<Duration>,
    /// Hidden in Istio's docs and refused by its validation ("not supported yet").
    #[serde(deserialize_with = "opt_duration")]
    pub exponential_delay: Option<Duration>,
    pub percentage: Option<Percent>,
}

impl Delay {
    /// Percentage of requests delayed. Istio: "If left unspecified, no request will be delayed."
    pub fn effective_percentage(&self) -> f64 {
        self.percentage
            .map(|p| p.value)
            .or(self.percent.map(f64::from))
            .unwrap_or(0.0)
    }
}

/// Abort. The old integer `percent` is reserved in Istio's current API: it is ignored.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Abort {
    /// Oneof `httpStatus`, `grpcStatus`, `http2Error`.
    pub http_status: Option<i32>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

impl Abort {
    /// Percentage of requests aborted. Istio: "If not specified, no request will be aborted."
    pub fn effective_percentage(&self) -> f64 {
        self.percentage.map_or(0.0, |p| p.value)
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    /// Istio: absent means 100%.
    pub percentage: Option<Percent>,
}

impl VirtualService {
    /// Every destination the routes send traffic to (route, mirror and mirrors), each with the
    /// path of its `Destination` object, e.g. `spec.http[0].route[1].destination`.
    pub fn destinations(&self) -> Vec<(String, &Destination)> {
        let mut out = Vec::new();
        for (i, http) in self.http.iter().enumerate() {
            for (j, rd) in http.route.iter().enumerate() {
                out.push((
                    format!("spec.http[{i}].route[{j}].destination"),
                    &rd.destination,
                ));
            }
            if let Some(m) = &http.mirror {
                out.push((format!("spec.http[{i}].mirror"), m));
            }
            for (j, m) in http.mirrors.iter().enumerate() {
                out.push((
                    format!("spec.http[{i}].mirrors[{j}].destination"),
                    &m.destination,
                ));
            }
        }
        for (i, tls) in self.tls.iter().enumerate() {
            for (j, rd) in tls.route.iter().enumerate() {
                out.push((
                    format!("spec.tls[{i}].route[{j}].destination"),
                    &rd.destination,
                ));
            }
        }
        for (i, tcp) in self.tcp.iter().enumerate() {
            for (j, rd) in tcp.route.iter().enumerate() {
                out.push((
                    format!("spec.tcp[{i}].route[{j}].destination"),
                    &rd.destination,
                ));
            }
        }
        out
    }
}

/// Destinations naming a subset that `has_subset(host, subset)` says is not defined; the state
/// layer answers from its DestinationRules. Hosts are passed as written: resolving short names
/// against the VirtualService's namespace is the caller's job.
pub fn undefined_subsets(
    vs: &VirtualService,
    has_subset: impl Fn(&str, &str) -> bool,
) -> Vec<FieldError> {
    vs.destinations()
        .into_iter()
        .filter(|(_, d)| !d.subset.is_empty() && !has_subset(&d.host, &d.subset))
        .map(|(path, d)| {
            let msg = format!(
                "subset {:?} of host {:?} is not defined by any DestinationRule",
                d.subset, d.host
            );
            FieldError::new(format!("{path}.subset"), msg)
        })
        .collect()
}

//! DestinationRule (networking.istio.io): traffic policy for a host after routing (load balancing,
//! connection pools, outlier detection, client TLS), its named subsets, and Istio's validation.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::common::{
    check_duration, check_export_to, check_fqdn, check_labels, check_percent, check_port,
    check_wildcard_domain, is_dns1123_label, istio_enum, opt_duration, opt_u64, PortSelector,
    Report, WorkloadSelector,
};
use super::virtual_service::RegexRewrite;
use super::FieldError;

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DestinationRule {
    /// Required: a service from the registry (Kubernetes services and ServiceEntry hosts).
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    /// Istio: absent means exported to all namespaces.
    pub export_to: Vec<String>,
    /// Restricts the rule to these workloads in its own namespace.
    pub workload_selector: Option<WorkloadSelector>,
}

impl DestinationRule {
    /// The subset with this name, for the state layer's cross-reference with VirtualServices.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Istio: when unset, auto mTLS picks ISTIO_MUTUAL for mesh workloads, else plaintext.
    pub tls: Option<ClientTlsSettings>,
    /// Istio: port-level settings replace (not merge with) the destination-level ones.
    pub port_level_settings: Vec<PortTrafficPolicy>,
    pub tunnel: Option<TunnelSettings>,
    pub proxy_protocol: Option<ProxyProtocol>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTlsSettings>,
}

/// A named set of a service's endpoints, selected by labels.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Subset {
    pub name: String,
    /// Istio: usually required, but a subset without labels is meaningful for a multi-SNI host
    /// such as an egress gateway, so none is accepted.
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule-level policy for this subset.
    pub traffic_policy: Option<TrafficPolicy>,
}

istio_enum! {
    pub enum SimpleLb {
        /// Istio picks the default, LEAST_REQUEST.
        #[default]
        Unspecified = "UNSPECIFIED",
        /// Deprecated; Istio treats it as LEAST_REQUEST.
        LeastConn = "LEAST_CONN",
        Random = "RANDOM",
        Passthrough = "PASSTHROUGH",
        RoundRobin = "ROUND_ROBIN",
        LeastRequest = "LEAST_REQUEST",
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// Oneof with `consistentHash`.
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHashLb>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
    #[serde(deserialize_with = "opt_duration")]
    pub warmup_duration_secs: Option<Duration>,
}

/// The simple algorithm in effect. Istio (concepts/traffic-management): "By default, Istio uses a
/// least requests load balancing policy"; LEAST_CONN is its deprecated alias.
pub fn effective_simple_lb(lb: Option<&LoadBalancerSettings>) -> SimpleLb {
    match lb.and_then(|lb| lb.simple) {
        None | Some(SimpleLb::Unspecified | SimpleLb::LeastConn) => SimpleLb::LeastRequest,
        Some(other) => other,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ConsistentHashLb {
    /// Hash key, oneof: `httpHeaderName`, `httpCookie`, `useSourceIp`, `httpQueryParameterName`.
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    /// Hash algorithm, oneof; Istio: RingHash when neither is set.
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<MagLev>,
    /// Deprecated: use `ringHash.minimumRingSize`.
    #[serde(deserialize_with = "opt_u64")]
    pub minimum_ring_size: Option<u64>,
    pub http_header_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RingHash {
    /// Istio: defaults to 1024.
    #[serde(deserialize_with = "opt_u64")]
    pub minimum_ring_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct MagLev {
    /// A prime below 5000011. Istio: defaults to 65537.
    #[serde(deserialize_with = "opt_u64")]
    pub table_size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct HttpCookie {
    pub name: String,
    pub path: String,
    /// Generate the cookie with this lifetime when absent; `0s` makes a session cookie.
    #[serde(deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct LocalityLbSetting {
    /// Only one of distribute, failover or failoverPriority (topology labels) may be set.
    pub distribute: Vec<Distribute>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Distribute {
    pub from: String,
    /// Weights per destination locality; they sum to 100.
    pub to: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TcpSettings {
    /// Istio: 0 means the default, 2^32-1.
    pub max_connections: i32,
    #[serde(deserialize_with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(deserialize_with = "opt_duration")]
    pub max_connection_duration: Option<Duration>,
    /// Istio: default 1 hour; `0s` disables the timeout.
    #[serde(deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
}

impl TcpSettings {
    /// Istio: "TCP connection timeout ... Default is 10s."
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(Duration::from_secs(10))
    }
}

/// Istio: unset fields fall back to the OS (Linux: 9 probes, 7200s time, 75s interval).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct TcpKeepalive {
    pub probes: u32,
    #[serde(deserialize_with = "opt_duration")]
    pub time: Option<Duration>,
    #[serde(deserialize_with = "opt_duration")]
    pub interval: Option<Duration>,
}

istio_enum! {
    pub enum H2UpgradePolicy {
        #[default]
        Default = "DEFAULT",
        DoNotUpgrade = "DO_NOT_UPGRADE",
        Upgrade = "UPGRADE",
    }
}

/// Istio: a 0 limit means the default, 2^32-1 (`maxRequestsPerConnection`: unlimited).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpSettings {
    pub http1_max_pending_requests: i32,
    pub http2_max_requests: i32,
    pub max_requests_per_connection: i32,
    pub max_retries: i32,
    /// Istio: default 1 hour.
    #[serde(deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: H2UpgradePolicy,
    pub use_client_protocol: bool,
    pub max_concurrent_streams: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated: use `consecutive5xxErrors` or `consecutiveGatewayErrors`.
    pub consecutive_errors: i32,
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failures: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(deserialize_with = "opt_duration")]
    pub interval: Option<Duration>,
    #[serde(deserialize_with = "opt_duration")]
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: i32,
    pub min_health_percent: i32,
}

impl OutlierDetection {
    /// Istio: "This feature defaults to 5 but can be disabled by setting the value to 0."
    pub fn consecutive_5xx_errors(&self) -> u32 {
        self.consecutive_5xx_errors.unwrap_or(5)
    }

    /// Istio: "Time interval between ejection sweep analysis ... Default is 10s."
    pub fn interval(&self) -> Duration {
        self.interval.unwrap_or(Duration::from_secs(10))
    }

    /// Istio: "Minimum ejection duration ... Default is 30s."
    pub fn base_ejection_time(&self) -> Duration {
        self.base_ejection_time.unwrap_or(Duration::from_secs(30))
    }

    /// Istio: "Maximum % of hosts ... that can be ejected. Defaults to 10%."
    pub fn max_ejection_percent(&self) -> i32 {
        if self.max_ejection_percent == 0 {
            10
        } else {
            self.max_ejection_percent
        }
    }
}

istio_enum! {
    pub enum TlsMode {
        /// Istio's proto default: no TLS to the upstream.
        #[default]
        Disable = "DISABLE",
        Simple = "SIMPLE",
        Mutual = "MUTUAL",
        /// mTLS with Istio's own certificates; all other fields should be empty.
        IstioMutual = "ISTIO_MUTUAL",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ClientTlsSettings {
    pub mode: TlsMode,
    pub client_certificate: String,
    pub private_key: String,
    pub ca_certificates: String,
    pub credential_name: String,
    pub subject_alt_names: Vec<String>,
    pub sni: String,
    /// Istio: default false.
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TunnelSettings {
    /// `CONNECT` (Istio's default when empty) or `POST`.
    pub protocol: String,
    pub target_host: String,
    pub target_port: u32,
}

istio_enum! {
    pub enum ProxyProtocolVersion {
        #[default]
        V1 = "V1",
        V2 = "V2",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct ProxyProtocol {
    pub version: ProxyProtocolVersion,
}

// ---- validation (istio/istio pkg/config/validation ValidateDestinationRule) --------------------

impl DestinationRule {
    /// Istio ValidateDestinationRule. `namespace` is the object's, for the exportTo rules.
    pub fn validate(&self, namespace: Option<&str>) -> Vec<FieldError> {
        let mut r = Report::default();
        if self.host.is_empty() {
            r.err("spec.host", "host is required");
        } else {
            r.check("spec.host", check_wildcard_domain(&self.host));
        }
        if let Some(tp) = &self.traffic_policy {
            check_traffic_policy(&mut r, "spec.trafficPolicy", tp);
        }
        let mut names: Vec<&str> = Vec::new();
        for (i, subset) in self.subsets.iter().enumerate() {
            let field = format!("spec.subsets[{i}]");
            if subset.name.is_empty() {
                r.err(format!("{field}.name"), "subset name cannot be empty");
            } else if !is_dns1123_label(&subset.name) {
                r.err(
                    format!("{field}.name"),
                    format!("subset name is invalid: {}", subset.name),
                );
            } else if names.contains(&subset.name.as_str()) {
                r.err(
                    format!("{field}.name"),
                    format!("duplicate subset names: {}", subset.name),
                );
            }
            names.push(&subset.name);
            check_labels(&mut r, &format!("{field}.labels"), &subset.labels);
            if let Some(tp) = &subset.traffic_policy {
                check_traffic_policy(&mut r, &format!("{field}.trafficPolicy"), tp);
            }
        }
        check_export_to(&mut r, namespace, &self.export_to, false);
        if let Some(selector) = &self.workload_selector {
            selector.check(&mut r, "spec.workloadSelector");
            // Istio: a workload-selected rule is only visible in its own namespace.
            let own = |e: &String| e == "." || Some(e.as_str()) == namespace;
            if self.export_to.len() > 1 {
                let msg = "destination rule with workload selector cannot have multiple entries in exportTo";
                r.err("spec.exportTo", msg);
            } else if self.export_to.first().is_some_and(|e| !own(e)) {
                let msg = "destination rule with workload selector cannot have exportTo beyond current namespace";
                r.err("spec.exportTo", msg);
            }
        }
        r.0
    }
}

fn check_traffic_policy(r: &mut Report, field: &str, tp: &TrafficPolicy) {
    if *tp == TrafficPolicy::default() {
        r.err(
            field.to_string(),
            "traffic policy must have at least one field",
        );
        return;
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        r.err(
            field.to_string(),
            "tunnel and proxyProtocol must not be set together",
        );
    }
    check_policy_parts(
        r,
        field,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let f = format!("{field}.portLevelSettings[{i}]");
        match p.port {
            None => r.err(
                format!("{f}.port"),
                "portTrafficPolicy must have valid port",
            ),
            Some(port) => check_port(r, format!("{f}.port.number"), port.number),
        }
        let empty = p.load_balancer.is_none()
            && p.connection_pool.is_none()
            && p.outlier_detection.is_none()
            && p.tls.is_none();
        if empty {
            r.err(f, "port traffic policy must have at least one field");
        } else {
            check_policy_parts(
                r,
                &f,
                p.load_balancer.as_ref(),
                p.connection_pool.as_ref(),
                p.outlier_detection.as_ref(),
                p.tls.as_ref(),
            );
        }
    }
    if let Some(t) = &tp.tunnel {
        let f = format!("{field}.tunnel");
        if !t.protocol.is_empty() && t.protocol != "CONNECT" && t.protocol != "POST" {
            r.err(
                format!("{f}.protocol"),
                "tunnel protocol must be \"CONNECT\" or \"POST\"",
            );
        }
        if check_fqdn(&t.target_host).is_err() && t.target_host.parse::<std::net::IpAddr>().is_err()
        {
            r.err(
                format!("{f}.targetHost"),
                "tunnel target host must be valid FQDN or IP address",
            );
        }
        check_port(r, format!("{f}.targetPort"), t.target_port);
    }
}

fn check_policy_parts(
    r: &mut Report,
    field: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    outlier: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        check_load_balancer(r, &format!("{field}.loadBalancer"), lb);
    }
    if let Some(pool) = pool {
        check_connection_pool(r, &format!("{field}.connectionPool"), pool);
    }
    if let Some(o) = outlier {
        let f = format!("{field}.outlierDetection");
        check_duration(r, format!("{f}.baseEjectionTime"), o.base_ejection_time);
        check_duration(r, format!("{f}.interval"), o.interval);
        if !o.split_external_local_origin_errors
            && o.consecutive_local_origin_failures.unwrap_or(0) > 0
        {
            let msg = "outlier detection consecutive local origin failures is specified, but split external local origin errors is set to false";
            r.err(format!("{f}.consecutiveLocalOriginFailures"), msg);
        }
        check_percent(
            r,
            format!("{f}.maxEjectionPercent"),
            i64::from(o.max_ejection_percent),
        );
        check_percent(
            r,
            format!("{f}.minHealthPercent"),
            i64::from(o.min_health_percent),
        );
    }
    if let Some(tls) = tls {
        check_tls(r, &format!("{field}.tls"), tls);
    }
}

fn check_load_balancer(r: &mut Report, field: &str, lb: &LoadBalancerSettings) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        r.err(
            field.to_string(),
            "only one of simple or consistentHash may be set",
        );
    }
    if let Some(ch) = &lb.consistent_hash {
        let f = format!("{field}.consistentHash");
        let keys = [
            ch.http_header_name.is_some(),
            ch.http_cookie.is_some(),
            ch.use_source_ip.is_some(),
            ch.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            let msg = "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set";
            r.err(f.clone(), msg);
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            r.err(f.clone(), "only one of ringHash or maglev may be set");
        }
        if ch.http_cookie.as_ref().is_some_and(|c| c.name.is_empty()) {
            r.err(
                format!("{f}.httpCookie.name"),
                "name required for HttpCookie",
            );
        }
        if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
            r.err(
                format!("{f}.minimumRingSize"),
                "only one of MinimumRingSize or Maglev/Ringhash can be specified",
            );
        }
        if let Some(m) = &ch.maglev {
            let size = m.table_size.unwrap_or(0);
            let msg = if size == 0 {
                Some("tableSize must be set for maglev")
            } else if size >= 5_000_011 {
                Some("tableSize must be less than 5000011 for maglev")
            } else if !is_prime(size) {
                Some("tableSize must be a prime number for maglev")
            } else {
                None
            };
            if let Some(msg) = msg {
                r.err(format!("{f}.maglev.tableSize"), msg);
            }
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        check_locality_lb(r, &format!("{field}.localityLbSetting"), l);
    }
    check_duration(
        r,
        format!("{field}.warmupDurationSecs"),
        lb.warmup_duration_secs,
    );
}

/// Envoy's primality test, which Istio copies "to ensure we 100% match Envoy's implementation".
fn is_prime(x: u64) -> bool {
    if x != 0 && x < 4 {
        return true;
    }
    if x & 1 == 0 {
        return false;
    }
    let mut factor = 3;
    while factor * factor <= x {
        if x.is_multiple_of(factor) {
            return false;
        }
        factor += 2;
    }
    true
}

/// Istio ValidateLocalityLbSetting.
fn check_locality_lb(r: &mut Report, field: &str, l: &LocalityLbSetting) {
    if !l.distribute.is_empty() && !l.failover.is_empty() {
        r.err(
            field.to_string(),
            "can not simultaneously specify 'distribute' and 'failover'",
        );
        return;
    }
    const TOPOLOGY: &[&str] = &[
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "topology.istio.io/subzone",
    ];
    if !l.failover.is_empty() {
        if let Some(label) = l
            .failover_priority
            .iter()
            .find(|p| TOPOLOGY.contains(&p.as_str()))
        {
            let msg = format!("can not simultaneously set 'failover' and topology label '{label}' in 'failover_priority'");
            r.err(format!("{field}.failoverPriority"), msg);
        }
    }
    for (i, d) in l.distribute.iter().enumerate() {
        let f = format!("{field}.distribute[{i}]");
        if d.to.values().any(|w| !(1..=100).contains(w)) {
            r.err(
                format!("{f}.to"),
                "locality weight must be in range [1, 100]",
            );
        } else if d.to.values().sum::<u32>() != 100 {
            r.err(
                format!("{f}.to"),
                format!(
                    "total locality weight {} != 100",
                    d.to.values().sum::<u32>()
                ),
            );
        }
    }
    for (i, fo) in l.failover.iter().enumerate() {
        let f = format!("{field}.failover[{i}]");
        if fo.from == fo.to {
            r.err(
                f.clone(),
                "locality lb failover settings must specify different regions",
            );
        }
        if fo.from.contains('/') || fo.to.contains('/') {
            r.err(f, "locality lb failover only specify region");
        }
    }
    // Istio only warns that failover needs outlier detection to take effect.
}

fn check_connection_pool(r: &mut Report, field: &str, pool: &ConnectionPoolSettings) {
    if pool.http.is_none() && pool.tcp.is_none() {
        r.err(
            field.to_string(),
            "connection pool must have at least one field",
        );
    }
    if let Some(h) = &pool.http {
        let f = format!("{field}.http");
        let counts = [
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ];
        for (name, n) in counts {
            if n < 0 {
                r.err(format!("{f}.{name}"), "must be non-negative");
            }
        }
        check_duration(r, format!("{f}.idleTimeout"), h.idle_timeout);
        if h.h2_upgrade_policy == H2UpgradePolicy::Upgrade && h.use_client_protocol {
            r.err(
                format!("{f}.useClientProtocol"),
                "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
            );
        }
    }
    if let Some(t) = &pool.tcp {
        let f = format!("{field}.tcp");
        if t.max_connections < 0 {
            r.err(
                format!("{f}.maxConnections"),
                "max connections must be non-negative",
            );
        }
        check_duration(r, format!("{f}.connectTimeout"), t.connect_timeout);
        check_duration(
            r,
            format!("{f}.maxConnectionDuration"),
            t.max_connection_duration,
        );
        // Istio: an idle timeout of 0s disables it and skips validation.
        check_duration(
            r,
            format!("{f}.idleTimeout"),
            t.idle_timeout.filter(|d| d.as_millis() != 0),
        );
        if let Some(ka) = &t.tcp_keepalive {
            check_duration(r, format!("{f}.tcpKeepalive.time"), ka.time);
            check_duration(r, format!("{f}.tcpKeepalive.interval"), ka.interval);
        }
    }
}

/// Istio ValidateTLS for client TLS settings.
fn check_tls(r: &mut Report, field: &str, tls: &ClientTlsSettings) {
    let skip_verify = tls.insecure_skip_verify == Some(true);
    if skip_verify
        && tls.mode == TlsMode::Simple
        && (!tls.ca_certificates.is_empty()
            || !tls.credential_name.is_empty()
            || !tls.subject_alt_names.is_empty())
    {
        let msg = "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true";
        r.err(field.to_string(), msg);
    }
    if skip_verify
        && tls.mode == TlsMode::Mutual
        && (!tls.ca_certificates.is_empty() || !tls.subject_alt_names.is_empty())
    {
        let msg =
            "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true";
        r.err(field.to_string(), msg);
    }
    let file_based = matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual);
    if file_based && !tls.credential_name.is_empty() {
        let files = [
            &tls.client_certificate,
            &tls.ca_certificates,
            &tls.private_key,
            &tls.ca_crl,
        ];
        if files.iter().any(|f| !f.is_empty()) {
            let msg = "cannot specify client certificates or CA certificate or CA CRL If credentialName is set";
            r.err(field.to_string(), msg);
        }
        return;
    }
    if tls.mode == TlsMode::Mutual {
        if tls.client_certificate.is_empty() {
            r.err(
                format!("{field}.clientCertificate"),
                "client certificate required for mutual tls",
            );
        }
        if tls.private_key.is_empty() {
            r.err(
                format!("{field}.privateKey"),
                "private key required for mutual tls",
            );
        }
    }
}

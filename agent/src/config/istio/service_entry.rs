//! ServiceEntry (networking.istio.io): services added to Istio's registry by hand (external APIs,
//! VMs), with their ports, resolution and endpoints, and Istio's validation of them.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::common::{
    check_export_to, check_fqdn, check_ip_or_cidr, check_labels, check_port, check_wildcard_domain,
    is_dns1123_label, istio_enum, Report,
};
use super::FieldError;

istio_enum! {
    pub enum Location {
        /// Istio's default: outside the mesh (no mTLS, client-side policy).
        #[default]
        MeshExternal = "MESH_EXTERNAL",
        MeshInternal = "MESH_INTERNAL",
    }
}

istio_enum! {
    pub enum Resolution {
        /// Istio's default: connections are already resolved; forward to the original IP.
        #[default]
        None = "NONE",
        /// Use the endpoints' static IPs (or Unix sockets).
        Static = "STATIC",
        Dns = "DNS",
        DnsRoundRobin = "DNS_ROUND_ROBIN",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServiceEntry {
    /// Required: DNS names, possibly wildcard-prefixed.
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDR blocks of the service.
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub location: Location,
    pub resolution: Resolution,
    /// Only one of `endpoints` or `workloadSelector` may be set.
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<EntryWorkloadSelector>,
    /// Istio: absent means exported to all namespaces; `~` means to none.
    pub export_to: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

/// networking.istio.io WorkloadSelector: note `labels`, not `matchLabels`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct EntryWorkloadSelector {
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ServicePort {
    pub number: u32,
    /// HTTP|HTTPS|GRPC|HTTP2|MONGO|TCP|TLS and friends; empty means protocol sniffing.
    pub protocol: String,
    /// Required: a DNS-1123 label, unique in the entry.
    pub name: String,
    pub target_port: u32,
}

impl ServicePort {
    /// Istio: "If unset, default to `number`."
    pub fn target_port(&self) -> u32 {
        if self.target_port == 0 {
            self.number
        } else {
            self.target_port
        }
    }
}

/// One endpoint of a ServiceEntry (the WorkloadEntry message).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadEntry {
    /// An IP, a hostname (DNS resolution only) or `unix:///absolute/path`.
    pub address: String,
    /// Service port name to endpoint port; Istio: takes precedence over `targetPort`.
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub network: String,
    pub locality: String,
    pub weight: u32,
    pub service_account: String,
}

impl WorkloadEntry {
    /// The endpoint port that traffic to `port` is sent to, by Istio's precedence: the endpoint's
    /// port map, then the service port's `targetPort`, then its number.
    pub fn port_for(&self, port: &ServicePort) -> u32 {
        self.ports
            .get(&port.name)
            .copied()
            .unwrap_or_else(|| port.target_port())
    }
}

/// Istio protocol.Parse: the protocols a port may name (case-insensitive).
const PROTOCOLS: &[&str] = &[
    "tcp",
    "udp",
    "grpc",
    "grpc-web",
    "http",
    "http_proxy",
    "http2",
    "https",
    "tls",
    "mongo",
    "redis",
    "mysql",
];

fn is_http(protocol: &str) -> bool {
    matches!(
        protocol.to_ascii_lowercase().as_str(),
        "http" | "http2" | "grpc" | "grpc-web" | "http_proxy"
    )
}

fn is_tls(protocol: &str) -> bool {
    matches!(protocol.to_ascii_lowercase().as_str(), "https" | "tls")
}

const UNIX_PREFIX: &str = "unix://";

impl ServiceEntry {
    /// Istio ValidateServiceEntry. `namespace` is the object's, for the exportTo rules.
    pub fn validate(&self, namespace: Option<&str>) -> Vec<FieldError> {
        let mut r = Report::default();
        if let Some(sel) = &self.workload_selector {
            for (k, v) in &sel.labels {
                let f = format!("spec.workloadSelector.labels.{k}");
                if k.is_empty() {
                    r.err(
                        f,
                        format!("empty key is not supported in selector: \"{k}={v}\""),
                    );
                } else if k.contains('*') || v.contains('*') {
                    r.err(
                        f,
                        format!("wildcard is not supported in selector: \"{k}={v}\""),
                    );
                }
            }
            if !self.endpoints.is_empty() {
                let msg = "only one of WorkloadSelector or Endpoints is allowed in Service Entry";
                r.err("spec.workloadSelector", msg);
            }
        }
        if self.hosts.is_empty() {
            r.err("spec.hosts", "service entry must have at least one host");
        }
        for (i, host) in self.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            if host == "*" {
                r.err(field, format!("invalid host {host}"));
            } else {
                r.check(field, check_wildcard_domain(host));
            }
        }
        let mut cidr = false;
        for (i, address) in self.addresses.iter().enumerate() {
            cidr |= address.contains('/');
            r.check(format!("spec.addresses[{i}]"), check_ip_or_cidr(address));
        }
        if cidr && !matches!(self.resolution, Resolution::None | Resolution::Static) {
            let msg = "CIDR addresses are allowed only for NONE/STATIC resolution types";
            r.err("spec.resolution", msg);
        }
        let mut names: Vec<&str> = Vec::new();
        let mut numbers: Vec<u32> = Vec::new();
        for (i, port) in self.ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            if names.contains(&port.name.as_str()) {
                r.err(
                    format!("{field}.name"),
                    format!("service entry port name {:?} already defined", port.name),
                );
            } else if !is_dns1123_label(&port.name) {
                r.err(
                    format!("{field}.name"),
                    format!("invalid port name: {}", port.name),
                );
            }
            if numbers.contains(&port.number) {
                r.err(
                    format!("{field}.number"),
                    format!("service entry port {} already defined", port.number),
                );
            }
            names.push(&port.name);
            numbers.push(port.number);
            check_port(&mut r, format!("{field}.number"), port.number);
            if port.target_port != 0 {
                check_port(&mut r, format!("{field}.targetPort"), port.target_port);
            }
            if !port.protocol.is_empty()
                && !PROTOCOLS.contains(&port.protocol.to_ascii_lowercase().as_str())
            {
                r.err(
                    format!("{field}.protocol"),
                    format!("unsupported protocol: {}", port.protocol),
                );
            }
        }
        match self.resolution {
            Resolution::None => {
                if !self.endpoints.is_empty() {
                    r.err(
                        "spec.endpoints",
                        "no endpoints should be provided for resolution type none",
                    );
                }
            }
            Resolution::Static => {
                for (i, e) in self.endpoints.iter().enumerate() {
                    self.check_endpoint(&mut r, &format!("spec.endpoints[{i}]"), e, &names, false);
                }
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                if self.endpoints.is_empty() {
                    for (i, host) in self.hosts.iter().enumerate() {
                        if check_fqdn(host).is_err() {
                            let msg = format!("hosts must be FQDN if no endpoints are provided for resolution mode {}", self.resolution);
                            r.err(format!("spec.hosts[{i}]"), msg);
                        }
                    }
                }
                if self.resolution == Resolution::DnsRoundRobin && self.endpoints.len() > 1 {
                    let msg = format!(
                        "there must only be 0 or 1 endpoint for resolution mode {}",
                        self.resolution
                    );
                    r.err("spec.endpoints", msg);
                }
                for (i, e) in self.endpoints.iter().enumerate() {
                    self.check_endpoint(&mut r, &format!("spec.endpoints[{i}]"), e, &names, true);
                }
            }
        }
        // Istio: plain TCP cannot tell several hosts apart unless resolution is NONE.
        if self.resolution != Resolution::None && self.hosts.len() > 1 {
            if let Some(i) = self
                .ports
                .iter()
                .position(|p| !is_http(&p.protocol) && !is_tls(&p.protocol))
            {
                r.err(
                    format!("spec.ports[{i}].protocol"),
                    "multiple hosts provided with non-HTTP, non-TLS ports",
                );
            }
        }
        check_export_to(&mut r, namespace, &self.export_to, true);
        r.0
    }

    /// Istio validateWorkloadEntry for an endpoint; `allow_fqdn` only with DNS resolution.
    fn check_endpoint(
        &self,
        r: &mut Report,
        field: &str,
        e: &WorkloadEntry,
        ports: &[&str],
        allow_fqdn: bool,
    ) {
        let addr = e.address.as_str();
        if addr.is_empty() && e.network.is_empty() {
            r.err(format!("{field}.address"), "address is required");
        }
        if let Some(path) = addr.strip_prefix(UNIX_PREFIX) {
            let ok = path.starts_with('@') || (path.starts_with('/') && !path.ends_with('/'));
            if !ok {
                r.err(
                    format!("{field}.address"),
                    format!("{path} is not an absolute path to a file"),
                );
            }
            if !e.ports.is_empty() {
                r.err(
                    format!("{field}.ports"),
                    format!("unix endpoint {addr} must not include ports"),
                );
            }
            if ports.len() != 1 {
                r.err(
                    format!("{field}.address"),
                    "exactly 1 service port required for unix endpoints",
                );
            }
        } else if !addr.is_empty() && addr.parse::<std::net::IpAddr>().is_err() {
            if !allow_fqdn {
                r.err(
                    format!("{field}.address"),
                    format!("endpoint address {addr:?} is not a valid IP address"),
                );
            } else if check_fqdn(addr).is_err() {
                r.err(
                    format!("{field}.address"),
                    format!("endpoint address {addr:?} is not a valid FQDN or an IP address"),
                );
            }
        }
        for (name, port) in &e.ports {
            let f = format!("{field}.ports.{name}");
            if !ports.contains(&name.as_str()) {
                r.err(
                    f.clone(),
                    format!("endpoint port {name:?} is not defined by the service entry"),
                );
            }
            if !is_dns1123_label(name) {
                r.err(f.clone(), format!("invalid port name: {name}"));
            }
            check_port(r, f, *port);
        }
        check_labels(r, &format!("{field}.labels"), &e.labels);
    }
}

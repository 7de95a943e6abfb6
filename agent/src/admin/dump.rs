//! The shape of `/config_dump`: what the agent holds, as JSON. Field names follow ztunnel's dump
//! (camelCase; `workloads`, `services`, `policies`, `certificates` as istioctl's
//! `ztunnel-config` reads them) plus ambit's own sections: the compiled routes and the clusters
//! with their endpoints' outlier state. Both sides use these types: the admin endpoint writes
//! them, `ambit zc` reads them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConfigDump {
    /// This agent's node.
    pub node: String,
    pub trust_domain: String,
    /// Every pod the agent knows (not only this node's), as ztunnel lists them.
    pub workloads: Vec<WorkloadDump>,
    pub services: Vec<ServiceDump>,
    /// AuthorizationPolicies (ztunnel's `policies`).
    pub policies: Vec<PolicyDump>,
    pub peer_authentications: Vec<PeerAuthnDump>,
    /// What applies to each workload enrolled on this node, as compiled.
    pub workload_policies: Vec<WorkloadPolicyDump>,
    /// Per client namespace on this node: the VirtualServices' routes as compiled.
    pub routes: Vec<NamespaceRoutesDump>,
    pub clusters: Vec<ClusterDump>,
    pub certificates: Vec<CertsDump>,
    /// SHA-256 fingerprints of the roots peers are verified against.
    pub trust_bundle: Vec<CertDump>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadDump {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub workload_ips: Vec<String>,
    pub service_account: String,
    /// ztunnel: `HBONE` for a captured (ambient) workload, `TCP` otherwise.
    pub protocol: String,
    /// Captured by the mesh (namespace in ambient mode, not opted out, running).
    pub enrolled: bool,
    pub workload_name: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    /// ztunnel: `Healthy` for a running pod.
    pub status: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceDump {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<String>,
    pub ports: Vec<ServicePortDump>,
    pub endpoints: Vec<EndpointDump>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServicePortDump {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A number, or the container port's name.
    pub target_port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndpointDump {
    pub address: String,
    /// `namespace/name` of the pod behind it, when the EndpointSlice names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub ready: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyDump {
    pub name: String,
    pub namespace: String,
    /// ztunnel's scopes: `Global` (root namespace, no selector), `Namespace`,
    /// `WorkloadSelector`; and `TargetRefs` (enforced by a waypoint, not here).
    pub scope: String,
    /// `Allow`, `Deny`, `Audit`, `Custom`.
    pub action: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    pub rules: usize,
    /// Rejected by ambit: the workloads it would select deny every connection (fail closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PeerAuthnDump {
    pub name: String,
    pub namespace: String,
    pub scope: String,
    pub mode: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WorkloadPolicyDump {
    /// `namespace/name`.
    pub workload: String,
    /// The effective mTLS mode and the PeerAuthentication it comes from (none: the default).
    pub mtls: MtlsDump,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub port_mtls: BTreeMap<u16, MtlsDump>,
    pub authorization_policies: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MtlsDump {
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NamespaceRoutesDump {
    pub namespace: String,
    pub virtual_hosts: Vec<VirtualHostDump>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualHostDump {
    /// The hosts it answers for (exact, or `*.suffix`).
    pub hosts: Vec<String>,
    /// `VirtualService/namespace/name`.
    pub virtual_service: String,
    pub http: Vec<RouteDump>,
    pub tcp: Vec<RouteDump>,
    pub tls: Vec<RouteDump>,
}

/// One route: its matches (ORed; none = every request) and what it does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteDump {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Each match's conditions (ANDed) as `field op value`, e.g. `uri prefix /api`.
    pub matches: Vec<Vec<String>>,
    pub destinations: Vec<DestinationDump>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retries after the first try (none: `attempts: 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationDump {
    /// Istio's cluster name, `outbound|port|subset|host` (port 0: the request's).
    pub cluster: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterDump {
    /// `outbound|port|subset|host`.
    pub name: String,
    /// The client namespace a DestinationRule shapes it for; none for a Service port's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// `LEAST_REQUEST` (Istio's default), `ROUND_ROBIN`, `RANDOM`, `PASSTHROUGH`,
    /// `RING_HASH`, `MAGLEV`.
    pub lb_policy: String,
    pub outlier_detection: bool,
    pub endpoints: Vec<ClusterEndpointDump>,
    /// Envoy `ejections_active`.
    pub ejections_active: u64,
    /// Envoy `ejections_enforced_total`, by detector.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ejections_total: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterEndpointDump {
    pub address: String,
    /// `HEALTHY` or `EJECTED` (outlier detection took it out).
    pub status: String,
    /// Envoy `num_ejections`: how many times outlier detection ejected it.
    pub ejections: u32,
    /// When an ejected endpoint returns, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_until: Option<String>,
}

pub const HEALTHY: &str = "HEALTHY";
pub const EJECTED: &str = "EJECTED";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertsDump {
    /// The SPIFFE id.
    pub identity: String,
    /// ztunnel: `Available`, `Initializing`, or `Unavailable: <why>`.
    pub state: String,
    /// Leaf first.
    pub cert_chain: Vec<CertDump>,
    /// ztunnel: the roots the workload's certificate is verified against (istioctl prints each
    /// as a `Root` row after the chain); here the trust bundle's, less any the chain holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub root_certs: Vec<CertDump>,
    /// SHA-256 of the trust-bundle root the chain ends at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_fingerprint: Option<String>,
    /// Seconds until the leaf expires (negative: expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertDump {
    /// `Leaf`, `Intermediate` or `Root`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Hexadecimal, as istioctl prints it.
    pub serial_number: String,
    pub valid_from: String,
    pub expiration_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint_sha256: Option<String>,
}

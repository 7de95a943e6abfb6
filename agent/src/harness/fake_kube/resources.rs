//! The resources the fake API server serves, and its discovery documents (`/api`, `/apis`,
//! `/api/v1`, `/apis/<group>`, `/apis/<group>/<version>`, `/version`), shaped as the real server's.

use serde_json::{json, Value};

/// One served resource. Kinds are unique across the table, so the fake's API names them by kind.
#[derive(Debug)]
pub(super) struct Resource {
    /// "" for the core group.
    pub group: &'static str,
    /// Served versions, preferred first. An object is stored once and served at each of them.
    pub versions: &'static [&'static str],
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// A CustomResourceDefinition's resource: it can be uninstalled, and its list items carry
    /// `apiVersion` and `kind` (the real server sends built-in list items without them).
    pub crd: bool,
}

const V1: &[&str] = &["v1"];
/// Istio serves networking at v1, v1beta1 and v1alpha3, all from one stored version.
const NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const SECURITY: &[&str] = &["v1", "v1beta1"];
const TELEMETRY: &[&str] = &["v1", "v1alpha1"];

const fn builtin(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> Resource {
    Resource {
        group,
        versions: V1,
        kind,
        plural,
        namespaced,
        crd: false,
    }
}

const fn crd(
    group: &'static str,
    versions: &'static [&'static str],
    kind: &'static str,
    plural: &'static str,
) -> Resource {
    Resource {
        group,
        versions,
        kind,
        plural,
        namespaced: true,
        crd: true,
    }
}

pub(super) const RESOURCES: &[Resource] = &[
    builtin("", "Namespace", "namespaces", false),
    builtin("", "Pod", "pods", true),
    builtin("", "Service", "services", true),
    builtin("", "ConfigMap", "configmaps", true),
    builtin("discovery.k8s.io", "EndpointSlice", "endpointslices", true),
    crd(
        "networking.istio.io",
        NETWORKING,
        "VirtualService",
        "virtualservices",
    ),
    crd(
        "networking.istio.io",
        NETWORKING,
        "DestinationRule",
        "destinationrules",
    ),
    crd(
        "networking.istio.io",
        NETWORKING,
        "ServiceEntry",
        "serviceentries",
    ),
    crd(
        "security.istio.io",
        SECURITY,
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    crd(
        "security.istio.io",
        SECURITY,
        "PeerAuthentication",
        "peerauthentications",
    ),
    crd("telemetry.istio.io", TELEMETRY, "Telemetry", "telemetries"),
];

/// The groups of [`RESOURCES`] that come from CRDs.
pub(super) const CRD_GROUPS: &[&str] = &[
    "networking.istio.io",
    "security.istio.io",
    "telemetry.istio.io",
];

/// An index into [`RESOURCES`].
pub(super) type ResourceId = usize;

pub(super) fn by_kind(kind: &str) -> Option<ResourceId> {
    RESOURCES.iter().position(|r| r.kind == kind)
}

/// The resource named by `apiVersion` and `kind`, if `apiVersion` is one of its served versions.
pub(super) fn by_api_version(api_version: &str, kind: &str) -> Option<ResourceId> {
    let (group, version) = split_api_version(api_version);
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.kind == kind && r.versions.contains(&version))
}

pub(super) fn by_plural(group: &str, version: &str, plural: &str) -> Option<ResourceId> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.plural == plural && r.versions.contains(&version))
}

/// `"v1"` → `("", "v1")`, `"g/v"` → `("g", "v")`.
pub(super) fn split_api_version(api_version: &str) -> (&str, &str) {
    api_version.split_once('/').unwrap_or(("", api_version))
}

pub(super) fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// Whether some resource of the table is served at `group/version` (installed or not).
pub(super) fn known_group_version(group: &str, version: &str) -> bool {
    RESOURCES
        .iter()
        .any(|r| r.group == group && r.versions.contains(&version))
}

/// `GET /api/v1` or `GET /apis/<group>/<version>`: an APIResourceList.
pub(super) fn resource_list(group: &str, version: &str) -> Value {
    let resources: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.versions.contains(&version))
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.kind.to_lowercase(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": api_version(group, version),
        "resources": resources,
    })
}

/// `GET /apis/<group>`: an APIGroup (the real server prefers the newest storage-friendly version;
/// here, the first of the table).
pub(super) fn api_group(group: &str) -> Option<Value> {
    let versions = RESOURCES.iter().find(|r| r.group == group)?.versions;
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    Some(json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first(),
    }))
}

/// `GET /apis`: an APIGroupList of the named groups served now.
pub(super) fn api_group_list<'a>(groups: impl Iterator<Item = &'a str>) -> Value {
    let groups: Vec<Value> = groups.filter_map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api`.
pub(super) fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    })
}

/// `GET /version`.
pub(super) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "31",
        "gitVersion": "v1.31.0-ambit-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T00:00:00Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Every group-version served by the table, with the non-CRD groups first (for `/apis`).
pub(super) fn groups() -> impl Iterator<Item = &'static str> {
    let mut seen: Vec<&'static str> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !seen.contains(&r.group) {
            seen.push(r.group);
        }
    }
    seen.into_iter()
}

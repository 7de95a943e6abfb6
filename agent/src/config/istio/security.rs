//! security.istio.io: AuthorizationPolicy (access control on workloads) and PeerAuthentication
//! (mTLS mode of workloads), their documented defaults, and Istio's validation of them.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::common::{
    check_ip_or_cidr, istio_enum, PolicyTargetReference, Report, WorkloadSelector,
};
use super::FieldError;

istio_enum! {
    pub enum Action {
        /// Istio: "Default is ALLOW if not specified."
        #[default]
        Allow = "ALLOW",
        Deny = "DENY",
        Audit = "AUDIT",
        Custom = "CUSTOM",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    /// Istio: unset (with no targetRefs) selects every workload in the namespace (the mesh, from
    /// the root namespace).
    pub selector: Option<WorkloadSelector>,
    /// Single-reference form of `targetRefs`.
    pub target_ref: Option<PolicyTargetReference>,
    /// At most one of `selector`, `targetRef` and `targetRefs` may be set.
    pub target_refs: Vec<PolicyTargetReference>,
    /// Istio: unset never matches, so an ALLOW policy with no rules denies everything.
    pub rules: Vec<Rule>,
    pub action: Action,
    /// Only with CUSTOM: the extension provider, declared in MeshConfig.
    pub provider: Option<ExtensionProvider>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct ExtensionProvider {
    pub name: String,
}

/// Matches when one `from`, one `to` and all `when` conditions match; empty matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Rule {
    pub from: Vec<RuleFrom>,
    pub to: Vec<RuleTo>,
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct RuleFrom {
    pub source: Option<Source>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct RuleTo {
    pub operation: Option<Operation>,
}

/// Source identities; fields are ANDed. String fields support exact, `prefix*`, `*suffix` and `*`
/// (present) matches.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Source {
    /// Peer identities from the mTLS certificate, `<trust domain>/ns/<namespace>/sa/<account>`.
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    /// JWT identities, `<iss>/<sub>`.
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// `account` or `namespace/account`; not combinable with principals or namespaces.
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    /// Source IPs or CIDRs of the IP packet.
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    /// Original client IPs from X-Forwarded-For or the PROXY protocol.
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

/// Request operation; fields are ANDed. Hosts, methods and paths apply only to HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// An extra condition on an Istio attribute (istio.io reference/config/security/conditions).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

istio_enum! {
    pub enum MtlsMode {
        /// Inherit from the parent (namespace, then mesh); with no parent, PERMISSIVE.
        #[default]
        Unset = "UNSET",
        Disable = "DISABLE",
        Permissive = "PERMISSIVE",
        Strict = "STRICT",
    }
}

impl MtlsMode {
    /// Istio: "Inherit from parent, if has one. Otherwise treated as PERMISSIVE."
    pub fn resolve(self, parent: Option<MtlsMode>) -> MtlsMode {
        match self {
            MtlsMode::Unset => parent.map_or(MtlsMode::Permissive, |p| p.resolve(None)),
            mode => mode,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct MutualTls {
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PeerAuthentication {
    /// Istio: unset applies to the whole namespace (the mesh, from the root namespace).
    pub selector: Option<WorkloadSelector>,
    /// Istio: "If not defined, inherit from parent" (the same as UNSET).
    pub mtls: Option<MutualTls>,
    /// Workload port (not service port) to mode; only with a selector.
    #[serde(deserialize_with = "port_keyed")]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

impl PeerAuthentication {
    /// This policy's workload-level mode (UNSET when `mtls` is absent).
    pub fn mode(&self) -> MtlsMode {
        self.mtls.map_or(MtlsMode::Unset, |m| m.mode)
    }

    /// The mode for one workload port: its port-level mode if any, else the workload-level one.
    pub fn mode_for_port(&self, port: u32) -> MtlsMode {
        self.port_level_mtls
            .get(&port)
            .map_or(self.mode(), |m| m.mode)
    }
}

/// Map keys written as port numbers (`80:` in YAML, `"80"` in JSON). Parsing the key in its own
/// Deserialize keeps the key in the error path.
fn port_keyed<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, MutualTls>, D::Error> {
    let map = BTreeMap::<PortKey, MutualTls>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k.0, v)).collect())
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(PortKey).map_err(|_| {
            serde::de::Error::custom(format!("port {s:?} is not a number in 1..65535"))
        })
    }
}

// ---- validation (istio/istio pkg/config/validation, pkg/config/security) -----------------------

impl AuthorizationPolicy {
    /// Istio ValidateAuthorizationPolicy, plus ambit's refusal of CUSTOM.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut r = Report::default();
        let targets = [
            self.selector.is_some(),
            self.target_ref.is_some(),
            !self.target_refs.is_empty(),
        ];
        if targets.iter().filter(|t| **t).count() > 1 {
            let field = if self.target_refs.is_empty() {
                "spec.targetRef"
            } else {
                "spec.targetRefs"
            };
            r.err(
                field,
                "only one of targetRefs or workloadSelector can be set",
            );
        }
        if let Some(selector) = &self.selector {
            selector.check(&mut r, "spec.selector");
        }
        if let Some(t) = &self.target_ref {
            t.check(&mut r, "spec.targetRef");
        }
        for (i, t) in self.target_refs.iter().enumerate() {
            t.check(&mut r, &format!("spec.targetRefs[{i}]"));
        }
        match self.action {
            Action::Custom => {
                // ambit has no external authorizer: failing closed is the only safe reading.
                r.err(
                    "spec.action",
                    "CUSTOM is not supported by ambit; the selected workloads deny",
                );
                if self.rules.is_empty() {
                    let msg = "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request";
                    r.err("spec.rules", msg);
                } else if self.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
                    r.err("spec.provider.name", "`provider.name` must not be empty");
                }
                self.check_custom_rules(&mut r);
            }
            Action::Deny if self.rules.is_empty() => {
                let msg = "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request";
                r.err("spec.rules", msg);
            }
            _ => {}
        }
        if self.provider.is_some() && self.action != Action::Custom {
            let msg = format!(
                "`provider` must not be with non CUSTOM action, found {}",
                self.action
            );
            r.err("spec.provider", msg);
        }
        for (i, rule) in self.rules.iter().enumerate() {
            check_rule(&mut r, &format!("spec.rules[{i}]"), rule);
        }
        r.0
    }

    /// Istio: CUSTOM cannot match on identities, which the external authorizer never sees.
    fn check_custom_rules(&self, r: &mut Report) {
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let Some(s) = &from.source else { continue };
                let fields = [
                    ("namespaces", &s.namespaces),
                    ("notNamespaces", &s.not_namespaces),
                    ("serviceAccounts", &s.service_accounts),
                    ("notServiceAccounts", &s.not_service_accounts),
                    ("principals", &s.principals),
                    ("notPrincipals", &s.not_principals),
                    ("requestPrincipals", &s.request_principals),
                    ("notRequestPrincipals", &s.not_request_principals),
                ];
                for (name, _) in fields.iter().filter(|(_, v)| !v.is_empty()) {
                    let f = format!("spec.rules[{i}].from[{j}].source.{name}");
                    r.err(
                        f,
                        format!("{name} is currently not supported with CUSTOM action"),
                    );
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                let identity = matches!(
                    c.key.as_str(),
                    "source.namespace" | "source.serviceAccount" | "source.principal"
                ) || c.key.starts_with("request.auth.");
                if identity {
                    let msg = format!("{} is currently not supported with CUSTOM action", c.key);
                    r.err(format!("spec.rules[{i}].when[{j}].key"), msg);
                }
            }
        }
    }
}

fn check_rule(r: &mut Report, field: &str, rule: &Rule) {
    for (j, from) in rule.from.iter().enumerate() {
        let f = format!("{field}.from[{j}].source");
        let Some(s) = &from.source else {
            r.err(f, "`from.source` must not be nil");
            continue;
        };
        let identities = s.principals.len()
            + s.not_principals.len()
            + s.namespaces.len()
            + s.not_namespaces.len();
        if identities > 0 && !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty()) {
            r.err(
                f.clone(),
                "cannot set serviceAccounts with namespaces or principals",
            );
        }
        let lists = [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ];
        if lists.iter().all(|(_, v)| v.is_empty()) {
            r.err(f.clone(), "`from.source` must not be empty");
        }
        for (name, values) in lists {
            for (k, v) in values.iter().enumerate() {
                let path = format!("{f}.{name}[{k}]");
                if v.is_empty() {
                    r.err(path, format!("empty value not allowed, found in {name}"));
                } else if name.ends_with("IpBlocks") || name == "ipBlocks" {
                    r.check(path, check_ip_or_cidr(v));
                } else if is_service_accounts(name) {
                    r.check(path, check_service_account(v));
                }
            }
            if is_service_accounts(name) && values.len() > 16 {
                r.err(format!("{f}.{name}"), "may not have more than 16 values");
            }
        }
    }
    for (j, to) in rule.to.iter().enumerate() {
        let f = format!("{field}.to[{j}].operation");
        let Some(op) = &to.operation else {
            r.err(f, "`to.operation` must not be nil");
            continue;
        };
        let lists = [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("ports", &op.ports),
            ("notPorts", &op.not_ports),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ];
        if lists.iter().all(|(_, v)| v.is_empty()) {
            r.err(f.clone(), "`to.operation` must not be empty");
        }
        for (name, values) in lists {
            for (k, v) in values.iter().enumerate() {
                let path = format!("{f}.{name}[{k}]");
                if v.is_empty() {
                    r.err(path, format!("empty value not allowed, found in {name}"));
                } else if name == "ports" || name == "notPorts" {
                    r.check(path, check_authz_port(v));
                } else if name == "paths" || name == "notPaths" {
                    r.check(path, check_path_template(v));
                }
            }
        }
    }
    for (j, c) in rule.when.iter().enumerate() {
        let f = format!("{field}.when[{j}]");
        if c.key.is_empty() {
            r.err(format!("{f}.key"), "`key` must not be empty");
            continue;
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            let msg = format!(
                "at least one of `values` or `notValues` must be set for key {}",
                c.key
            );
            r.err(f.clone(), msg);
            continue;
        }
        if let Err(e) = check_condition_key(&c.key) {
            r.err(format!("{f}.key"), e);
            continue;
        }
        for (list, values) in [("values", &c.values), ("notValues", &c.not_values)] {
            for (k, v) in values.iter().enumerate() {
                r.check(format!("{f}.{list}[{k}]"), check_condition_value(&c.key, v));
            }
        }
    }
}

fn is_service_accounts(name: &str) -> bool {
    name == "serviceAccounts" || name == "notServiceAccounts"
}

/// Istio security.ValidateAttribute: the condition keys of istio.io's conditions reference.
fn check_condition_key(key: &str) -> Result<(), String> {
    let map_key = |prefix: &str| -> Result<(), String> {
        let rest = &key[prefix.len()..];
        match rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            Some(inner) if !inner.is_empty() => Ok(()),
            _ => Err(format!("bad key ({key}): should have format a[b]")),
        }
    };
    match key {
        "source.ip"
        | "remote.ip"
        | "source.namespace"
        | "source.serviceAccount"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "destination.ip"
        | "destination.port"
        | "connection.sni" => Ok(()),
        _ if key.starts_with("request.headers") => map_key("request.headers"),
        _ if key.starts_with("request.experimental.inline.headers") => {
            map_key("request.experimental.inline.headers")
        }
        _ if key.starts_with("request.auth.claims") => map_key("request.auth.claims"),
        _ if key.starts_with("experimental.envoy.filters.") => key.find('[').map_or(
            Err(format!("bad key ({key}): should have format a[b]")),
            |i| map_key(&key[..i]),
        ),
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        _ if key.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

fn check_condition_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("empty value not allowed, found in {key}"));
    }
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => check_ip_or_cidr(value),
        "destination.port" => check_authz_port(value),
        "source.serviceAccount" => check_service_account(value),
        _ => Ok(()),
    }
}

/// Istio security.ValidatePorts: a decimal number up to 65535.
fn check_authz_port(port: &str) -> Result<(), String> {
    match port.parse::<u32>() {
        Ok(p) if p <= 65535 && !port.starts_with('+') => Ok(()),
        _ => Err(format!("bad port ({port})")),
    }
}

/// Istio security.CheckServiceAccount: `account` or `namespace/account`, no wildcards.
fn check_service_account(value: &str) -> Result<(), String> {
    let expected = "expected format 'serviceAccount' or 'namespace/serviceAccount'";
    if value.contains('*') {
        return Err("wildcard not allowed".into());
    }
    if value.len() > 320 {
        return Err(format!(
            "value cannot exceed 320 characters, found {value:?}"
        ));
    }
    match value.split_once('/') {
        Some((ns, sa)) if ns.is_empty() || sa.is_empty() || sa.contains('/') => {
            Err(format!("{expected}, found {value:?}"))
        }
        _ => Ok(()),
    }
}

/// Istio security.CheckValidPathTemplate: `{*}` and `{**}` (last) as whole segments only.
fn check_path_template(path: &str) -> Result<(), String> {
    let template = path.contains("{*}") || path.contains("{**}");
    let mut any_seen = false;
    for glob in path.trim_matches('/').split('/') {
        match glob {
            "{*}" | "{**}" if any_seen => {
                return Err(format!(
                    "invalid or unsupported path {path}: {{**}} is not the last operator"
                ));
            }
            "{*}" => continue,
            "{**}" => {
                any_seen = true;
                continue;
            }
            _ => {}
        }
        if glob.contains(['{', '}']) {
            return Err(format!("invalid or unsupported path {path}: contains '{{' or '}}' beyond a supported path template"));
        }
        let literal = |c: char| c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@=".contains(c);
        if template && !glob.chars().all(literal) {
            return Err(format!("invalid or unsupported path {path}: contains segment {glob} with invalid string literal"));
        }
    }
    Ok(())
}

impl PeerAuthentication {
    /// Istio ValidatePeerAuthentication.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut r = Report::default();
        let no_selector = self
            .selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty());
        if no_selector && !self.port_level_mtls.is_empty() {
            let msg = "mesh/namespace peer authentication cannot have port level mTLS";
            r.err("spec.portLevelMtls", msg);
        }
        for port in self.port_level_mtls.keys() {
            if !(1..=65535).contains(port) {
                r.err(
                    format!("spec.portLevelMtls.{port}"),
                    "port must be in range 1..65535",
                );
            }
        }
        if let Some(selector) = &self.selector {
            selector.check(&mut r, "spec.selector");
        }
        r.0
    }
}

//! Istio's config CRDs (VirtualService, DestinationRule, ServiceEntry, AuthorizationPolicy,
//! PeerAuthentication) read exactly as istio.io documents them: typed specs, the object envelope,
//! decoding with field paths, and Istio's own validation rules (istio/istio pkg/config/validation).
//!
//! [`IstioConfig::parse`] is the one entry point: it dispatches on `apiVersion`/`kind`, decodes the
//! spec (unknown fields are ignored, as Istio ignores them, and their paths returned for a debug
//! log), then validates. [`IstioConfig::decode`] and [`IstioConfig::validate`] are the two halves,
//! for callers that need the typed object even when it is invalid (an AuthorizationPolicy with
//! action CUSTOM is rejected, yet its selector still names the workloads that must deny).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

pub mod common;
pub mod destination_rule;
mod route_validation;
pub mod security;
pub mod service_entry;
pub mod telemetry;
pub mod virtual_service;

#[cfg(test)]
mod doc_examples;
#[cfg(test)]
mod tests;

pub use common::{Percent, PolicyTargetReference, PortSelector, StringMatch, WorkloadSelector};
pub use destination_rule::DestinationRule;
pub use security::{Action, AuthorizationPolicy, MtlsMode, PeerAuthentication};
pub use service_entry::{Location, Resolution, ServiceEntry};
pub use telemetry::Telemetry;
pub use virtual_service::{undefined_subsets, VirtualService};

/// One problem with one field of an Istio object. `field` is a path from the object root in the
/// form serde_path_to_error prints, e.g. `spec.http[0].route[1].weight`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A Kubernetes object carrying an Istio spec. `spec` defaults to empty when absent: Istio's
/// documented "allow-nothing" AuthorizationPolicy is just `spec: {}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioObject<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
}

impl<S> IstioObject<S> {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
}

/// The Istio kinds ambit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IstioKind {
    VirtualService,
    DestinationRule,
    ServiceEntry,
    AuthorizationPolicy,
    PeerAuthentication,
    Telemetry,
    /// The mesh config: the `istio` ConfigMap (not a CRD, but Istio's config all the same).
    MeshConfig,
}

const NETWORKING_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];
const SECURITY_VERSIONS: &[&str] = &["v1", "v1beta1"];
const TELEMETRY_VERSIONS: &[&str] = &["v1", "v1alpha1"];

impl IstioKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IstioKind::VirtualService => "VirtualService",
            IstioKind::DestinationRule => "DestinationRule",
            IstioKind::ServiceEntry => "ServiceEntry",
            IstioKind::AuthorizationPolicy => "AuthorizationPolicy",
            IstioKind::PeerAuthentication => "PeerAuthentication",
            IstioKind::Telemetry => "Telemetry",
            IstioKind::MeshConfig => "ConfigMap",
        }
    }

    /// Resolves `apiVersion` and `kind`. Istio serves networking kinds at v1, v1beta1 and v1alpha3
    /// and security kinds at v1 and v1beta1; all versions of a kind share one schema.
    pub fn from_type_meta(api_version: &str, kind: &str) -> Result<IstioKind, FieldError> {
        let supported =
            "networking.istio.io/{v1,v1beta1,v1alpha3}, security.istio.io/{v1,v1beta1} \
             or telemetry.istio.io/{v1,v1alpha1}";
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let versions = match group {
            "networking.istio.io" => NETWORKING_VERSIONS,
            "security.istio.io" => SECURITY_VERSIONS,
            "telemetry.istio.io" => TELEMETRY_VERSIONS,
            _ => {
                let msg = format!("unsupported apiVersion {api_version:?}; expected {supported}");
                return Err(FieldError::new("apiVersion", msg));
            }
        };
        if !versions.contains(&version) {
            let msg = format!("unsupported apiVersion {api_version:?}; expected {supported}");
            return Err(FieldError::new("apiVersion", msg));
        }
        let found = match (group, kind) {
            ("networking.istio.io", "VirtualService") => IstioKind::VirtualService,
            ("networking.istio.io", "DestinationRule") => IstioKind::DestinationRule,
            ("networking.istio.io", "ServiceEntry") => IstioKind::ServiceEntry,
            ("security.istio.io", "AuthorizationPolicy") => IstioKind::AuthorizationPolicy,
            ("security.istio.io", "PeerAuthentication") => IstioKind::PeerAuthentication,
            ("telemetry.istio.io", "Telemetry") => IstioKind::Telemetry,
            _ => {
                let expected = match group {
                    "networking.istio.io" => "VirtualService, DestinationRule or ServiceEntry",
                    "security.istio.io" => "AuthorizationPolicy or PeerAuthentication",
                    _ => "Telemetry",
                };
                let msg = format!("unsupported kind {kind:?} for {group}; expected {expected}");
                return Err(FieldError::new("kind", msg));
            }
        };
        Ok(found)
    }
}

/// One decoded Istio object (boxed: a DestinationRule is much larger than a PeerAuthentication).
#[derive(Debug, Clone, PartialEq)]
pub enum IstioConfig {
    VirtualService(Box<IstioObject<VirtualService>>),
    DestinationRule(Box<IstioObject<DestinationRule>>),
    ServiceEntry(Box<IstioObject<ServiceEntry>>),
    AuthorizationPolicy(Box<IstioObject<AuthorizationPolicy>>),
    PeerAuthentication(Box<IstioObject<PeerAuthentication>>),
    Telemetry(Box<IstioObject<Telemetry>>),
    /// The `istio` ConfigMap, its `mesh` key decoded (`config::mesh`).
    MeshConfig(Box<crate::config::mesh::MeshConfigMap>),
}

impl IstioConfig {
    /// Decodes and validates one object. On success also returns the paths of fields that were
    /// ignored because Istio's schema does not know them (for a debug log, never an error).
    pub fn parse(value: Value) -> Result<(IstioConfig, Vec<String>), Vec<FieldError>> {
        let (config, ignored) = Self::decode(value)?;
        let errors = config.validate();
        if errors.is_empty() {
            Ok((config, ignored))
        } else {
            Err(errors)
        }
    }

    /// Decodes without validating. Type errors (including unknown enum values) carry their path.
    pub fn decode(mut value: Value) -> Result<(IstioConfig, Vec<String>), Vec<FieldError>> {
        let Some(object) = value.as_object_mut() else {
            let msg = "expected a Kubernetes object (a mapping with apiVersion and kind)";
            return Err(vec![FieldError::new("apiVersion", msg)]);
        };
        let api_version = match object.get("apiVersion") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(vec![FieldError::new("apiVersion", "must be a string")]),
            None => return Err(vec![FieldError::new("apiVersion", "is required")]),
        };
        let kind = match object.get("kind") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(vec![FieldError::new("kind", "must be a string")]),
            None => return Err(vec![FieldError::new("kind", "is required")]),
        };
        let kind = if (api_version.as_str(), kind.as_str()) == ("v1", "ConfigMap") {
            IstioKind::MeshConfig
        } else {
            IstioKind::from_type_meta(&api_version, &kind).map_err(|e| vec![e])?
        };
        // Status is written by Istio, not configuration: neither decoded nor reported as ignored.
        object.remove("status");
        prune_nulls(&mut value);
        Ok(match kind {
            IstioKind::VirtualService => {
                let (o, ignored) = decode_object(value)?;
                (IstioConfig::VirtualService(Box::new(o)), ignored)
            }
            IstioKind::DestinationRule => {
                let (o, ignored) = decode_object(value)?;
                (IstioConfig::DestinationRule(Box::new(o)), ignored)
            }
            IstioKind::ServiceEntry => {
                let (o, ignored) = decode_object(value)?;
                (IstioConfig::ServiceEntry(Box::new(o)), ignored)
            }
            IstioKind::AuthorizationPolicy => {
                let (o, ignored) = decode_object(value)?;
                (IstioConfig::AuthorizationPolicy(Box::new(o)), ignored)
            }
            IstioKind::PeerAuthentication => {
                let (o, ignored) = decode_object(value)?;
                (IstioConfig::PeerAuthentication(Box::new(o)), ignored)
            }
            IstioKind::Telemetry => {
                let (o, ignored) = decode_object(value)?;
                (IstioConfig::Telemetry(Box::new(o)), ignored)
            }
            IstioKind::MeshConfig => {
                let (m, ignored) = crate::config::mesh::MeshConfigMap::parse(value)?;
                (IstioConfig::MeshConfig(Box::new(m)), ignored)
            }
        })
    }

    /// Istio's validation rules for this object; empty when valid.
    pub fn validate(&self) -> Vec<FieldError> {
        match self {
            IstioConfig::VirtualService(o) => o.spec.validate(o.namespace()),
            IstioConfig::DestinationRule(o) => o.spec.validate(o.namespace()),
            IstioConfig::ServiceEntry(o) => o.spec.validate(o.namespace()),
            IstioConfig::AuthorizationPolicy(o) => o.spec.validate(),
            IstioConfig::PeerAuthentication(o) => o.spec.validate(),
            IstioConfig::Telemetry(o) => o.spec.validate(),
            IstioConfig::MeshConfig(m) => m
                .mesh
                .validate()
                .into_iter()
                .map(|e| FieldError::new(format!("data.mesh.{}", e.field), e.message))
                .collect(),
        }
    }

    pub fn kind(&self) -> IstioKind {
        match self {
            IstioConfig::VirtualService(_) => IstioKind::VirtualService,
            IstioConfig::DestinationRule(_) => IstioKind::DestinationRule,
            IstioConfig::ServiceEntry(_) => IstioKind::ServiceEntry,
            IstioConfig::AuthorizationPolicy(_) => IstioKind::AuthorizationPolicy,
            IstioConfig::PeerAuthentication(_) => IstioKind::PeerAuthentication,
            IstioConfig::Telemetry(_) => IstioKind::Telemetry,
            IstioConfig::MeshConfig(_) => IstioKind::MeshConfig,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            IstioConfig::VirtualService(o) => &o.metadata,
            IstioConfig::DestinationRule(o) => &o.metadata,
            IstioConfig::ServiceEntry(o) => &o.metadata,
            IstioConfig::AuthorizationPolicy(o) => &o.metadata,
            IstioConfig::PeerAuthentication(o) => &o.metadata,
            IstioConfig::Telemetry(o) => &o.metadata,
            IstioConfig::MeshConfig(m) => &m.metadata,
        }
    }
}

fn decode_object<S: DeserializeOwned + Default>(
    value: Value,
) -> Result<(IstioObject<S>, Vec<String>), Vec<FieldError>> {
    decode_typed(value).map_err(|e| vec![e])
}

/// Decodes through serde_ignored (collecting unknown-field paths) around serde_path_to_error
/// (giving type errors their path). In the other order a numeric map key loses its path.
pub(crate) fn decode_typed<T: DeserializeOwned>(
    value: Value,
) -> Result<(T, Vec<String>), FieldError> {
    let mut track = serde_path_to_error::Track::new();
    let mut ignored = Vec::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let result = serde_ignored::deserialize(de, |path| ignored.push(ignored_path(&path)));
    match result {
        Ok(object) => Ok((object, ignored)),
        Err(e) => {
            let path = track.path().to_string();
            let path = if path == "." { String::new() } else { path };
            Err(FieldError::new(path, e.to_string()))
        }
    }
}

/// Prints a serde_ignored path the way serde_path_to_error prints one: `spec.http[0].foo`.
fn ignored_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", ignored_path(parent)),
        Path::Map { parent, key } => {
            let parent = ignored_path(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_path(parent),
    }
}

/// Kubernetes: null values of non-nullable CRD fields are pruned before storage, so a local
/// `rules:` with no value reads as Istio would see it from the API server (absent).
fn prune_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(prune_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(prune_nulls),
        _ => {}
    }
}

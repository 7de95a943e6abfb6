//! The objects ambit reads, named the way Kubernetes names them, and the one parser every source
//! uses to turn a JSON/YAML value into one of them. A source never interprets objects itself: the
//! file source and the Kubernetes source both end here, then in `state::Store`.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;

use super::istio::{IstioConfig, IstioKind};

/// Every kind ambit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    ServiceEntry,
    VirtualService,
    DestinationRule,
    AuthorizationPolicy,
    PeerAuthentication,
    Telemetry,
    /// Only the mesh config: the ConfigMap named `istio` (`config::mesh`).
    ConfigMap,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::ServiceEntry,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::AuthorizationPolicy,
        Kind::PeerAuthentication,
        Kind::Telemetry,
        Kind::ConfigMap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::Telemetry => "Telemetry",
            Kind::ConfigMap => "ConfigMap",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    /// The API versions accepted for this kind (Istio: v1alpha3 only for networking).
    pub fn accepts_api_version(self, api_version: &str) -> bool {
        match self {
            Kind::Namespace | Kind::Pod | Kind::Service | Kind::ConfigMap => api_version == "v1",
            Kind::EndpointSlice => api_version == "discovery.k8s.io/v1",
            Kind::ServiceEntry | Kind::VirtualService | Kind::DestinationRule => matches!(
                api_version,
                "networking.istio.io/v1"
                    | "networking.istio.io/v1beta1"
                    | "networking.istio.io/v1alpha3"
            ),
            Kind::AuthorizationPolicy | Kind::PeerAuthentication => {
                matches!(
                    api_version,
                    "security.istio.io/v1" | "security.istio.io/v1beta1"
                )
            }
            Kind::Telemetry => matches!(
                api_version,
                "telemetry.istio.io/v1" | "telemetry.istio.io/v1alpha1"
            ),
        }
    }

    pub fn is_namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one object: kind, namespace ("" for cluster-scoped), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One problem with one field of one object. `location` is where a file source found it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{}{object}: {field}: {message}", location.as_deref().map(|l| format!("{l}: ")).unwrap_or_default())]
pub struct ObjectError {
    pub object: ObjectRef,
    /// Path of the field, e.g. `spec.http[0].route[1].weight`.
    pub field: String,
    pub message: String,
    pub location: Option<String>,
}

impl ObjectError {
    pub fn new(object: &ObjectRef, field: impl Into<String>, message: impl Into<String>) -> Self {
        ObjectError {
            object: object.clone(),
            field: field.into(),
            message: message.into(),
            location: None,
        }
    }
}

/// An object that could not be accepted: why, field by field, and for an AuthorizationPolicy the
/// workloads it would have selected, which then deny (a policy that cannot be read fails closed).
#[derive(Debug, Clone)]
pub struct Rejected {
    pub object: ObjectRef,
    pub errors: Vec<ObjectError>,
    pub scope: Option<PolicyScope>,
}

impl Rejected {
    /// A rejection of anything but an AuthorizationPolicy.
    pub fn new(object: ObjectRef, errors: Vec<ObjectError>) -> Self {
        Rejected {
            object,
            errors,
            scope: None,
        }
    }
}

/// Which workloads a rejected AuthorizationPolicy would have selected, as far as its text tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyScope {
    /// `spec.selector.matchLabels` could be read.
    Selector(std::collections::BTreeMap<String, String>),
    /// No selector, or one that could not be read: the whole namespace (the mesh from the root
    /// namespace).
    Namespace,
    /// `targetRef`/`targetRefs` were set: enforced by a waypoint, never at the node proxy.
    TargetRefs,
}

impl PolicyScope {
    /// The scope read from an AuthorizationPolicy's raw JSON: a selector that reads as a string
    /// map is kept, anything else widens to the namespace (fail closed).
    pub fn from_json(object: &serde_json::Value) -> PolicyScope {
        let spec = object.get("spec");
        let has_targets = spec.is_some_and(|s| {
            s.get("targetRef").is_some_and(|t| t.is_object())
                || s.get("targetRefs")
                    .and_then(|t| t.as_array())
                    .is_some_and(|a| !a.is_empty())
        });
        let labels = spec
            .and_then(|s| s.get("selector"))
            .and_then(|s| s.get("matchLabels"))
            .and_then(|m| m.as_object())
            .and_then(|m| {
                m.iter()
                    .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect::<Option<std::collections::BTreeMap<_, _>>>()
            });
        let has_selector = spec.is_some_and(|s| s.get("selector").is_some());
        match labels {
            Some(l) if !l.is_empty() => PolicyScope::Selector(l),
            // A policy naming targets and no readable selector is for a waypoint.
            _ if has_targets && !has_selector => PolicyScope::TargetRefs,
            _ => PolicyScope::Namespace,
        }
    }
}

/// A parsed object. Validation beyond the types happens when the store converts it.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    /// Decoded and validated by Istio's rules (`config::istio`).
    Istio(IstioConfig),
}

/// The ambit kind of an Istio kind.
pub fn istio_kind(k: IstioKind) -> Kind {
    match k {
        IstioKind::VirtualService => Kind::VirtualService,
        IstioKind::DestinationRule => Kind::DestinationRule,
        IstioKind::ServiceEntry => Kind::ServiceEntry,
        IstioKind::AuthorizationPolicy => Kind::AuthorizationPolicy,
        IstioKind::PeerAuthentication => Kind::PeerAuthentication,
        IstioKind::Telemetry => Kind::Telemetry,
        IstioKind::MeshConfig => Kind::ConfigMap,
    }
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        fn meta_ref(
            kind: Kind,
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> ObjectRef {
            ObjectRef::new(
                kind,
                if kind.is_namespaced() {
                    m.namespace.clone().unwrap_or_else(|| "default".into())
                } else {
                    String::new()
                },
                m.name.clone().unwrap_or_default(),
            )
        }
        match self {
            Object::Namespace(o) => meta_ref(Kind::Namespace, &o.metadata),
            Object::Pod(o) => meta_ref(Kind::Pod, &o.metadata),
            Object::Service(o) => meta_ref(Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => meta_ref(Kind::EndpointSlice, &o.metadata),
            Object::Istio(o) => meta_ref(istio_kind(o.kind()), o.metadata()),
        }
    }
}

/// What a source tells the store.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// Added or changed.
    Apply(Object),
    /// Could not be parsed: the store records why and keeps the last good version (a rejected
    /// AuthorizationPolicy fails closed instead).
    Reject(Rejected),
    Delete(ObjectRef),
    /// The full current set of `kinds` (a re-list, or a reload of the files): whatever of these
    /// kinds is not listed is gone. Rejected objects keep their last good version.
    Replace {
        kinds: Vec<Kind>,
        objects: Vec<Object>,
        rejected: Vec<Rejected>,
        /// Where each object came from (file and document), for error messages.
        origins: std::collections::BTreeMap<ObjectRef, String>,
    },
}

/// The outcome of parsing one value.
#[derive(Debug)]
pub enum Parsed {
    Object(Object),
    /// A kind ambit does not read (a Deployment in the same directory, say).
    Ignored {
        api_version: String,
        kind: String,
    },
    Rejected(Rejected),
}

/// Parses one object from its JSON form (YAML documents are converted to JSON first). Fields
/// ambit does not know are ignored, as Kubernetes and Istio do; wrong types and values are not.
pub fn parse(value: serde_json::Value) -> Parsed {
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let kind_str = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let Some(kind) = Kind::from_kind(&kind_str) else {
        return Parsed::Ignored {
            api_version,
            kind: kind_str,
        };
    };
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let namespace = if kind.is_namespaced() {
        meta.and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
    } else {
        ""
    };
    if kind == Kind::ConfigMap && name != super::mesh::MESH_CONFIG_MAP {
        // Istio reads one ConfigMap: the mesh config.
        return Parsed::Ignored {
            api_version,
            kind: kind_str,
        };
    }
    let oref = ObjectRef::new(kind, namespace, name);
    if !kind.accepts_api_version(&api_version) {
        let e = ObjectError::new(
            &oref,
            "apiVersion",
            format!("{api_version:?} is not a served version of {kind}"),
        );
        return Parsed::Rejected(Rejected::new(oref, vec![e]));
    }
    if name.is_empty() {
        let e = ObjectError::new(&oref, "metadata.name", "required");
        return Parsed::Rejected(Rejected::new(oref, vec![e]));
    }
    // A rejected policy's scope, read from the raw text before the value is consumed.
    let scope = (kind == Kind::AuthorizationPolicy).then(|| PolicyScope::from_json(&value));
    let result = match kind {
        Kind::Namespace => typed(&oref, value).map(Object::Namespace),
        Kind::Pod => typed(&oref, value).map(Object::Pod),
        Kind::Service => typed(&oref, value).map(Object::Service),
        Kind::EndpointSlice => typed(&oref, value).map(Object::EndpointSlice),
        _ => match IstioConfig::parse(value) {
            Ok((config, ignored)) => {
                for field in ignored {
                    tracing::debug!(object = %oref, %field, "ignoring a field Istio's schema does not know");
                }
                Ok(Object::Istio(config))
            }
            Err(errors) => Err(errors
                .into_iter()
                .map(|e| ObjectError::new(&oref, e.field, e.message))
                .collect()),
        },
    };
    match result {
        Ok(o) => Parsed::Object(o),
        Err(errors) => Parsed::Rejected(Rejected {
            object: oref,
            errors,
            scope,
        }),
    }
}

/// Deserializes, reporting a type error with the path of the field that caused it.
pub(crate) fn typed<T: DeserializeOwned>(
    oref: &ObjectRef,
    value: serde_json::Value,
) -> Result<Box<T>, Vec<ObjectError>> {
    serde_path_to_error::deserialize(value)
        .map(Box::new)
        .map_err(|e| {
            let path = e.path().to_string();
            vec![ObjectError::new(
                oref,
                if path == "." { String::new() } else { path },
                e.into_inner().to_string(),
            )]
        })
}

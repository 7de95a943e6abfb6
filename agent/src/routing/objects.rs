//! The Istio objects routing compiles, as one kind at a time sees them: oldest first (Istio's
//! tie-break), with their namespace and the `exportTo` visibility rule.

use std::sync::Arc;

use crate::config::istio::destination_rule::DestinationRule;
use crate::config::istio::service_entry::ServiceEntry;
use crate::config::istio::virtual_service::VirtualService;
use crate::config::istio::{IstioConfig, IstioObject};
use crate::config::{Kind, ObjectRef};
use crate::state::State;

/// An Istio object of one kind with what ordering and visibility need.
pub(super) struct Obj<'s, T> {
    pub key: Arc<str>,
    pub oref: ObjectRef,
    pub namespace: &'s str,
    /// Istio: older objects win conflicts; a missing timestamp (local files) sorts first, then
    /// by namespace/name.
    pub age: (
        Option<&'s k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
        String,
    ),
    pub obj: &'s IstioObject<T>,
}

pub(super) trait Spec: Sized {
    fn of(config: &IstioConfig) -> Option<&IstioObject<Self>>;
    fn export_to(&self) -> &[String];
}

impl Spec for VirtualService {
    fn of(config: &IstioConfig) -> Option<&IstioObject<Self>> {
        match config {
            IstioConfig::VirtualService(o) => Some(o),
            _ => None,
        }
    }
    fn export_to(&self) -> &[String] {
        &self.export_to
    }
}

impl Spec for DestinationRule {
    fn of(config: &IstioConfig) -> Option<&IstioObject<Self>> {
        match config {
            IstioConfig::DestinationRule(o) => Some(o),
            _ => None,
        }
    }
    fn export_to(&self) -> &[String] {
        &self.export_to
    }
}

impl Spec for ServiceEntry {
    fn of(config: &IstioConfig) -> Option<&IstioObject<Self>> {
        match config {
            IstioConfig::ServiceEntry(o) => Some(o),
            _ => None,
        }
    }
    fn export_to(&self) -> &[String] {
        &self.export_to
    }
}

/// Every object of `kind`, oldest first.
pub(super) fn objects<T: Spec>(state: &State, kind: Kind) -> Vec<Obj<'_, T>> {
    let mut out: Vec<Obj<'_, T>> = state
        .istio_by_namespace
        .iter()
        .filter(|((k, _), _)| *k == kind)
        .flat_map(|((_, ns), keys)| {
            keys.iter().filter_map(move |k| {
                let obj = T::of(state.istio.get(k)?)?;
                Some(Obj {
                    key: k.clone(),
                    oref: ObjectRef::new(kind, &**ns, obj.name()),
                    namespace: ns,
                    age: (
                        obj.metadata.creation_timestamp.as_ref(),
                        format!("{ns}/{}", obj.name()),
                    ),
                    obj,
                })
            })
        })
        .collect();
    out.sort_by(|a, b| a.age.cmp(&b.age));
    out
}

/// Istio `exportTo`: absent or `*` everywhere, `.` its own namespace, `~` nowhere, else the
/// namespaces named.
pub(super) fn exported_to(export_to: &[String], own: &str, client: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && own == client) || e == client)
}

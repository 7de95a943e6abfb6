//! Which API resource to watch for each kind: fixed for the Kubernetes kinds, discovered for the
//! Istio CRDs (the newest served version ambit reads), which may also not be installed at all.

use ::kube::api::ApiResource;
use ::kube::core::gvk::GroupVersionKind;
use ::kube::error::DiscoveryError;
use ::kube::Client;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::Kind;

/// Istio serves its CRDs at several versions; prefer the newest one (`parse` reads them all).
const VERSIONS: [&str; 4] = ["v1", "v1beta1", "v1alpha3", "v1alpha1"];

pub(super) enum Discovered {
    Served(ApiResource),
    NotInstalled,
    Failed(::kube::Error),
}

/// The API group of an Istio kind; None for the Kubernetes kinds.
pub(super) fn api_group(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Namespace | Kind::Pod | Kind::Service | Kind::EndpointSlice | Kind::ConfigMap => None,
        Kind::ServiceEntry | Kind::VirtualService | Kind::DestinationRule => {
            Some("networking.istio.io")
        }
        Kind::AuthorizationPolicy | Kind::PeerAuthentication => Some("security.istio.io"),
        Kind::Telemetry => Some("telemetry.istio.io"),
    }
}

pub(super) async fn resource(client: &Client, kind: Kind) -> Discovered {
    let builtin = match kind {
        Kind::Namespace => Some(ApiResource::erase::<Namespace>(&())),
        Kind::Pod => Some(ApiResource::erase::<Pod>(&())),
        Kind::Service => Some(ApiResource::erase::<Service>(&())),
        Kind::EndpointSlice => Some(ApiResource::erase::<EndpointSlice>(&())),
        Kind::ConfigMap => Some(ApiResource::erase::<ConfigMap>(&())),
        _ => None,
    };
    if let Some(ar) = builtin {
        return Discovered::Served(ar);
    }
    let Some(group) = api_group(kind) else {
        return Discovered::NotInstalled;
    };
    // One group-version document per try (GET /apis/<group>/<version>), not the whole /apis list.
    for version in VERSIONS
        .into_iter()
        .filter(|v| kind.accepts_api_version(&format!("{group}/{v}")))
    {
        let gvk = GroupVersionKind::gvk(group, version, kind.as_str());
        match ::kube::discovery::pinned_kind(client, &gvk).await {
            Ok((ar, _)) => return Discovered::Served(ar),
            // The version is not served (404), or is served without this kind.
            Err(::kube::Error::Api(s)) if s.code == 404 => {}
            Err(::kube::Error::Discovery(DiscoveryError::MissingKind(_))) => {}
            // Anything else might hide a preferred version: do not fall back to an older one.
            Err(e) => return Discovered::Failed(e),
        }
    }
    Discovered::NotInstalled
}

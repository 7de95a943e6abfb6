//! Istio's rule for whether a pod is in the ambient mesh, in one place: the agent applies it to
//! the pods its config source shows, and the plugin to a pod it looks up itself while the agent is
//! down (see `plugin`).

/// The label that puts a namespace or a pod in (or, on a pod, out of) the ambient mesh.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Its value for "in the mesh".
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Its value on a pod for "never in the mesh".
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Set on a pod with an injected sidecar: such a pod keeps its sidecar, not ambient.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What decides a pod's enrolment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Enrolment<'a> {
    /// The namespace's `istio.io/dataplane-mode` label.
    pub namespace_mode: Option<&'a str>,
    /// The pod's own `istio.io/dataplane-mode` label.
    pub pod_mode: Option<&'a str>,
    /// The pod has an injected sidecar ([`SIDECAR_STATUS_ANNOTATION`]).
    pub has_sidecar: bool,
    /// The pod shares the node's network namespace.
    pub host_network: bool,
}

impl Enrolment<'_> {
    /// Istio: a pod labelled ambient is enrolled in any namespace, one labelled none never, any
    /// other pod when its namespace is labelled ambient; never a pod with a sidecar or on the
    /// host network.
    pub fn meshed(&self) -> bool {
        let pod_ambient = self.pod_mode == Some(DATAPLANE_MODE_AMBIENT);
        let opted_out = self.pod_mode == Some(DATAPLANE_MODE_NONE);
        let ns_ambient = self.namespace_mode == Some(DATAPLANE_MODE_AMBIENT);
        (ns_ambient || pod_ambient) && !opted_out && !self.has_sidecar && !self.host_network
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_istio_rule() {
        let ns = |mode| Enrolment {
            namespace_mode: mode,
            ..Default::default()
        };
        assert!(ns(Some("ambient")).meshed());
        assert!(!ns(None).meshed());
        assert!(!ns(Some("none")).meshed());
        let opted_in = Enrolment {
            pod_mode: Some("ambient"),
            ..ns(None)
        };
        assert!(opted_in.meshed(), "a pod label enrols in any namespace");
        let opted_out = Enrolment {
            pod_mode: Some("none"),
            ..ns(Some("ambient"))
        };
        assert!(!opted_out.meshed());
        assert!(!Enrolment {
            has_sidecar: true,
            ..opted_in
        }
        .meshed());
        assert!(!Enrolment {
            host_network: true,
            ..ns(Some("ambient"))
        }
        .meshed());
    }
}

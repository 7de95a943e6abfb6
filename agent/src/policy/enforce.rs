//! The proxy's side of policy: the compiled view for this node's workloads, swapped atomically by
//! the control loop on every published snapshot, and the `InboundPolicy` check every inbound
//! connection (HBONE stream or plaintext) goes through before the app is reached.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::{debug, info, warn};

use super::{evaluate, BrokenPolicy, CompiledPolicies, ConnAttrs, Verdict};
use crate::proxy::{Decision, InboundConnection, InboundPolicy};
use crate::state::State;

/// Istio's default root namespace: its policies apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Labels of `ambit_policy_denials_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DenialLabels {
    /// `namespace/name` of the PeerAuthentication or AuthorizationPolicy that denied.
    pub policy: String,
    /// `namespace/name` of the workload.
    pub workload: String,
}

#[derive(Debug)]
pub struct Enforcer {
    root_namespace: String,
    node: String,
    compiled: ArcSwap<CompiledPolicies>,
    denials: Family<DenialLabels, Counter>,
}

impl Enforcer {
    pub fn new(root_namespace: &str, node: &str) -> Self {
        Enforcer {
            root_namespace: root_namespace.to_string(),
            node: node.to_string(),
            compiled: ArcSwap::from_pointee(CompiledPolicies::default()),
            denials: Family::default(),
        }
    }

    /// Denials per policy and workload (registered with the metrics endpoint).
    pub fn denials(&self) -> Family<DenialLabels, Counter> {
        self.denials.clone()
    }

    /// Recompiles the policies of this node's workloads from a new snapshot (control path).
    pub fn update(&self, state: &State, broken: &[BrokenPolicy]) {
        let compiled =
            CompiledPolicies::build_for_node(state, &self.root_namespace, broken, &self.node);
        for note in compiled.notes() {
            warn!(note = %note, "policy");
        }
        self.compiled.store(Arc::new(compiled));
    }
}

impl InboundPolicy for Enforcer {
    fn check(&self, conn: &InboundConnection<'_>) -> Decision {
        let pod = conn.pod;
        let compiled = self.compiled.load();
        let Some(policy) = compiled.for_workload(&pod.namespace, &pod.name) else {
            // Enrolment follows the snapshot the policies were compiled from, so this is a race
            // with a change; refuse rather than guess.
            let decision = Decision::Deny {
                policy: "(none)".into(),
                reason: "no policy view for this workload yet".into(),
            };
            self.count(conn, "(none)");
            return decision;
        };
        let attrs = ConnAttrs {
            src_ip: conn.src.ip(),
            dst_ip: conn.dst.ip(),
            dst_port: conn.dst.port(),
            identity: conn.identity,
        };
        let decision = evaluate(&policy, &attrs);
        for audited in &decision.audit {
            info!(policy = %audited, workload = %pod.name, namespace = %pod.namespace, src = %conn.src, dst = %conn.dst, identity = ?conn.identity.map(ToString::to_string), "AUDIT policy matched");
        }
        match decision.verdict {
            Verdict::Allow { policy } => {
                debug!(workload = %pod.name, namespace = %pod.namespace, src = %conn.src, dst = %conn.dst, policy = policy.as_deref().unwrap_or("(no ALLOW policy applies)"), "allowed");
                Decision::Allow
            }
            Verdict::Deny { policy, reason } => {
                debug!(workload = %pod.name, namespace = %pod.namespace, src = %conn.src, dst = %conn.dst, identity = ?conn.identity.map(ToString::to_string), %policy, %reason, "denied");
                self.count(conn, &policy);
                Decision::Deny {
                    policy: policy.to_string(),
                    reason: reason.to_string(),
                }
            }
        }
    }
}

impl Enforcer {
    fn count(&self, conn: &InboundConnection<'_>, policy: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                policy: policy.to_string(),
                workload: format!("{}/{}", conn.pod.namespace, conn.pod.name),
            })
            .inc();
    }
}

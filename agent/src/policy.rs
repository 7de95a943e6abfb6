//! Inbound security policy at the destination, with Istio ambient's L4 semantics:
//! PeerAuthentication (is plaintext accepted on this port?) and AuthorizationPolicy (CUSTOM, DENY,
//! ALLOW, AUDIT). Two halves:
//!
//! - [`CompiledPolicies::build`] runs when a state snapshot is published. It resolves, for every
//!   enrolled workload, the policies that apply to it and its effective mTLS mode per port, into
//!   one immutable [`WorkloadPolicy`]. Building is linear in policies + workloads (label index, no
//!   policy × workload scan).
//! - [`evaluate`] runs per connection. It is pure and reads only the workload's own policies, so
//!   its cost does not grow with unrelated policies in the cluster.
//!
//! Semantics follow istiod's translation for ztunnel (istio/istio
//! `pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go`) and ztunnel's matcher
//! (istio/ztunnel `src/rbac.rs`); where ambit differs (it fails closed where ztunnel fails open),
//! the code says so at the spot.

mod compile;
mod eval;

#[cfg(test)]
mod doc_examples;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use compile::{CompiledPolicies, PeerAuthnView, WorkloadPolicy};
pub use eval::evaluate;

/// Istio's default root namespace: its policies apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

use crate::config::istio::MtlsMode;
use crate::identity::Identity;
use crate::state::Key;

/// What policy sees of one inbound connection (or HBONE stream) at the destination.
#[derive(Debug, Clone, Copy)]
pub struct ConnAttrs<'a> {
    /// The client's address as the destination sees it.
    pub src_ip: IpAddr,
    /// The app address the client asked for (a pod IP).
    pub dst_ip: IpAddr,
    /// The app port: PeerAuthentication's `portLevelMtls` and AuthorizationPolicy's `ports` are
    /// workload (target) ports, never Service ports.
    pub dst_port: u16,
    /// The client's verified SPIFFE identity; `None` for plaintext. ztunnel has no other notion of
    /// "mTLS": an HBONE stream always carries a verified peer identity, plaintext never does.
    pub identity: Option<&'a Identity>,
}

/// The outcome of [`evaluate`], with what decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// AUDIT policies that matched. Istio: AUDIT never changes the decision, it only marks the
    /// request for an audit log.
    pub audit: Vec<Key>,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `policy` is the ALLOW policy that matched; `None` when no ALLOW policy applies (Istio:
    /// a workload without ALLOW policies allows what no DENY policy denies).
    Allow { policy: Option<Key> },
    /// `policy` is `namespace/name` of the PeerAuthentication or AuthorizationPolicy that decided.
    Deny { policy: Key, reason: DenyReason },
}

impl Verdict {
    /// `(policy, reason)` of a denial, in the form the proxy logs and reports.
    pub fn deny_parts(&self) -> Option<(String, String)> {
        match self {
            Verdict::Allow { .. } => None,
            Verdict::Deny { policy, reason } => Some((policy.to_string(), reason.to_string())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The effective PeerAuthentication mode for the port is STRICT and the connection is
    /// plaintext.
    MtlsRequired { port: u16 },
    /// A CUSTOM policy or a policy ambit could not accept selects the workload: fail closed.
    Unsupported { detail: Arc<str> },
    /// A DENY policy matched.
    DenyMatched,
    /// ALLOW policies apply and none matched (`count` of them).
    NotAllowed { count: usize },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::MtlsRequired { port } => write!(
                f,
                "PeerAuthentication mode STRICT on port {port}: plaintext connections are refused"
            ),
            DenyReason::Unsupported { detail } => write!(f, "fail closed: {detail}"),
            DenyReason::DenyMatched => f.write_str("a DENY AuthorizationPolicy matched"),
            DenyReason::NotAllowed { count } => write!(
                f,
                "no ALLOW AuthorizationPolicy matched ({count} apply to the workload)"
            ),
        }
    }
}

/// Something about a policy an operator should know: it is not enforced here, enforced more
/// strictly than written, or makes workloads deny. Logged when the policies are built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyNote {
    #[error("AuthorizationPolicy {policy}: targetRef(s) attach it to a waypoint; the node proxy does not enforce it")]
    TargetRefsAtWaypoint { policy: Key },
    #[error("AuthorizationPolicy {policy}: HTTP attributes ({fields}) cannot be checked at L4; {effect}")]
    HttpAttributes {
        policy: Key,
        fields: String,
        effect: &'static str,
    },
    #[error(
        "AuthorizationPolicy {policy}: {reason}; the workloads it selects deny every connection"
    )]
    FailClosed { policy: Key, reason: String },
    #[error("PeerAuthentication {policy}: {reason}")]
    PeerAuthnIgnored { policy: Key, reason: &'static str },
}

impl PolicyNote {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PolicyNote::TargetRefsAtWaypoint { .. } => "target_refs",
            PolicyNote::HttpAttributes { .. } => "http_attributes",
            PolicyNote::FailClosed { .. } => "fail_closed",
            PolicyNote::PeerAuthnIgnored { .. } => "peer_authn_ignored",
        }
    }
}

/// The effective mTLS mode of one port and the PeerAuthentication it came from (`None`: the
/// default, PERMISSIVE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveMtls {
    pub mode: MtlsMode,
    pub source: Option<Key>,
}

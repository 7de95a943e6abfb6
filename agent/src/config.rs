//! Config sources and the objects they read. Every source (the YAML file source now, the
//! Kubernetes API next) parses through [`object::parse`] and hands [`SourceEvent`]s to
//! `state::Store`, which owns validation and the snapshot. No source interprets objects itself.

pub mod files;
pub mod istio;
pub mod kube;
pub mod mesh;
pub mod object;
pub mod telemetry;

pub use object::{
    parse, Kind, Object, ObjectError, ObjectRef, Parsed, PolicyScope, Rejected, SourceEvent,
};

/// Istio: a namespace with this label is in ambient mode; a pod with value `none` opts out (the
/// rule itself is `ambit_cni::enrolment`, shared with the CNI plugin).
pub use ambit_cni::enrolment::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};
/// Local mode: the pod's network namespace path (a real cluster finds it under /proc instead).
pub const NETNS_ANNOTATION: &str = "ambit.dev/netns";
/// Istio's per-pod port exclusions (comma-separated ports).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
/// Istio's default trust/cluster domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";

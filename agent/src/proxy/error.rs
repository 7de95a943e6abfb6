//! Why a proxied connection failed, with the Envoy/Istio response flag each maps to: what the
//! access log and the `response_flags` label of Istio's metrics say.

use std::net::SocketAddr;

use thiserror::Error;

use super::hbone::pool::PoolError;

#[derive(Debug, Error)]
pub enum Error {
    #[error("no original destination recorded for the captured connection from {peer}")]
    NoOrigDst { peer: SocketAddr },
    #[error("the cluster view is incomplete ({missing}): where {dst} belongs is not known")]
    IncompleteView { dst: SocketAddr, missing: String },
    #[error("Service {service} has no ready endpoint on port {port}")]
    NoHealthyUpstream { service: String, port: u16 },
    #[error("no cluster for {host}: {reason}")]
    NoCluster { host: String, reason: &'static str },
    #[error("the pod has no address of {dst}'s family")]
    NoSourceAddress { dst: SocketAddr },
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HBONE tunnel to {dst}: {source}")]
    Tunnel {
        dst: SocketAddr,
        #[source]
        source: Box<PoolError>,
    },
    #[error("HBONE request from {peer} refused: {reason}")]
    BadRequest { peer: SocketAddr, reason: String },
    #[error("denied by {policy}: {reason}")]
    Denied { policy: String, reason: String },
    #[error("the downstream connection was reset")]
    DownstreamReset,
    #[error("the upstream connection was reset")]
    UpstreamReset,
    #[error("{cluster}: connectionPool maxConnections reached")]
    Overflow { cluster: String },
}

impl Error {
    /// Envoy's `%RESPONSE_FLAGS%` for this failure (policy denials as ztunnel reports them).
    pub fn response_flag(&self) -> &'static str {
        match self {
            // No route: nowhere known to send it.
            Error::NoOrigDst { .. } | Error::IncompleteView { .. } => "NR",
            Error::NoHealthyUpstream { .. } => "UH",
            Error::NoCluster { .. } => "NC",
            Error::NoSourceAddress { .. } | Error::Connect { .. } | Error::Tunnel { .. } => "UF",
            Error::BadRequest { .. } => "DPE",
            Error::Denied { .. } => "DENY",
            Error::DownstreamReset => "DC",
            Error::UpstreamReset => "UR",
            Error::Overflow { .. } => "UO",
        }
    }

    /// A short stable name, for counters and log fields.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NoOrigDst { .. } => "no_orig_dst",
            Error::IncompleteView { .. } => "incomplete_view",
            Error::NoHealthyUpstream { .. } => "no_healthy_upstream",
            Error::NoCluster { .. } => "no_cluster",
            Error::NoSourceAddress { .. } => "no_source_address",
            Error::Connect { .. } => "connect",
            Error::Tunnel { .. } => "tunnel",
            Error::BadRequest { .. } => "bad_request",
            Error::Denied { .. } => "denied",
            Error::DownstreamReset => "downstream_reset",
            Error::UpstreamReset => "upstream_reset",
            Error::Overflow { .. } => "overflow",
        }
    }
}

//! How a request to an upstream failed, and what Envoy records for it.

use std::net::SocketAddr;

use thiserror::Error;

use crate::proxy::hbone::PoolError;

/// A request that got no response from its upstream.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: crate::proxy::Error,
    },
    #[error("HBONE tunnel to {endpoint}: {source}")]
    Tunnel {
        endpoint: SocketAddr,
        #[source]
        source: Box<PoolError>,
    },
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {endpoint}: {source}")]
    Request {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("connecting to {endpoint}: no connection within {after:?} (connectTimeout)")]
    ConnectTimeout {
        endpoint: SocketAddr,
        after: std::time::Duration,
    },
    /// The upstream closed or reset its connection before a whole response head (the
    /// source-side relay's reading of it).
    #[error("request to {endpoint}: the upstream closed before a response")]
    Closed { endpoint: SocketAddr },
    /// The upstream's response head is not HTTP/1.1 the relay can follow.
    #[error("request to {endpoint}: malformed response head")]
    Malformed { endpoint: SocketAddr },
    /// A DestinationRule connection-pool limit was reached (Envoy's circuit breaker).
    #[error("{cluster}: connectionPool {limit} reached")]
    Overflow {
        cluster: String,
        limit: &'static str,
    },
}

impl UpstreamError {
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for the reply made in its place.
    pub fn details(&self) -> &'static str {
        match self.response_flag() {
            "UO" => "upstream_reset_before_response_started{overflow}",
            "UPE" => "upstream_reset_before_response_started{protocol_error}",
            "UR" => "upstream_reset_before_response_started{connection_termination}",
            _ => "upstream_reset_before_response_started{connection_failure}",
        }
    }

    /// Envoy's response flag: UF when no connection could be made, UR when the upstream reset or
    /// closed mid-request, UPE when it answered something that is not HTTP, UO past a
    /// connection-pool limit.
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Tunnel { .. }
            | UpstreamError::Handshake { .. } => "UF",
            UpstreamError::Request { source, .. } if source.is_parse() => "UPE",
            UpstreamError::Request { .. } | UpstreamError::Closed { .. } => "UR",
            UpstreamError::Malformed { .. } => "UPE",
            UpstreamError::Overflow { .. } => "UO",
        }
    }
}

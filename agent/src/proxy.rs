//! The per-node proxy: one module per connection stage, side by side, each a struct built from the
//! shared [`ProxyInputs`] and the pod it serves, with `run(self)`:
//! - `outbound`: connections an enrolled pod's app makes (captured to 15001);
//! - `inbound`: HBONE (15008), mTLS CONNECT streams from other meshed pods;
//! - `inbound_plain`: plaintext connections to the pod (steered to 15006);
//! - `local`: a meshed connection to a pod of this node, handed from outbound to inbound
//!   in-process.
//!
//! What they share: `accept` (the one accept loop), `copy` (the one bidirectional copy),
//! `connect` (sockets in the pod through [`SocketFactory`]), `hbone` (client pool, server, stream),
//! `error` (why a connection failed, as a response flag), `counters` and `metrics` (ambit's
//! counters, Istio's telemetry and the access log), `worker` (which data-plane thread this is).
//! The proxy gets its sockets and the original destinations through traits that `node`
//! implements, so it never imports `node` or `ebpf`.

pub mod accept;
pub mod access_log;
pub mod addr;
pub mod connect;
pub mod copy;
pub mod counters;
pub mod drain;
pub mod error;
pub mod hbone;
pub mod http;
pub mod inbound;
pub mod inbound_plain;
pub mod local;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod spans;
pub mod worker;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

pub use counters::Counters;
pub use error::Error;

use crate::identity::{Identity, SecretManager};
use crate::snapshot::SnapshotReader;
use crate::state::IstioLabels;

/// Makes sockets inside one pod's network namespace (a socket's netns is fixed when it is
/// created). Implemented by `node::netns::NetnsWorker`; the in-process tests use loopback.
pub trait SocketFactory: Send + Sync + std::fmt::Debug {
    /// An unconnected, non-blocking TCP socket for `dst`, marked so capture skips it, bound to
    /// `bind` (port chosen at connect) if given.
    fn upstream(
        &self,
        dst: SocketAddr,
        bind: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = io::Result<tokio::net::TcpSocket>> + Send + '_>>;

    /// A socket to the pod's own app at `dst` whose source is the client's address `client`
    /// (IP_TRANSPARENT), or None where the pod has no transparent setup: the caller then dials
    /// from the pod's own address. A non-zero `client` port is a connection from it to `dst`
    /// already in the pod's netns (plaintext inbound), whose 4-tuple must not be reused.
    fn app_upstream(
        &self,
        dst: SocketAddr,
        client: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Option<tokio::net::TcpSocket>>> + Send + '_>> {
        let _ = (dst, client);
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// Where a captured connection was going: the eBPF original-destination map in the agent
/// (`ebpf::OrigDstTable`), a table in tests.
pub trait OrigDstLookup: Send + Sync + std::fmt::Debug {
    /// Takes (reads and removes) the original destination of the connection `peer` → `local`
    /// accepted in the pod's netns `netns_cookie`.
    fn take(&self, netns_cookie: u64, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr>;
}

/// What every stage shares.
#[derive(Debug)]
pub struct ProxyInputs {
    /// The latest published snapshot (one load per connection).
    pub snapshot: SnapshotReader,
    pub orig_dst: Arc<dyn OrigDstLookup>,
    pub counters: Counters,
    pub telemetry: Arc<metrics::Telemetry>,
    pub secrets: Arc<SecretManager>,
    pub pool: hbone::Pool,
    /// Pooled upstream HTTP connections (L7).
    pub upstreams: http::client::Upstreams,
    /// Load-balancer state per cluster, kept across snapshots.
    pub balancers: http::balance::Balancers,
    /// Connection-pool limits in use per cluster (circuit breakers), kept across snapshots.
    pub breakers: http::breaker::Breakers,
    /// How long the outbound stage waits for an undeclared port's first bytes (or a TLS port's
    /// ClientHello) before forwarding the connection as plain TCP.
    pub protocol_detection_timeout: std::time::Duration,
    /// Destination-side L7: an HBONE stream that carries HTTP is served here, request by request
    /// (`reporter="destination"` request metrics), unless a pod opts out
    /// (`http::inbound::DESTINATION_L7_ANNOTATION`).
    pub destination_l7: bool,
    /// Source-side HTTP/1.1 relayed as bytes when the route allows (`http::passthrough::source`).
    pub source_relay: bool,
    /// A bulk transfer between two TCP sockets is spliced (`copy::splice`); off with the sk_msg
    /// fast path, whose redirected bytes `splice` cannot read.
    pub splice: bool,
    /// One span exporter per tracing provider in use (exports run on the control runtime).
    pub tracers: crate::trace::Tracers,
    /// The live connections, for the admin endpoint's `/debug/connections`.
    pub connections: crate::admin::connections::Connections,
    /// The pods of this node a meshed connection is handed to in-process (same-node shortcut).
    pub local: local::LocalPods,
    /// Ports no HBONE CONNECT may target (`hbone::target::own_ports`).
    pub own_ports: std::sync::Arc<[u16]>,
    /// Set when the agent stops: accept loops stop, HBONE connections get GOAWAY.
    pub drain: drain::Drain,
}

/// One enrolled pod, as the stages see it.
#[derive(Debug)]
pub struct PodContext {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub netns_cookie: u64,
    pub sockets: Arc<dyn SocketFactory>,
    /// The pod's SPIFFE identity (its service account).
    pub identity: Identity,
    /// Its values in Istio's metric labels.
    pub istio: Arc<IstioLabels>,
    /// The `baggage` header of tunnels this pod opens (namespace, workload, service), built once
    /// at enrolment (a clone is a reference count, not a copy); None if the labels make it invalid.
    pub baggage: Option<::http::HeaderValue>,
    /// The pod as its spans name it, made on its first sampled request and shared by its spans.
    pub trace_workload: std::sync::OnceLock<Arc<crate::trace::Workload>>,
}

impl ProxyInputs {
    /// For `copy::bidirectional`: where spliced bytes are counted, when splicing is on.
    pub fn splice(&self) -> Option<&std::sync::atomic::AtomicU64> {
        self.splice.then_some(&self.counters.bytes_spliced)
    }
}

impl PodContext {
    /// The pod's address of the same family as `ip`, for binding the proxy's connection to the app.
    pub fn ip_like(&self, ip: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|p| p.is_ipv4() == ip.is_ipv4())
    }

    /// The app's address of a captured outbound connection, as the app knows it: the proxy sees
    /// the loopback address the kernel bound the socket to; the app (through the getsockname
    /// hook) and Envoy's access log see its pod IP, port unchanged.
    pub fn app_address(&self, peer: SocketAddr, dst: SocketAddr) -> SocketAddr {
        match self.ip_like(dst.ip()) {
            Some(ip) if peer.ip().is_loopback() => SocketAddr::new(ip, peer.port()),
            _ => peer,
        }
    }
}

/// Closes a socket with RST instead of FIN (linger 0), as a refused connection would.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

//! The per-node proxy: one module per connection stage. Each stage is a struct built from shared
//! inputs plus the pod it serves, with `run(self)`.

pub mod hbone;
pub mod inbound_plain;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ebpf::OrigDstTable;
use crate::identity::{Identity, SecretManager};
use crate::node::netns::NetnsWorker;
use crate::state::store::StateReader;

/// Inputs every stage shares.
#[derive(Debug)]
pub struct ProxyInputs {
    pub orig_dst: OrigDstTable,
    pub metrics: Metrics,
    /// The latest published cluster state (one immutable snapshot per connection).
    pub state: StateReader,
    pub secrets: Arc<SecretManager>,
    pub pool: pool::Pool,
    pub policy: Arc<dyn InboundPolicy>,
}

/// An inbound connection (or HBONE stream) as policy sees it.
#[derive(Debug)]
pub struct InboundConnection<'a> {
    pub pod: &'a PodContext,
    /// The client's address as the TCP connection shows it.
    pub src: SocketAddr,
    /// The app address the client asked for.
    pub dst: SocketAddr,
    /// The client's verified SPIFFE identity (HBONE), None for plaintext.
    pub identity: Option<&'a Identity>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy` names what decided (`namespace/name` or a rule such as `PeerAuthentication STRICT`).
    Deny {
        policy: String,
        reason: String,
    },
}

/// Inbound authorization, asked for every inbound connection before the app is reached (HBONE:
/// a denial answers 401; plaintext: the connection is closed). Security policy plugs in here.
pub trait InboundPolicy: Send + Sync + std::fmt::Debug {
    fn check(&self, conn: &InboundConnection<'_>) -> Decision;
}

/// Until PeerAuthentication/AuthorizationPolicy are enforced: everything is allowed (PERMISSIVE).
#[derive(Debug, Default)]
pub struct AllowAll;

impl InboundPolicy for AllowAll {
    fn check(&self, _: &InboundConnection<'_>) -> Decision {
        Decision::Allow
    }
}

/// One enrolled pod, as the stages see it.
#[derive(Debug)]
pub struct PodContext {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub netns_cookie: u64,
    pub worker: Arc<NetnsWorker>,
    /// The pod's SPIFFE identity (its service account).
    pub identity: Identity,
    /// The `baggage` header of tunnels this pod opens (namespace, workload, service), built once
    /// at enrolment (a clone is a reference count, not a copy); None if the labels make it invalid.
    pub baggage: Option<http::HeaderValue>,
}

impl PodContext {
    /// The pod's address of the same family as `ip`, for binding the proxy's connection to the app.
    pub fn ip_like(&self, ip: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|p| p.is_ipv4() == ip.is_ipv4())
    }
}

/// Proxy counters. Exported in the status file; Istio-named metrics arrive with the admin server.
#[derive(Debug, Default, serde::Serialize)]
pub struct Metrics {
    pub outbound_accepted: AtomicU64,
    pub outbound_orig_dst_missing: AtomicU64,
    pub outbound_connect_failed: AtomicU64,
    pub inbound_accepted: AtomicU64,
    pub inbound_connect_failed: AtomicU64,
    /// Outbound connections to enrolled workloads, sent over HBONE.
    pub outbound_hbone: AtomicU64,
    /// Outbound connections to destinations outside the mesh, sent in plaintext.
    pub outbound_plaintext: AtomicU64,
    /// Outbound connections to a Service with no ready endpoint (reset).
    pub outbound_no_endpoints: AtomicU64,
    /// Outbound connections refused because some kind was not listed yet (reset).
    pub outbound_incomplete_view: AtomicU64,
    /// Outbound HBONE tunnels that could not be opened (TLS, identity, status, connect).
    pub outbound_hbone_failed: AtomicU64,
    pub hbone_inbound_accepted: AtomicU64,
    pub hbone_inbound_streams: AtomicU64,
    /// HBONE TLS handshakes that failed: a bad or missing client certificate, or a client that
    /// refused ours.
    pub hbone_tls_refused: AtomicU64,
    /// HBONE requests answered 400.
    pub hbone_inbound_bad_request: AtomicU64,
    /// Inbound connections or streams denied by policy.
    pub inbound_denied: AtomicU64,
    pub relays_completed: AtomicU64,
    pub relays_reset: AtomicU64,
    pub bytes_relayed: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter as (name, help, value), read at scrape time by the admin endpoint, which
    /// exports each as `ambit_proxy_<name>_total`. A new field is exported once it is listed here.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "outbound_accepted",
                "Outbound connections accepted from enrolled pods.",
                get(&self.outbound_accepted),
            ),
            (
                "outbound_orig_dst_missing",
                "Outbound connections refused: no original destination recorded.",
                get(&self.outbound_orig_dst_missing),
            ),
            (
                "outbound_connect_failed",
                "Outbound connections whose upstream connect failed.",
                get(&self.outbound_connect_failed),
            ),
            (
                "inbound_accepted",
                "Inbound connections accepted for enrolled pods.",
                get(&self.inbound_accepted),
            ),
            (
                "inbound_connect_failed",
                "Inbound connections whose connect to the pod failed.",
                get(&self.inbound_connect_failed),
            ),
            (
                "outbound_hbone",
                "Outbound connections to enrolled workloads, sent over HBONE.",
                get(&self.outbound_hbone),
            ),
            (
                "outbound_plaintext",
                "Outbound connections to destinations outside the mesh, sent in plaintext.",
                get(&self.outbound_plaintext),
            ),
            (
                "outbound_no_endpoints",
                "Outbound connections to a Service without ready endpoints.",
                get(&self.outbound_no_endpoints),
            ),
            (
                "outbound_incomplete_view",
                "Outbound connections refused (reset) because the cluster view was incomplete.",
                get(&self.outbound_incomplete_view),
            ),
            (
                "outbound_hbone_failed",
                "Outbound HBONE tunnels that could not be opened.",
                get(&self.outbound_hbone_failed),
            ),
            (
                "hbone_inbound_accepted",
                "HBONE (15008) connections accepted.",
                get(&self.hbone_inbound_accepted),
            ),
            (
                "hbone_inbound_streams",
                "HBONE CONNECT streams received.",
                get(&self.hbone_inbound_streams),
            ),
            (
                "hbone_tls_refused",
                "HBONE TLS handshakes that failed (bad or missing client certificate, or the client refused ours).",
                get(&self.hbone_tls_refused),
            ),
            (
                "hbone_inbound_bad_request",
                "HBONE requests answered 400.",
                get(&self.hbone_inbound_bad_request),
            ),
            (
                "inbound_denied",
                "Inbound connections or streams denied by policy.",
                get(&self.inbound_denied),
            ),
            (
                "relays_completed",
                "Relays that ended with both sides closed cleanly.",
                get(&self.relays_completed),
            ),
            (
                "relays_reset",
                "Relays that ended in a reset.",
                get(&self.relays_reset),
            ),
            (
                "bytes_relayed",
                "Bytes relayed, both directions.",
                get(&self.bytes_relayed),
            ),
        ]
    }
}

/// TCP keepalive for HBONE connections (both ends): a peer node that vanishes without a FIN is
/// noticed within about a minute instead of holding the connection (and its pool slot) forever.
pub fn keepalive(stream: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Closes a socket with RST instead of FIN (linger 0), as a refused connection would.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn hbone_sockets_get_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let sock = socket2::SockRef::from(&s);
        assert!(!sock.keepalive().expect("read"), "off before");
        super::keepalive(&s);
        assert!(sock.keepalive().expect("read"), "on after");
        assert_eq!(
            sock.keepalive_time().expect("read"),
            std::time::Duration::from_secs(30)
        );
        assert_eq!(sock.keepalive_retries().expect("read"), 3);
    }
}

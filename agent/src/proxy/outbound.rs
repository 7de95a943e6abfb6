//! Outbound: connections the pod's app made, rewritten by connect4/6 to 127.0.0.1/::1:15001 in the
//! pod's netns. The original destination comes from the eBPF map; the upstream socket is created in
//! the same netns, so the source address stays the pod's own.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use ambit_common::HBONE_PORT;

use super::pool::{ConnectRequest, PoolKey};
use super::{relay, reset, Metrics, PodContext, ProxyInputs};
use crate::identity::Identity;
use crate::state::{Destination, State, Workload};

pub struct Outbound {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
}

impl Outbound {
    pub async fn run(self) {
        // The listener is bound to one address (127.0.0.1 or ::1, port 15001), so every accepted
        // socket's local address is that one: no getsockname per connection.
        let Ok(local) = self.listener.local_addr() else {
            warn!(pod = %self.pod.name, "outbound listener has no local address");
            return;
        };
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(pod = %self.pod.name, error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            Metrics::inc(&self.pi.metrics.outbound_accepted);
            tokio::spawn(handle(
                self.pi.clone(),
                self.pod.clone(),
                stream,
                peer,
                local,
            ));
        }
    }
}

async fn handle(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let dst = match pi.orig_dst.take(pod.netns_cookie, peer, local) {
        Ok(Some(dst)) => dst,
        Ok(None) | Err(_) => {
            // Someone connected to 15001 directly, or the entry was lost: nowhere safe to go.
            Metrics::inc(&pi.metrics.outbound_orig_dst_missing);
            warn!(pod = %pod.name, %peer, "outbound connection without an original destination; resetting");
            return reset(stream);
        }
    };
    debug!(pod = %pod.name, %peer, %dst, "outbound captured");
    let route = route(&pi.state.load(), pi.secrets.trust_domain(), dst);
    match route {
        Route::Hbone { dst, identity } => {
            Metrics::inc(&pi.metrics.outbound_hbone);
            hbone(&pi, &pod, stream, peer, dst, identity).await
        }
        Route::Direct(dst) => {
            Metrics::inc(&pi.metrics.outbound_plaintext);
            plaintext(&pi, &pod, stream, dst).await
        }
        Route::NoEndpoints => {
            Metrics::inc(&pi.metrics.outbound_no_endpoints);
            debug!(pod = %pod.name, %dst, "service without ready endpoints; resetting");
            reset(stream)
        }
        Route::Incomplete => {
            Metrics::inc(&pi.metrics.outbound_incomplete_view);
            debug!(pod = %pod.name, %dst, "the cluster view is incomplete; resetting");
            reset(stream)
        }
    }
}

/// Where a captured connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An enrolled workload: over HBONE to its 15008, CONNECT to `dst`.
    Hbone { dst: SocketAddr, identity: Identity },
    /// Outside the mesh (or unknown): plaintext, as a direct connection would go.
    Direct(SocketAddr),
    /// A Service port without a ready endpoint.
    NoEndpoints,
    /// Some kind has not been listed yet, so where `dst` belongs is not known: refused rather than
    /// sent in plaintext around the mesh (fail closed).
    Incomplete,
}

/// Decides the route from one state snapshot. A Service VIP is resolved to one of its ready
/// endpoints (the capture happens before kube-proxy could); a pod IP goes to that pod.
pub fn route(state: &State, trust_domain: &str, dst: SocketAddr) -> Route {
    if !state.is_complete() {
        return Route::Incomplete;
    }
    let to_workload = |addr: SocketAddr, w: Option<Arc<Workload>>| match w {
        Some(w) if state.is_enrolled(&w) => Route::Hbone {
            dst: addr,
            identity: Identity::new(trust_domain, &w.namespace, service_account(&w)),
        },
        _ => Route::Direct(addr),
    };
    match state.destination(dst) {
        Some(Destination::Workload(w)) => to_workload(dst, Some(w)),
        Some(Destination::Service {
            service,
            port: Some(_),
        }) => {
            let mut endpoints = state.ready_endpoints(&service, dst.port());
            // Stay in the family the app dialled when the Service is dual-stack.
            if endpoints.iter().any(|e| e.is_ipv4() == dst.is_ipv4()) {
                endpoints.retain(|e| e.is_ipv4() == dst.is_ipv4());
            }
            if endpoints.is_empty() {
                return Route::NoEndpoints;
            }
            let ep = endpoints[fastrand::usize(..endpoints.len())];
            to_workload(ep, state.workload_by_ip(ep.ip()))
        }
        _ => Route::Direct(dst),
    }
}

fn service_account(w: &Workload) -> &str {
    if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    }
}

async fn plaintext(pi: &ProxyInputs, pod: &PodContext, stream: TcpStream, dst: SocketAddr) {
    let upstream = match connect(pod, dst).await {
        Ok(s) => s,
        Err(e) => {
            Metrics::inc(&pi.metrics.outbound_connect_failed);
            debug!(pod = %pod.name, %dst, error = %e, "outbound connect failed");
            // The app must see what a direct connect would have produced: a reset, not a clean close.
            return reset(stream);
        }
    };
    finish(pi, relay::relay(stream, upstream).await);
}

async fn hbone(
    pi: &ProxyInputs,
    pod: &PodContext,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    identity: Identity,
) {
    let Some(src_ip) = pod.ip_like(dst.ip()) else {
        Metrics::inc(&pi.metrics.outbound_hbone_failed);
        warn!(pod = %pod.name, %dst, "pod has no address of the destination's family");
        return reset(stream);
    };
    let key = PoolKey {
        src_netns: pod.netns_cookie,
        src_ip,
        src_id: pod.identity.clone(),
        dst_id: identity,
        dst: SocketAddr::new(dst.ip(), HBONE_PORT),
    };
    let req = ConnectRequest {
        authority: dst,
        // The app's socket is on loopback (capture rewrote its destination); the peer sees the pod.
        forwarded_for: SocketAddr::new(src_ip, peer.port()),
        baggage: pod.baggage.clone(),
    };
    let tunnel = match pi.pool.connect(&key, &pod.worker, &req).await {
        Ok(t) => t,
        Err(e) => {
            Metrics::inc(&pi.metrics.outbound_hbone_failed);
            warn!(pod = %pod.name, %dst, error = %e, "HBONE tunnel failed");
            return reset(stream);
        }
    };
    finish(pi, tunnel.splice(stream).await);
}

async fn connect(pod: &PodContext, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = pod.worker.upstream_socket(dst, None).await?;
    let s = socket.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub(super) fn finish(pi: &ProxyInputs, outcome: relay::RelayOutcome) {
    use std::sync::atomic::Ordering;
    pi.metrics
        .bytes_relayed
        .fetch_add(outcome.a_to_b + outcome.b_to_a, Ordering::Relaxed);
    Metrics::inc(if outcome.reset {
        &pi.metrics.relays_reset
    } else {
        &pi.metrics.relays_completed
    });
}

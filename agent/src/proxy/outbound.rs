//! Outbound: connections the pod's app made, rewritten by connect4/6 to 127.0.0.1/::1:15001 in
//! the pod's netns. Istio's order of decisions: original destination → what it is in the snapshot
//! (a Service, a workload, or outside the mesh) → an endpoint → the connection (HBONE to an
//! enrolled workload, plaintext otherwise). Upstream sockets are made in the pod's netns, so the
//! source address stays the pod's own.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_common::HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::addr::{OrigDst, PeerAddr};
use super::copy;
use super::hbone::{ConnectRequest, PoolKey};
use super::metrics::{ConnectionResult, Peer, Reporter, ServiceRef, TcpLabels};
use super::{connect, reset, Counters, Error, PodContext, ProxyInputs};
use crate::identity::Identity;
use crate::snapshot::Snapshot;
use crate::state::{Destination, Service, State, Workload};

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
        let Outbound { pi, pod, listener } = self;
        let name = pod.name.clone();
        super::accept::serve(listener, "outbound", &name, move |stream, peer| {
            handle(pi.clone(), pod.clone(), stream, PeerAddr(peer), local)
        })
        .await;
    }
}

/// Where a captured connection goes.
#[derive(Debug, Clone)]
pub enum Route {
    /// An enrolled workload: over HBONE to its 15008, CONNECT to `endpoint`.
    Hbone {
        endpoint: SocketAddr,
        identity: Identity,
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Outside the mesh (or unknown): plaintext, as a direct connection would go.
    Direct {
        endpoint: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

async fn handle(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: PeerAddr,
    local: SocketAddr,
) {
    Counters::inc(&pi.counters.outbound_accepted);
    let _ = stream.set_nodelay(true);
    let Some(dst) = pi.orig_dst.take(pod.netns_cookie, peer.0, local) else {
        // Someone connected to 15001 directly, or the entry was lost: nowhere safe to go.
        Counters::inc(&pi.counters.outbound_orig_dst_missing);
        warn!(pod = %pod.name, %peer, "outbound connection without an original destination; resetting");
        return reset(stream);
    };
    let dst = OrigDst(dst);
    debug!(pod = %pod.name, %peer, %dst, "outbound captured");
    let snap = pi.snapshot.load_full();
    let labels = TcpLabels {
        reporter: Reporter::Source,
        source: Peer::Workload(pod.istio.clone()),
        destination: Peer::Unknown,
        service: None,
        flags: "-",
        mtls: false,
    };
    match route(&snap, pi.secrets.trust_domain(), dst) {
        Err(e) => {
            let counter = match &e {
                Error::IncompleteView { .. } => &pi.counters.outbound_incomplete_view,
                _ => &pi.counters.outbound_no_endpoints,
            };
            Counters::inc(counter);
            debug!(pod = %pod.name, %dst, error = %e, "no route; resetting");
            // A Service without ready endpoints is still the destination the app addressed.
            let service = match &e {
                Error::NoHealthyUpstream { service, .. } => snap.state.service_by_host(service),
                _ => None,
            };
            let labels = TcpLabels {
                service: service.map(ServiceRef),
                ..labels
            };
            let result = ConnectionResult::open(&pi.telemetry, labels, (peer.0, dst.0));
            result.finish(Err(e));
            reset(stream)
        }
        Ok(route) => {
            // The labels are complete before the connection is counted as opened.
            let (service, destination, mtls) = match &route {
                Route::Hbone {
                    service, workload, ..
                } => (service, Peer::Workload(workload.istio.clone()), true),
                Route::Direct {
                    service, workload, ..
                } => (
                    service,
                    workload
                        .as_ref()
                        .map_or(Peer::Unknown, |w| Peer::Workload(w.istio.clone())),
                    false,
                ),
            };
            let labels = TcpLabels {
                service: service.clone().map(ServiceRef),
                destination,
                mtls,
                ..labels
            };
            let mut result = ConnectionResult::open(&pi.telemetry, labels, (peer.0, dst.0));
            let outcome = match route {
                Route::Hbone {
                    endpoint, identity, ..
                } => {
                    Counters::inc(&pi.counters.outbound_hbone);
                    result.set_upstream(endpoint);
                    hbone(&pi, &pod, stream, peer, endpoint, identity).await
                }
                Route::Direct { endpoint, .. } => {
                    Counters::inc(&pi.counters.outbound_plaintext);
                    result.set_upstream(endpoint);
                    plaintext(&pi, &pod, stream, endpoint).await
                }
            };
            if let Ok(o) = &outcome {
                finish(&pi, o);
            }
            result.finish(outcome);
        }
    }
}

/// Decides the route from one snapshot. A Service VIP is resolved to one of its ready endpoints
/// (the capture happens before kube-proxy could); a pod IP goes to that pod.
pub fn route(snap: &Snapshot, trust_domain: &str, dst: OrigDst) -> Result<Route, Error> {
    let state = &snap.state;
    if !state.is_complete() {
        let missing: Vec<&str> = state.unsynced().iter().map(|k| k.as_str()).collect();
        return Err(Error::IncompleteView {
            dst: dst.0,
            missing: missing.join(", "),
        });
    }
    match state.destination(dst.0) {
        Some(Destination::Workload(w)) => {
            Ok(to_workload(state, trust_domain, dst.0, Some(w), None))
        }
        Some(Destination::Service {
            service,
            port: Some(_),
        }) => {
            let endpoints = state
                .endpoints_of(&service, dst.0.port())
                .map(|e| e.for_family_of(dst.0))
                .unwrap_or_default();
            if endpoints.is_empty() {
                return Err(Error::NoHealthyUpstream {
                    service: service.hostname.clone(),
                    port: dst.0.port(),
                });
            }
            let ep = endpoints[fastrand::usize(..endpoints.len())];
            let w = state.workload_by_ip(ep.ip());
            Ok(to_workload(state, trust_domain, ep, w, Some(service)))
        }
        _ => Ok(Route::Direct {
            endpoint: dst.0,
            workload: None,
            service: None,
        }),
    }
}

fn to_workload(
    state: &State,
    trust_domain: &str,
    endpoint: SocketAddr,
    w: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
) -> Route {
    match w {
        Some(w) if state.is_enrolled(&w) => Route::Hbone {
            endpoint,
            identity: Identity::new(trust_domain, &w.namespace, service_account(&w)),
            workload: w,
            service,
        },
        w => Route::Direct {
            endpoint,
            workload: w,
            service,
        },
    }
}

fn service_account(w: &Workload) -> &str {
    if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    }
}

async fn plaintext(
    pi: &ProxyInputs,
    pod: &PodContext,
    stream: TcpStream,
    dst: SocketAddr,
) -> Result<copy::Outcome, Error> {
    let upstream = match connect::direct(pod, dst).await {
        Ok(s) => s,
        Err(e) => {
            Counters::inc(&pi.counters.outbound_connect_failed);
            debug!(pod = %pod.name, %dst, error = %e, "outbound connect failed");
            // The app must see what a direct connect would have produced: a reset, not a clean
            // close.
            reset(stream);
            return Err(e);
        }
    };
    Ok(copy::bidirectional(stream, upstream).await)
}

async fn hbone(
    pi: &ProxyInputs,
    pod: &PodContext,
    stream: TcpStream,
    peer: PeerAddr,
    dst: SocketAddr,
    identity: Identity,
) -> Result<copy::Outcome, Error> {
    let Some(src_ip) = pod.ip_like(dst.ip()) else {
        Counters::inc(&pi.counters.outbound_hbone_failed);
        reset(stream);
        return Err(Error::NoSourceAddress { dst });
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
        forwarded_for: SocketAddr::new(src_ip, peer.0.port()),
        baggage: pod.baggage.clone(),
    };
    let tunnel = match pi.pool.connect(&key, pod.sockets.as_ref(), &req).await {
        Ok(t) => t,
        Err(source) => {
            Counters::inc(&pi.counters.outbound_hbone_failed);
            warn!(pod = %pod.name, %dst, error = %source, "HBONE tunnel failed");
            reset(stream);
            return Err(Error::Tunnel {
                dst,
                source: Box::new(source),
            });
        }
    };
    Ok(copy::bidirectional(stream, tunnel).await)
}

/// ambit's own relay counters.
pub(super) fn finish(pi: &ProxyInputs, outcome: &copy::Outcome) {
    use std::sync::atomic::Ordering;
    pi.counters
        .bytes_relayed
        .fetch_add(outcome.a_to_b + outcome.b_to_a, Ordering::Relaxed);
    Counters::inc(if outcome.reset() {
        &pi.counters.relays_reset
    } else {
        &pi.counters.relays_completed
    });
}

//! Outbound: connections the pod's app made, rewritten by connect4/6 to 127.0.0.1/::1:15001 in
//! the pod's netns. Istio's order of decisions: original destination → what it is in the snapshot
//! (a Service, a workload, or outside the mesh) → protocol (declared by the Service port, else
//! detected from the first bytes) → HTTP is served per request (`http::outbound`); anything else
//! is routed here as a whole connection: VirtualService `tls` (by SNI) and `tcp` routes → cluster
//! → the DestinationRule's load balancer → an endpoint → the connection (HBONE to an enrolled
//! workload, plaintext otherwise). Upstream sockets are made in the pod's netns, so the source
//! address stays the pod's own.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_common::HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::addr::{OrigDst, PeerAddr};
use super::copy;
use super::hbone::{ConnectRequest, PoolKey};
use super::http::balance::{endpoints_for, ActiveRequest, Balancers, Outcome, PickContext};
use super::http::breaker::Limits;
use super::http::outbound::HttpConn;
use super::http::target::{self, ClusterRef, NoCluster};
use super::metrics::{ConnectionResult, Peer, Reporter, ServiceRef, TcpLabels};
use super::protocol::{self, Protocol};
use super::{connect, http, reset, Counters, Error, PodContext, ProxyInputs};
use crate::admin::connections::{ConnectionInfo, Direction, Protocol as LiveProtocol};
use crate::identity::Identity;
use crate::routing::entries::Entry;
use crate::routing::matching;
use crate::snapshot::Snapshot;
use crate::state::{Destination, Service, State, Workload};

pub struct Outbound {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
    /// To and from the other workers' loops on this listener.
    pub handoff: super::accept::Handoff,
}

impl Outbound {
    pub async fn run(self) {
        // The listener is bound to one address (127.0.0.1 or ::1, port 15001), so every accepted
        // socket's local address is that one: no getsockname per connection.
        let Ok(local) = self.listener.local_addr() else {
            warn!(pod = %self.pod.name, "outbound listener has no local address");
            return;
        };
        let Outbound {
            pi,
            pod,
            listener,
            handoff,
        } = self;
        let (name, affinity) = (pod.name.clone(), pod.netns_cookie);
        let drain = pi.drain.clone();
        super::accept::serve(
            listener,
            handoff,
            &drain,
            "outbound",
            &name,
            affinity,
            move |stream, peer| handle(pi.clone(), pod.clone(), stream, PeerAddr(peer), local),
        )
        .await;
    }
}

/// Istio's cluster for a destination no Service or ServiceEntry covers.
const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

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

    // Istio's protocol selection: what the destination port declares, else what the first bytes
    // show. Only Service ports are routed by protocol; a pod address or an address outside the
    // mesh is forwarded as it is (L4).
    let declared = protocol_of(&pi.snapshot.load(), &pod.namespace, dst.0);
    let mut sni = None;
    match declared {
        Some(p) if p.is_http() => {
            return serve_http(pi, pod, stream, peer, local, dst, p, false).await;
        }
        Some(p) if p.is_sniffed() => {
            Counters::inc(&pi.counters.outbound_sniffed);
            let sniffed = protocol::sniff(&stream, pi.protocol_detection_timeout).await;
            debug!(pod = %pod.name, %dst, sniffed = sniffed.metric_label(), "protocol detected");
            match sniffed.protocol() {
                None => return, // closed before a byte: nothing to forward
                Some(p) if p.is_http() => {
                    return serve_http(pi, pod, stream, peer, local, dst, p, true).await;
                }
                Some(_) => {}
            }
        }
        Some(p) if p.is_tls_routed() => {
            match protocol::client_hello_sni(&stream, pi.protocol_detection_timeout).await {
                Ok(name) => sni = name,
                // Without a readable SNI the connection goes where the Service's default goes
                // (Envoy falls back to the filter chain without server names).
                Err(e) => debug!(pod = %pod.name, %dst, error = %e, "no SNI"),
            }
        }
        _ => {}
    }
    tcp(pi, pod, stream, peer, dst, sni.as_deref()).await
}

/// The declared protocol of what `dst` addresses: a Service port, or a ServiceEntry port (by
/// the entry's address, else a port of an entry without addresses: Istio gives such a port one
/// listener for every address, HTTP if any entry declares HTTP on it, then TLS); None when `dst`
/// is a pod or outside everything known (forwarded at L4).
fn protocol_of(snap: &Snapshot, namespace: &str, dst: SocketAddr) -> Option<Protocol> {
    match snap.state.destination(dst) {
        Some(Destination::Service {
            port: Some(port), ..
        }) => return Some(Protocol::for_service_port(&port)),
        Some(Destination::Service { port: None, .. } | Destination::Workload(_)) => return None,
        _ => {}
    }
    if let Some(e) = target::entry_at(snap, namespace, dst) {
        return e.service.port(dst.port()).map(Protocol::for_service_port);
    }
    let on_port: Vec<Protocol> = snap
        .routes
        .entries_of(namespace)
        .filter(|e| e.addresses.is_empty())
        .filter_map(|e| e.service.port(dst.port()))
        .map(Protocol::for_service_port)
        .collect();
    on_port
        .iter()
        .find(|p| p.is_http())
        .or_else(|| on_port.iter().find(|p| p.is_tls_routed()))
        .or_else(|| on_port.first())
        .copied()
}

#[allow(clippy::too_many_arguments)]
async fn serve_http(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: PeerAddr,
    local: SocketAddr,
    dst: OrigDst,
    protocol: Protocol,
    sniffed: bool,
) {
    Counters::inc(&pi.counters.outbound_http);
    let _live = pi.connections.register(ConnectionInfo {
        workload: format!("{}/{}", pod.namespace, pod.name),
        direction: Direction::Outbound,
        protocol: LiveProtocol::Http,
        src: pod.app_address(peer.0, dst.0),
        dst: dst.0,
        original_dst: Some(dst.0),
    });
    let conn = HttpConn {
        pi,
        pod_key: format!("{}/{}", pod.namespace, pod.name),
        pod,
        peer,
        local,
        dst,
        protocol,
        sniffed,
    };
    http::outbound::serve(conn, stream).await
}

/// A connection forwarded at L4: to the endpoint the route and load balancer choose, as bytes.
async fn tcp(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: PeerAddr,
    dst: OrigDst,
    sni: Option<&str>,
) {
    let snap = pi.snapshot.load_full();
    let labels = TcpLabels {
        reporter: Reporter::Source,
        source: Peer::Workload(pod.istio.clone()),
        destination: Peer::Unknown,
        service: None,
        flags: "-",
        mtls: false,
        tags: None,
    };
    let key = format!("{}/{}", pod.namespace, pod.name);
    // The source workload's CLIENT settings (Telemetry API), looked up only when some workload
    // of this node has settings that change TCP connections (an access log, a metric turned
    // off, tag overrides).
    let settings = snap.tcp_telemetry.then(|| snap.telemetry_of(&key));
    let downstream = (pod.app_address(peer.0, dst.0), dst.0);
    let tagged = |labels: TcpLabels| match settings {
        Some(s) => labels.tagged(&s.client.metrics, downstream, pi.secrets.trust_domain()),
        None => labels,
    };
    let conn = L4Conn {
        peer: peer.0,
        dst: dst.0,
        namespace: &pod.namespace,
        source: snap.state.workloads.get(key.as_str()).map(|w| &**w),
        sni,
        name_cluster: settings.is_some_and(|s| s.client.access_log.enabled()),
    };
    let routed = route(&snap, pi.secrets.trust_domain(), &pi.balancers, &conn).and_then(
        |(route, active, tcp)| {
            // `maxConnections`: the cluster's connections from this node; past it, refused (UO).
            let limited = tcp.limits.as_ref().map(|(k, l)| pi.breakers.limited(k, *l));
            let slot = match limited {
                Some(l) => Some(l.connection().ok_or_else(|| Error::Overflow {
                    cluster: l.cluster.to_string(),
                })?),
                None => None,
            };
            Ok((route, active, tcp, slot))
        },
    );
    match routed {
        Err(e) => {
            let counter = match &e {
                Error::IncompleteView { .. } => &pi.counters.outbound_incomplete_view,
                Error::Overflow { .. } => &pi.counters.outbound_overflow,
                _ => &pi.counters.outbound_no_endpoints,
            };
            Counters::inc(counter);
            debug!(pod = %pod.name, %dst, error = %e, "no route; resetting");
            // A Service without ready endpoints is still the destination the app addressed.
            let service = match &e {
                Error::NoHealthyUpstream { service, .. } => snap.state.service_by_host(service),
                _ => None,
            };
            let mut result = ConnectionResult::open(
                &pi.telemetry,
                tagged(TcpLabels {
                    service: service.clone().map(ServiceRef),
                    ..labels
                }),
                downstream,
                settings,
            );
            if result.logs() {
                if let Some(s) = service {
                    result.set_cluster(format!("outbound|{}||{}", dst.0.port(), s.hostname));
                }
                if let Some(sni) = sni {
                    result.set_requested_server_name(sni);
                }
            }
            result.finish(Err(e));
            reset(stream)
        }
        Ok((route, active, tcp, connection)) => {
            // The labels are complete before the connection is counted as opened. `active`
            // counts the connection on its endpoint (least request) until it ends.
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
            let labels = tagged(TcpLabels {
                service: service.clone().map(ServiceRef),
                destination,
                mtls,
                ..labels
            });
            let mut result = ConnectionResult::open(&pi.telemetry, labels, downstream, settings);
            if result.logs() {
                // Envoy names the cluster it forwarded to; a destination no Service or entry
                // covers goes through `PassthroughCluster`.
                result.set_cluster(
                    tcp.cluster
                        .as_ref()
                        .map_or_else(|| PASSTHROUGH_CLUSTER.to_string(), ToString::to_string),
                );
                if let Some(sni) = sni {
                    result.set_requested_server_name(sni);
                }
            }
            let live = |protocol, endpoint| {
                pi.connections.register(ConnectionInfo {
                    workload: key.clone(),
                    direction: Direction::Outbound,
                    protocol,
                    src: pod.app_address(peer.0, dst.0),
                    dst: endpoint,
                    original_dst: Some(dst.0),
                })
            };
            let outcome = match route {
                Route::Hbone {
                    endpoint, identity, ..
                } => {
                    Counters::inc(&pi.counters.outbound_hbone);
                    result.set_upstream(endpoint);
                    let _live = live(LiveProtocol::Hbone, endpoint);
                    hbone(&pi, &pod, stream, peer, endpoint, identity, &tcp).await
                }
                Route::Direct { endpoint, .. } => {
                    Counters::inc(&pi.counters.outbound_plaintext);
                    result.set_upstream(endpoint);
                    let _live = live(LiveProtocol::Tcp, endpoint);
                    plaintext(&pi, &pod, stream, endpoint, &tcp).await
                }
            };
            // Envoy's TCP proxy tells the outlier detector whether the connection was made.
            match &outcome {
                Err(Error::Connect { .. } | Error::Tunnel { .. }) => {
                    active.report(Outcome::ConnectFailed);
                }
                Err(Error::UpstreamReset) | Ok(_) => active.report(Outcome::Connected),
                Err(_) => {}
            }
            // The connection's places end before it is counted as ended.
            drop((active, connection));
            if let Ok(o) = &outcome {
                finish(&pi, o);
            }
            result.finish(outcome);
        }
    }
}

/// A cluster's `connectionPool.tcp` as an L4 connection applies it.
#[derive(Debug, Clone)]
pub struct TcpPool {
    /// Istio: default 10s.
    pub connect_timeout: std::time::Duration,
    pub keepalive: Option<connect::Keepalive>,
    /// The cluster and its limits (for its `maxConnections` breaker), when its policy sets a
    /// connection pool.
    pub limits: Option<(crate::routing::ClusterKey, Limits)>,
    /// The cluster, when the connection's access log names it ([`L4Conn::name_cluster`]).
    pub cluster: Option<crate::routing::ClusterKey>,
}

impl Default for TcpPool {
    fn default() -> Self {
        TcpPool {
            connect_timeout: crate::proxy::http::client::DEFAULT_CONNECT_TIMEOUT,
            keepalive: None,
            limits: None,
            cluster: None,
        }
    }
}

impl TcpPool {
    fn of(cluster: &crate::routing::Cluster, named: bool) -> TcpPool {
        let name = || named.then(|| cluster.key.clone());
        let Some(pool) = cluster.policy.connection_pool.as_ref() else {
            return TcpPool {
                cluster: name(),
                ..TcpPool::default()
            };
        };
        let tcp = pool.tcp.as_ref();
        TcpPool {
            connect_timeout: tcp.map_or(crate::proxy::http::client::DEFAULT_CONNECT_TIMEOUT, |t| {
                t.connect_timeout()
            }),
            keepalive: tcp
                .and_then(|t| t.tcp_keepalive.as_ref())
                .map(connect::Keepalive::of),
            limits: Limits::of(cluster).map(|l| (cluster.key.clone(), l)),
            cluster: name(),
        }
    }
}

/// What L4 routing looks at: the connection, its client, and the SNI of a TLS port.
#[derive(Debug, Clone, Copy)]
pub struct L4Conn<'a> {
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    /// The client pod's namespace.
    pub namespace: &'a str,
    /// The client workload, if the snapshot has it.
    pub source: Option<&'a Workload>,
    /// The ClientHello's server name, on a port declared TLS or HTTPS.
    pub sni: Option<&'a str>,
    /// Whether the route should name its cluster (`TcpPool::cluster`): an access log will show
    /// it. Otherwise the connection does not pay for a copy of the name.
    pub name_cluster: bool,
}

/// Decides the route from one snapshot. A Service port goes where its VirtualService's `tls`
/// (by SNI) or `tcp` routes send it, else to the Service itself, and the DestinationRule's load
/// balancer picks the endpoint (the capture happens before kube-proxy could); a pod IP goes to
/// that pod.
pub fn route(
    snap: &Snapshot,
    trust_domain: &str,
    balancers: &Balancers,
    conn: &L4Conn<'_>,
) -> Result<(Route, ActiveRequest, TcpPool), Error> {
    let state = &snap.state;
    let dst = conn.dst;
    if !state.is_complete() {
        let missing: Vec<&str> = state.unsynced().iter().map(|k| k.as_str()).collect();
        return Err(Error::IncompleteView {
            dst,
            missing: missing.join(", "),
        });
    }
    let service = match state.destination(dst) {
        Some(Destination::Workload(w)) => {
            return Ok((
                to_workload(state, trust_domain, dst, Some(w), None),
                ActiveRequest::default(),
                TcpPool::default(),
            ))
        }
        Some(Destination::Service {
            service,
            port: Some(_),
        }) => Some(service),
        Some(Destination::Service { port: None, .. }) => None,
        Some(Destination::ServiceEntry(_)) | None => {
            entry_for(snap, conn).map(|e| e.service.clone())
        }
    };
    let Some(service) = service else {
        return Ok((
            Route::Direct {
                endpoint: dst,
                workload: None,
                service: None,
            },
            ActiveRequest::default(),
            TcpPool::default(),
        ));
    };
    let cluster = l4_cluster(snap, conn, &service)?;
    if cluster.passthrough {
        return Ok((
            Route::Direct {
                endpoint: dst,
                workload: state.workload_by_ip(dst.ip()),
                service: cluster.service.clone(),
            },
            ActiveRequest::default(),
            TcpPool {
                cluster: conn.name_cluster.then(|| cluster.key.clone()),
                ..TcpPool::default()
            },
        ));
    }
    let endpoints = endpoints_for(&cluster.endpoints, dst);
    let ctx = PickContext::connection(conn.peer, dst);
    let Some(picked) = balancers.pick(&cluster.key, &cluster.policy, endpoints, &ctx) else {
        return Err(Error::NoHealthyUpstream {
            service: cluster.key.host.to_string(),
            port: cluster.key.port,
        });
    };
    let w = state.workload_by_ip(picked.addr.ip());
    let tcp = TcpPool::of(&cluster, conn.name_cluster);
    let service = cluster.service.clone().or(Some(service));
    Ok((
        to_workload(state, trust_domain, picked.addr, w, service),
        picked.active,
        tcp,
    ))
}

/// The ServiceEntry host a connection to an address outside the cluster's Services goes to, as
/// Istio's listeners decide: an entry whose `addresses` include it; on a TLS port, the entry the
/// SNI names; else an entry without addresses that declares this port TCP and resolves its own
/// endpoints (its listener takes the whole port).
fn entry_for<'s>(snap: &'s Snapshot, conn: &L4Conn<'_>) -> Option<&'s Arc<Entry>> {
    let dst = conn.dst;
    if let Some(e) = target::entry_at(snap, conn.namespace, dst) {
        return Some(e);
    }
    let without_addresses = |e: &&Arc<Entry>| e.addresses.is_empty();
    if let Some(sni) = conn.sni {
        let e = snap
            .routes
            .entry(conn.namespace, sni)
            .filter(without_addresses)
            .filter(|e| e.service.port(dst.port()).is_some());
        if e.is_some() {
            return e;
        }
    }
    snap.routes
        .entries_of(conn.namespace)
        .filter(without_addresses)
        .filter(|e| !e.is_passthrough())
        .find(|e| {
            e.service.port(dst.port()).is_some_and(|p| {
                let protocol = Protocol::for_service_port(p);
                !protocol.is_http() && !protocol.is_tls_routed()
            })
        })
}

/// The cluster an L4 connection to `service` goes to: the first `tls` route matching the SNI
/// (TLS ports), else the first matching `tcp` route, by weight; without one, the Service itself.
fn l4_cluster<'s>(
    snap: &'s Snapshot,
    conn: &L4Conn<'_>,
    service: &Arc<Service>,
) -> Result<ClusterRef<'s>, Error> {
    let dst = conn.dst;
    let no_cluster = |host: &str, e: NoCluster| Error::NoCluster {
        host: host.to_string(),
        reason: e.describe(),
    };
    let vhost = snap.routes.virtual_host(conn.namespace, &service.hostname);
    let dests = vhost.and_then(|v| {
        let tls = conn.sni.and_then(|_| {
            matching::select_tls(&v.tls, conn.sni, dst, conn.source, conn.namespace)
                .map(|r| &r.destinations)
        });
        tls.or_else(|| {
            matching::select_tcp(&v.tcp, dst, conn.source, conn.namespace).map(|r| &r.destinations)
        })
    });
    match dests {
        Some(dests) => {
            let Some(d) = matching::pick_weighted(dests, fastrand::u64(..)) else {
                return Err(no_cluster(&service.hostname, NoCluster::UnknownHost));
            };
            target::cluster(snap, conn.namespace, &d.cluster, dst.port())
                .map_err(|e| no_cluster(&d.cluster.host, e))
        }
        None => target::service_cluster(snap, conn.namespace, service, dst.port())
            .map_err(|e| no_cluster(&service.hostname, e)),
    }
}

pub(crate) fn to_workload(
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
    tcp: &TcpPool,
) -> Result<copy::Outcome, Error> {
    let connecting = connect::direct_with(pod, dst, tcp.keepalive);
    let connected = tokio::time::timeout(tcp.connect_timeout, connecting)
        .await
        .unwrap_or_else(|_| Err(connect::timed_out(dst, tcp.connect_timeout)));
    let upstream = match connected {
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
    Ok(copy::bidirectional(stream, upstream, pi.splice()).await)
}

/// To an enrolled workload: handed to its inbound stage in-process when it is a pod of this node
/// (`local`), else over an HBONE tunnel.
async fn hbone(
    pi: &Arc<ProxyInputs>,
    pod: &PodContext,
    stream: TcpStream,
    peer: PeerAddr,
    dst: SocketAddr,
    identity: Identity,
    tcp: &TcpPool,
) -> Result<copy::Outcome, Error> {
    if let Some(local) = pi.local.serving(dst.ip()) {
        let client = pod.app_address(peer.0, dst);
        let timeout = tcp.connect_timeout;
        return super::local::handoff(pi, pod, local, stream, client, dst, timeout).await;
    }
    let Some(src_ip) = pod.ip_like(dst.ip()) else {
        Counters::inc(&pi.counters.outbound_hbone_failed);
        reset(stream);
        return Err(Error::NoSourceAddress { dst });
    };
    let key = PoolKey {
        worker: crate::proxy::worker::current(),
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
    let connecting = pi.pool.connect(&key, pod.sockets.as_ref(), &req);
    let tunnel = match tokio::time::timeout(tcp.connect_timeout, connecting).await {
        Err(_) => {
            Counters::inc(&pi.counters.outbound_hbone_failed);
            reset(stream);
            return Err(connect::timed_out(dst, tcp.connect_timeout));
        }
        Ok(Ok(t)) => t,
        Ok(Err(source)) => {
            Counters::inc(&pi.counters.outbound_hbone_failed);
            warn!(pod = %pod.name, %dst, error = %source, "HBONE tunnel failed");
            reset(stream);
            return Err(Error::Tunnel {
                dst,
                source: Box::new(source),
            });
        }
    };
    Ok(copy::bidirectional(stream, tunnel, None).await)
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

//! Inbound over HBONE: port 15008 in each enrolled pod (sk_lookup never steers it). Each CONNECT
//! stream is one tunnelled connection to the app. Answers as ztunnel's: 400 or 503 when the
//! CONNECT has no target (`hbone::target`: not a CONNECT, another pod's address, an unknown
//! hostname, one of the proxy's own ports), 401 when policy denies, 503 when the app cannot be
//! reached, 200 (with the pod's `baggage`) and the tunnel otherwise. Also the inbound policy
//! check both inbound stages share.
//!
//! A stream's work is in two parts that `proxy::local` shares for a client pod on this node:
//! [`admit`] decides (labels, policy, the app's connection) and [`carry`] moves the bytes, over
//! any [`Downstream`] (the CONNECT stream here).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::addr::{canonical, OrigDst, PeerAddr};
use super::hbone::server::{self, answer};
use super::hbone::target::{self, Reached, Target, TargetError};
use super::hbone::Stream;
use super::http::inbound::{self as inbound_http, Carried, Downstream, InboundHttp};
use super::metrics::{inbound_cluster, ConnectionResult, Peer, Reporter, ServiceRef, TcpLabels};
use super::{connect, copy, Counters, Error, PodContext, ProxyInputs};
use crate::admin::connections::{
    ConnectionGuard, ConnectionInfo, Direction, Protocol as LiveProtocol,
};
use crate::identity::Identity;
use crate::policy::{evaluate, ConnAttrs, Verdict};
use crate::snapshot::Snapshot;

pub struct Inbound {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
    /// To and from the other workers' loops on this listener.
    pub handoff: super::accept::Handoff,
}

impl Inbound {
    pub async fn run(self) {
        // Handshakes need the pod's certificate: wait for its first issue (connections queue in
        // the backlog meanwhile).
        let mut wait = Duration::from_millis(50);
        while let Err(e) = self.pi.secrets.fetch(&self.pod.identity).await {
            warn!(pod = %self.pod.name, identity = %self.pod.identity, error = %e, "no certificate yet for the HBONE listener");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        let acceptor = TlsAcceptor::from(crate::tls::server_config(
            self.pi.secrets.clone(),
            self.pod.identity.clone(),
        ));
        let Inbound {
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
            "inbound",
            &name,
            affinity,
            move |tcp, peer| {
                connection(
                    pi.clone(),
                    pod.clone(),
                    acceptor.clone(),
                    tcp,
                    PeerAddr(peer),
                )
            },
        )
        .await;
    }
}

async fn connection(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: PeerAddr,
) {
    Counters::inc(&pi.counters.hbone_inbound_accepted);
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let served = server::serve(
        &acceptor,
        &pi.drain,
        tcp,
        peer.0,
        |identity, req, respond| {
            stream(pi.clone(), pod.clone(), identity, peer, local, req, respond)
        },
    )
    .await;
    match served {
        Ok(server::Ended::Closed) => {}
        Ok(server::Ended::Flooded) => {
            Counters::inc(&pi.counters.hbone_control_flood);
            server::report_flood(&pod.name, peer.0);
        }
        Err(e) => {
            Counters::inc(&pi.counters.hbone_tls_refused);
            // Any client can fail a handshake: one line per failure would let it fill the log.
            server::report_refused(&pod.name, &e);
        }
    }
}

/// One CONNECT stream.
async fn stream(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    identity: Arc<Identity>,
    peer: PeerAddr,
    local: SocketAddr,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let snap = pi.snapshot.load_full();
    let reached = Reached {
        namespace: &pod.namespace,
        name: &pod.name,
        ips: &pod.ips,
        local,
        own: &pi.own_ports,
    };
    let target = match target::resolve(&req, reached, &snap) {
        Ok(t) => t,
        Err(e) => {
            Counters::inc(&pi.counters.hbone_inbound_streams);
            let status = refused(&pi, &pod, peer, &identity, req.method(), req.uri(), &e);
            return answer(&mut respond, status);
        }
    };
    let admitted = match admit(&pi, &pod, &snap, &identity, peer, target).await {
        Ok(a) => a,
        Err(status) => return answer(&mut respond, status),
    };
    drop(snap);
    let ok = established(&pod);
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name, dst = %admitted.dst, error = %e, "client went away before the tunnel opened");
            return admitted.abandon();
        }
    };
    debug!(pod = %pod.name, %peer, %identity, dst = %admitted.dst, "HBONE tunnel open");
    let outcome = carry(admitted, Stream::new(send, req.into_body())).await;
    super::outbound::finish(&pi, &outcome);
}

/// A connection the inbound stage let through: its telemetry open (reporter destination), its
/// place in the live connections, and the app's connection made; [`carry`] relays or serves it.
pub(super) struct Admitted {
    result: ConnectionResult,
    app: TcpStream,
    dst: OrigDst,
    /// Destination-side L7, when the port is looked at for HTTP.
    http: Option<InboundHttp>,
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    _live: ConnectionGuard,
}

impl Admitted {
    /// The client went away before its connection was carried.
    pub(super) fn abandon(self) {
        super::reset(self.app);
        self.result.finish(Err(Error::DownstreamReset));
    }
}

/// The part of an inbound connection that decides, whatever carries it (an HBONE stream, or a
/// client pod on this node handed over in-process, `proxy::local`): telemetry labels with the
/// verified source, AuthorizationPolicy, then the app's connection from the client's address.
/// A refusal is recorded here and comes back as the status an HBONE client is answered (401
/// denied, 503 app unreachable).
pub(super) async fn admit(
    pi: &Arc<ProxyInputs>,
    pod: &Arc<PodContext>,
    snap: &Snapshot,
    identity: &Identity,
    peer: PeerAddr,
    target: Target,
) -> Result<Admitted, StatusCode> {
    // Counted for every connection that reaches the app's side, tunnelled or handed over.
    Counters::inc(&pi.counters.hbone_inbound_streams);
    let dst = target.dst;
    let labels = TcpLabels {
        reporter: Reporter::Destination,
        source: verified_source(snap, peer, identity),
        destination: Peer::Workload(pod.istio.clone()),
        // The Service the client named, else the one that selects the pod on that port.
        service: target
            .service
            .or_else(|| {
                snap.local_service(&pod.namespace, &pod.name, dst.0.port())
                    .cloned()
            })
            .map(ServiceRef),
        flags: "-",
        mtls: true,
        tags: None,
    };
    // The HTTP requests of the stream (destination-side L7) carry their own tags.
    let l7_labels = labels.clone();
    let key = format!("{}/{}", pod.namespace, pod.name);
    // The destination workload's SERVER settings (Telemetry API), looked up only when some
    // workload of this node has settings that change TCP connections.
    let settings = snap.tcp_telemetry.then(|| snap.telemetry_of(&key));
    let labels = match settings {
        Some(s) => labels.tagged(
            &s.server.metrics,
            (peer.0, dst.0),
            pi.secrets.trust_domain(),
        ),
        None => labels,
    };
    let mut result = ConnectionResult::open(&pi.telemetry, labels, (peer.0, dst.0), settings);
    if result.logs() {
        result.set_cluster(inbound_cluster(dst.0.port()));
    }
    if let Err(e) = authorize(pi, snap, pod, peer, dst, Some(identity)) {
        result.finish(Err(e));
        return Err(StatusCode::UNAUTHORIZED);
    }
    result.set_upstream(dst.0);
    let live = pi.connections.register(ConnectionInfo {
        workload: key.clone(),
        direction: Direction::Inbound,
        protocol: LiveProtocol::Hbone,
        src: peer.0,
        dst: dst.0,
        original_dst: Some(dst.0),
    });
    let app = match connect::app(pod, dst.0, SocketAddr::new(peer.0.ip(), 0)).await {
        Ok(app) => app,
        Err(e) => {
            Counters::inc(&pi.counters.inbound_connect_failed);
            connect::log_app_unreachable(pod, dst.0, peer.0, &e);
            result.finish(Err(e));
            return Err(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let http = inbound_http::wanted(pi, snap, pod, dst.0.port()).then(|| InboundHttp {
        pi: pi.clone(),
        pod: pod.clone(),
        labels: l7_labels,
        peer: peer.0,
        dst: dst.0,
        pod_key: key,
    });
    Ok(Admitted {
        result,
        app,
        dst,
        http,
        pi: pi.clone(),
        pod: pod.clone(),
        _live: live,
    })
}

/// The part that carries an admitted connection from the client's end `down` to the app:
/// destination-side L7 when the port is looked at for HTTP and the bytes are HTTP, else a relay.
/// Records the connection's end and returns how it went (the caller counts the relay).
pub(super) async fn carry<D: Downstream>(admitted: Admitted, down: D) -> copy::Outcome {
    let Admitted {
        mut result,
        app,
        dst,
        http,
        pi,
        pod,
        _live,
    } = admitted;
    let outcome = match http {
        Some(conn) => match inbound_http::classify(down, &app, pi.protocol_detection_timeout).await
        {
            Carried::Http { io, h2 } => {
                // Its requests are logged one by one (Envoy's HTTP connection manager writes
                // no connection line).
                result.served_as_http();
                inbound_http::serve(conn, io, app, h2, D::CLIENT_CLOSES).await
            }
            Carried::Opaque { tunnel, first } => relay_after(tunnel, first, app, pi.splice()).await,
            Carried::AppFailed {
                tunnel,
                read,
                error,
            } => {
                debug!(pod = %pod.name, %dst, %error, "app connection failed");
                tunnel.abort();
                copy::Outcome {
                    a_to_b: read as u64,
                    b_to_a: 0,
                    failed: Some(copy::Side::B),
                }
            }
        },
        None => copy::bidirectional(down, app, pi.splice()).await,
    };
    result.finish(Ok(outcome));
    outcome
}

/// Relays the stream as bytes, `first` (already read from it) to the app first.
async fn relay_after<D: copy::Duplex>(
    tunnel: D,
    first: Bytes,
    mut app: TcpStream,
    splice: Option<&std::sync::atomic::AtomicU64>,
) -> copy::Outcome {
    use tokio::io::AsyncWriteExt;
    if !first.is_empty() {
        if let Err(e) = app.write_all(&first).await {
            debug!(error = %e, "app went away before the stream's first bytes");
            super::reset(app);
            return copy::Outcome {
                a_to_b: 0,
                b_to_a: 0,
                failed: Some(copy::Side::B),
            };
        }
    }
    let mut outcome = copy::bidirectional(tunnel, app, splice).await;
    outcome.a_to_b += first.len() as u64;
    outcome
}

/// The 200 that opens a tunnel. As ztunnel's, it carries the destination workload's `baggage`
/// (ztunnel's `ENABLE_RESPONSE_BAGGAGE`, on by default); its refusals carry none.
fn established(pod: &PodContext) -> http::Response<()> {
    let mut ok = http::Response::new(());
    if let Some(baggage) = &pod.baggage {
        ok.headers_mut().insert(
            http::header::HeaderName::from_static("baggage"),
            baggage.clone(),
        );
    }
    ok
}

/// Records a CONNECT that has no target (`hbone::target`) and returns its answer. ztunnel logs
/// each at WARN (its "connection failed" early-deny line), before any access log or metric; as
/// there, only a client holding a certificate of the mesh (or a pod of this node) can cause one.
pub(super) fn refused(
    pi: &ProxyInputs,
    pod: &PodContext,
    peer: PeerAddr,
    identity: &Identity,
    method: &http::Method,
    uri: &http::Uri,
    e: &TargetError,
) -> StatusCode {
    let status = e.status();
    if status == StatusCode::BAD_REQUEST {
        Counters::inc(&pi.counters.hbone_inbound_bad_request);
    } else {
        Counters::inc(&pi.counters.hbone_inbound_unavailable);
    }
    warn!(pod = %pod.name, namespace = %pod.namespace, src.addr = %peer, %identity, %method, %uri, status = status.as_u16(), reason = e.metric_label(), error = %e, "HBONE request refused");
    status
}

/// The source of an HBONE stream for the metrics: the workload at the peer's address if it runs
/// as the verified identity, else the identity alone (ztunnel does the same: what the peer proved,
/// never what it says).
fn verified_source(snap: &Snapshot, peer: PeerAddr, identity: &Identity) -> Peer {
    match snap.state.workload_by_ip(canonical(peer.0.ip())) {
        Some(w)
            if w.namespace == identity.namespace
                && w.service_account == identity.service_account =>
        {
            Peer::Workload(w.istio.clone())
        }
        _ => Peer::Identity(identity.clone()),
    }
}

/// Inbound authorization (PeerAuthentication, AuthorizationPolicy) of one connection or stream
/// from this snapshot's compiled policies; AUDIT matches are logged, denials counted.
pub(super) fn authorize(
    pi: &ProxyInputs,
    snap: &Snapshot,
    pod: &PodContext,
    src: PeerAddr,
    dst: OrigDst,
    identity: Option<&Identity>,
) -> Result<(), Error> {
    let denied = |policy: String, reason: String| {
        Counters::inc(&pi.counters.inbound_denied);
        pi.telemetry
            .denials
            .get_or_create(&super::metrics::DenialLabels {
                policy: policy.clone(),
                workload: format!("{}/{}", pod.namespace, pod.name),
            })
            .inc();
        debug!(workload = %pod.name, namespace = %pod.namespace, %src, %dst, identity = ?identity.map(ToString::to_string), %policy, %reason, "denied");
        Err(Error::Denied { policy, reason })
    };
    let Some(policy) = snap.policies.for_workload(&pod.namespace, &pod.name) else {
        // Enrolment follows the snapshot the policies were compiled from, so this is a race
        // with a change; refuse rather than guess.
        return denied(
            "(none)".into(),
            "no policy view for this workload yet".into(),
        );
    };
    let decision = evaluate(
        &policy,
        &ConnAttrs {
            src_ip: src.0.ip(),
            dst_ip: dst.0.ip(),
            dst_port: dst.0.port(),
            identity,
        },
    );
    for audited in &decision.audit {
        info!(policy = %audited, workload = %pod.name, namespace = %pod.namespace, %src, %dst, identity = ?identity.map(ToString::to_string), "AUDIT policy matched");
    }
    match decision.verdict {
        Verdict::Allow { .. } => Ok(()),
        Verdict::Deny { policy, reason } => denied(policy.to_string(), reason.to_string()),
    }
}

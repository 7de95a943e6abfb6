//! L7 outbound: serves an enrolled pod's HTTP connection (HTTP/1.x or HTTP/2, whatever the app
//! speaks) and routes each request as an Istio sidecar would, in Istio's order of decisions, on
//! the snapshot of the moment (a route change applies to the next request, on the same
//! connection): host → VirtualService route (first match) → redirect, direct response, CORS
//! preflight, or a weighted destination → cluster → load balancer → endpoint → upstream
//! connection (HBONE to a meshed workload, plaintext otherwise), pooled per source pod.
//!
//! Bodies stream both ways; trailers pass (gRPC status); an HTTP/1.1 `Upgrade` (WebSocket) is
//! sent on after the route is chosen and the two upgraded connections are joined. Bad requests get
//! hyper's 400 (or 431 for headers over [`MAX_HEADER_BYTES`]) and the connection is closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use super::body::{Finishing, ProxyBody};
use super::client;
use super::headers::{self, LocalReply};
use super::passthrough::source::stream;
use super::retry::add_flag;
use super::target::{self, ClusterRef, Target};
use crate::proxy::access_log::RequestFields;
use crate::proxy::addr::{OrigDst, PeerAddr};
use crate::proxy::local::Prefixed;
use crate::proxy::metrics::requests::{header_bytes, RequestLabels, RequestResult};
use crate::proxy::metrics::{Peer, Reporter, ServiceRef, TcpLabels};
use crate::proxy::protocol::Protocol;
use crate::proxy::spans;
use crate::proxy::{Counters, PodContext, ProxyInputs};
use crate::routing::matching::{self, cors_preflight};
use crate::routing::{Action, HttpRoute, RequestInfo, RequestMatch, WeightedDestination};
use crate::snapshot::Snapshot;
use crate::state::Workload;
use crate::trace::SpanKind;

/// The most header bytes a request may carry (Envoy's `max_request_headers_kb` default, 60 KiB);
/// more is answered 431.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// One HTTP connection of an enrolled pod's app.
#[derive(Debug)]
pub struct HttpConn {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    /// `namespace/name` of the client pod, as the state keys workloads (made once per
    /// connection, not per request).
    pub pod_key: String,
    pub peer: PeerAddr,
    /// The proxy's listener address.
    pub local: SocketAddr,
    pub dst: OrigDst,
    /// The port's protocol: declared, or what the first bytes showed.
    pub protocol: Protocol,
    /// Whether it was detected rather than declared (the upstream then speaks the app's version,
    /// as Istio's sniffed ports do).
    pub sniffed: bool,
}

/// Serves the connection until the app closes it: HTTP/1.x requests the source-side relay can
/// follow as bytes (`passthrough::source`), and the connection from the first one it cannot on
/// (or HTTP/2 from the start) with hyper's server.
pub async fn serve(conn: HttpConn, mut stream: TcpStream) {
    let conn = Arc::new(conn);
    let (unread, served) = if relays(&conn) {
        match super::passthrough::source::relay(&conn, &mut stream).await {
            super::passthrough::source::Ended::Done => return,
            super::passthrough::source::Ended::HandOver { unread, served } => (unread, served),
        }
    } else {
        (bytes::Bytes::new(), false)
    };
    serve_hyper(conn, Prefixed::new(unread, stream), served).await;
}

/// Whether the connection's requests start with the relay: HTTP/1.x (what an HTTP/2 port's
/// client sends is HTTP/2, declared or detected), unless it is turned off.
fn relays(conn: &HttpConn) -> bool {
    conn.pi.source_relay && !matches!(conn.protocol, Protocol::Http2 | Protocol::Grpc)
}

/// Serves the connection with hyper's server; `served`: the relay served requests on it before.
async fn serve_hyper(conn: Arc<HttpConn>, stream: Prefixed<TcpStream>, served: bool) {
    let first = Arc::new(FirstRequest::default());
    // After the relay's requests and none started (the relay closes such a connection itself
    // when it drains), it has had its first; with the start of one read, hyper's server is to
    // serve it before a drain closes the connection.
    if served && stream.unread_is_empty() {
        first.came();
    }
    let service = {
        let conn = conn.clone();
        let first = first.clone();
        hyper::service::service_fn(move |req| {
            first.came();
            let conn = conn.clone();
            // Boxed: hyper's HTTP/2 server spawns each stream's future, and a spawn moves the
            // future by value; the request's state machine is kilobytes, its box one pointer.
            let request = Box::pin(async move { conn.request(req).await });
            async move { Ok::<_, Infallible>(request.await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header read timeout (30s by default) also runs while a keep-alive connection waits
    // for its next request, so an app's idle connection would be closed after 30s, racing the
    // request the app sends at that instant. Envoy (Istio's sidecar and waypoint) keeps it for its
    // idle timeout, one hour by default, with no request-headers timeout.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(APP_IDLE_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    // Draining, a keep-alive connection is closed after its response in flight: the app's next
    // request opens a new connection, which the successor agent (or nobody) accepts. An HTTP/1.x
    // connection accepted just before the drain that has not had its first request yet gets it
    // first, answered with `connection: close`: the app opened it to send one (perhaps already on
    // its way), and closing it as idle would fail that request. HTTP/2 (prior knowledge) is sent
    // GOAWAY at once, which loses no request.
    let wait_first = !matches!(conn.protocol, Protocol::Http2 | Protocol::Grpc);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(served);
    let served = tokio::select! {
        out = &mut served => out,
        () = conn.pi.drain.started() => {
            let first_or_not = async {
                if wait_first {
                    // At most FIRST_REQUEST_WAIT, then it is closed as idle.
                    let _ = tokio::time::timeout(FIRST_REQUEST_WAIT, first.wait()).await;
                }
            };
            tokio::select! {
                out = &mut served => out,
                () = first_or_not => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            }
        }
    };
    if let Err(e) = served {
        debug!(pod = %conn.pod.name, dst = %conn.dst, error = %e, "HTTP connection ended");
    }
}

/// How long an app's keep-alive HTTP/1.x connection may wait idle for its next request (Envoy's
/// `common_http_protocol_options.idle_timeout` default).
pub(super) const APP_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// How long a draining proxy waits for a new connection's first request (hyper's default header
/// read timeout, 30s): well inside the pod's termination grace.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(30);

/// Whether a connection has had its first request.
#[derive(Default)]
struct FirstRequest {
    came: AtomicBool,
    notify: tokio::sync::Notify,
}

impl FirstRequest {
    fn came(&self) {
        if !self.came.swap(true, Ordering::AcqRel) {
            // Stores a permit when nobody waits yet.
            self.notify.notify_one();
        }
    }

    /// Resolves once the first request has come (at once if it has).
    async fn wait(&self) {
        if !self.came.load(Ordering::Acquire) {
            self.notify.notified().await;
        }
    }
}

/// What the route decided to forward to.
pub(super) struct Forward<'s> {
    /// None: to the original destination (nothing known about the host).
    pub cluster: Option<ClusterRef<'s>>,
    pub route: Option<&'s HttpRoute>,
    pub matched: Option<&'s RequestMatch>,
    pub dest: Option<&'s WeightedDestination>,
}

/// A reply made here, with what it says about the request for telemetry.
pub(super) struct Local {
    reply: LocalReply,
    details: &'static str,
}

impl Local {
    pub(super) fn new(reply: LocalReply, details: &'static str) -> Box<Self> {
        Box::new(Local { reply, details })
    }
}

impl HttpConn {
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let snap = self.pi.snapshot.load_full();
        let request_id = headers::request_id(req.headers_mut());
        let authority = authority(&req).map(str::to_owned);
        let decided = {
            let source = snap.state.workloads.get(self.pod_key.as_str());
            self.decide(&snap, &req, authority.as_deref(), source.map(|w| &**w))
        };
        // An HTTP/2 request the source relay can send (`passthrough::source::stream`).
        let relayed = match &decided {
            Ok(forward) => stream::takes(self, &snap, forward, &req),
            Err(_) => None,
        };
        let result = self.open(
            &snap,
            &mut req,
            &request_id,
            authority.as_deref(),
            decided.as_ref().ok(),
        );
        match (decided, relayed) {
            (Ok(forward), Some(policy)) => {
                stream::respond(self, &snap, &forward, policy, req, result).await
            }
            (Ok(forward), None) => self.forward(&snap, forward, req, result).await,
            (Err(local), _) => self.local_reply(result, *local, None),
        }
    }

    /// Opens the telemetry of a request routed to `forward` (None: answered here): counts it,
    /// starts its metrics, access-log fields and CLIENT span (the context for the next hop
    /// written into `req`'s headers).
    pub(super) fn open<B>(
        &self,
        snap: &Snapshot,
        req: &mut Request<B>,
        request_id: &HeaderValue,
        authority: Option<&str>,
        forward: Option<&Forward<'_>>,
    ) -> RequestResult {
        Counters::inc(&self.pi.counters.http_requests);
        let grpc = is_grpc(req.headers());
        let telemetry = snap.telemetry_of(&self.pod_key).clone();
        let sinks = telemetry.client.access_log.enabled();
        let mut result = self.start_result(snap, req, grpc, request_id, authority, sinks);
        let cluster = forward.and_then(|f| f.cluster.as_ref());
        if let Some(tracing) = spans::of(&telemetry, SpanKind::Client) {
            let begun = spans::begin(&self.pi, tracing, SpanKind::Client, req.headers());
            if begun.reported() {
                let (host, _) = target::split_authority(authority.unwrap_or(""));
                let host = cluster.map_or(host, |c| std::borrow::Cow::Borrowed(&*c.key.host));
                let path = req.uri().path().to_owned();
                let (method, version) = (req.method().clone(), req.version());
                result.cluster_name = cluster.map(|c| c.key.to_string());
                result.span = begun.record(
                    &self.pi,
                    &self.pod,
                    tracing,
                    spans::Start {
                        host: &host,
                        port: self.dst.0.port(),
                        method: method.as_str(),
                        authority: authority.unwrap_or(""),
                        path: &path,
                        version,
                        peer: Some(self.pod.app_address(self.peer.0, self.dst.0).ip()),
                    },
                    req.headers_mut(),
                );
            } else {
                begun.carry(tracing, req.headers_mut());
            }
        }
        result.set_settings(telemetry, req);
        if let Some(cluster) = cluster {
            result.labels.conn.service = cluster.service.clone().map(ServiceRef);
            if let Some(log) = result.log.as_mut() {
                log.upstream_cluster = Some(cluster.key.to_string());
            }
        }
        if let Some(log) = result.log.as_mut() {
            log.route_name = forward
                .and_then(|f| f.route)
                .and_then(|r| r.name.as_deref().map(str::to_owned));
        }
        result
    }

    /// Routes the request: the VirtualService's route and destination, or a reply made here.
    pub(super) fn decide<'s, B>(
        &self,
        snap: &'s Snapshot,
        req: &Request<B>,
        authority: Option<&str>,
        source: Option<&Workload>,
    ) -> Result<Forward<'s>, Box<Local>> {
        if !snap.state.is_complete() {
            // Fail closed, as the L4 path does: nothing is known to be absent yet.
            return Err(Local::new(LocalReply::no_cluster(), "incomplete_view"));
        }
        let namespace = self.pod.namespace.as_str();
        let dst = self.dst.0;
        let (host, _) = match authority {
            Some(a) => {
                let (h, p) = target::split_authority(a);
                (Some(h), p)
            }
            None => (None, None),
        };
        let plain_forward = |cluster| Forward {
            cluster,
            route: None,
            matched: None,
            dest: None,
        };
        match target::resolve(snap, namespace, host.as_deref(), dst) {
            Target::Passthrough => Ok(plain_forward(None)),
            Target::Service(service) => {
                // A Service without the port the connection was going to: on, as it was going.
                if service.port(dst.port()).is_none() {
                    return Ok(plain_forward(None));
                }
                target::service_cluster(snap, namespace, &service, dst.port())
                    .map(|c| plain_forward(Some(c)))
                    .map_err(|_| Local::new(LocalReply::no_cluster(), "cluster_not_found"))
            }
            Target::Virtual { host: vhost, .. } => {
                let info = self.info(req, authority.unwrap_or(""), source);
                let Some((route, matched)) = matching::select_match(&vhost.http, &info) else {
                    return Err(Local::new(LocalReply::no_route(), "route_not_found"));
                };
                match &route.action {
                    Action::Redirect(r) => {
                        let mut reply = LocalReply::new(r.status, "-", "");
                        let location = matching::redirect_location(r, &info);
                        match HeaderValue::try_from(location) {
                            Ok(v) => {
                                reply.headers.insert(header::LOCATION, v);
                            }
                            Err(_) => {
                                return Err(Local::new(
                                    LocalReply::new(StatusCode::BAD_REQUEST, "-", ""),
                                    "invalid_redirect_location",
                                ))
                            }
                        }
                        route.headers.response.apply(&mut reply.headers);
                        Err(Local::new(reply, "redirect"))
                    }
                    Action::DirectResponse { status, body } => {
                        let mut reply = LocalReply::new(*status, "-", "");
                        reply.body = body.clone();
                        route.headers.response.apply(&mut reply.headers);
                        Err(Local::new(reply, "direct_response"))
                    }
                    Action::Route(dests) => {
                        if let Some(cors) = &route.cors {
                            if let Some(pre) = cors_preflight(cors, req.method(), req.headers()) {
                                let mut reply = LocalReply::new(pre.status(), "-", "");
                                reply.headers = pre.into_parts().0.headers;
                                return Err(Local::new(reply, "cors_response"));
                            }
                        }
                        let Some(dest) = matching::pick_weighted(dests, fastrand::u64(..)) else {
                            return Err(Local::new(LocalReply::no_cluster(), "cluster_not_found"));
                        };
                        let cluster = target::cluster(snap, namespace, &dest.cluster, dst.port())
                            .map_err(|_| {
                            Local::new(LocalReply::no_cluster(), "cluster_not_found")
                        })?;
                        Ok(Forward {
                            cluster: Some(cluster),
                            route: Some(route),
                            matched,
                            dest: Some(dest),
                        })
                    }
                }
            }
        }
    }

    /// What matching looks at.
    fn info<'r, B>(
        &'r self,
        req: &'r Request<B>,
        authority: &'r str,
        source: Option<&'r Workload>,
    ) -> RequestInfo<'r> {
        RequestInfo {
            method: req.method(),
            scheme: req
                .headers()
                .get(&headers::X_FORWARDED_PROTO)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("http"),
            authority,
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            port: self.dst.0.port(),
            source,
            source_namespace: &self.pod.namespace,
        }
    }

    /// HTTP/2 upstream for ports declared HTTP/2 or gRPC, for a DestinationRule's
    /// `h2UpgradePolicy: UPGRADE`, and, with `useClientProtocol` or on a sniffed port, when the
    /// app spoke HTTP/2; HTTP/1.1 otherwise (Istio's cluster protocol options).
    pub(super) fn upstream_version(
        &self,
        downstream: Version,
        cluster: Option<&crate::routing::Cluster>,
    ) -> client::Version {
        let client_h2 = downstream == Version::HTTP_2;
        let http = cluster
            .and_then(|c| c.policy.connection_pool.as_ref())
            .and_then(|p| p.http.as_ref());
        let upgrade_policy = http.is_some_and(|h| {
            h.h2_upgrade_policy == crate::config::istio::destination_rule::H2UpgradePolicy::Upgrade
        });
        let use_client = http.is_some_and(|h| h.use_client_protocol);
        let h2 = if use_client || self.sniffed {
            client_h2
        } else {
            upgrade_policy || self.protocol.wants_h2_upstream()
        };
        if h2 {
            client::Version::Http2
        } else {
            client::Version::Http1
        }
    }

    /// The request's telemetry, opened with what is known before routing.
    fn start_result<B>(
        &self,
        snap: &Snapshot,
        req: &Request<B>,
        grpc: bool,
        request_id: &HeaderValue,
        authority: Option<&str>,
        sinks: bool,
    ) -> RequestResult {
        // The Service the app addressed, until routing says where the request went (a request
        // no route takes is still one for it, as Istio reports it).
        let addressed = match snap.state.destination(self.dst.0) {
            Some(crate::state::Destination::Service { service, .. }) => Some(ServiceRef(service)),
            _ => None,
        };
        let labels = RequestLabels {
            conn: TcpLabels {
                reporter: Reporter::Source,
                source: Peer::Workload(self.pod.istio.clone()),
                destination: Peer::Unknown,
                service: addressed,
                flags: "-",
                mtls: false,
                tags: None,
            },
            protocol: if grpc { "grpc" } else { "http" },
            response_code: 0,
            grpc_status: None,
        };
        let log = (self.pi.telemetry.access_log.is_some() || sinks)
            .then(|| Box::new(log_fields(req, authority.unwrap_or(""), request_id)));
        let head = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) as u64
            + req.method().as_str().len() as u64;
        RequestResult::start(
            &self.pi.telemetry,
            labels,
            (self.pod.app_address(self.peer.0, self.dst.0), self.dst.0),
            head + header_bytes(req.headers()),
            log,
        )
    }

    /// Answers with a reply made here and records it.
    pub(super) fn local_reply(
        &self,
        mut result: RequestResult,
        local: Local,
        upstream: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        Counters::inc(&self.pi.counters.http_local_replies);
        result.labels.conn.flags = add_flag(result.labels.conn.flags, local.reply.flag);
        if upstream.is_some() {
            result.upstream = upstream;
        }
        if let Some(log) = result.log.as_mut() {
            log.details = local.details;
        }
        let resp = local.reply.into_response();
        result.set_response(resp.status().as_u16(), resp.headers());
        let (parts, body) = resp.into_parts();
        Response::from_parts(
            parts,
            http_body_util::BodyExt::boxed(Finishing::new(body, result)),
        )
    }
}

/// `:authority` (HTTP/2, or an absolute-form HTTP/1.1 target), else `Host`.
pub(super) fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// The access log's fields of a request, as it arrived.
pub(super) fn log_fields<B>(
    req: &Request<B>,
    authority: &str,
    request_id: &HeaderValue,
) -> RequestFields {
    RequestFields {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        authority: authority.to_string(),
        protocol: match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        },
        response_code: 0,
        details: "-",
        grpc_status: None,
        request_id: request_id.to_str().unwrap_or("-").to_string(),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        route_name: None,
        upstream_cluster: None,
    }
}

/// gRPC, as Istio's `request_protocol` label tells it: `content-type: application/grpc…`.
pub(super) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Joins an upgraded (WebSocket) connection to its upgraded upstream, bytes both ways.
pub(super) async fn join_upgraded(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    picked: Option<super::balance::Picked>,
) {
    let _active = picked.map(|p| p.active);
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        debug!(error = %e, "upgraded connection ended");
    }
}

/// A body that holds something (the endpoint's active-request guard) until it is dropped.
pub(super) struct Held<B, T> {
    inner: B,
    _held: T,
}

impl<B, T> Held<B, T> {
    pub(super) fn new(inner: B, held: T) -> Self {
        Held { inner, _held: held }
    }
}

impl<B: hyper::body::Body + Unpin, T: Unpin> hyper::body::Body for Held<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

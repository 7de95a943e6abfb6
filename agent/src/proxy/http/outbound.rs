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
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tracing::debug;

use super::balance::{endpoints_for, PickContext};
use super::body::{self, Counted, Finishing, ProxyBody};
use super::client::{self, UpstreamKey};
use super::headers::{self, LocalReply};
use super::target::{self, ClusterRef, Target};
use crate::proxy::access_log::RequestFields;
use crate::proxy::addr::{OrigDst, PeerAddr};
use crate::proxy::metrics::requests::{header_bytes, RequestLabels, RequestResult};
use crate::proxy::metrics::{Peer, Reporter, ServiceRef, TcpLabels};
use crate::proxy::outbound::{to_workload, Route as L4Route};
use crate::proxy::protocol::Protocol;
use crate::proxy::{Counters, PodContext, ProxyInputs};
use crate::routing::matching::{self, cors_preflight, cors_response_headers};
use crate::routing::{Action, HttpRoute, RequestInfo, RequestMatch, WeightedDestination};
use crate::snapshot::Snapshot;
use crate::state::Workload;

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

/// Serves the connection until the app closes it.
pub async fn serve(conn: HttpConn, stream: TcpStream) {
    let conn = Arc::new(conn);
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.request(req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        debug!(pod = %conn.pod.name, dst = %conn.dst, error = %e, "HTTP connection ended");
    }
}

/// What the route decided to forward to.
struct Forward<'s> {
    /// None: to the original destination (nothing known about the host).
    cluster: Option<ClusterRef<'s>>,
    route: Option<&'s HttpRoute>,
    matched: Option<&'s RequestMatch>,
    dest: Option<&'s WeightedDestination>,
}

/// A reply made here, with what it says about the request for telemetry.
struct Local {
    reply: LocalReply,
    details: &'static str,
}

impl Local {
    fn new(reply: LocalReply, details: &'static str) -> Box<Self> {
        Box::new(Local { reply, details })
    }
}

impl HttpConn {
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        Counters::inc(&self.pi.counters.http_requests);
        let snap = self.pi.snapshot.load_full();
        let request_id = headers::request_id(req.headers_mut());
        let grpc = is_grpc(req.headers());
        let authority = authority(&req).map(str::to_owned);
        let mut result = self.start_result(&snap, &req, grpc, &request_id, authority.as_deref());

        let decided = {
            let source = snap.state.workloads.get(self.pod_key.as_str());
            self.decide(&snap, &req, authority.as_deref(), source.map(|w| &**w))
        };
        let forward = match decided {
            Ok(f) => f,
            Err(local) => return self.local_reply(result, *local, None),
        };
        if let Some(cluster) = &forward.cluster {
            result.labels.conn.service = cluster.service.clone().map(ServiceRef);
            if let Some(log) = result.log.as_mut() {
                log.upstream_cluster = Some(cluster.key.to_string());
            }
        }
        if let Some(log) = result.log.as_mut() {
            log.route_name = forward
                .route
                .and_then(|r| r.name.as_deref().map(str::to_owned));
        }
        self.forward(&snap, forward, req, result).await
    }

    /// Routes the request: the VirtualService's route and destination, or a reply made here.
    fn decide<'s>(
        &self,
        snap: &'s Snapshot,
        req: &Request<Incoming>,
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
    fn info<'r>(
        &'r self,
        req: &'r Request<Incoming>,
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

    /// Picks the endpoint and sends the request there.
    async fn forward(
        &self,
        snap: &Snapshot,
        fwd: Forward<'_>,
        mut req: Request<Incoming>,
        mut result: RequestResult,
    ) -> Response<ProxyBody> {
        let dst = self.dst.0;
        let upgrade = req.version() != Version::HTTP_2 && headers::is_upgrade(req.headers());
        let origin = req.headers().get(header::ORIGIN).cloned();

        // The endpoint, picked on the request as the app sent it (Envoy picks the host before the
        // route's header edits and rewrite apply).
        let picked = match &fwd.cluster {
            Some(cluster) if !cluster.passthrough => {
                let endpoints = endpoints_for(&cluster.endpoints, dst);
                let ctx = PickContext {
                    headers: Some(req.headers()),
                    query: req.uri().query(),
                    source: self.peer.0,
                    destination: dst,
                };
                match self
                    .pi
                    .balancers
                    .pick(&cluster.key, &cluster.policy, endpoints, &ctx)
                {
                    Some(p) => Some(p),
                    None => {
                        let local =
                            Local::new(LocalReply::no_healthy_upstream(), "no_healthy_upstream");
                        return self.local_reply(result, *local, None);
                    }
                }
            }
            _ => None,
        };
        // The route's and the destination's header edits, then the rewrite (Istio's order: the
        // route picks on the request as sent).
        if let Some(route) = fwd.route {
            route.headers.request.apply(req.headers_mut());
        }
        if let Some(dest) = fwd.dest {
            dest.headers.request.apply(req.headers_mut());
        }
        let mut authority = authority(&req).map(str::to_owned);
        let mut path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        if let Some(rw) = fwd.route.and_then(|r| r.rewrite.as_ref()) {
            path = matching::rewrite_path(rw, fwd.matched, &path);
            if let Some(a) = &rw.authority {
                authority = a.to_str().ok().map(str::to_owned);
            }
        }

        let endpoint = picked.as_ref().map_or(dst, |p| p.addr);
        let service = fwd.cluster.as_ref().and_then(|c| c.service.clone());
        let l4 = to_workload(
            &snap.state,
            self.pi.secrets.trust_domain(),
            endpoint,
            snap.state.workload_by_ip(endpoint.ip()),
            service,
        );
        let tunnel = match &l4 {
            L4Route::Hbone {
                identity, workload, ..
            } => {
                result.labels.conn.destination = Peer::Workload(workload.istio.clone());
                result.labels.conn.mtls = true;
                Some(identity.clone())
            }
            L4Route::Direct { workload, .. } => {
                result.labels.conn.destination = workload
                    .as_ref()
                    .map_or(Peer::Unknown, |w| Peer::Workload(w.istio.clone()));
                None
            }
        };
        result.upstream = Some(endpoint);

        // The request as the upstream gets it.
        let version = if upgrade {
            client::Version::Http1
        } else {
            self.upstream_version(req.version(), fwd.cluster.as_deref())
        };
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, incoming) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        // hyper answered `Expect: 100-continue` itself when the body was first read.
        parts.headers.remove(header::EXPECT);
        if !parts.headers.contains_key(&headers::X_FORWARDED_PROTO) {
            parts.headers.insert(
                headers::X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static("http"),
            );
        }
        let authority = authority.unwrap_or_else(|| dst.to_string());
        match version {
            client::Version::Http1 => {
                parts.version = Version::HTTP_11;
                parts.uri = match path.parse::<Uri>() {
                    Ok(u) => u,
                    Err(_) => Uri::from_static("/"),
                };
                if let Ok(v) = HeaderValue::try_from(authority.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
            client::Version::Http2 => {
                parts.version = Version::HTTP_2;
                parts.uri = format!("http://{authority}{path}")
                    .parse::<Uri>()
                    .unwrap_or_else(|_| Uri::from_static("/"));
                parts.headers.remove(header::HOST);
            }
        }
        let upstream_body = Counted::new(incoming, result.request_body_counter());
        let upstream_req =
            Request::from_parts(parts, http_body_util::BodyExt::boxed(upstream_body));

        let key = UpstreamKey {
            worker: crate::proxy::worker::current(),
            src_netns: self.pod.netns_cookie,
            endpoint,
            tunnel,
            version,
        };
        let settings = client::PoolSettings::of(fwd.cluster.as_deref());
        let sent = self
            .pi
            .upstreams
            .send(&self.pi, &self.pod, &key, settings, upstream_req)
            .await;
        let (resp, lease) = match sent {
            Ok(r) => r,
            Err(e) => {
                debug!(pod = %self.pod.name, %endpoint, error = %e, "upstream request failed");
                let flag = e.response_flag();
                let local = Local::new(LocalReply::upstream_failed(flag), e.details());
                return self.local_reply(result, *local, Some(endpoint));
            }
        };

        let mut resp = resp;
        let switching = upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upstream_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, switching);
        if let Some(dest) = fwd.dest {
            dest.headers.response.apply(&mut parts.headers);
        }
        if let Some(route) = fwd.route {
            route.headers.response.apply(&mut parts.headers);
            if let Some(cors) = &route.cors {
                for (name, value) in cors_response_headers(cors, origin.as_ref()) {
                    parts.headers.insert(name, value);
                }
            }
        }
        if let Some(cookie) = picked.as_ref().and_then(|p| p.set_cookie.clone()) {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
        result.set_response(parts.status.as_u16(), &parts.headers);
        if let Some(log) = result.log.as_mut() {
            log.details = "via_upstream";
        }

        if let (Some(downstream), Some(upstream)) = (downstream_upgrade, upstream_upgrade) {
            drop((incoming, lease));
            tokio::spawn(join_upgraded(downstream, upstream, picked));
            result.finish(None);
            return Response::from_parts(parts, body::empty());
        }
        // The endpoint stays busy (least-request), and the upstream connection in use, until the
        // response has been sent on.
        let active = picked.map(|p| p.active);
        let body = Finishing::new(Held::new(incoming, (active, lease)), result);
        Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
    }

    /// HTTP/2 upstream for ports declared HTTP/2 or gRPC, for a DestinationRule's
    /// `h2UpgradePolicy: UPGRADE`, and, with `useClientProtocol` or on a sniffed port, when the
    /// app spoke HTTP/2; HTTP/1.1 otherwise (Istio's cluster protocol options).
    fn upstream_version(
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
    fn start_result(
        &self,
        snap: &Snapshot,
        req: &Request<Incoming>,
        grpc: bool,
        request_id: &HeaderValue,
        authority: Option<&str>,
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
            },
            protocol: if grpc { "grpc" } else { "http" },
            response_code: 0,
            grpc_status: None,
        };
        let log = self.pi.telemetry.access_log.as_ref().map(|_| {
            Box::new(RequestFields {
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
                authority: authority.unwrap_or("").to_string(),
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
            })
        });
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
    fn local_reply(
        &self,
        mut result: RequestResult,
        local: Local,
        upstream: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        Counters::inc(&self.pi.counters.http_local_replies);
        result.labels.conn.flags = local.reply.flag;
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
fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// gRPC, as Istio's `request_protocol` label tells it: `content-type: application/grpc…`.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Joins an upgraded (WebSocket) connection to its upgraded upstream, bytes both ways.
async fn join_upgraded(
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
struct Held<B, T> {
    inner: B,
    _held: T,
}

impl<B, T> Held<B, T> {
    fn new(inner: B, held: T) -> Self {
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

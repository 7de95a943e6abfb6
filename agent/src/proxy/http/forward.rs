//! Forwarding a routed request, in Envoy's order: the route's fault (delay, then abort), the
//! endpoint pick on the request as sent, the route's and destination's header edits and rewrite,
//! copies to the route's mirrors, then tries under the route's retry policy (Istio's default when
//! it sets none) within its `timeout`: each try picks an endpoint (another one than those tried,
//! when there is one), sends on a pooled upstream connection within its `perTryTimeout`, and a
//! retriable result is retried after a jittered back-off while tries and the body's replay buffer
//! last. The last try's response goes back to the app with the route's response edits.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::debug;

use super::balance::{endpoints_for, Outcome, PickContext, Picked};
use super::body::{self, Counted, Finishing, ProxyBody};
use super::client::{self, PoolSettings, Sent, UpstreamError, UpstreamKey};
use super::headers::{self, LocalReply};
use super::outbound::{authority, Forward, Held, HttpConn, Local};
use super::retry::{self, add_flag, Payload, TryEnd};
use super::target::ClusterRef;
use super::{fault, mirror};
use crate::proxy::metrics::requests::RequestResult;
use crate::proxy::metrics::Peer;
use crate::proxy::outbound::{to_workload, Route as L4Route};
use crate::proxy::Counters;
use crate::routing::matching::{self, cors_response_headers};
use crate::routing::resilience::{RetryPolicy, DEFAULT_RETRY};
use crate::snapshot::Snapshot;

/// Envoy's `host_selection_retry_max_attempts` as Istio sets it: picks made to find an endpoint
/// not tried yet before taking a tried one.
const HOST_SELECTION_ATTEMPTS: usize = 5;

/// The request as every try sends it (a try gets a copy; the last one takes it).
pub struct Template {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Template {
    pub fn request(&self, body: client::Body) -> Request<client::Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }

    fn into_request(self, body: client::Body) -> Request<client::Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// How the tries ended without a response to pass on.
enum Failed {
    Upstream(UpstreamError),
    /// The route's timeout, or the last try's per-try timeout.
    Timeout {
        per_try: bool,
    },
}

impl HttpConn {
    pub(super) async fn forward(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        fwd: Forward<'_>,
        mut req: Request<Incoming>,
        mut result: RequestResult,
    ) -> Response<ProxyBody> {
        let dst = self.dst.0;
        let started = Instant::now();
        // Envoy's fault filter runs before the router: a delay, then an abort.
        if let Some(fault) = fwd.route.and_then(|r| r.fault.as_ref()) {
            if let Some((delay, share)) = fault.delay {
                if fault::hit(share) {
                    Counters::inc(&self.pi.counters.http_fault_delays);
                    result.labels.conn.flags = add_flag(result.labels.conn.flags, "DI");
                    tokio::time::sleep(delay).await;
                }
            }
            if let Some((with, share)) = fault.abort {
                if fault::hit(share) {
                    Counters::inc(&self.pi.counters.http_fault_aborts);
                    let local = Local::new(fault::abort_reply(with), "fault_filter_abort");
                    return self.local_reply(result, *local, None);
                }
            }
        }
        let upgrade = req.version() != Version::HTTP_2 && headers::is_upgrade(req.headers());
        let origin = req.headers().get(header::ORIGIN).cloned();
        let cluster = fwd.cluster.as_ref();

        // The first endpoint, picked on the request as the app sent it (Envoy picks the host
        // before the route's header edits and rewrite apply).
        let mut picked = match self.pick(cluster, req.headers(), req.uri().query(), &[]) {
            Ok(p) => p,
            Err(()) => {
                let local = Local::new(LocalReply::no_healthy_upstream(), "no_healthy_upstream");
                return self.local_reply(result, *local, None);
            }
        };
        let (authority, path) = fwd.edit_request(&mut req);
        let version = if upgrade {
            client::Version::Http1
        } else {
            self.upstream_version(req.version(), cluster.map(|c| &**c))
        };
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // The app's HTTP/2 connection indexes response headers in its HPACK table.
        let downstream_h2 = req.version() == Version::HTTP_2;
        let (mut parts, incoming) = req.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        if version == client::Version::Http2 {
            headers::own_values(&mut parts.headers);
        }
        // hyper answered `Expect: 100-continue` itself when the body was first read.
        parts.headers.remove(header::EXPECT);
        if !parts.headers.contains_key(&headers::X_FORWARDED_PROTO) {
            parts.headers.insert(
                headers::X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static("http"),
            );
        }
        let authority = authority.unwrap_or_else(|| dst.to_string());
        let template = template(parts, version, &authority, &path);

        let policy: Option<&RetryPolicy> = if upgrade {
            // An upgraded connection is never sent twice.
            None
        } else {
            fwd.route
                .map_or(Some(&*DEFAULT_RETRY), |r| r.retry.as_ref())
        };
        let retries = policy.map_or(0, |p| p.retries);
        let mut downstream: client::Body = Counted::new(incoming, result.request_body_counter())
            .map_err(Into::into)
            .boxed();
        if let Some(route) = fwd.route.filter(|r| !r.mirrors.is_empty() && !upgrade) {
            downstream = mirror::start(self, snap, route, &template, version, downstream);
        }
        let mut payload = Payload::new(downstream, retries > 0);
        let deadline = fwd.route.and_then(|r| r.timeout).map(|t| started + t);

        let mut template = Some(template);
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retry = 0u32;
        // The retry in flight's place under the cluster's `maxRetries`.
        let mut _retry_slot = None;
        let outcome = loop {
            let endpoint = picked.as_ref().map_or(dst, |p| p.addr);
            let last = retry >= retries;
            let Some(body) = payload.next_body() else {
                // Unreachable: a retry is only decided while the body can be sent again.
                break Err(Failed::Upstream(UpstreamError::Overflow {
                    cluster: "request body".into(),
                    limit: "replay buffer",
                }));
            };
            let upstream_req = match (&template, last) {
                (Some(t), false) => t.request(body),
                _ => match template.take() {
                    Some(t) => t.into_request(body),
                    None => break Err(Failed::Timeout { per_try: false }),
                },
            };
            let try_deadline =
                retry::try_deadline(deadline, policy.and_then(|p| p.per_try_timeout));
            let send = self.send_try(snap, cluster, endpoint, version, upstream_req, &mut result);
            let sent = match try_deadline {
                Some(at) => tokio::time::timeout_at(at, send).await.ok(),
                None => Some(send.await),
            };
            // What the outlier detector learns of the endpoint from this try.
            if let Some(p) = &picked {
                match &sent {
                    Some(Ok((resp, _))) => {
                        p.report(Outcome::Connected);
                        p.report(Outcome::Status(resp.status().as_u16()));
                    }
                    Some(Err(e)) => {
                        if let Some(o) = outcome_of(e) {
                            p.report(o);
                        }
                    }
                    None => p.report(Outcome::Timeout),
                }
            }
            let (try_timed_out, retriable) = {
                let end = match &sent {
                    Some(Ok((resp, _))) => TryEnd::Response {
                        status: resp.status(),
                        headers: resp.headers(),
                    },
                    Some(Err(e)) => TryEnd::of_error(e),
                    None => TryEnd::PerTryTimeout,
                };
                let retriable = match (policy, &template) {
                    (Some(p), Some(t)) => retry::retriable(p, end, &t.headers),
                    (Some(p), None) => retry::retriable(p, end, &HeaderMap::new()),
                    (None, _) => false,
                };
                (end == TryEnd::PerTryTimeout, retriable)
            };
            let timed_out_route = deadline.is_some_and(|d| Instant::now() >= d);
            let mut can_retry = retriable && !last && !timed_out_route && payload.replayable();
            if can_retry {
                // `maxRetries`: retries in flight to the cluster; past it the result stands.
                if let Some(limited) = cluster.and_then(|c| self.pi.breakers.of(c)) {
                    _retry_slot = limited.retry();
                    can_retry = _retry_slot.is_some();
                }
            }
            if !can_retry {
                if retriable && last && retries > 0 {
                    Counters::inc(&self.pi.counters.http_retries_exhausted);
                    result.labels.conn.flags = add_flag(result.labels.conn.flags, "URX");
                }
                break match sent {
                    Some(Ok(sent)) => Ok(sent),
                    Some(Err(e)) => Err(Failed::Upstream(e)),
                    None => Err(Failed::Timeout {
                        per_try: try_timed_out && !timed_out_route,
                    }),
                };
            }
            drop(sent);
            retry += 1;
            Counters::inc(&self.pi.counters.http_retries);
            tried.push(endpoint);
            let pause = retry::backoff(
                policy.map_or(crate::routing::resilience::DEFAULT_BACKOFF, |p| p.backoff),
                retry,
                fastrand::u64(..),
            );
            if deadline.is_some_and(|d| Instant::now() + pause >= d) {
                tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await;
                break Err(Failed::Timeout { per_try: false });
            }
            tokio::time::sleep(pause).await;
            let avoid: &[SocketAddr] = if policy.is_some_and(|p| p.avoid_previous_hosts) {
                &tried
            } else {
                &[]
            };
            let empty = HeaderMap::new();
            let (headers, query) = match &template {
                // Envoy hashes a retry on the request as edited (its router's headers by then).
                Some(t) => (&t.headers, t.uri.query()),
                None => (&empty, None),
            };
            picked = match self.pick(cluster, headers, query, avoid) {
                Ok(p) => p,
                Err(()) => {
                    let local =
                        Local::new(LocalReply::no_healthy_upstream(), "no_healthy_upstream");
                    return self.local_reply(result, *local, None);
                }
            };
        };

        let (resp, lease) = match outcome {
            Ok(sent) => sent,
            Err(Failed::Upstream(e)) => {
                let endpoint = picked.as_ref().map_or(dst, |p| p.addr);
                debug!(pod = %self.pod.name, %endpoint, error = %e, "upstream request failed");
                let flag = e.response_flag();
                let local = Local::new(LocalReply::upstream_failed(flag), e.details());
                return self.local_reply(result, *local, Some(endpoint));
            }
            Err(Failed::Timeout { per_try }) => {
                Counters::inc(&self.pi.counters.http_timeouts);
                let endpoint = picked.as_ref().map_or(dst, |p| p.addr);
                let details = retry::timeout_details(per_try);
                let local = Local::new(LocalReply::upstream_timeout(), details);
                return self.local_reply(result, *local, Some(endpoint));
            }
        };

        let mut resp = resp;
        let switching = upgrade && resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upstream_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers, switching);
        if downstream_h2 {
            headers::own_values(&mut parts.headers);
        }
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
            tokio::spawn(super::outbound::join_upgraded(downstream, upstream, picked));
            result.finish(None);
            return Response::from_parts(parts, body::empty());
        }
        // The endpoint stays busy (least-request), and the upstream connection in use, until the
        // response has been sent on.
        let active = picked.map(|p| p.active);
        // Envoy's route timeout spans the whole response: a body still streaming when it passes
        // is cut (the app's stream is reset, flag `UT`).
        let body = Finishing::until(Held::new(incoming, (active, lease)), result, deadline);
        Response::from_parts(parts, http_body_util::BodyExt::boxed(body))
    }

    /// An endpoint of `cluster` for one try, avoiding those in `avoid` when another can be had
    /// (None: to the original destination). Err: the cluster has no endpoint.
    pub(super) fn pick(
        &self,
        cluster: Option<&ClusterRef<'_>>,
        headers: &HeaderMap,
        query: Option<&str>,
        avoid: &[SocketAddr],
    ) -> Result<Option<Picked>, ()> {
        let Some(cluster) = cluster.filter(|c| !c.passthrough) else {
            return Ok(None);
        };
        let endpoints = endpoints_for(&cluster.endpoints, self.dst.0);
        let ctx = PickContext {
            headers: Some(headers),
            query,
            source: self.peer.0,
            destination: self.dst.0,
        };
        let mut picked = None;
        for _ in 0..HOST_SELECTION_ATTEMPTS {
            let p = self
                .pi
                .balancers
                .pick(&cluster.key, &cluster.policy, endpoints, &ctx)
                .ok_or(())?;
            let fresh = !avoid.contains(&p.addr);
            picked = Some(p);
            if fresh {
                break;
            }
        }
        Ok(picked)
    }

    /// One try: the request to `endpoint` (in HBONE for a meshed workload), on a pooled
    /// connection. The request's labels and upstream follow the try.
    pub(super) async fn send_try(
        &self,
        snap: &Snapshot,
        cluster: Option<&ClusterRef<'_>>,
        endpoint: SocketAddr,
        version: client::Version,
        req: Request<client::Body>,
        result: &mut RequestResult,
    ) -> Result<Sent, UpstreamError> {
        let tunnel = self.upstream_of(snap, cluster, endpoint, result);
        self.send_to(cluster, endpoint, tunnel, version, req).await
    }

    /// How a try reaches `endpoint`: the identity of the HBONE tunnel to a meshed workload, None
    /// for plain TCP. The request's destination labels and upstream follow it.
    pub(super) fn upstream_of(
        &self,
        snap: &Snapshot,
        cluster: Option<&ClusterRef<'_>>,
        endpoint: SocketAddr,
        result: &mut RequestResult,
    ) -> Option<crate::identity::Identity> {
        let service = cluster.and_then(|c| c.service.clone());
        let l4 = to_workload(
            &snap.state,
            self.pi.secrets.trust_domain(),
            endpoint,
            snap.state.workload_by_ip(endpoint.ip()),
            service,
        );
        result.upstream = Some(endpoint);
        match l4 {
            L4Route::Hbone {
                identity, workload, ..
            } => {
                result.labels.conn.destination = Peer::Workload(workload.istio.clone());
                result.labels.conn.mtls = true;
                Some(identity)
            }
            L4Route::Direct { workload, .. } => {
                result.labels.conn.destination = workload
                    .as_ref()
                    .map_or(Peer::Unknown, |w| Peer::Workload(w.istio.clone()));
                result.labels.conn.mtls = false;
                None
            }
        }
    }

    /// Sends on a pooled connection to `endpoint`.
    pub(super) async fn send_to(
        &self,
        cluster: Option<&ClusterRef<'_>>,
        endpoint: SocketAddr,
        tunnel: Option<crate::identity::Identity>,
        version: client::Version,
        req: Request<client::Body>,
    ) -> Result<Sent, UpstreamError> {
        let key = UpstreamKey {
            worker: crate::proxy::worker::current(),
            src_netns: self.pod.netns_cookie,
            endpoint,
            tunnel,
            version,
        };
        let settings = PoolSettings::of(cluster.map(|c| &**c));
        let limited = cluster.and_then(|c| self.pi.breakers.of(c));
        self.pi
            .upstreams
            .send(&self.pi, &self.pod, &key, settings, limited.as_ref(), req)
            .await
    }
}

impl Forward<'_> {
    /// Applies the route's and the destination's request header edits to `req`; the authority
    /// and the path (with the query) the upstream gets, after the route's rewrite.
    pub(super) fn edit_request<B>(&self, req: &mut Request<B>) -> (Option<String>, String) {
        if let Some(route) = self.route {
            route.headers.request.apply(req.headers_mut());
        }
        if let Some(dest) = self.dest {
            dest.headers.request.apply(req.headers_mut());
        }
        let mut authority = authority(req).map(str::to_owned);
        let mut path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        if let Some(rw) = self.route.and_then(|r| r.rewrite.as_ref()) {
            path = matching::rewrite_path(rw, self.matched, &path);
            if let Some(a) = &rw.authority {
                authority = a.to_str().ok().map(str::to_owned);
            }
        }
        (authority, path)
    }
}

/// How an upstream failure reads to the outlier detector (None: the proxy's own refusal, which
/// says nothing of the endpoint).
pub(super) fn outcome_of(e: &UpstreamError) -> Option<Outcome> {
    Some(match e {
        UpstreamError::Connect { .. }
        | UpstreamError::Tunnel { .. }
        | UpstreamError::Handshake { .. } => Outcome::ConnectFailed,
        UpstreamError::ConnectTimeout { .. } => Outcome::Timeout,
        UpstreamError::Request { .. }
        | UpstreamError::Closed { .. }
        | UpstreamError::Malformed { .. } => Outcome::Reset,
        UpstreamError::Overflow { .. } => return None,
    })
}

/// The request line and headers as the upstream gets them, for `version`.
fn template(
    mut parts: http::request::Parts,
    version: client::Version,
    authority: &str,
    path: &str,
) -> Template {
    let (version, uri) = match version {
        client::Version::Http1 => {
            if let Ok(v) = HeaderValue::try_from(authority) {
                parts.headers.insert(header::HOST, v);
            }
            (
                Version::HTTP_11,
                path.parse::<Uri>()
                    .unwrap_or_else(|_| Uri::from_static("/")),
            )
        }
        client::Version::Http2 => {
            parts.headers.remove(header::HOST);
            (
                Version::HTTP_2,
                format!("http://{authority}{path}")
                    .parse::<Uri>()
                    .unwrap_or_else(|_| Uri::from_static("/")),
            )
        }
    };
    Template {
        method: parts.method,
        uri,
        version,
        headers: parts.headers,
    }
}

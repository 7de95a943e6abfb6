//! The tries of a request the source relay sends (`source` for HTTP/1.1 from the app, `stream`
//! for HTTP/2): its head as the upstream gets it, written on pooled raw upstream connections
//! under the route's retry policy, `timeout` and `perTryTimeout`, as `forward` tries; a retried
//! try's response read through during the back-off so that its connection carries the next.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use super::super::framing::ResponseHead;
use super::super::{read_response_head, Failed, READ_SIZE};
use crate::proxy::http::balance::{Outcome, Picked};
use crate::proxy::http::client::{self, PoolSettings, RawConn, UpstreamError, UpstreamKey};
use crate::proxy::http::forward::outcome_of;
use crate::proxy::http::headers::{self, LocalReply};
use crate::proxy::http::outbound::{Forward, HttpConn};
use crate::proxy::http::retry::{self, add_flag, TryEnd};
use crate::proxy::http::target::ClusterRef;
use crate::proxy::metrics::requests::RequestResult;
use crate::proxy::Counters;
use crate::routing::resilience::{RetryPolicy, DEFAULT_BACKOFF};
use crate::snapshot::Snapshot;

/// The plan for `req`, edited here into the request the upstream gets ([`upstream_head`]), with
/// the route's `timeout` from now; and its first endpoint, picked on the request as the app sent
/// it (Envoy picks before the header edits apply). None: the cluster has no endpoint.
pub(super) fn plan<'a, B>(
    conn: &HttpConn,
    fwd: &Forward<'_>,
    cluster: &'a ClusterRef<'a>,
    policy: Option<&'a RetryPolicy>,
    req: &'a mut Request<B>,
    to_head: bool,
) -> Option<(Plan<'a>, Picked)> {
    let started = Instant::now();
    let picked = conn
        .pick(Some(cluster), req.headers(), req.uri().query(), &[])
        .ok()
        .flatten()?;
    let (out, path) = upstream_head(fwd, req);
    let plan = Plan {
        cluster,
        policy,
        deadline: fwd.route.and_then(|r| r.timeout).map(|t| started + t),
        headers: req.headers(),
        out,
        path,
        to_head,
    };
    Some((plan, picked))
}

/// How a relayed request is sent: to which cluster, under which retry policy and deadline, as
/// which head.
pub(super) struct Plan<'a> {
    pub(super) cluster: &'a ClusterRef<'a>,
    pub(super) policy: Option<&'a RetryPolicy>,
    /// The route's `timeout`, from the request's start.
    pub(super) deadline: Option<Instant>,
    /// The request's headers as the upstream gets them (what retry conditions and re-picks
    /// read).
    pub(super) headers: &'a HeaderMap,
    /// The head the upstream gets ([`upstream_head`]) and its path.
    pub(super) out: Vec<u8>,
    pub(super) path: String,
    pub(super) to_head: bool,
}

/// The response a request's tries came to, to pass on: its head at the start of the response
/// buffer.
pub(super) struct Sent {
    pub(super) up: RawConn,
    pub(super) head: ResponseHead,
    pub(super) key: UpstreamKey,
    /// The endpoint it came from, busy (least-request) until it has been sent on.
    pub(super) picked: Picked,
}

/// What the tries of a request came to.
// Unboxed: the large variant is the common one (nearly every request), the small one rare.
#[allow(clippy::large_enum_variant)]
pub(super) enum Tried {
    Response(Sent),
    /// None: answered here with `reply` (the upstream failed, timed out, or has no endpoint
    /// left).
    Local {
        reply: LocalReply,
        details: &'static str,
    },
}

/// Sends the plan's head to `picked`, then under the retry policy to the endpoints it picks, each
/// try on a pooled upstream connection within its time, and reads the final response's head
/// into `resp_buf` (informational ones relayed to `down`).
pub(super) async fn tries<W: AsyncWrite + Unpin>(
    conn: &HttpConn,
    snap: &Snapshot,
    plan: &Plan<'_>,
    mut picked: Picked,
    down: &mut W,
    resp_buf: &mut BytesMut,
    result: &mut RequestResult,
) -> Tried {
    let Plan {
        cluster,
        policy,
        deadline,
        ..
    } = *plan;
    let retries = policy.map_or(0, |p| p.retries);
    let settings = PoolSettings::of(Some(&**cluster));
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retry = 0u32;
    let sent = loop {
        let endpoint = picked.addr;
        let tunnel = conn.upstream_of(snap, Some(cluster), endpoint, result);
        let key = UpstreamKey {
            worker: crate::proxy::worker::current(),
            src_netns: conn.pod.netns_cookie,
            endpoint,
            tunnel,
            version: client::Version::Http1,
        };
        let try_deadline = retry::try_deadline(deadline, policy.and_then(|p| p.per_try_timeout));
        let sending = send(
            conn,
            &key,
            settings,
            &plan.out,
            plan.to_head,
            down,
            resp_buf,
        );
        let sent = match try_deadline {
            // Past its time the try is abandoned, its upstream connection closed with it.
            Some(at) => tokio::time::timeout_at(at, sending).await.ok(),
            None => Some(sending.await),
        };
        let sent = sent.map(|s| s.map(|(up, head)| (up, head, key)));
        let grpc = match &sent {
            Some(sent) => grpc_headers(sent),
            None => HeaderMap::new(),
        };
        let end = match &sent {
            None => {
                picked.report(Outcome::Timeout);
                TryEnd::PerTryTimeout
            }
            Some(Ok((_, head, _))) => {
                picked.report(Outcome::Connected);
                picked.report(Outcome::Status(head.status));
                match StatusCode::from_u16(head.status) {
                    Ok(status) => TryEnd::Response {
                        status,
                        headers: &grpc,
                    },
                    Err(_) => TryEnd::Reset,
                }
            }
            Some(Err(e)) => {
                if let Some(o) = outcome_of(e) {
                    picked.report(o);
                }
                TryEnd::of_error(e)
            }
        };
        let try_timed_out = end == TryEnd::PerTryTimeout;
        let retriable = policy.is_some_and(|p| retry::retriable(p, end, plan.headers));
        let timed_out_route = deadline.is_some_and(|d| Instant::now() >= d);
        if !retriable || retry >= retries || timed_out_route {
            if retriable && retry >= retries && retries > 0 {
                Counters::inc(&conn.pi.counters.http_retries_exhausted);
                result.labels.conn.flags = add_flag(result.labels.conn.flags, "URX");
            }
            break sent.ok_or(TimedOut {
                per_try: try_timed_out && !timed_out_route,
            });
        }
        retry += 1;
        Counters::inc(&conn.pi.counters.http_retries);
        tried.push(endpoint);
        let base = policy.map_or(DEFAULT_BACKOFF, |p| p.backoff);
        let pause = retry::backoff(base, retry, fastrand::u64(..));
        // The route's time ends during the back-off: no other try.
        let past_deadline = deadline.filter(|d| Instant::now() + pause >= *d);
        let backoff =
            tokio::time::sleep_until(past_deadline.unwrap_or_else(|| Instant::now() + pause));
        // The try's response is read to its end during the back-off, and its connection goes
        // back to the pool (Envoy keeps an HTTP/1.1 connection whose retried response was
        // whole); one whose response has not ended by then is closed with the try.
        if let Some(sent) = sent {
            Box::pin(discard_during(conn, sent, settings, resp_buf, backoff)).await;
        } else {
            backoff.await;
        }
        if past_deadline.is_some() {
            break Err(TimedOut { per_try: false });
        }
        let avoid: &[SocketAddr] = if policy.is_some_and(|p| p.avoid_previous_hosts) {
            &tried
        } else {
            &[]
        };
        // Envoy hashes a retry on the request as edited and rewritten.
        let query = plan.path.split_once('?').map(|(_, q)| q);
        picked = match conn.pick(Some(cluster), plan.headers, query, avoid) {
            Ok(Some(p)) => p,
            _ => {
                return Tried::Local {
                    reply: LocalReply::no_healthy_upstream(),
                    details: "no_healthy_upstream",
                }
            }
        };
    };
    match sent {
        Ok(Ok((up, head, key))) => Tried::Response(Sent {
            up,
            head,
            key,
            picked,
        }),
        Ok(Err(e)) => {
            debug!(pod = %conn.pod.name, endpoint = %picked.addr, error = %e, "upstream request failed");
            Tried::Local {
                reply: LocalReply::upstream_failed(e.response_flag()),
                details: e.details(),
            }
        }
        Err(TimedOut { per_try }) => {
            Counters::inc(&conn.pi.counters.http_timeouts);
            Tried::Local {
                reply: LocalReply::upstream_timeout(),
                details: retry::timeout_details(per_try),
            }
        }
    }
}

/// No try answered within the route's `timeout` (`per_try`: the last try's `perTryTimeout`).
struct TimedOut {
    per_try: bool,
}

/// Reads the body of a try's response that is not relayed (a retried one) while `backoff`
/// runs, and checks its connection back in if the response ended in time and the connection
/// can carry another request; then waits for the rest of `backoff`.
async fn discard_during(
    conn: &HttpConn,
    sent: Result<(RawConn, ResponseHead, UpstreamKey), UpstreamError>,
    settings: PoolSettings,
    buf: &mut BytesMut,
    backoff: tokio::time::Sleep,
) {
    tokio::pin!(backoff);
    if let Ok((mut up, head, key)) = sent {
        if !head.close && !head.until_close && !conn.pi.drain.is_draining() {
            let read = tokio::select! {
                read = discard_body(&mut up.io, buf, head) => read,
                () = &mut backoff => false,
            };
            if read {
                conn.pi.upstreams.checkin_raw(&key, settings, true, up);
            }
        }
    }
    backoff.await;
}

/// Reads the body of the response whose head starts `buf` to its end, keeping none of it;
/// whether it ended with nothing after it (the connection can carry another request).
async fn discard_body<R: AsyncRead + Unpin>(
    up: &mut R,
    buf: &mut BytesMut,
    head: ResponseHead,
) -> bool {
    let mut body = head.body;
    buf.advance(head.len);
    loop {
        let Ok((used, _)) = body.advance(buf) else {
            return false;
        };
        buf.advance(used);
        if body.done() {
            return buf.is_empty();
        }
        buf.reserve(READ_SIZE);
        match up.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return false,
        }
    }
}

/// Sends the request head `out` on a pooled connection of `key` (a new one when none is idle,
/// or when the pooled one turns out closed before any response) and reads the final response
/// head into `buf` (informational ones relayed to `down` as they come).
async fn send<W: AsyncWrite + Unpin>(
    conn: &HttpConn,
    key: &UpstreamKey,
    settings: PoolSettings,
    out: &[u8],
    to_head: bool,
    down: &mut W,
    buf: &mut BytesMut,
) -> Result<(RawConn, ResponseHead), UpstreamError> {
    let upstreams = &conn.pi.upstreams;
    let endpoint = key.endpoint;
    let mut pooled = upstreams.checkout_raw(key, settings, !conn.pi.drain.is_draining());
    loop {
        let mut up = match pooled.take() {
            Some(up) => up,
            // Boxed: opening a tunnel is a large future, and rare; inline, every request's
            // future would be that large (and copied whole when it starts).
            None => Box::pin(upstreams.open_raw(&conn.pi, &conn.pod, key, settings)).await?,
        };
        buf.clear();
        let wrote = async {
            up.io.write_all(out).await?;
            up.io.flush().await
        };
        let (written, head) = match wrote.await {
            Ok(()) => (
                true,
                read_response_head(&mut up.io, down, buf, to_head).await,
            ),
            Err(_) => (false, Err(Failed::BeforeResponse)),
        };
        match head {
            Ok(head) => return Ok((up, head)),
            // Closed while it was idle, so that the request could not be written: sent again on
            // a new connection, as hyper's pool sends again a request it could not write. One
            // written may have been served: its failure is the try's.
            Err(Failed::BeforeResponse) if up.reused && !written => {
                debug!(%endpoint, "pooled connection closed; sending on a new one");
            }
            Err(Failed::BeforeResponse) if !buf.is_empty() => {
                return Err(UpstreamError::Malformed { endpoint })
            }
            Err(_) => return Err(UpstreamError::Closed { endpoint }),
        }
    }
}

/// The response's `grpc-status` as headers, for the retry policy's gRPC conditions (empty when
/// it has none, as almost every HTTP/1.1 response).
fn grpc_headers<T>(sent: &Result<(T, ResponseHead, UpstreamKey), UpstreamError>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok((
        _,
        ResponseHead {
            grpc_status: Some(status),
            ..
        },
        _,
    )) = sent
    {
        headers.insert("grpc-status", HeaderValue::from(*status));
    }
    headers
}

/// The request head the upstream gets (`forward`'s template for HTTP/1.1): the route's and
/// destination's request edits, the rewrite, hop-by-hop headers dropped, `x-forwarded-proto`
/// when the app set none, and `Host` as the authority; with the path (and query) it carries.
pub(super) fn upstream_head<B>(fwd: &Forward<'_>, req: &mut Request<B>) -> (Vec<u8>, String) {
    let (authority, mut path) = fwd.edit_request(req);
    if path.parse::<Uri>().is_err() {
        path = "/".to_string();
    }
    let h = req.headers_mut();
    headers::strip_hop_by_hop(h, false);
    if !h.contains_key(&headers::X_FORWARDED_PROTO) {
        h.insert(
            headers::X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static("http"),
        );
    }
    if let Some(v) = authority.and_then(|a| HeaderValue::try_from(a).ok()) {
        h.insert(header::HOST, v);
    }
    let method = req.method().as_str();
    let size: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(method.len() + path.len() + size + 16);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (out, path)
}

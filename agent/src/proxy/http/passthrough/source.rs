//! Source-side HTTP/1.1, relayed as bytes. An app's HTTP/1.1 request whose route needs no more
//! than an endpoint of a cluster (with the route's and destination's request header edits, a
//! rewrite, and the route's retry policy, Istio's default included) is routed as the full
//! outbound path routes it (`outbound::HttpConn::decide`, the same load balancer, telemetry,
//! span and access-log line), then written by this relay as the head the upstream gets, on a
//! pooled upstream HTTP/1.1 connection (`client::RawConn`, HBONE to a meshed endpoint); the
//! response goes back to the app as the bytes the upstream sent, its head parsed (`httparse`)
//! and its body's framing followed for the status, the sizes and the connection's reuse.
//!
//! Serving the same request with hyper's server and client moves it through a task and a
//! channel more on each way and parses and writes every head once more; at the fixed rate
//! of the l7 bench this was most of what L7 cost over L4 at the source (`agent/benches/README.md`).
//!
//! Anything else goes to the full server (`outbound::serve_hyper`), with the connection, at the
//! request that needs it (read and not relayed): a request with a body, hop-by-hop headers other
//! than `Connection: keep-alive|close`, an upgrade, `Expect` or HTTP/1.0; a malformed or
//! oversized head (hyper answers it 400 or 431); a reply made here (no route, a redirect, a
//! direct response, CORS), a fault, a mirror, response header edits, cookie affinity,
//! connection-pool settings, an HTTP/2 upstream, or the original destination. Routing such a
//! request twice changes nothing: nothing was counted or sent. The route's `timeout` and its
//! retries' `perTryTimeout` are kept here as `forward` keeps them (a try past its time is
//! abandoned and retried or answered 504 `UT`; a body still streaming at the route's timeout is
//! cut).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, HeaderName, Method, Request, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::framing::{Body, RequestHead, ResponseHead, MAX_HEADERS};
use super::{
    local_reply_bytes, read_response_head, relay_response_body, watch_client, Failed, READ_SIZE,
};
use crate::proxy::copy::Side;
use crate::proxy::http::balance::Outcome;
use crate::proxy::http::client::{self, PoolSettings, RawConn, UpstreamError, UpstreamKey};
use crate::proxy::http::forward::outcome_of;
use crate::proxy::http::headers::{self, LocalReply};
use crate::proxy::http::outbound::{
    authority, Forward, HttpConn, APP_IDLE_TIMEOUT, MAX_HEADER_BYTES,
};
use crate::proxy::http::retry::{self, add_flag, TryEnd, RETRIABLE_HEADER_NAMES};
use crate::proxy::http::target::{self, ClusterRef};
use crate::proxy::metrics::requests::RequestResult;
use crate::proxy::Counters;
use crate::routing::resilience::{RetryPolicy, DEFAULT_BACKOFF, DEFAULT_RETRY};
use crate::routing::{Action, HashKey, LbPolicy};
use crate::snapshot::Snapshot;

/// How the relay ended.
pub(in crate::proxy::http) enum Ended {
    /// The connection is done (closed by either end, or after a response that closes it).
    Done,
    /// The next request is the full server's: what was read of it and not relayed, and whether
    /// the relay served requests before it.
    HandOver { unread: Bytes, served: bool },
}

/// What became of one request.
enum Step {
    /// Not this relay's: nothing of it was counted or sent.
    HandOver,
    /// Answered; the connection goes on.
    Next,
    /// Answered; the connection closes (the app asked, or the response ends with the close).
    Close,
    /// The connection failed mid-request.
    Gone,
}

/// Relays the connection's requests until it ends or a request needs the full server.
pub(in crate::proxy::http) async fn relay(conn: &Arc<HttpConn>, stream: &mut TcpStream) -> Ended {
    let (mut rd, mut wr) = stream.split();
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut resp_buf = BytesMut::new();
    let mut served = false;
    let hand_over = |buf: BytesMut, served| Ended::HandOver {
        unread: buf.freeze(),
        served,
    };
    // One wait for the drain per connection (each new one joins the drain's list of waiters),
    // and the app's idle timeout as hyper's server keeps it (`APP_IDLE_TIMEOUT`, Envoy's).
    let drained = conn.pi.drain.started();
    let idle = tokio::time::sleep(APP_IDLE_TIMEOUT);
    tokio::pin!(drained, idle);
    loop {
        idle.as_mut()
            .reset(tokio::time::Instant::now() + APP_IDLE_TIMEOUT);
        let head = loop {
            if !buf.is_empty() {
                match RequestHead::parse(&buf) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() <= MAX_HEADER_BYTES => {}
                    _ => return hand_over(buf, served),
                }
            }
            if conn.pi.drain.is_draining() {
                // Idle after requests: closed, as hyper's draining server closes it. One that has
                // had none yet gets its first request from hyper's server (`serve_hyper`).
                if served && buf.is_empty() {
                    let _ = wr.shutdown().await;
                    return Ended::Done;
                }
                return hand_over(buf, served);
            }
            buf.reserve(READ_SIZE);
            let read = tokio::select! {
                read = rd.read_buf(&mut buf) => read,
                () = &mut drained => continue,
                () = &mut idle => return Ended::Done,
            };
            match read {
                Ok(n) if n > 0 => {}
                // Closed (or failed) between requests or within a head: nothing to answer.
                _ => return Ended::Done,
            }
        };
        match exchange(conn, &head, &mut rd, &mut wr, &mut buf, &mut resp_buf).await {
            Step::HandOver => return hand_over(buf, served),
            Step::Next => served = true,
            Step::Close => {
                let _ = wr.shutdown().await;
                return Ended::Done;
            }
            Step::Gone => return Ended::Done,
        }
    }
}

/// The request whose head starts `buf`: routed, sent and answered, or left to the full server.
async fn exchange<R, W>(
    conn: &Arc<HttpConn>,
    head: &RequestHead,
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    resp_buf: &mut BytesMut,
) -> Step
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !head.simple || head.body != Body::Empty {
        return Step::HandOver;
    }
    let Some(mut req) = request_of(&buf[..head.len]) else {
        return Step::HandOver;
    };
    let snap = conn.pi.snapshot.load_full();
    let request_id = headers::request_id(req.headers_mut());
    let Some(authority) = authority(&req).map(str::to_owned) else {
        return Step::HandOver;
    };
    let decided = {
        let source = snap.state.workloads.get(conn.pod_key.as_str());
        conn.decide(&snap, &req, Some(&authority), source.map(|w| &**w))
    };
    let Ok(fwd) = decided else {
        return Step::HandOver;
    };
    let Some((cluster, policy)) = relayable(conn, &snap, &fwd, &req) else {
        return Step::HandOver;
    };
    // From here the request is this relay's.
    buf.advance(head.len);
    Counters::inc(&conn.pi.counters.http_outbound_relayed);
    let mut result = conn.open(&snap, &mut req, &request_id, Some(&authority), Some(&fwd));
    let to_head = head.is_head;
    let done = {
        let work = send_and_relay(
            conn,
            &snap,
            &fwd,
            cluster,
            policy,
            req,
            to_head,
            wr,
            resp_buf,
            &mut result,
        );
        tokio::select! {
            done = work => Some(done),
            _ = watch_client(rd, buf) => None,
        }
    };
    let (step, flag) = done.unwrap_or_else(|| {
        // The app went away before the response ended: so does the upstream connection.
        if let Some(log) = result.log.as_mut() {
            log.details = match result.labels.response_code {
                0 => "downstream_remote_disconnect",
                _ => "via_upstream",
            };
        }
        (Step::Gone, Some("DC"))
    });
    result.finish(flag);
    match step {
        Step::Next if head.close => Step::Close,
        step => step,
    }
}

/// The cluster and retry policy of a routed request this relay can send, or None: the full
/// server's (see the module's documentation).
fn relayable<'f, 's, B>(
    conn: &HttpConn,
    snap: &'s Snapshot,
    fwd: &'f Forward<'s>,
    req: &Request<B>,
) -> Option<(&'f ClusterRef<'s>, Option<&'s RetryPolicy>)> {
    let cluster = fwd
        .cluster
        .as_ref()
        .filter(|c| cluster_relayable(conn, c))?;
    if let Some(route) = fwd.route {
        if route.fault.is_some()
            || !route.mirrors.is_empty()
            || route.cors.is_some()
            || !route.headers.response.is_empty()
        {
            return None;
        }
        // Decided for the route, not for the destination its weights picked: a request the
        // relay leaves is routed again by the full server, whose pick is another draw, so a
        // choice that depended on the draw would shift the split towards what the relay takes.
        if let Action::Route(dests) = &route.action {
            let all = dests.iter().all(|d| {
                d.headers.response.is_empty()
                    && target::cluster(snap, &conn.pod.namespace, &d.cluster, conn.dst.0.port())
                        .is_ok_and(|c| cluster_relayable(conn, &c))
            });
            if !all {
                return None;
            }
        }
    }
    let policy = fwd
        .route
        .map_or(Some(&*DEFAULT_RETRY), |r| r.retry.as_ref());
    if policy.is_some_and(|p| {
        p.on.retriable_headers && req.headers().contains_key(&RETRIABLE_HEADER_NAMES)
    }) {
        return None;
    }
    Some((cluster, policy))
}

/// Whether requests to `cluster` can be the relay's: endpoints of its own (not the original
/// destination), HTTP/1.1 upstream, no cookie to set, no connection-pool limits or settings.
fn cluster_relayable(conn: &HttpConn, cluster: &ClusterRef<'_>) -> bool {
    let cookie = matches!(
        &cluster.policy.lb,
        LbPolicy::ConsistentHash {
            key: HashKey::Cookie { .. },
            ..
        }
    );
    !cluster.passthrough
        && !cookie
        && cluster.policy.connection_pool.is_none()
        && conn.upstream_version(Version::HTTP_11, Some(&**cluster)) == client::Version::Http1
}

/// Picks the endpoint, sends the request under the retry policy and relays the response (or a
/// reply made here): the step, and the response flag to finish the request with.
#[allow(clippy::too_many_arguments)]
async fn send_and_relay<W: AsyncWrite + Unpin>(
    conn: &HttpConn,
    snap: &Snapshot,
    fwd: &Forward<'_>,
    cluster: &ClusterRef<'_>,
    policy: Option<&RetryPolicy>,
    mut req: Request<()>,
    to_head: bool,
    down: &mut W,
    resp_buf: &mut BytesMut,
    result: &mut RequestResult,
) -> (Step, Option<&'static str>) {
    let started = Instant::now();
    // Picked on the request as the app sent it (Envoy picks before the header edits apply).
    let Ok(Some(mut picked)) = conn.pick(Some(cluster), req.headers(), req.uri().query(), &[])
    else {
        return no_healthy_upstream(conn, down, to_head, result).await;
    };
    let (out, path) = upstream_head(fwd, &mut req);
    let retries = policy.map_or(0, |p| p.retries);
    let settings = PoolSettings::of(Some(&**cluster));
    let deadline = fwd.route.and_then(|r| r.timeout).map(|t| started + t);
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
        let sending = send(conn, &key, settings, &out, to_head, down, resp_buf);
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
        let retriable = policy.is_some_and(|p| retry::retriable(p, end, req.headers()));
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
        let query = path.split_once('?').map(|(_, q)| q);
        picked = match conn.pick(Some(cluster), req.headers(), query, avoid) {
            Ok(Some(p)) => p,
            _ => {
                return no_healthy_upstream(conn, down, to_head, result).await;
            }
        };
    };
    let (mut up, head, key) = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(e)) => {
            debug!(pod = %conn.pod.name, endpoint = %picked.addr, error = %e, "upstream request failed");
            let reply = LocalReply::upstream_failed(e.response_flag());
            return Box::pin(local(conn, down, reply, e.details(), to_head, result)).await;
        }
        Err(TimedOut { per_try }) => {
            Counters::inc(&conn.pi.counters.http_timeouts);
            let reply = LocalReply::upstream_timeout();
            let details = retry::timeout_details(per_try);
            return Box::pin(local(conn, down, reply, details, to_head, result)).await;
        }
    };
    if let Some(log) = result.log.as_mut() {
        log.details = "via_upstream";
    }
    // The upstream closes its connection after this response: the app's stays open, as with
    // hyper's server (only a body that ends with the close has to end the app's too).
    let mut head = head;
    let upstream_closes = head.close;
    if conn.pi.drain.is_draining() {
        // Draining: the response says it ends the connection, as hyper's draining server's do,
        // so the app sends its next request on a new one instead of racing the close.
        if !head.close {
            tell_app_close(resp_buf, &mut head);
        }
    } else if head.close && !head.until_close {
        keep_app_open(resp_buf, &mut head);
    }
    let relaying = relay_response_body(&mut up.io, down, resp_buf, head, result);
    let relayed = match deadline {
        // Envoy's route timeout spans the whole response: a body still streaming when it passes
        // is cut, the app's connection with it (as `forward`'s body does).
        Some(at) => match tokio::time::timeout_at(at, relaying).await {
            Ok(relayed) => relayed,
            Err(_) => return (Step::Gone, Some("UT")),
        },
        None => relaying.await,
    };
    // The endpoint stays busy (least-request) until the response has been sent on.
    drop(picked);
    match relayed {
        // The app read a response that ends with the connection (a body until the close): it
        // closes its own too.
        Ok(end) if end.close => (Step::Close, None),
        // The upstream's connection ends with it; or bytes came after the response that no
        // request asked for, and that connection cannot be followed any more: the app's can.
        Ok(end) if end.stray || upstream_closes => (Step::Next, None),
        Ok(_) => {
            let reuse = !conn.pi.drain.is_draining();
            conn.pi.upstreams.checkin_raw(&key, settings, reuse, up);
            (Step::Next, None)
        }
        Err(Failed::Response(Side::A)) => (Step::Gone, Some("DC")),
        Err(_) => (Step::Gone, Some("UR")),
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

/// Rewrites the response head at the start of `buf` for an app whose connection stays open
/// when the upstream's closes: without the `Connection` and `Keep-Alive` headers (hop-by-hop,
/// which hyper's server drops too, and not counted then), as HTTP/1.1. Its length and counted
/// bytes follow.
fn keep_app_open(buf: &mut BytesMut, head: &mut ResponseHead) {
    let raw = &buf[..head.len];
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut parsed);
    if !matches!(resp.parse(raw), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut out = Vec::with_capacity(head.len);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(head.status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or_default().as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut removed = 0u64;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") || h.name.eq_ignore_ascii_case("keep-alive") {
            removed += (h.name.len() + h.value.len() + 4) as u64;
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let rest = buf.split_off(head.len);
    buf.clear();
    buf.extend_from_slice(&out);
    buf.extend_from_slice(&rest);
    head.len = out.len();
    head.counted_bytes -= removed.min(head.counted_bytes);
    head.close = false;
}

/// Adds `Connection: close` to the response head at the start of `buf`: the app's connection
/// ends after it. Not counted (a hop-by-hop header, as hyper's server adds it).
fn tell_app_close(buf: &mut BytesMut, head: &mut ResponseHead) {
    const CLOSE: &[u8] = b"connection: close\r\n";
    head.close = true;
    // Before the empty line that ends the head (one with bare LF line ends is left as it is:
    // the connection still closes after it).
    if !buf[..head.len].ends_with(b"\r\n\r\n") {
        return;
    }
    let rest = buf.split_off(head.len - 2);
    buf.extend_from_slice(CLOSE);
    buf.extend_from_slice(&rest);
    head.len += CLOSE.len();
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

/// Answers 503 `UH`: no endpoint of the cluster to send to.
async fn no_healthy_upstream<W: AsyncWrite + Unpin>(
    conn: &HttpConn,
    down: &mut W,
    to_head: bool,
    result: &mut RequestResult,
) -> (Step, Option<&'static str>) {
    let reply = LocalReply::no_healthy_upstream();
    Box::pin(local(
        conn,
        down,
        reply,
        "no_healthy_upstream",
        to_head,
        result,
    ))
    .await
}

/// Answers the request with a reply made here, recorded as the full path records its own
/// (`HttpConn::local_reply`); the connection goes on.
async fn local<W: AsyncWrite + Unpin>(
    conn: &HttpConn,
    down: &mut W,
    reply: LocalReply,
    details: &'static str,
    to_head: bool,
    result: &mut RequestResult,
) -> (Step, Option<&'static str>) {
    Counters::inc(&conn.pi.counters.http_local_replies);
    result.labels.conn.flags = add_flag(result.labels.conn.flags, reply.flag);
    if let Some(log) = result.log.as_mut() {
        log.details = details;
    }
    let out = local_reply_bytes(reply, to_head, false, result);
    match down.write_all(&out).await {
        Ok(()) => (Step::Next, None),
        Err(_) => (Step::Gone, Some("DC")),
    }
}

/// The request head the upstream gets (`forward`'s template for HTTP/1.1): the route's and
/// destination's request edits, the rewrite, hop-by-hop headers dropped, `x-forwarded-proto`
/// when the app set none, and `Host` as the authority; with the path (and query) it carries.
fn upstream_head(fwd: &Forward<'_>, req: &mut Request<()>) -> (Vec<u8>, String) {
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

/// `raw`, a whole request head the relay follows, as `http`'s request (what routing, telemetry
/// and the upstream head are made from); None when a part does not fit `http`'s types.
fn request_of(raw: &[u8]) -> Option<Request<()>> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut parsed);
    let Ok(httparse::Status::Complete(_)) = r.parse(raw) else {
        return None;
    };
    let method = Method::from_bytes(r.method?.as_bytes()).ok()?;
    let uri: Uri = r.path?.parse().ok()?;
    let mut headers = HeaderMap::with_capacity(r.headers.len() + 6);
    for h in r.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(req)
}

#[cfg(test)]
mod tests;

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
//!
//! The tries are `tries`'s, shared with `stream`, which sends an HTTP/2 app's requests without a
//! body the same way and answers their streams with the upstream's responses.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::{HeaderMap, HeaderName, Method, Request, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::framing::{Body, RequestHead, ResponseHead, MAX_HEADERS};
use super::{local_reply_bytes, relay_response_body, watch_client, Failed, READ_SIZE};
use crate::proxy::copy::Side;
use crate::proxy::http::client::{self, PoolSettings};
use crate::proxy::http::headers::{self, LocalReply};
use crate::proxy::http::outbound::{
    authority, Forward, HttpConn, APP_IDLE_TIMEOUT, MAX_HEADER_BYTES,
};
use crate::proxy::http::retry::{add_flag, RETRIABLE_HEADER_NAMES};
use crate::proxy::http::target::{self, ClusterRef};
use crate::proxy::metrics::requests::RequestResult;
use crate::proxy::Counters;
use crate::routing::resilience::{RetryPolicy, DEFAULT_RETRY};
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
pub(super) fn relayable<'f, 's, B>(
    conn: &HttpConn,
    snap: &'s Snapshot,
    fwd: &'f Forward<'s>,
    req: &Request<B>,
) -> Option<(&'f ClusterRef<'s>, Option<&'s RetryPolicy>)> {
    let cluster = fwd
        .cluster
        .as_ref()
        .filter(|c| cluster_relayable(conn, c, req.version()))?;
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
                        .is_ok_and(|c| cluster_relayable(conn, &c, req.version()))
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
/// destination), HTTP/1.1 upstream for a request of the app's `version`, no cookie to set, no
/// connection-pool limits or settings.
fn cluster_relayable(conn: &HttpConn, cluster: &ClusterRef<'_>, version: Version) -> bool {
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
        && conn.upstream_version(version, Some(&**cluster)) == client::Version::Http1
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
    let Some((plan, picked)) = tries::plan(conn, fwd, cluster, policy, &mut req, to_head) else {
        return no_healthy_upstream(conn, down, to_head, result).await;
    };
    let Sent {
        mut up,
        head,
        key,
        picked,
    } = match tries::tries(conn, snap, &plan, picked, down, resp_buf, result).await {
        Tried::Response(sent) => sent,
        Tried::Local { reply, details } => {
            return Box::pin(local(conn, down, reply, details, to_head, result)).await
        }
    };
    let settings = PoolSettings::of(Some(&**cluster));
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
    let relayed = match plan.deadline {
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

pub(in crate::proxy::http) mod stream;
mod tries;

use tries::{Sent, Tried};

#[cfg(test)]
mod tests;

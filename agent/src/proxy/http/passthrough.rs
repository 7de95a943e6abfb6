//! Destination-side HTTP/1.1, observed rather than served again. When all the destination has to
//! do with a request is record it (`istio_requests_total` and friends with
//! `reporter="destination"`, its SERVER span when tracing is on, its access-log line when logging
//! is: [`observe`]; no metric tags read from the request), the request and its response are
//! relayed as the bytes they are (a traced request's head written again with the context for the
//! next hop), and only their heads are parsed (`httparse`) and their bodies' framing followed
//! (`Content-Length`, chunked, or until the app closes), for the status, the sizes and the
//! duration. This is what the HBONE stream of an agent's pool carries in the common case; serving
//! it with hyper's server and client instead parses and writes every head twice more, moves each
//! request through two more tasks and cost the destination a third more CPU per request
//! (`agent/benches/README.md`).
//!
//! Anything else goes to the full server (`inbound::serve`) at a request boundary, with the bytes
//! read and not relayed: a request that upgrades, carries `Expect`, a chunked body, or hop-by-hop
//! headers other than `Connection: keep-alive|close`; a malformed or oversized head (hyper answers
//! it 400 or 431); metric tags for the workload; and a drain. The app's connection goes along when
//! it is still open. A request without an `x-request-id` gets one, as from the full server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tracing::debug;

use super::headers::LocalReply;
use super::outbound::MAX_HEADER_BYTES;
use crate::config::telemetry::EffectiveTelemetry;
use crate::proxy::copy::Side;
use crate::proxy::metrics::requests::{header_bytes, RequestLabels, RequestResult};
use crate::proxy::metrics::TcpLabels;
use crate::proxy::{spans, Counters, PodContext, ProxyInputs};
use crate::trace::SpanKind;
use framing::{Body, RequestHead, ResponseHead};

/// Bytes asked for per read.
const READ_SIZE: usize = 16 * 1024;

/// The largest response head (hyper's client's default read buffer limit, ~400 KiB: response
/// heads carry large cookies and policies).
const MAX_RESPONSE_HEAD_BYTES: usize = 400 * 1024;

/// The header the relay adds to a request without one.
const REQUEST_ID_NAME: &str = "x-request-id";

/// The stream, as the relay needs it (`inbound::InboundHttp`'s parts).
pub(super) struct Conn<'a> {
    pub pi: &'a Arc<ProxyInputs>,
    pub pod: &'a Arc<PodContext>,
    /// The stream's labels (reporter destination, verified source, this pod, the Service).
    pub labels: &'a TcpLabels,
    /// The client.
    pub peer: SocketAddr,
    /// The app's address.
    pub dst: SocketAddr,
    /// `namespace/name` of the pod, as the snapshot keys workloads.
    pub pod_key: &'a str,
}

/// What woke an idle relay.
enum Woke {
    Client(std::io::Result<usize>),
    App,
    Drain,
}

/// How the relay ended.
pub(super) enum Ended<I> {
    /// The stream is done; `Some`: the end whose failure ended it.
    Done(Option<Side>),
    /// The next request is the full server's: the stream, what was read from it and not relayed
    /// (the start of that request), and the app's connection if it is still open.
    HandOver {
        io: I,
        unread: Bytes,
        app: Option<TcpStream>,
    },
}

/// Whether the requests of a workload with these settings need no more than recording (with
/// their span and access-log line: [`observe`]): metric tags read what the full server has.
pub(super) fn observable(telemetry: &EffectiveTelemetry) -> bool {
    telemetry.server.metrics.tags.is_none()
}

/// Relays the stream's requests to `app` and the app's responses back, recording each, until the
/// stream ends or a request needs the full server.
pub(super) async fn relay<I>(conn: Conn<'_>, io: I, app: TcpStream) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (mut down_rd, mut down_wr) = tokio::io::split(io);
    let mut app = Some(app);
    let mut req_buf = BytesMut::with_capacity(READ_SIZE);
    let mut resp_buf = BytesMut::new();
    let hand_over = |rd: ReadHalf<I>, wr: WriteHalf<I>, unread: BytesMut, app| Ended::HandOver {
        io: rd.unsplit(wr),
        unread: unread.freeze(),
        app,
    };
    loop {
        // Idle until the next request's head is whole, noticing the app closing meanwhile.
        let head = loop {
            if !req_buf.is_empty() {
                match RequestHead::parse(&req_buf) {
                    Ok(Some(head)) => break head,
                    Ok(None) if req_buf.len() <= MAX_HEADER_BYTES => {}
                    _ => return hand_over(down_rd, down_wr, req_buf, app),
                }
            }
            if conn.pi.drain.is_draining() {
                return hand_over(down_rd, down_wr, req_buf, app);
            }
            req_buf.reserve(READ_SIZE);
            let app_closing = async {
                match &app {
                    Some(a) => a.readable().await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                read = down_rd.read_buf(&mut req_buf) => Woke::Client(read),
                _ = app_closing => Woke::App,
                () = conn.pi.drain.started() => Woke::Drain,
            };
            match woke {
                Woke::Client(Ok(0)) if req_buf.is_empty() => {
                    let _ = down_wr.shutdown().await;
                    return Ended::Done(None);
                }
                // A pool resets the stream of a connection it lets go: between requests, that is
                // no failure (as the full server counts it).
                Woke::Client(Err(_)) if req_buf.is_empty() => return Ended::Done(None),
                // The client closed (or failed) within a request's head.
                Woke::Client(Ok(0) | Err(_)) => return Ended::Done(Some(Side::A)),
                Woke::Client(Ok(_)) => {}
                Woke::App => {
                    if let Some(a) = &app {
                        match a.try_read(&mut [0u8; 1]) {
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            // Closed while idle (its keep-alive timeout): the next request makes
                            // another connection, as hyper's client pool would.
                            Ok(0) | Err(_) => app = None,
                            // Bytes no request asked for (a 408 before closing, say): that
                            // connection cannot be followed any more, the stream can.
                            Ok(_) => app = None,
                        }
                    }
                }
                Woke::Drain => return hand_over(down_rd, down_wr, req_buf, app),
            }
        };
        let telemetry = {
            let snap = conn.pi.snapshot.load();
            snap.telemetry_of(conn.pod_key).clone()
        };
        if !head.simple || !observable(&telemetry) {
            return hand_over(down_rd, down_wr, req_buf, app);
        }
        // As the full server (and Envoy) does: a request without an id gets one on its way.
        let request_id = (!head.request_id).then(super::headers::new_request_id);
        let added = request_id
            .as_ref()
            .map_or(0, |id| (REQUEST_ID_NAME.len() + id.len() + 4) as u64);
        // The request's duration starts with its head, as in the full server: a reconnect to the
        // app is part of it.
        let mut result = RequestResult::start(
            &conn.pi.telemetry,
            RequestLabels {
                conn: conn.labels.clone(),
                protocol: "http",
                response_code: 0,
                grpc_status: None,
            },
            (conn.peer, conn.dst),
            head.counted_bytes + added,
            None,
        );
        // What the app gets instead of the request's own head, if anything.
        let tracing = spans::of(&telemetry, SpanKind::Server);
        let logged =
            conn.pi.telemetry.access_log.is_some() || telemetry.server.access_log.enabled();
        let new_head = if tracing.is_some() || logged {
            let raw = &req_buf[..head.len];
            // The SERVER span, decided from the caller's trace headers alone.
            let span = match tracing {
                Some(tracing) => {
                    let Some(ctx) = observe::context(raw) else {
                        return hand_over(down_rd, down_wr, req_buf, app);
                    };
                    let begun =
                        spans::begin_from(conn.pi, tracing, SpanKind::Server, ctx.extract());
                    Some((tracing, ctx, begun))
                }
                None => None,
            };
            match span {
                // Neither reported nor logged (most requests): the head stays as it came but for
                // the context it carries on.
                Some((tracing, ctx, begun)) if !begun.reported() && !logged => {
                    let next_hop = begun.next_hop(tracing, ctx.carried());
                    Some(observe::carried(raw, &next_hop, request_id.as_ref()))
                }
                span => {
                    let Some(mut parsed) = observe::Head::parse(raw) else {
                        // Headers `http`'s types refuse: the full server answers them.
                        return hand_over(down_rd, down_wr, req_buf, app);
                    };
                    let added = request_id.is_some();
                    let id = parsed.request_id(request_id);
                    if logged {
                        result.log = Some(Box::new(parsed.log_fields(&id, conn.dst.port())));
                    }
                    match span {
                        Some((tracing, _, begun)) => {
                            Some(parsed.traced(&conn, tracing, begun, &mut result))
                        }
                        None => added.then(|| with_request_id(raw, &id)),
                    }
                }
            }
        } else {
            request_id.map(|id| with_request_id(&req_buf[..head.len], &id))
        };
        let mut stream = match app.take().filter(still_open) {
            Some(stream) => stream,
            None => match crate::proxy::connect::app(
                conn.pod,
                conn.dst,
                SocketAddr::new(conn.peer.ip(), 0),
            )
            .await
            {
                Ok(stream) => stream,
                // The full server tries again, and answers 503 as it does.
                Err(_) => return hand_over(down_rd, down_wr, req_buf, None),
            },
        };
        Counters::inc(&conn.pi.counters.http_inbound_relayed);
        result.upstream = Some(conn.dst);
        result.set_observed_settings(telemetry);
        let counter = result.request_body_counter();
        let body_sent = std::sync::atomic::AtomicBool::new(false);
        let received = {
            let (mut app_rd, mut app_wr) = stream.split();
            let send = async {
                let head = (&head, new_head);
                send_request(&mut down_rd, &mut app_wr, &mut req_buf, head, counter).await?;
                body_sent.store(true, Ordering::Relaxed);
                // Watched until the response ends: a client that goes away (a reset, or the end
                // of its stream, as hyper's server takes it) is not waited on.
                watch_client(&mut down_rd, &mut req_buf).await
            };
            let recv = relay_response(
                &mut app_rd,
                &mut down_wr,
                &mut resp_buf,
                head.is_head,
                &mut result,
            );
            tokio::pin!(send, recv);
            let mut app_write_failed = false;
            loop {
                tokio::select! {
                    s = &mut send, if !app_write_failed => match s {
                        Err(Side::A) => break None,
                        // The app stopped reading: its answer may still come.
                        _ => app_write_failed = true,
                    },
                    r = &mut recv => break Some(r),
                }
            }
        };
        let Some(received) = received else {
            // The client went away mid-request: so does the app's connection.
            if let Some(log) = result.log.as_mut() {
                // Envoy's details for a downstream gone before its response.
                log.details = match result.labels.response_code {
                    0 => "downstream_remote_disconnect",
                    _ => "via_upstream",
                };
            }
            result.finish(Some("DC"));
            return Ended::Done(Some(Side::A));
        };
        if let Some(log) = result.log.as_mut() {
            log.details = match received {
                Err(Failed::BeforeResponse) => "upstream_reset_before_response_started",
                _ => "via_upstream",
            };
        }
        match received {
            Ok(end) if body_sent.load(Ordering::Relaxed) => {
                result.finish(None);
                if end.close || head.close {
                    let _ = down_wr.shutdown().await;
                    return Ended::Done(None);
                }
                // Bytes after the response: that connection cannot be followed any more.
                app = (!end.stray).then_some(stream);
            }
            // The app answered before the request's body was all sent (or could be): the request
            // is over, and the connection with it.
            Ok(_) => {
                result.finish(None);
                let _ = down_wr.shutdown().await;
                return Ended::Done(None);
            }
            Err(Failed::BeforeResponse) => {
                debug!(dst = %conn.dst, "app failed before a response (503)");
                let reply = LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UC",
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                );
                result.labels.conn.flags = reply.flag;
                let wrote = write_local_reply(&mut down_wr, reply, head.is_head, &mut result).await;
                result.finish(None);
                return Ended::Done(wrote.err());
            }
            Err(Failed::Response(side)) => {
                result.finish(Some(if side == Side::A { "DC" } else { "UR" }));
                return Ended::Done(Some(side));
            }
        }
    }
}

/// Reads what the client sends while its request's response is on its way (a pipelined request,
/// kept in `buf` up to a head's worth); returns only when the client goes away.
async fn watch_client<R: AsyncRead + Unpin>(down: &mut R, buf: &mut BytesMut) -> Result<(), Side> {
    loop {
        if buf.len() >= MAX_HEADER_BYTES {
            // Enough for the next request: the rest waits in the stream's flow control.
            return std::future::pending().await;
        }
        buf.reserve(READ_SIZE);
        match down.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Side::A),
        }
    }
}

/// Whether the app's idle connection is still open: a close it sent may not have woken the idle
/// wait yet when the next request came in the same batch of events.
fn still_open(app: &TcpStream) -> bool {
    use futures::FutureExt;
    if app.readable().now_or_never().is_none() {
        return true;
    }
    matches!(app.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `head` with an `x-request-id: id` line added. The head ends with CRLF CRLF (bare LF goes to
/// hyper): the header goes before the last CRLF.
fn with_request_id(head: &[u8], id: &http::HeaderValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + REQUEST_ID_NAME.len() + id.len() + 4);
    out.extend_from_slice(&head[..head.len() - 2]);
    out.extend_from_slice(REQUEST_ID_NAME.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Sends the request whose head starts `buf` to the app (`new_head` in place of its own, when
/// given), and its body as it comes.
async fn send_request<R, W>(
    down: &mut R,
    app: &mut W,
    buf: &mut BytesMut,
    (head, mut new_head): (&RequestHead, Option<Vec<u8>>),
    counter: Arc<AtomicU64>,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut body = head.body.clone();
    let mut take = head.len;
    loop {
        let (used, data) = body.advance(&buf[take..]).map_err(|()| Side::A)?;
        take += used;
        counter.fetch_add(data, Ordering::Relaxed);
        if let Some(mut out) = new_head.take() {
            // In the same write as the body's first bytes.
            out.extend_from_slice(&buf[head.len..take]);
            app.write_all(&out).await.map_err(|_| Side::B)?;
            buf.advance(take);
            take = 0;
        } else if take > 0 {
            app.write_all(&buf[..take]).await.map_err(|_| Side::B)?;
            buf.advance(take);
            take = 0;
        }
        if body.done() {
            return Ok(());
        }
        buf.reserve(READ_SIZE);
        match down.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Side::A),
        }
    }
}

/// How a response ended.
struct ResponseEnd {
    /// The connection ends with it (`Connection: close`, HTTP/1.0, a body ended by the close).
    close: bool,
    /// The app sent bytes after it that no request asked for.
    stray: bool,
}

/// Why a response did not end.
enum Failed {
    /// The app closed, failed or sent what is not HTTP before any of a response was relayed.
    BeforeResponse,
    /// Part of the response was relayed, then this end failed.
    Response(Side),
}

/// Relays the app's response to the request (informational ones first), recording its status
/// and sizes.
async fn relay_response<R, W>(
    app: &mut R,
    down: &mut W,
    buf: &mut BytesMut,
    is_head: bool,
    result: &mut RequestResult,
) -> Result<ResponseEnd, Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let head = read_response_head(app, down, buf, is_head).await?;
    relay_response_body(app, down, buf, head, result).await
}

/// Reads the final response head to a request into the start of `buf`; informational (1xx)
/// responses before it are relayed to `down` as they come.
async fn read_response_head<R, W>(
    app: &mut R,
    down: &mut W,
    buf: &mut BytesMut,
    is_head: bool,
) -> Result<ResponseHead, Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut started = false;
    let failed = |started: bool, side: Side| {
        if started {
            Failed::Response(side)
        } else {
            Failed::BeforeResponse
        }
    };
    loop {
        let head = loop {
            if !buf.is_empty() {
                match ResponseHead::parse(buf, is_head) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() <= MAX_RESPONSE_HEAD_BYTES => {}
                    _ => return Err(failed(started, Side::B)),
                }
            }
            buf.reserve(READ_SIZE);
            match app.read_buf(buf).await {
                Ok(n) if n > 0 => {}
                _ => return Err(failed(started, Side::B)),
            }
        };
        if head.status == 101 {
            // Switching protocols without an upgrade asked for.
            return Err(failed(started, Side::B));
        }
        if head.status >= 200 {
            return Ok(head);
        }
        // 1xx: relayed as it is; the final response follows.
        down.write_all(&buf[..head.len])
            .await
            .map_err(|_| Failed::Response(Side::A))?;
        buf.advance(head.len);
        started = true;
    }
}

/// Relays the response whose final head starts `buf` (read by [`read_response_head`]) and its
/// body, as its framing says, recording its status and sizes.
async fn relay_response_body<R, W>(
    app: &mut R,
    down: &mut W,
    buf: &mut BytesMut,
    head: ResponseHead,
    result: &mut RequestResult,
) -> Result<ResponseEnd, Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    result.set_observed_response(head.status, head.counted_bytes);
    let mut body = head.body;
    let mut take = head.len;
    loop {
        let (used, data) = body
            .advance(&buf[take..])
            .map_err(|()| Failed::Response(Side::B))?;
        take += used;
        result.add_response_body(data);
        if take > 0 {
            down.write_all(&buf[..take])
                .await
                .map_err(|_| Failed::Response(Side::A))?;
            buf.advance(take);
            take = 0;
        }
        if body.done() {
            break;
        }
        buf.reserve(READ_SIZE);
        match app.read_buf(buf).await {
            Ok(n) if n > 0 => {}
            Ok(_) if body == Body::UntilClose => break,
            _ => return Err(Failed::Response(Side::B)),
        }
    }
    down.flush().await.map_err(|_| Failed::Response(Side::A))?;
    let stray = !buf.is_empty();
    buf.clear();
    Ok(ResponseEnd {
        close: head.close || head.until_close,
        stray,
    })
}

/// Writes the proxy's own reply, closing the connection after it.
async fn write_local_reply<W: AsyncWrite + Unpin>(
    down: &mut W,
    reply: LocalReply,
    to_head: bool,
    result: &mut RequestResult,
) -> Result<(), Side> {
    let out = local_reply_bytes(reply, to_head, true, result);
    down.write_all(&out).await.map_err(|_| Side::A)?;
    let _ = down.shutdown().await;
    Ok(())
}

/// The proxy's own reply as HTTP/1.1 (`Connection: close` when `close`), recorded in `result`.
fn local_reply_bytes(
    reply: LocalReply,
    to_head: bool,
    close: bool,
    result: &mut RequestResult,
) -> Vec<u8> {
    let length = reply.body.len();
    let body = if to_head {
        Bytes::new()
    } else {
        reply.body.clone()
    };
    let mut resp = reply.into_response();
    // Counted as the full server counts its local replies: before the framing headers.
    result.set_observed_response(resp.status().as_u16(), header_bytes(resp.headers()));
    result.add_response_body(body.len() as u64);
    if close {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    resp.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(length),
    );
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.status().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        resp.status()
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    out
}

mod framing;
mod observe;
pub(super) mod source;
#[cfg(test)]
mod tests;

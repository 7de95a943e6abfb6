//! Destination-side HTTP/1.1, observed rather than served again. When all the destination has to
//! do with a request is record it (`istio_requests_total` and friends with
//! `reporter="destination"`: no span, no access-log line, no metric tags read from the request),
//! the request and its response are relayed as the bytes they are, and only their heads are
//! parsed (`httparse`) and their bodies' framing followed (`Content-Length`, chunked, or until the
//! app closes), for the status, the sizes and the duration. This is what the HBONE stream of an
//! agent's pool carries in the common case; serving it with hyper's server and client instead
//! parses and writes every head twice more, moves each request through two more tasks and cost
//! the destination a third more CPU per request (`agent/benches/README.md`).
//!
//! Anything else goes to the full server (`inbound::serve`) at a request boundary, with the bytes
//! read and not relayed: a request that upgrades, carries `Expect`, a chunked body, or hop-by-hop
//! headers other than `Connection: keep-alive|close`; a malformed or oversized head (hyper answers
//! it 400 or 431); tracing, an access log or metric tags for the workload; and a drain. The app's
//! connection goes along when it is still open. A request without an `x-request-id` gets one, as
//! from the full server.

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
use crate::proxy::{Counters, PodContext, ProxyInputs};

/// Bytes asked for per read.
const READ_SIZE: usize = 16 * 1024;

/// The largest response head (hyper's client's default read buffer limit, ~400 KiB: response
/// heads carry large cookies and policies).
const MAX_RESPONSE_HEAD_BYTES: usize = 400 * 1024;

/// The header the relay adds to a request without one.
const REQUEST_ID_NAME: &str = "x-request-id";

/// The most headers a head may have (hyper's default; more goes to hyper, which answers 431).
const MAX_HEADERS: usize = 100;

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

/// Whether the requests of a workload with these settings need no more than recording.
pub(super) fn observable(pi: &ProxyInputs, telemetry: &EffectiveTelemetry) -> bool {
    let server = &telemetry.server;
    server.tracing.is_none()
        && !server.access_log.enabled()
        && server.metrics.tags.is_none()
        && pi.telemetry.access_log.is_none()
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
        if !head.simple || !observable(conn.pi, &telemetry) {
            return hand_over(down_rd, down_wr, req_buf, app);
        }
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
        // As the full server (and Envoy) does: a request without an id gets one on its way.
        let request_id = (!head.request_id).then(super::headers::new_request_id);
        let added = request_id
            .as_ref()
            .map_or(0, |id| (REQUEST_ID_NAME.len() + id.len() + 4) as u64);
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
        result.upstream = Some(conn.dst);
        result.set_observed_settings(telemetry);
        let counter = result.request_body_counter();
        let body_sent = std::sync::atomic::AtomicBool::new(false);
        let (received, client_gone) = {
            let (mut app_rd, mut app_wr) = stream.split();
            let send = async {
                let head = (&head, request_id);
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
                        Err(Side::A) => break (None, true),
                        // The app stopped reading: its answer may still come.
                        _ => app_write_failed = true,
                    },
                    r = &mut recv => break (Some(r), false),
                }
            }
        };
        let Some(received) = received else {
            debug_assert!(client_gone);
            // The client went away mid-request: so does the app's connection.
            result.finish(Some("DC"));
            return Ended::Done(Some(Side::A));
        };
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

/// Sends the request whose head starts `buf` to the app, and its body as it comes.
async fn send_request<R, W>(
    down: &mut R,
    app: &mut W,
    buf: &mut BytesMut,
    (head, mut request_id): (&RequestHead, Option<http::HeaderValue>),
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
        if let Some(id) = request_id.take() {
            // The head ends with CRLF CRLF (bare LF goes to hyper): the header goes before the
            // last CRLF, in the same write as the rest.
            let mut out = Vec::with_capacity(take + REQUEST_ID_NAME.len() + id.len() + 4);
            out.extend_from_slice(&buf[..head.len - 2]);
            out.extend_from_slice(REQUEST_ID_NAME.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
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
    let mut started = false;
    let failed = |started: bool, side: Side| {
        if started {
            Failed::Response(side)
        } else {
            Failed::BeforeResponse
        }
    };
    let head = loop {
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
            break head;
        }
        // 1xx: relayed as it is; the final response follows.
        down.write_all(&buf[..head.len])
            .await
            .map_err(|_| Failed::Response(Side::A))?;
        buf.advance(head.len);
        started = true;
    };
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
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
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
    down.write_all(&out).await.map_err(|_| Side::A)?;
    let _ = down.shutdown().await;
    Ok(())
}

/// A request head this relay can follow, or one it leaves to the full server (`simple` false).
#[derive(Debug)]
struct RequestHead {
    /// The head's length in bytes.
    len: usize,
    /// What `istio_request_bytes` counts of it: method, path and query, and each header as
    /// `name: value\r\n` (what the full server counts of the same request).
    counted_bytes: u64,
    body: Body,
    is_head: bool,
    /// `Connection: close`.
    close: bool,
    /// It has an `x-request-id` (the relay adds one otherwise, as the full server does).
    request_id: bool,
    simple: bool,
}

impl RequestHead {
    /// The head at the start of `buf`: None while it is incomplete; Err when it is malformed.
    fn parse(buf: &[u8]) -> Result<Option<RequestHead>, httparse::Error> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(buf)? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let method = req.method.unwrap_or_default();
        let path = req.path.unwrap_or_default();
        // A line ended by a bare LF reaches the app as it came, and apps differ on it: hyper
        // reads and writes it again.
        let mut simple = !has_bare_lf(&buf[..len])
            && req.version == Some(1)
            && method != "CONNECT"
            && http::uri::PathAndQuery::try_from(path).is_ok()
            && path.starts_with('/');
        let mut length = None;
        let mut close = false;
        let mut request_id = false;
        let mut counted = (method.len() + path.len()) as u64;
        for h in req.headers.iter() {
            counted += (h.name.len() + h.value.len() + 4) as u64;
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                match (parse_length(h.value), length) {
                    (Some(n), None) => length = Some(n),
                    _ => simple = false,
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        simple = false;
                    }
                }
            } else if name.eq_ignore_ascii_case("x-request-id") {
                request_id = true;
            } else if name.eq_ignore_ascii_case("content-type") {
                // gRPC (and gRPC-Web) is recorded with its own protocol and status.
                simple &= !h.value.starts_with(b"application/grpc");
            } else if [
                "transfer-encoding",
                "upgrade",
                "expect",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
            {
                simple = false;
            }
        }
        Ok(Some(RequestHead {
            len,
            counted_bytes: counted,
            body: match length {
                Some(0) | None => Body::Empty,
                Some(n) => Body::Length(n),
            },
            is_head: method == "HEAD",
            close,
            request_id,
            simple,
        }))
    }
}

/// `1*DIGIT` (RFC 9110 §8.6), between optional whitespace.
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether a line of `head` ends with LF alone.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// A response head.
#[derive(Debug)]
struct ResponseHead {
    len: usize,
    status: u16,
    /// Each header as `name: value\r\n`, as the full server counts them.
    counted_bytes: u64,
    body: Body,
    close: bool,
    /// The body ends when the app closes the connection.
    until_close: bool,
}

impl ResponseHead {
    /// The head at the start of `buf` (None while incomplete), the response to a HEAD request when
    /// `to_head`. Err: malformed, or framing that cannot be followed safely.
    fn parse(buf: &[u8], to_head: bool) -> Result<Option<ResponseHead>, ()> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf).map_err(|_| ())? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let status = resp.code.unwrap_or_default();
        let mut close = resp.version == Some(0);
        let mut length = None;
        let mut chunked = None;
        let mut counted = 0u64;
        for h in resp.headers.iter() {
            counted += (h.name.len() + h.value.len() + 4) as u64;
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                // Checked only if the body is framed by it (hyper's client ignores it otherwise).
                length = match (parse_length(h.value), length) {
                    (Some(n), None) => Some(Ok(n)),
                    (Some(n), Some(Ok(l))) if n == l => Some(Ok(n)),
                    _ => Some(Err(())),
                };
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding decides (RFC 9112 §6.3): chunked, or the body runs to the close.
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                let tokens = h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii);
                for token in tokens {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && resp.version == Some(0) {
                        close = false;
                    }
                }
            }
        }
        let no_body = to_head || status < 200 || status == 204 || status == 304;
        let (body, until_close) = match (no_body, chunked, length) {
            (true, _, _) => (Body::Empty, false),
            (false, Some(true), _) => (Body::Chunked(Chunked::Size { size: 0, digits: 0 }), false),
            (false, Some(false), _) => (Body::UntilClose, true),
            (false, None, Some(Err(()))) => return Err(()),
            (false, None, Some(Ok(0))) => (Body::Empty, false),
            (false, None, Some(Ok(n))) => (Body::Length(n), false),
            (false, None, None) => (Body::UntilClose, true),
        };
        Ok(Some(ResponseHead {
            len,
            status,
            counted_bytes: counted,
            body,
            close,
            until_close,
        }))
    }
}

/// Where a message's body stands.
#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// No body, or all of it relayed.
    Empty,
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes the connection.
    UntilClose,
}

/// The chunked coding's state (RFC 9112 §7.1), between any two bytes.
#[derive(Debug, Clone, PartialEq)]
enum Chunked {
    /// In a chunk's size line; `digits` read so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// In a chunk extension, until the line's end.
    Extension {
        size: u64,
    },
    /// The size line's LF.
    SizeLf {
        size: u64,
    },
    /// This many data bytes of the chunk to come.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the empty line that ends the body).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl Body {
    fn done(&self) -> bool {
        matches!(self, Body::Empty | Body::Chunked(Chunked::Done))
    }

    /// Follows the body over `buf`: how many bytes of `buf` belong to it, and how many of those
    /// are data (what the metrics count; chunk framing is not). Err: not a valid chunked coding.
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, u64), ()> {
        match self {
            Body::Empty => Ok((0, 0)),
            Body::UntilClose => Ok((buf.len(), buf.len() as u64)),
            Body::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = Body::Empty;
                }
                Ok((n as usize, n))
            }
            Body::Chunked(state) => state.advance(buf),
        }
    }
}

impl Chunked {
    fn advance(&mut self, buf: &[u8]) -> Result<(usize, u64), ()> {
        let mut i = 0;
        let mut data = 0u64;
        while i < buf.len() && *self != Chunked::Done {
            if let Chunked::Data(left) = self {
                let n = (*left).min((buf.len() - i) as u64);
                *left -= n;
                i += n as usize;
                data += n;
                if *left == 0 {
                    *self = Chunked::DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            *self = match (&*self, b) {
                (Chunked::Size { size, digits }, b) if b.is_ascii_hexdigit() => {
                    let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                    Chunked::Size {
                        size: size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(d))
                            .ok_or(())?,
                        digits: digits.saturating_add(1),
                    }
                }
                (Chunked::Size { size, digits }, b';' | b' ' | b'\t') if *digits > 0 => {
                    Chunked::Extension { size: *size }
                }
                (Chunked::Size { size, digits }, b'\r') if *digits > 0 => {
                    Chunked::SizeLf { size: *size }
                }
                (Chunked::Extension { size }, b'\r') => Chunked::SizeLf { size: *size },
                (Chunked::Extension { .. }, b'\n') => return Err(()),
                (Chunked::Extension { size }, _) => Chunked::Extension { size: *size },
                (Chunked::SizeLf { size }, b'\n') => Chunked::after_size(*size),
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataLf, b'\n') => Chunked::Size { size: 0, digits: 0 },
                (Chunked::TrailerStart, b'\r') => Chunked::EndLf,
                (Chunked::TrailerStart, _) => Chunked::TrailerLine,
                (Chunked::TrailerLine, b'\r') => Chunked::TrailerLf,
                (Chunked::TrailerLine, _) => Chunked::TrailerLine,
                (Chunked::TrailerLf, b'\n') => Chunked::TrailerStart,
                (Chunked::EndLf, b'\n') => Chunked::Done,
                _ => return Err(()),
            };
        }
        Ok((i, data))
    }

    fn after_size(size: u64) -> Chunked {
        if size == 0 {
            Chunked::TrailerStart
        } else {
            Chunked::Data(size)
        }
    }
}

#[cfg(test)]
mod tests;

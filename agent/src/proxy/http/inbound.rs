//! L7 inbound: the destination's side of an HTTP request, as a sidecar's inbound listener. When an
//! HBONE stream to an enrolled pod carries HTTP, the destination's proxy serves that HTTP itself
//! and forwards each request to the app, so every request is recorded where it arrives
//! (`istio_requests_total` and friends with `reporter="destination"`, its access-log line), with
//! `source_*` from the peer's verified identity, never from headers.
//!
//! Whether a stream carries HTTP is decided from the client's first bytes (an HTTP/1.x request
//! line or the HTTP/2 preface; Istio's protocol selection), unless the port is declared opaque
//! (`tcp`, `tls`, ...), the app speaks first (a server-first protocol), or nothing comes within
//! the protocol detection timeout: the stream is then relayed as bytes, as it always was. The app
//! is spoken to in the client's HTTP version (Istio's inbound clusters use the downstream
//! protocol), over the one connection made for the stream.
//!
//! An agent's HTTP/1.1 whose requests need only recording is relayed as bytes instead
//! (`passthrough`), and comes here from the first request that needs more.
//!
//! The client's end is a [`Downstream`]: an HBONE stream, or, for a client pod on this node
//! (`proxy::local`), the client's own socket or an in-process pipe.
//!
//! Draining (an upgrade or SIGTERM), an HTTP/2 client is sent GOAWAY. An HTTP/1.1 client has no
//! such signal: a server that closes an idle keep-alive connection can meet the request the client
//! sends at that instant, which then fails. When the client is another agent's (or this one's)
//! upstream pool ([`Downstream::CLIENT_CLOSES`]: it learns of the drain from the HBONE GOAWAY, or
//! drains itself), the connection is not closed here: requests still coming on it are served,
//! answered with `connection: close`, and the client closes idle ones; whatever is left is closed
//! at the end of the drain grace period. For the same reason such a connection has no idle
//! timeout here: the client's pool closes it after its own (`connectionPool.http.idleTimeout`). An app's own connection (a client pod's socket on this
//! node) is drained as any server would: closed when idle, or after its response in flight.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::body::{Counted, Finishing, ProxyBody};
use super::client::Body;
use super::headers::{self, LocalReply};
use super::outbound::{authority, is_grpc, join_upgraded, log_fields, Held, MAX_HEADER_BYTES};
use super::passthrough::{self, Ended};
use super::target;
use crate::proxy::copy::{Duplex, Outcome, Side};
use crate::proxy::hbone::{H2Stream, Stream};
use crate::proxy::local::Prefixed;
use crate::proxy::metrics::requests::{header_bytes, RequestLabels, RequestResult};
use crate::proxy::metrics::{inbound_cluster, TcpLabels};
use crate::proxy::protocol::{self, Protocol, Sniffed};
use crate::proxy::spans;
use crate::proxy::{PodContext, ProxyInputs};
use crate::snapshot::Snapshot;
use crate::state::TargetPort;
use crate::trace::SpanKind;

/// A pod annotation that turns destination-side L7 off for that pod (`"false"` or `"off"`);
/// `--destination-l7 off` turns it off node-wide.
pub const DESTINATION_L7_ANNOTATION: &str = "ambit.dev/destination-l7";

/// Whether streams to `pod`'s `port` are looked at for HTTP: destination-side L7 is on node-wide
/// and for the pod, and the port is not declared as something else than HTTP.
pub fn wanted(pi: &ProxyInputs, snap: &Snapshot, pod: &PodContext, port: u16) -> bool {
    if !pi.destination_l7 {
        return false;
    }
    let workload = snap
        .state
        .workloads
        .get(&crate::state::key(&pod.namespace, &pod.name));
    if let Some(w) = workload {
        if w.annotations
            .get(DESTINATION_L7_ANNOTATION)
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "off"))
        {
            return false;
        }
    }
    let Some(service) = snap.local_service(&pod.namespace, &pod.name, port) else {
        // No Service selects the port: sniffed, as Istio's inbound passthrough chain does.
        return true;
    };
    let declared = service.ports.iter().find(|p| match &p.target_port {
        TargetPort::Number(n) => *n == port,
        TargetPort::Named(name) => workload.and_then(|w| w.named_ports.get(name)) == Some(&port),
    });
    declared.is_none_or(|p| {
        let protocol = Protocol::for_service_port(p);
        protocol.is_http() || protocol.is_sniffed()
    })
}

/// The client's end of an inbound connection, as destination-side L7 needs it on top of a relay
/// end: its first bytes (to classify them), then `AsyncRead + AsyncWrite` for an HTTP server.
pub trait Downstream: Duplex + Sized + Send + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// The next bytes the client sent (their window released); None at its end or on an error.
    fn next_bytes(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
    /// The same bytes as `AsyncRead + AsyncWrite`, `first` (already taken) read first.
    fn into_io_after(self, first: Bytes) -> Self::Io;
    /// Ends it as a failed connection does, after the app's connection failed.
    fn abort(self);
    /// The client is an agent's upstream pool, which stops reusing its HTTP/1.1 connection and
    /// closes it when this agent drains (HBONE GOAWAY, or the same process's drain): draining,
    /// this side then keeps the connection open rather than racing the client's next request.
    const CLIENT_CLOSES: bool = false;
}

impl Downstream for Stream {
    type Io = H2Stream;
    const CLIENT_CLOSES: bool = true;

    async fn next_bytes(&mut self) -> Option<Bytes> {
        let chunk = self.recv.data().await?.ok()?;
        let _ = self.recv.flow_control().release_capacity(chunk.len());
        Some(chunk)
    }

    fn into_io_after(self, first: Bytes) -> H2Stream {
        Stream::into_io_after(self, first)
    }

    fn abort(mut self) {
        // RFC 9113 §8.5, as the relay does when the app's connection fails.
        self.send.send_reset(h2::Reason::CONNECT_ERROR);
    }
}

/// What an inbound stream turned out to carry.
pub enum Carried<D: Downstream> {
    /// HTTP/1.x, or HTTP/2 (`h2`) with prior knowledge; `io` reads the first bytes again.
    Http { io: D::Io, h2: bool },
    /// Anything else: relay it, `first` (already read from the stream) first.
    Opaque { tunnel: D, first: Bytes },
    /// The app's connection failed (reset) while the client had sent `read` bytes.
    AppFailed {
        tunnel: D,
        read: usize,
        error: std::io::Error,
    },
}

/// Reads the stream's first bytes until they prove HTTP or not, unless the app speaks first or
/// `timeout` passes.
pub async fn classify<D: Downstream>(
    mut tunnel: D,
    app: &TcpStream,
    timeout: Duration,
) -> Carried<D> {
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut first = BytesMut::new();
    let mut watch_app = true;
    loop {
        let chunk = tokio::select! {
            biased;
            chunk = tunnel.next_bytes() => chunk,
            _ = app.readable(), if watch_app => {
                // An HTTP/2 server (gRPC) sends its SETTINGS at once: that is not a server-first
                // protocol, the client's preface is on its way.
                match app_sent_h2_settings(app).await {
                    Ok(true) => {
                        watch_app = false;
                        continue;
                    }
                    Ok(false) => break,
                    // Looking took the socket's error (a reset is reported once): pass it on.
                    Err(e) => {
                        return Carried::AppFailed {
                            tunnel,
                            read: first.len(),
                            error: e,
                        }
                    }
                }
            }
            _ = &mut deadline => break,
        };
        let Some(chunk) = chunk else {
            // The stream ended (or failed) first: the relay sees the same end.
            break;
        };
        first.extend_from_slice(&chunk);
        match protocol::decide(&first) {
            None => continue,
            Some(Sniffed::Http1) => {
                return Carried::Http {
                    io: tunnel.into_io_after(first.freeze()),
                    h2: false,
                }
            }
            Some(Sniffed::H2) => {
                return Carried::Http {
                    io: tunnel.into_io_after(first.freeze()),
                    h2: true,
                }
            }
            Some(_) => break,
        }
    }
    Carried::Opaque {
        tunnel,
        first: first.freeze(),
    }
}

/// Whether what the app sent first is an HTTP/2 frame header of a SETTINGS frame (RFC 9113
/// §3.4: a server's preface), looked at without taking it.
async fn app_sent_h2_settings(app: &TcpStream) -> std::io::Result<bool> {
    const SETTINGS: u8 = 0x4;
    let mut head = [0u8; 9];
    let n = app.peek(&mut head).await?;
    Ok(n == 9 && head[3] == SETTINGS && head[4] & !0x1 == 0)
}

/// One HTTP stream's context at the destination.
pub struct InboundHttp {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    /// The stream's labels (reporter destination, verified source, this pod, the Service).
    pub labels: TcpLabels,
    /// The client: the HBONE peer, or the client pod's address on this node.
    pub peer: SocketAddr,
    /// The app's address.
    pub dst: SocketAddr,
    /// `namespace/name` of the pod, as the snapshot keys workloads.
    pub pod_key: String,
}

/// The connection to the app, in the client's HTTP version. One is made per stream (before the
/// stream's 200, so an unreachable app is a refused stream); when the app closes it (`Connection:
/// close`, an idle timeout), the next request makes another, as Envoy's inbound pool does.
enum Sender {
    /// HTTP/1.1 carries one request at a time: the server side reads the next request only after
    /// this one's response has been sent.
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// Serves the stream's HTTP until either end closes; the bytes each way on the stream, for the
/// stream's TCP metrics. `client_closes`: the client's [`Downstream::CLIENT_CLOSES`].
pub async fn serve<I>(
    conn: InboundHttp,
    io: I,
    app: TcpStream,
    h2: bool,
    client_closes: bool,
) -> Outcome
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let counts = Arc::new(Counts::default());
    let io = CountedIo {
        inner: io,
        counts: counts.clone(),
    };
    // An agent's pool's HTTP/1.1 is relayed as bytes while its requests need only recording.
    let (io, app) = if client_closes && !h2 {
        let ends = passthrough::Conn {
            pi: &conn.pi,
            pod: &conn.pod,
            labels: &conn.labels,
            peer: conn.peer,
            dst: conn.dst,
            pod_key: &conn.pod_key,
        };
        match passthrough::relay(ends, io, app).await {
            Ended::Done(failed) => return counts.outcome(failed),
            Ended::HandOver { io, unread, app } => (Prefixed::new(unread, io), app),
        }
    } else {
        (Prefixed::new(Bytes::new(), io), Some(app))
    };
    let dst = conn.dst;
    let app = match app {
        Some(app) => match handshake(app, h2).await {
            Ok(app) => Some(app),
            Err(e) => {
                debug!(%dst, error = %e, "app HTTP handshake failed");
                return counts.outcome(Some(Side::B));
            }
        },
        // The app closed it: the first request makes another.
        None => None,
    };
    let drain = conn.pi.drain.clone();
    let conn = Arc::new(Served {
        conn,
        app: tokio::sync::Mutex::new(app),
        h2,
        active: Arc::default(),
    });
    let in_flight = conn.active.clone();
    // HTTP/1.1 from an agent's pool, draining: answered with `connection: close`, and closed by
    // the client (see the module's doc).
    let keep_open = client_closes && !h2;
    let service = {
        let conn = conn.clone();
        let drain = drain.clone();
        hyper::service::service_fn(move |req| {
            let conn = conn.clone();
            let drain = drain.clone();
            let request = Box::pin(async move { conn.request(req).await });
            async move {
                let mut resp = request.await;
                if keep_open && drain.is_draining() {
                    close_after(&mut resp);
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = TokioIo::new(io);
    // Draining: the client's pooled connection over this stream ends with GOAWAY (HTTP/2), after
    // the response in flight (an app's HTTP/1.1), or when the client (an agent's pool) closes it,
    // so its next request goes on a new stream.
    let served = if h2 {
        let c = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .serve_connection(io, service);
        tokio::pin!(c);
        tokio::select! {
            out = &mut c => out,
            () = drain.started() => {
                c.as_mut().graceful_shutdown();
                c.await
            }
        }
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .max_buf_size(MAX_HEADER_BYTES);
        if keep_open {
            // hyper's header read timeout (30s by default) also runs while a keep-alive
            // connection waits for its next request: it would close an agent's idle connection
            // under the request that agent sends at that instant. The agent's pool closes its
            // idle connections itself (`connectionPool.http.idleTimeout`).
            builder.header_read_timeout(None);
        }
        let c = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(c);
        tokio::select! {
            out = &mut c => out,
            () = drain.started(), if !keep_open => {
                c.as_mut().graceful_shutdown();
                c.await
            }
        }
    };
    match served {
        Ok(()) => counts.outcome(None),
        // The client closed (or reset) a connection it was not using: a pooled connection let
        // go, not a failure.
        Err(_) if in_flight.load(Ordering::Acquire) == 0 => counts.outcome(None),
        Err(e) => {
            debug!(%dst, error = %e, "inbound HTTP stream ended");
            counts.outcome(Some(Side::A))
        }
    }
}

/// Ends an HTTP/1.1 connection after this response (hyper's server closes it once written), unless
/// the response switches protocols.
fn close_after(resp: &mut Response<ProxyBody>) {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

async fn handshake(app: TcpStream, h2: bool) -> Result<Sender, hyper::Error> {
    Ok(if h2 {
        Sender::Http2(handshake_h2(app).await?)
    } else {
        Sender::Http1(handshake_h1(app).await?)
    })
}

async fn handshake_h1(app: TcpStream) -> Result<http1::SendRequest<Body>, hyper::Error> {
    let (sender, driver) = http1::Builder::new()
        .handshake::<_, Body>(TokioIo::new(app))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = driver.with_upgrades().await {
            debug!(error = %e, "app HTTP/1.1 connection ended");
        }
    });
    Ok(sender)
}

async fn handshake_h2(app: TcpStream) -> Result<http2::SendRequest<Body>, hyper::Error> {
    let (sender, driver) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, Body>(TokioIo::new(app))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            debug!(error = %e, "app HTTP/2 connection ended");
        }
    });
    Ok(sender)
}

struct Served {
    conn: InboundHttp,
    app: tokio::sync::Mutex<Option<Sender>>,
    h2: bool,
    /// Requests whose response has not ended.
    active: Arc<AtomicUsize>,
}

/// One request in flight, until its response body ends or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a request did not reach the app.
#[derive(Debug, thiserror::Error)]
pub enum InboundHttpError {
    #[error("connecting to the app again: {0}")]
    Connect(#[from] crate::proxy::Error),
    #[error("the app's HTTP connection: {0}")]
    Http(#[from] hyper::Error),
}

impl Served {
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let c = &self.conn;
        let in_flight = InFlight::new(&self.active);
        let request_id = headers::request_id(req.headers_mut());
        let grpc = is_grpc(req.headers());
        let snap = c.pi.snapshot.load();
        let telemetry = snap.telemetry_of(&c.pod_key).clone();
        let sinks = telemetry.server.access_log.enabled();
        let mut result = {
            let authority = authority(&req).unwrap_or("");
            let log = (c.pi.telemetry.access_log.is_some() || sinks).then(|| {
                let mut fields = log_fields(&req, authority, &request_id);
                fields.upstream_cluster = Some(inbound_cluster(c.dst.port()));
                Box::new(fields)
            });
            let head = req.uri().path_and_query().map_or(1, |p| p.as_str().len()) as u64
                + req.method().as_str().len() as u64;
            RequestResult::start(
                &c.pi.telemetry,
                RequestLabels {
                    conn: c.labels.clone(),
                    protocol: if grpc { "grpc" } else { "http" },
                    response_code: 0,
                    grpc_status: None,
                },
                (c.peer, c.dst),
                head + header_bytes(req.headers()),
                log,
            )
        };
        result.upstream = Some(c.dst);
        if let Some(tracing) = spans::of(&telemetry, SpanKind::Server) {
            let begun = spans::begin(&c.pi, tracing, SpanKind::Server, req.headers());
            if begun.reported() {
                let authority = authority(&req).unwrap_or("").to_owned();
                let host = match &c.labels.service {
                    Some(service) => service.0.hostname.clone(),
                    None => target::split_authority(&authority).0.into_owned(),
                };
                let path = req.uri().path().to_owned();
                let (method, version) = (req.method().clone(), req.version());
                result.cluster_name = Some(inbound_cluster(c.dst.port()));
                result.span = begun.record(
                    &c.pi,
                    &c.pod,
                    tracing,
                    spans::Start {
                        host: &host,
                        port: c.dst.port(),
                        method: method.as_str(),
                        authority: &authority,
                        path: &path,
                        version,
                        peer: Some(c.peer.ip()),
                    },
                    req.headers_mut(),
                );
            } else {
                begun.carry(tracing, req.headers_mut());
            }
        }
        result.set_settings(telemetry, &req);
        drop(snap);
        let upgrade = req.version() != Version::HTTP_2 && headers::is_upgrade(req.headers());
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if self.h2 {
            // Into the app connection's HPACK table: not slices of the tunnel's read buffers.
            headers::own_values(&mut parts.headers);
        } else {
            headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        }
        let body = Counted::new(body, result.request_body_counter())
            .map_err(Into::into)
            .boxed();
        let req = Request::from_parts(parts, body);
        let sent = self.send(req).await;
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                debug!(dst = %c.dst, error = %e, "app failed before a response (503)");
                let reply = LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UC",
                    "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                );
                result.labels.conn.flags = reply.flag;
                if let Some(log) = result.log.as_mut() {
                    log.details = "upstream_reset_before_response_started";
                }
                let resp = reply.into_response();
                result.set_response(resp.status().as_u16(), resp.headers());
                let (parts, body) = resp.into_parts();
                let body = Held::new(Finishing::new(body, result), in_flight);
                return Response::from_parts(parts, body.boxed());
            }
        };
        if let Some(log) = result.log.as_mut() {
            log.details = "via_upstream";
        }
        let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (Some(down), true) = (downstream_upgrade, upgraded) {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(join_upgraded(down, up, None));
        }
        result.set_response(resp.status().as_u16(), resp.headers());
        if self.h2 {
            headers::own_values(resp.headers_mut());
        } else {
            headers::strip_hop_by_hop(resp.headers_mut(), upgraded);
        }
        let (parts, body) = resp.into_parts();
        let body = Held::new(Finishing::new(body, result), in_flight);
        Response::from_parts(parts, body.boxed())
    }
}

impl Served {
    /// Sends the request on the app connection, making a new one if the app closed the last.
    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, InboundHttpError> {
        let mut app = self.app.lock().await;
        let sender = match app.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => {
                let c = &self.conn;
                let stream =
                    crate::proxy::connect::app(&c.pod, c.dst, SocketAddr::new(c.peer.ip(), 0))
                        .await?;
                handshake(stream, self.h2).await?
            }
        };
        match app.insert(sender) {
            Sender::Http1(sender) => {
                if sender.ready().await.is_err() {
                    // Closed while we looked (the app's `Connection: close` is acted on when
                    // its connection task next runs): the request has not been sent; a new
                    // connection takes it.
                    let c = &self.conn;
                    let stream =
                        crate::proxy::connect::app(&c.pod, c.dst, SocketAddr::new(c.peer.ip(), 0))
                            .await?;
                    *sender = handshake_h1(stream).await?;
                    sender.ready().await?;
                }
                Ok(sender.send_request(req).await?)
            }
            Sender::Http2(sender) => {
                let mut sender = sender.clone();
                drop(app);
                Ok(sender.send_request(req).await?)
            }
        }
    }
}

/// Bytes read from and written to the stream.
#[derive(Default)]
struct Counts {
    read: AtomicU64,
    written: AtomicU64,
}

impl Counts {
    fn outcome(&self, failed: Option<Side>) -> Outcome {
        Outcome {
            a_to_b: self.read.load(Ordering::Relaxed),
            b_to_a: self.written.load(Ordering::Relaxed),
            failed,
        }
    }
}

/// The stream, counting its bytes for the TCP metrics.
struct CountedIo<I> {
    inner: I,
    counts: Arc<Counts>,
}

impl<I: AsyncRead + Unpin> AsyncRead for CountedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counts.read.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CountedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counts.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

//! Shared pieces of the L7 namespaced tests: real servers that run inside pods (an HTTP/1.1 and
//! HTTP/2 app that tells what it received, a tonic gRPC health service, a WebSocket echo, a TLS
//! server), clients for them, agents started on a world's nodes, and readers for `/metrics` and
//! the access log.
#![allow(dead_code)]

use std::convert::Infallible;
use std::hash::Hasher as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit::harness::apps::ServerThread;
use ambit::harness::{run_async_in_netns, ClusterYaml, LocalAgent, Node, Pod, World};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{ambit_bin, SETTLE};

pub mod otlp;
pub mod scenes;
pub mod zipkin;

/// Istio's `mesh` namespace of these tests, ambient.
pub const NS: &str = "mesh";

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

// ---------------------------------------------------------------------------------------------
// Agents

/// One agent per node, each reading `yaml` (as `cluster.yaml`) and `istio` (as `istio.yaml`),
/// started, with exactly its pods enrolled and ready. `args` go to every agent.
pub fn start_agents(
    world: &World,
    nodes: &[(&Node, &[&Pod])],
    yaml: &ClusterYaml,
    istio: &str,
    args: &[String],
) -> Vec<LocalAgent> {
    start_agents_with(world, nodes, yaml, istio, |_| args.to_vec())
}

/// [`start_agents`], each agent writing its access log to [`access_log_path`] of its node.
pub fn start_agents_logged(
    world: &World,
    nodes: &[(&Node, &[&Pod])],
    yaml: &ClusterYaml,
    istio: &str,
) -> Vec<LocalAgent> {
    start_agents_with(world, nodes, yaml, istio, |node| {
        vec![format!(
            "--access-log={}",
            access_log_path(world, node).display()
        )]
    })
}

/// [`start_agents`] with each node's own arguments.
pub fn start_agents_with(
    world: &World,
    nodes: &[(&Node, &[&Pod])],
    yaml: &ClusterYaml,
    istio: &str,
    args: impl Fn(&Node) -> Vec<String>,
) -> Vec<LocalAgent> {
    let mut agents: Vec<LocalAgent> = nodes
        .iter()
        .map(|(node, _)| {
            let mut a = LocalAgent::new(world, node, &ambit_bin());
            for x in &args(node) {
                a = a.arg(x);
            }
            yaml.write(&a.config_dir());
            write_istio(&a, istio);
            a
        })
        .collect();
    for a in &mut agents {
        a.start(world);
    }
    for (a, (_, pods)) in agents.iter().zip(nodes) {
        a.wait_enrolled(pods);
        a.wait_for("ready", SETTLE, |s| s["ready"] == true);
    }
    agents
}

/// Replaces the agent's Istio objects (`istio.yaml`, atomically); the agent reloads it.
pub fn write_istio(agent: &LocalAgent, istio: &str) {
    write_istio_in(&agent.config_dir(), istio);
}

/// [`write_istio`] for an agent's config directory.
pub fn write_istio_in(dir: &Path, istio: &str) {
    let tmp = dir.join(".istio.yaml.tmp");
    std::fs::write(&tmp, istio).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, dir.join("istio.yaml")).expect("rename istio.yaml");
}

/// The agent process's resident set (VmRSS), in bytes.
pub fn rss(agent: &LocalAgent) -> u64 {
    rss_of(agent.pid().expect("agent running"))
}

/// VmRSS of process `pid`, in bytes (for a closure that cannot hold the agent).
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Whether the agent's log shows a panic.
pub fn panicked(agent: &LocalAgent) -> bool {
    std::fs::read_to_string(agent.log_path())
        .unwrap_or_default()
        .contains("panicked")
}

// ---------------------------------------------------------------------------------------------
// Metrics and the access log

/// The sum of the series of `family` whose labels contain every `label="value"` given.
pub fn metric(metrics: &str, family: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .map(|v| v as u64)
        .sum()
}

/// The access log's lines (JSON objects) so far.
pub fn access_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

pub fn access_log_path(world: &World, node: &Node) -> PathBuf {
    world
        .state_dir()
        .join(format!("access-{}.log", node.name()))
}

// ---------------------------------------------------------------------------------------------
// Bodies: 1 MiB blocks of a pseudo-random pattern, each stamped with its index, so both ends
// can make and check gigabytes without holding them.

pub const BLOCK: usize = 1 << 20;

fn base_block() -> Bytes {
    static BASE: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let mut buf = vec![0u8; BLOCK];
        crate::support::pattern(42, &mut buf);
        Bytes::from(buf)
    })
    .clone()
}

/// Block `i` of the stream.
pub fn block(i: u64) -> Bytes {
    let mut b = BytesMut::from(&base_block()[..]);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b.freeze()
}

/// xxHash64 of the first `len` bytes of the stream.
pub fn stream_hash(len: u64) -> u64 {
    let mut h = twox_hash::XxHash64::with_seed(0);
    let mut done = 0u64;
    let mut i = 0;
    while done < len {
        let b = block(i);
        let n = (len - done).min(BLOCK as u64) as usize;
        h.write(&b[..n]);
        done += n as u64;
        i += 1;
    }
    h.finish()
}

/// A body of `len` bytes of the stream, made as it is read.
pub struct PatternBody {
    sent: u64,
    len: u64,
}

impl PatternBody {
    pub fn new(len: u64) -> Self {
        PatternBody { sent: 0, len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.sent).min(BLOCK as u64) as usize;
        let b = block(self.sent / BLOCK as u64).slice(..n);
        self.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.sent)
    }
}

/// Reads a body to its end: (bytes, xxHash64).
pub async fn hash_body<B>(mut body: B) -> Result<(u64, u64), String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut h = twox_hash::XxHash64::with_seed(0);
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body after {n} bytes: {e}"))?;
        if let Some(data) = frame.data_ref() {
            h.write(data);
            n += data.len() as u64;
        }
    }
    Ok((n, h.finish()))
}

// ---------------------------------------------------------------------------------------------
// The HTTP app

pub type AppBody = BoxBody<Bytes, Infallible>;

/// An HTTP/1.1 and HTTP/2 (prior knowledge) server in a pod that answers every request with what
/// it saw, as JSON: `{"pod", "method", "path", "authority", "version", "headers"}` (header values
/// joined with ","), with the headers `x-served-by: <pod>`, `x-app-private: secret` and
/// `x-app-version: 1`. Special paths: `/status/<code>` answers
/// that code; `/close` answers with `Connection: close` and closes; `GET /bytes/<n>` answers n bytes of the block stream; `POST /upload` answers the
/// body's length and hash. Every answer waits `delay` first.
pub struct HttpApp {
    /// Connections accepted.
    pub accepted: Arc<AtomicUsize>,
    /// Requests answered.
    pub requests: Arc<AtomicUsize>,
    _thread: ServerThread,
}

struct AppCfg {
    name: String,
    delay: Duration,
    requests: Arc<AtomicUsize>,
}

/// Binds `0.0.0.0:port` in the pod, on a thread of its own, and calls `serve` for each
/// connection; returns once listening.
fn listen_in_pod<F, Fut>(pod: &Pod, port: u16, serve: F) -> (ServerThread, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let accepted = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = pod.netns_path().to_path_buf();
    let count = accepted.clone();
    let thread = std::thread::spawn(move || {
        run_async_in_netns(&netns, move || async move {
            let listener = TcpListener::bind(("0.0.0.0", port))
                .await
                .unwrap_or_else(|e| panic!("bind :{port}: {e}"));
            ready_tx.send(()).expect("ready");
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async move {
                    let accept = async {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else {
                                continue;
                            };
                            count.fetch_add(1, Ordering::SeqCst);
                            let _ = stream.set_nodelay(true);
                            tokio::task::spawn_local(serve(stream));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                })
                .await;
        })
        .expect("app netns");
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("app did not start");
    (ServerThread::new(stop_tx, thread), accepted)
}

impl HttpApp {
    pub fn start(pod: &Pod, port: u16) -> HttpApp {
        Self::with_delay(pod, port, Duration::ZERO)
    }

    pub fn with_delay(pod: &Pod, port: u16, delay: Duration) -> HttpApp {
        let requests = Arc::new(AtomicUsize::new(0));
        let cfg = Arc::new(AppCfg {
            name: pod.name().to_string(),
            delay,
            requests: requests.clone(),
        });
        let (thread, accepted) = listen_in_pod(pod, port, move |stream| {
            let cfg = cfg.clone();
            async move {
                let svc = hyper::service::service_fn(move |req| answer(cfg.clone(), req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        HttpApp {
            accepted,
            requests,
            _thread: thread,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn answer(cfg: Arc<AppCfg>, req: Request<Incoming>) -> Result<Response<AppBody>, Infallible> {
    cfg.requests.fetch_add(1, Ordering::SeqCst);
    if !cfg.delay.is_zero() {
        tokio::time::sleep(cfg.delay).await;
    }
    let path = req.uri().path().to_string();
    let reply = |status: StatusCode, body: AppBody| {
        Response::builder()
            .status(status)
            .header("x-served-by", cfg.name.as_str())
            // For response header edits to remove and overwrite.
            .header("x-app-private", "secret")
            .header("x-app-version", "1")
            .body(body)
            .expect("response")
    };
    // A header value no other response has (HPACK indexes each one anew).
    if let Some(tag) = path.strip_prefix("/unique/") {
        let mut resp = reply(StatusCode::OK, full("unique"));
        if let Ok(v) = http::HeaderValue::from_str(&format!("{tag:0>48}")) {
            resp.headers_mut().insert("x-unique", v);
        }
        return Ok(resp);
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: u64 = n.parse().unwrap_or(0);
        let mut resp = reply(StatusCode::OK, PatternBody::new(n).boxed());
        resp.headers_mut()
            .insert(http::header::CONTENT_LENGTH, n.into());
        return Ok(resp);
    }
    if path == "/upload" {
        let (len, hash) = match hash_body(req.into_body()).await {
            Ok(v) => v,
            Err(e) => return Ok(reply(StatusCode::BAD_REQUEST, full(e))),
        };
        let body = json!({"pod": cfg.name, "len": len, "hash": hash.to_string()});
        return Ok(reply(StatusCode::OK, full(body.to_string())));
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<&str> = req
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        headers.insert(name.to_string(), Value::from(values.join(",")));
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    // The app closes the connection after this answer.
    let close = path == "/close";
    let body = json!({
        "pod": cfg.name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
        "authority": authority,
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    // The request body is read to the end so the connection can be reused.
    let _ = req.into_body().collect().await;
    let mut resp = reply(status, full(body.to_string()));
    if close {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    Ok(resp)
}

fn full(s: impl Into<Bytes>) -> AppBody {
    Full::new(s.into()).boxed()
}

// ---------------------------------------------------------------------------------------------
// HTTP clients (run them inside a pod: `in_pod`)

pub type ReqBody = BoxBody<Bytes, Infallible>;

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {:?} {}",
                self.status,
                self.headers,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// The pod that answered (`x-served-by`), or "" for a reply the proxy made.
    pub fn served_by(&self) -> String {
        self.header("x-served-by").unwrap_or_default()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One client connection, HTTP/1.1 or HTTP/2 with prior knowledge.
#[derive(Clone)]
pub enum Conn {
    H1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<ReqBody>>>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

impl Conn {
    pub async fn h1(dst: SocketAddr) -> Conn {
        let tcp = connect(dst).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn.with_upgrades());
        Conn::H1(Arc::new(tokio::sync::Mutex::new(sender)))
    }

    pub async fn h2(dst: SocketAddr) -> Conn {
        let tcp = connect(dst).await;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        Conn::H2(sender)
    }

    /// Sends the request (its URI is a path; the authority goes in `Host` or `:authority`) and
    /// returns the response head with its body unread.
    pub async fn send_streaming(
        &self,
        authority: &str,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, String> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let sent = match self {
            Conn::H1(s) => {
                req.headers_mut().insert(
                    http::header::HOST,
                    authority.parse().expect("authority as a header"),
                );
                let mut s = s.lock().await;
                s.ready().await.map_err(|e| format!("not ready: {e}"))?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                *req.uri_mut() = format!("http://{authority}{path}")
                    .parse()
                    .expect("absolute URI");
                *req.version_mut() = http::Version::HTTP_2;
                let mut s = s.clone();
                s.ready().await.map_err(|e| format!("not ready: {e}"))?;
                s.send_request(req).await
            }
        };
        sent.map_err(|e| format!("{authority}{path}: {e}"))
    }

    pub async fn send(&self, authority: &str, req: Request<ReqBody>) -> Result<Reply, String> {
        let resp = self.send_streaming(authority, req).await?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// GET `path` with extra headers; panics on a transport error.
    pub async fn get(&self, authority: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(authority, get(path, headers))
            .await
            .unwrap_or_else(|e| panic!("GET {authority}{path}: {e}"))
    }
}

pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<ReqBody> {
    request("GET", path, headers)
}

pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<ReqBody> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new().boxed()).expect("request")
}

pub async fn connect(dst: SocketAddr) -> TcpStream {
    let tcp = tokio::time::timeout(SETTLE, TcpStream::connect(dst))
        .await
        .unwrap_or_else(|_| panic!("connect {dst}: timed out"))
        .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    let _ = tcp.set_nodelay(true);
    tcp
}

// ---------------------------------------------------------------------------------------------
// gRPC: tonic's grpc.health.v1 service

/// A tonic `grpc.health.v1.Health` server in a pod: `ambit.Serving` is SERVING; `ambit.Flip`
/// flips between SERVING and NOT_SERVING every 20 ms, so `Watch` streams a change each time.
pub struct GrpcApp {
    pub accepted: Arc<AtomicUsize>,
    _thread: ServerThread,
}

impl GrpcApp {
    pub fn start(pod: &Pod, port: u16) -> GrpcApp {
        use tonic_health::ServingStatus;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = pod.netns_path().to_path_buf();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let thread = std::thread::spawn(move || {
            run_async_in_netns(&netns, move || async move {
                let (reporter, service) = tonic_health::server::health_reporter();
                reporter
                    .set_service_status("ambit.Serving", ServingStatus::Serving)
                    .await;
                reporter
                    .set_service_status("ambit.Flip", ServingStatus::Serving)
                    .await;
                tokio::spawn(async move {
                    let mut serving = true;
                    loop {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        serving = !serving;
                        let status = if serving {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        reporter.set_service_status("ambit.Flip", status).await;
                    }
                });
                let listener = TcpListener::bind(("0.0.0.0", port))
                    .await
                    .unwrap_or_else(|e| panic!("bind :{port}: {e}"));
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(
                    move |s: std::io::Result<TcpStream>| {
                        count.fetch_add(1, Ordering::SeqCst);
                        s
                    },
                );
                ready_tx.send(()).expect("ready");
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stop_rx.await;
                    })
                    .await;
            })
            .expect("grpc netns");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("gRPC app did not start");
        GrpcApp {
            accepted,
            _thread: ServerThread::new(stop_tx, thread),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket echo

/// A WebSocket server in a pod (tokio-tungstenite) that echoes every text and binary message.
pub struct WsApp {
    pub accepted: Arc<AtomicUsize>,
    _thread: ServerThread,
}

impl WsApp {
    pub fn start(pod: &Pod, port: u16) -> WsApp {
        let (thread, accepted) = listen_in_pod(pod, port, |stream| async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() || msg.is_binary() {
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                } else if msg.is_close() {
                    break;
                }
            }
        });
        WsApp {
            accepted,
            _thread: thread,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A TLS server in a pod (rustls, a self-signed certificate for `names`) that writes
/// `<pod>\n` once the handshake is done, then closes.
pub struct TlsApp {
    pub accepted: Arc<AtomicUsize>,
    _thread: ServerThread,
}

impl TlsApp {
    pub fn start(pod: &Pod, port: u16, names: &[&str]) -> TlsApp {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let name = pod.name().to_string();
        let (thread, accepted) = listen_in_pod(pod, port, move |stream| {
            let (acceptor, name) = (acceptor.clone(), name.clone());
            async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = tls.write_all(format!("{name}\n").as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        TlsApp {
            accepted,
            _thread: thread,
        }
    }
}

/// Connects to `dst`, does a TLS handshake with SNI `sni` (any certificate accepted: the test
/// is about where the ClientHello is routed), and returns the line the server wrote.
pub async fn tls_hello(dst: SocketAddr, sni: &str) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let tcp = connect(dst).await;
    let name =
        rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with SNI {sni}: {e}"))?;
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out).await;
    Ok(out.trim().to_string())
}

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Resilience apps: a scripted endpoint that records every request, and a `reviews`-like app that
// calls another service through the mesh per request.

/// How a [`ScriptApp`] answers a request to any path but `/upload` and `/upload-503`.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// 200 at once.
    Ok,
    /// This status, always.
    Status(u16),
    /// 503 for `percent`% of requests, drawn from an xorshift generator seeded with `seed`.
    FailRandom { seed: u64, percent: u64 },
    /// 200 after this long.
    Slow(Duration),
}

/// One request a [`ScriptApp`] received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub authority: String,
    /// The `x-test-id` header ("" without one): the test's own id, the same on every try.
    pub id: String,
    /// The status the app answered (0 until it has, or if the request was abandoned first).
    pub status: u16,
    pub at: std::time::Instant,
}

/// An HTTP/1.1 and HTTP/2 server in a pod that answers as its [`Behaviour`] says and records
/// every request on arrival (before any delay or body). `POST /upload` answers 200 and
/// `POST /upload-503` 503, both with `{"pod", "len", "hash"}` of the body read whole. Every
/// answer has `x-served-by: <pod>`.
pub struct ScriptApp {
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    _thread: ServerThread,
}

impl ScriptApp {
    pub fn start(pod: &Pod, port: u16, behaviour: Behaviour) -> ScriptApp {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let name: Arc<str> = pod.name().into();
        let rng = Arc::new(std::sync::Mutex::new(match behaviour {
            Behaviour::FailRandom { seed, .. } => seed | 1,
            _ => 1,
        }));
        let record = seen.clone();
        let (thread, _) = listen_in_pod(pod, port, move |stream| {
            let (name, rng, record) = (name.clone(), rng.clone(), record.clone());
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    script_answer(name.clone(), behaviour, rng.clone(), record.clone(), req)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        ScriptApp {
            seen,
            _thread: thread,
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }
}

async fn script_answer(
    name: Arc<str>,
    behaviour: Behaviour,
    rng: Arc<std::sync::Mutex<u64>>,
    record: Arc<std::sync::Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    let at = std::time::Instant::now();
    let path = req.uri().path().to_string();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let id = req
        .headers()
        .get("x-test-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Recorded on arrival: a try the proxy abandons (a per-try timeout) is still seen; the
    // status is filled in once known.
    let index = {
        let mut seen = record.lock().expect("seen");
        seen.push(Seen {
            path: path.clone(),
            authority,
            id,
            status: 0,
            at,
        });
        seen.len() - 1
    };
    let (status, body) = if path == "/upload" || path == "/upload-503" {
        let status = if path == "/upload" { 200 } else { 503 };
        match hash_body(req.into_body()).await {
            Ok((len, hash)) => (
                status,
                json!({"pod": &*name, "len": len, "hash": hash.to_string()}).to_string(),
            ),
            Err(e) => (400, e),
        }
    } else {
        let status = match behaviour {
            Behaviour::Ok => 200,
            Behaviour::Status(s) => s,
            Behaviour::FailRandom { percent, .. } => {
                let mut x = rng.lock().expect("rng");
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                if *x % 100 < percent {
                    503
                } else {
                    200
                }
            }
            Behaviour::Slow(d) => {
                tokio::time::sleep(d).await;
                200
            }
        };
        let _ = req.into_body().collect().await;
        (status, name.to_string())
    };
    record.lock().expect("seen")[index].status = status;
    Ok(Response::builder()
        .status(status)
        .header("x-served-by", &*name)
        .body(full(body))
        .expect("response"))
}

/// The headers Istio's docs ask apps to copy from a request to the calls it makes.
pub const TRACE_HEADERS: [&str; 9] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
];

/// Bookinfo's `reviews` in miniature: a server in a pod that, for each request, calls
/// `GET /ratings` on `upstream` (with `Host: authority`) from inside the pod, so the call goes
/// through the mesh, and answers 200 with `{"pod", "ratings_status", "ratings"}`, or 502 with
/// the error if the call failed. The trace headers ([`TRACE_HEADERS`]) go on with the call.
pub struct CallerApp {
    pub requests: Arc<AtomicUsize>,
    _thread: ServerThread,
}

impl CallerApp {
    pub fn start(pod: &Pod, port: u16, upstream: SocketAddr, authority: &str) -> CallerApp {
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let name: Arc<str> = pod.name().into();
        let authority: Arc<str> = authority.into();
        let (thread, _) = listen_in_pod(pod, port, move |stream| {
            let (name, authority, count) = (name.clone(), authority.clone(), count.clone());
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let (name, authority) = (name.clone(), authority.clone());
                    // As Istio asks of apps: the trace headers go on with the call it makes.
                    let forwarded: Vec<(String, String)> = TRACE_HEADERS
                        .iter()
                        .filter_map(|h| {
                            let v = req.headers().get(*h)?.to_str().ok()?;
                            Some((h.to_string(), v.to_string()))
                        })
                        .collect();
                    async move {
                        let conn = Conn::h1(upstream).await;
                        let headers: Vec<(&str, &str)> = forwarded
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        let (status, body) = match conn
                            .send(&authority, get("/ratings", &headers))
                            .await
                        {
                            Ok(r) => (
                                200,
                                json!({"pod": &*name, "ratings_status": r.status, "ratings": r.text()}),
                            ),
                            Err(e) => (502, json!({"pod": &*name, "error": e})),
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("x-served-by", &*name)
                                .body(full(body.to_string()))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        CallerApp {
            requests,
            _thread: thread,
        }
    }
}

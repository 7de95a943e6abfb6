//! HTTP in the pods: apps that serve HTTP/1.1 and h2c (hyper's auto server, as most app servers
//! do) and record what they received and how many connections they accepted, and clients that
//! speak HTTP/1.1 or HTTP/2 (prior knowledge) through the pod's captured connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::fixture::Mesh;
use super::io::within;
use super::world::Pod;

/// The body the apps answer with and the clients send.
pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A request as an app received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// `Host`, or the `:authority` of an HTTP/2 request.
    pub authority: String,
    pub version: Version,
    pub headers: HeaderMap,
    /// The connection it came on (the app's peer).
    pub peer: SocketAddr,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// An HTTP app started by [`Mesh::http_app`]; stops when dropped.
pub struct HttpApp {
    pub name: String,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl HttpApp {
    /// Connections it accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that ended so far.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// Every request it received, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The last request it received.
    pub fn last(&self) -> Seen {
        self.seen()
            .pop()
            .unwrap_or_else(|| panic!("{} received no request", self.name))
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mesh {
    /// An app at `addr` answering every request `200 <name> <path>` with `x-app: <name>`.
    pub async fn http_app(&self, addr: SocketAddr, name: &str) -> HttpApp {
        let who = name.to_string();
        self.http_app_with(addr, name, move |req| {
            let body = format!("{who} {}", req.uri().path());
            let who = who.clone();
            async move {
                Response::builder()
                    .header("x-app", who)
                    .body(full(body))
                    .expect("response")
            }
        })
        .await
    }

    /// An app at `addr` answering with `handler` (HTTP/1.1 with upgrades, or h2c).
    pub async fn http_app_with<F, Fut>(&self, addr: SocketAddr, name: &str, handler: F) -> HttpApp
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("app at {addr}: {e}"));
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, ended, record) = (accepted.clone(), closed.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (handler, record, ended) = (handler.clone(), record.clone(), ended.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers()
                                    .get(http::header::HOST)
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_owned)
                            })
                            .unwrap_or_default();
                        record.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                            method: req.method().clone(),
                            path: req
                                .uri()
                                .path_and_query()
                                .map_or("/".into(), |p| p.to_string()),
                            authority,
                            version: req.version(),
                            headers: req.headers().clone(),
                            peer,
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        HttpApp {
            name: name.to_string(),
            accepted,
            closed,
            seen,
            task,
        }
    }

    /// An HTTP/1.1 client connection from `from`'s app to `dst`, captured.
    pub async fn h1(&self, from: &Pod, dst: SocketAddr) -> H1 {
        let tcp = self.connect(from, dst).await;
        let (sender, conn) = within(
            "HTTP/1.1 handshake",
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp)),
        )
        .await
        .expect("HTTP/1.1 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        H1 { sender, driver }
    }

    /// An HTTP/2 client connection (prior knowledge, h2c) from `from`'s app to `dst`, captured.
    pub async fn h2(&self, from: &Pod, dst: SocketAddr) -> H2 {
        let tcp = self.connect(from, dst).await;
        let (sender, conn) = within(
            "HTTP/2 handshake",
            hyper::client::conn::http2::handshake::<_, _, Body>(
                TokioExecutor::new(),
                TokioIo::new(tcp),
            ),
        )
        .await
        .expect("HTTP/2 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        H2 { sender, driver }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The one value of header `name` (panics when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.headers))
            .to_str()
            .expect("ascii header")
    }
}

/// Reads a response whole.
pub async fn read_reply(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = within("a response body", body.collect())
        .await
        .unwrap_or_else(|e| panic!("response body: {e}"))
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A GET for `path` with `headers`.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(empty()).expect("request")
}

/// An HTTP/1.1 client connection.
pub struct H1 {
    pub sender: hyper::client::conn::http1::SendRequest<Body>,
    pub driver: JoinHandle<()>,
}

/// The test's end of the connection closes with it.
impl Drop for H1 {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl H1 {
    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        within("the connection to be ready", self.sender.ready())
            .await
            .expect("the client connection is open");
        within("a response", self.sender.send_request(req))
            .await
            .unwrap_or_else(|e| panic!("request: {e}"))
    }

    /// Sends `req` and reads the response whole.
    pub async fn call(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        read_reply(resp).await
    }

    /// GET `path` with `Host: host` and `headers`.
    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut all = vec![("host", host)];
        all.extend_from_slice(headers);
        self.call(get(path, &all)).await
    }
}

/// An HTTP/2 client connection (requests may run concurrently on clones of `sender`).
pub struct H2 {
    pub sender: hyper::client::conn::http2::SendRequest<Body>,
    pub driver: JoinHandle<()>,
}

impl Drop for H2 {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl H2 {
    pub async fn send(&self, req: Request<Body>) -> Response<Incoming> {
        let mut sender = self.sender.clone();
        within("the connection to be ready", sender.ready())
            .await
            .expect("the client connection is open");
        within("a response", sender.send_request(req))
            .await
            .unwrap_or_else(|e| panic!("request: {e}"))
    }

    pub async fn call(&self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        read_reply(resp).await
    }

    /// GET `http://<authority><path>` with `headers`.
    pub async fn get(&self, authority: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.call(get(&format!("http://{authority}{path}"), headers))
            .await
    }
}

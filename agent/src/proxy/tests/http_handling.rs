//! HTTP as it passes through the client's node proxy: upstream connections reused (HTTP/1.1
//! keep-alive) and multiplexed (HTTP/2), bodies streamed both ways, HTTP/1.0, `Expect:
//! 100-continue`, chunked bodies and trailers; the upstream pool's idle timeout, idle cap and
//! cleanup when a source pod leaves.

use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Barrier};
use twox_hash::XxHash64;

use super::fixture::*;

const PORT: u16 = 8080;

/// A client on n1 and a `web` pod on n2 behind the Service `web`, port 8080 named `port_name`
/// (with `yaml` added): (mesh, client, web, the Service's address).
async fn web(port_name: &str, yaml: &str) -> (Mesh, Pod, Pod, SocketAddr) {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let web = world.pod("web").node("n2").add();
    let vip = world
        .service("web")
        .named_port(port_name, PORT, PORT)
        .backends(&[&web])
        .add();
    world.yaml(yaml);
    let mesh = world.start().await;
    (mesh, client, web, SocketAddr::new(vip, PORT))
}

/// Istio/Envoy: upstream HTTP/1.1 connections are pooled with keep-alive, per endpoint, and
/// shared by the client connections of one source pod: 20 sequential requests on two client
/// connections reach the app on one connection.
#[tokio::test]
async fn http1_keep_alive_reuses_one_upstream_connection() {
    let (mesh, client, web, vip) = web("http", "").await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let mut first = mesh.h1(&client, vip).await;
    for i in 0..10 {
        let reply = first.get("web", &format!("/{i}"), &[]).await;
        assert_eq!(reply.text(), format!("web /{i}"));
    }
    let mut second = mesh.h1(&client, vip).await;
    for i in 0..10 {
        assert_eq!(second.get("web", "/", &[]).await.status, 200, "request {i}");
    }
    assert_eq!(app.requests(), 20);
    assert_eq!(app.connections(), 1, "one upstream connection for all");
    let peers: std::collections::BTreeSet<_> = app.seen().iter().map(|s| s.peer).collect();
    assert_eq!(peers.len(), 1, "{peers:?}");
}

/// Istio: a port named `http2`/`grpc` is HTTP/2 to the upstream, multiplexed on one connection
/// per endpoint: 100 requests in flight at once (the app holds each until all 100 have arrived)
/// share ONE upstream connection.
#[tokio::test]
async fn http2_multiplexes_100_concurrent_requests_on_one_upstream_connection() {
    for port_name in ["http2", "grpc-web-x"] {
        let (mesh, client, web, vip) = web(port_name, "").await;
        let all_in = Arc::new(Barrier::new(100));
        let app = mesh
            .http_app_with(web.addr(PORT), "web", move |req| {
                let all_in = all_in.clone();
                async move {
                    all_in.wait().await;
                    Response::new(full(format!("{:?} {}", req.version(), req.uri().path())))
                }
            })
            .await;
        let conn = mesh.h2(&client, vip).await;
        let replies = within(
            "100 concurrent requests",
            futures::future::join_all((0..100).map(|i| {
                let conn = &conn;
                async move { conn.get("web:8080", &format!("/{i}"), &[]).await }
            })),
        )
        .await;
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.text(), format!("HTTP/2.0 /{i}"), "{port_name}");
        }
        assert_eq!(
            app.connections(),
            1,
            "{port_name}: one multiplexed connection"
        );
        assert_eq!(mesh.node("n1").pi.upstreams.opened(), 1, "{port_name}");
    }
}

/// Streams a body of `total` bytes of [`pattern`] in 64 KiB chunks: the first `first` bytes at
/// once, the rest when `go` says so.
fn pattern_body(total: usize, first: usize, go: tokio::sync::oneshot::Receiver<()>) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let data = Bytes::from(pattern(1 << 20));
        let mut sent = 0;
        let mut go = Some(go);
        while sent < total {
            if sent >= first {
                if let Some(go) = go.take() {
                    if go.await.is_err() {
                        return;
                    }
                }
            }
            let n = (total - sent).min(64 * 1024);
            let at = sent % (1 << 20);
            let n = n.min((1 << 20) - at);
            if tx
                .send(Ok(Frame::data(data.slice(at..at + n))))
                .await
                .is_err()
            {
                return;
            }
            sent += n;
        }
    });
    StreamBody::new(tokio_stream_of(rx)).boxed()
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn hash_of(n: usize) -> u64 {
    let mut h = XxHash64::with_seed(0);
    let data = pattern(1 << 20);
    let mut left = n;
    while left > 0 {
        let k = left.min(1 << 20);
        h.write(&data[..k]);
        left -= k;
    }
    h.finish()
}

const BIG: usize = 64 << 20;
const FIRST: usize = 1 << 20;

/// Istio/Envoy stream bodies (Envoy buffers only up to its per-stream window): a 64 MiB request
/// body reaches the app while the client is still holding back all but its first MiB, and
/// arrives whole (hashed); likewise a 64 MiB response reaches the client while the app holds
/// back all but its first MiB.
#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let (mesh, client, web, vip) = web("http", "").await;
    let received = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let go_down = Arc::new(std::sync::Mutex::new(Some(go_rx)));
    let app_received = received.clone();
    let _app = mesh
        .http_app_with(web.addr(PORT), "web", move |req| {
            let received = app_received.clone();
            let go_down = go_down.clone();
            async move {
                if req.method() == http::Method::POST {
                    let mut body = req.into_body();
                    let mut h = XxHash64::with_seed(0);
                    let mut n = 0usize;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.expect("request body").into_data() {
                            h.write(&data);
                            n += data.len();
                            received.store(n as u64, Ordering::SeqCst);
                        }
                    }
                    return Response::new(full(format!("{n} {:x}", h.finish())));
                }
                let go = go_down
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .expect("one download");
                Response::new(pattern_body(BIG, FIRST, go))
            }
        })
        .await;

    // Up: the app sees the first MiB before the client sends the rest.
    let mut conn = mesh.h1(&client, vip).await;
    let (up_tx, up_rx) = tokio::sync::oneshot::channel();
    let req = Request::post("/upload")
        .header("host", "web")
        .header("content-length", BIG.to_string())
        .body(pattern_body(BIG, FIRST, up_rx))
        .expect("request");
    within("the connection to be ready", conn.sender.ready())
        .await
        .expect("open");
    let pending = conn.sender.send_request(req);
    let waiting = tokio::spawn(async move { pending.await.map(|r| r.map(|b| b.collect())) });
    eventually(
        "the app reads the first MiB while the rest is held back",
        || received.load(Ordering::SeqCst) >= FIRST as u64,
    )
    .await;
    up_tx.send(()).expect("the body is still being sent");
    let resp = within("the upload's response", waiting)
        .await
        .expect("task")
        .expect("response");
    let (parts, body) = resp.into_parts();
    assert_eq!(parts.status, 200);
    let body = within("upload reply", body).await.expect("body").to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("{BIG} {:x}", hash_of(BIG)),
        "the app got the whole body, in order"
    );

    // Down: the client reads the first MiB before the app sends the rest.
    let resp = conn.send(get("/download", &[("host", "web")])).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut h = XxHash64::with_seed(0);
    let mut n = 0usize;
    let mut go = Some(go_tx);
    while let Some(frame) = within("a response frame", body.frame()).await {
        if let Ok(data) = frame.expect("response body").into_data() {
            h.write(&data);
            n += data.len();
        }
        if n >= FIRST {
            if let Some(go) = go.take() {
                go.send(()).expect("the app is still sending");
            }
        }
    }
    assert_eq!(
        (n, h.finish()),
        (BIG, hash_of(BIG)),
        "the whole response, in order"
    );
}

/// HTTP/1.0 without `Host` (RFC 9112 §3.2 makes `Host` a 1.1 requirement): answered, routed by
/// where the connection was going. Envoy refuses 1.0 unless `accept_http_10` is on, which Istio
/// turns on with `PILOT_HTTP10` ("to support legacy applications"); ambit accepts it always,
/// as the issue asks.
#[tokio::test]
async fn an_http10_request_without_host_is_answered() {
    let (mesh, client, web, vip) = web("http", "").await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let mut conn = mesh.connect(&client, vip).await;
    conn.write_all(b"GET /old HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let reply = String::from_utf8(read_to_end(&mut conn).await).expect("utf-8");
    assert!(
        reply.starts_with("HTTP/1.0 200") || reply.starts_with("HTTP/1.1 200"),
        "{reply}"
    );
    assert!(reply.ends_with("web /old"), "{reply}");
    assert_eq!(app.last().path, "/old");
}

/// RFC 9110 §10.1.1, Envoy: `Expect: 100-continue` gets its `100 Continue` (Envoy answers it
/// itself and removes the header), then the body goes on and the app answers it.
#[tokio::test]
async fn expect_100_continue_is_answered_and_the_body_follows() {
    let (mesh, client, web, vip) = web("http", "").await;
    let app = echo_app(&mesh, &web).await;
    let mut conn = mesh.connect(&client, vip).await;
    conn.write_all(
        b"POST /up HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write");
    let cont = read_exact(&mut conn, 25).await;
    assert_eq!(&cont[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    conn.write_all(b"hello").await.expect("body");
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exact(&mut conn, 5).await, b"hello");
    assert!(
        app.last().headers.get("expect").is_none(),
        "the proxy answered the expectation itself"
    );
}

/// RFC 9112 §7.1: a chunked request body (its length unknown) reaches the app whole.
#[tokio::test]
async fn a_chunked_request_body_reaches_the_app() {
    let (mesh, client, web, vip) = web("http", "").await;
    let _app = echo_app(&mesh, &web).await;
    let mut conn = mesh.connect(&client, vip).await;
    conn.write_all(
        b"POST /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exact(&mut conn, 11).await, b"hello world");
}

/// RFC 9112 §7.1.2 (trailer section of chunked bodies), which gRPC-over-HTTP/1 bridges and
/// others rely on: a client asking for trailers (`TE: trailers`) gets the app's response
/// trailers over HTTP/1.1, and the app gets the client's request trailers.
#[tokio::test]
async fn trailers_pass_over_http1_chunked_bodies() {
    let (mesh, client, web, vip) = web("http", "").await;
    let app = mesh
        .http_app_with(web.addr(PORT), "web", |req| async move {
            let collected = req.into_body().collect().await.expect("request body");
            let got = collected
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().unwrap_or("").to_string())
                .unwrap_or_else(|| "none".into());
            let mut trailers = HeaderMap::new();
            trailers.insert("x-status", "done".parse().expect("value"));
            let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(Bytes::from(format!("request trailer {got}")))),
                Ok(Frame::trailers(trailers)),
            ];
            // hyper sends the trailers a `Trailer` header declares (RFC 9110 §6.6.2).
            Response::builder()
                .header("trailer", "x-status")
                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                .expect("response")
        })
        .await;
    let mut conn = mesh.h1(&client, vip).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().expect("value"));
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
        Ok(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("/t")
        .header("host", "web")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .body(StreamBody::new(futures::stream::iter(frames)).boxed())
        .expect("request");
    let resp = conn.send(req).await;
    let collected = within("body", resp.into_body().collect())
        .await
        .expect("body");
    let response_trailers = collected.trailers().cloned();
    assert_eq!(
        String::from_utf8_lossy(&collected.to_bytes()),
        "request trailer abc",
        "the app got the request's trailers"
    );
    assert_eq!(
        response_trailers.as_ref().and_then(|t| t.get("x-status")),
        Some(&"done".parse().expect("value")),
        "the client got the response's trailers"
    );
    drop(app);
}

/// Istio DestinationRule `connectionPool.http.idleTimeout`: "the period in which there are no
/// active requests ... When the idle timeout is reached, the connection will be closed".
#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout() {
    let (mesh, client, web, vip) = web(
        "http",
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  trafficPolicy: {connectionPool: {http: {idleTimeout: 200ms}}}
"#,
    )
    .await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let mut conn = mesh.h1(&client, vip).await;
    assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    let n1 = mesh.node("n1");
    eventually("the idle upstream connection is closed", || {
        app.closed() == 1
    })
    .await;
    assert_eq!(n1.pi.upstreams.connections(), 0);
    // The client's own connection is not the upstream's: it still works, on a new one.
    assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    assert_eq!(app.connections(), 2);
}

/// ambit bounds what a burst leaves behind: after `MAX_IDLE_HTTP1` + 4 overlapping requests (as
/// many upstream connections), at most `MAX_IDLE_HTTP1` stay idle per source pod and endpoint.
#[tokio::test]
async fn at_most_max_idle_http1_connections_stay_per_endpoint() {
    use crate::proxy::http::client::MAX_IDLE_HTTP1;
    let burst = MAX_IDLE_HTTP1 + 4;
    let (mesh, client, web, vip) = web("http", "").await;
    let all_in = Arc::new(Barrier::new(burst));
    let app = mesh
        .http_app_with(web.addr(PORT), "web", move |req| {
            let all_in = all_in.clone();
            async move {
                if req.uri().path() == "/burst" {
                    all_in.wait().await;
                }
                Response::new(full("ok"))
            }
        })
        .await;
    let mut conns = Vec::new();
    for _ in 0..burst {
        conns.push(mesh.h1(&client, vip).await);
    }
    let requests = conns.iter_mut().map(|c| c.get("web", "/burst", &[]));
    let replies = within("overlapping requests", futures::future::join_all(requests)).await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert_eq!(app.connections(), burst);
    // The next request finds them all idle and keeps MAX_IDLE_HTTP1 (one of them for itself).
    assert_eq!(conns[0].get("web", "/", &[]).await.status, 200);
    eventually("the idle connections beyond the cap are closed", || {
        app.closed() == burst - MAX_IDLE_HTTP1
    })
    .await;
    assert_eq!(app.connections(), burst, "no new connection");
    assert_eq!(mesh.node("n1").pi.upstreams.connections(), MAX_IDLE_HTTP1);
}

/// 64 clients at once on an HTTP/2 connection to an `http` port (HTTP/1.1 upstream, one
/// connection per request in flight), round after round: every request is answered and the
/// upstream connections are reused, not churned (a cap below the concurrency closed them, and
/// sorting them by a key other requests were moving panicked).
#[tokio::test]
async fn concurrent_requests_reuse_their_upstream_http1_connections_round_after_round() {
    let (mesh, client, web, vip) = web("http", "").await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let conn = mesh.h2(&client, vip).await;
    for round in 0..20 {
        let paths: Vec<String> = (0..64).map(|i| format!("/{i}")).collect();
        let requests = paths.iter().map(|p| conn.get("web", p, &[]));
        let replies = within(
            "64 concurrent requests",
            futures::future::join_all(requests),
        )
        .await;
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.text(), format!("web /{i}"), "round {round}");
        }
    }
    assert_eq!(app.requests(), 20 * 64);
    assert!(
        app.connections() <= 64,
        "{} upstream connections",
        app.connections()
    );
    assert_eq!(app.closed(), 0, "none closed while in use");
}

/// A source pod that leaves the node takes its upstream connections with it
/// (`Upstreams::retain`, called with the pods still enrolled).
#[tokio::test]
async fn a_departed_pods_upstream_connections_are_closed() {
    let (mesh, client, web, vip) = web("http2", "").await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let conn = mesh.h2(&client, vip).await;
    assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    let n1 = mesh.node("n1");
    assert_eq!(n1.pi.upstreams.connections(), 1);
    n1.pi.upstreams.retain(|netns| netns == client.cookie);
    assert_eq!(n1.pi.upstreams.connections(), 1, "still enrolled: kept");
    n1.pi.upstreams.retain(|netns| netns != client.cookie);
    assert_eq!(n1.pi.upstreams.connections(), 0);
    eventually("the app's connection is closed", || app.closed() == 1).await;
}

/// An app answering each request with its body (read whole, sent with a length).
async fn echo_app(mesh: &Mesh, web: &Pod) -> HttpApp {
    mesh.http_app_with(web.addr(PORT), "web", |req| async move {
        let body = req.into_body().collect().await.expect("request body");
        Response::new(full(body.to_bytes()))
    })
    .await
}

/// Reads a response head (up to the blank line).
async fn read_head(conn: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.extend(read_exact(conn, 1).await);
    }
    String::from_utf8(head).expect("utf-8 head")
}

//! gRPC and WebSocket through the client's node proxy, with real implementations: tonic's
//! `grpc.health.v1` service (unary `Check`, server-streaming `Watch`) and a tungstenite echo.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{SinkExt, StreamExt};
use http::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::{self, Message};
use tonic::codegen::Service;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{health_check_response, HealthCheckRequest};
use tonic_health::ServingStatus;

use super::fixture::*;

/// A tonic client's transport: one HTTP/2 connection (prior knowledge) the test opened through
/// the pod's capture.
#[derive(Clone)]
struct H2Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// Serves tonic's health service at `addr` (h2c), as a gRPC server in the pod would.
async fn health_server(
    addr: SocketAddr,
) -> (
    tonic_health::server::HealthReporter,
    tokio::task::JoinHandle<()>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind(addr).await.expect("bind");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let mut service = service.clone();
                    async move { service.call(req).await }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (reporter, task)
}

/// Istio: a port named `grpc` is gRPC, routed at L7 and sent as HTTP/2; gRPC's status travels in
/// the response trailers (or a trailers-only response), which must arrive intact. Unary `Check`
/// (OK for a serving service, NOT_FOUND for an unknown one) and server-streaming `Watch` (one
/// message now, one per status change).
#[tokio::test]
async fn grpc_unary_and_server_streaming_with_status_and_trailers() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("health").node("n2").add();
    let vip = world
        .service("health")
        .named_port("grpc", 50051, 50051)
        .backends(&[&server])
        .add();
    let mesh = world.start().await;
    let (reporter, _task) = health_server(server.addr(50051)).await;
    reporter
        .set_service_status("reviews", ServingStatus::Serving)
        .await;

    let tcp = mesh.connect(&client, SocketAddr::new(vip, 50051)).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    let origin: http::Uri = "http://health.mesh.svc.cluster.local:50051"
        .parse()
        .expect("uri");
    let mut health = HealthClient::with_origin(H2Channel(sender), origin);

    let ok = within(
        "Check",
        health.check(HealthCheckRequest {
            service: "reviews".into(),
        }),
    )
    .await
    .expect("Check succeeds: grpc-status 0 arrived in the trailers");
    assert_eq!(
        ok.into_inner().status,
        health_check_response::ServingStatus::Serving as i32
    );
    let unknown = within(
        "Check of an unknown service",
        health.check(HealthCheckRequest {
            service: "nope".into(),
        }),
    )
    .await
    .expect_err("an unknown service is NOT_FOUND");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    let mut watch = within(
        "Watch",
        health.watch(HealthCheckRequest {
            service: "reviews".into(),
        }),
    )
    .await
    .expect("Watch starts")
    .into_inner();
    let first = within("the first message", watch.message())
        .await
        .expect("stream")
        .expect("a message");
    assert_eq!(
        first.status,
        health_check_response::ServingStatus::Serving as i32
    );
    reporter
        .set_service_status("reviews", ServingStatus::NotServing)
        .await;
    let second = within("the second message", watch.message())
        .await
        .expect("stream")
        .expect("a message");
    assert_eq!(
        second.status,
        health_check_response::ServingStatus::NotServing as i32
    );

    // Istio's request metrics say gRPC, with the gRPC status of each call.
    let n1 = mesh.node("n1");
    let grpc = |status: &'static str| {
        [
            ("reporter", "source"),
            ("request_protocol", "grpc"),
            ("response_code", "200"),
            ("grpc_response_status", status),
        ]
    };
    n1.wait_metric("istio_requests_total", &grpc("0"), 1).await;
    n1.wait_metric("istio_requests_total", &grpc("5"), 1).await;
    drop(watch);
}

/// Istio: WebSocket upgrades are allowed on HTTP routes (Envoy `upgrade_configs` websocket): the
/// `Upgrade` request is routed, then the two upgraded connections are joined, messages both ways.
#[tokio::test]
async fn websocket_echo_through_upgrade() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("chat").node("n2").add();
    let vip = world
        .service("chat")
        .named_port("http-ws", 8080, 8080)
        .backends(&[&server])
        .add();
    let mesh = world.start().await;
    let app = mesh
        .http_app_with(server.addr(8080), "chat", |mut req| async move {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .expect("a WebSocket key")
                .as_bytes()
                .to_vec();
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let io = TokioIo::new(upgrade.await.expect("upgraded"));
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    io,
                    tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header(
                    "sec-websocket-accept",
                    tungstenite::handshake::derive_accept_key(&key),
                )
                .body(empty())
                .expect("101")
        })
        .await;
    let tcp = mesh.connect(&client, SocketAddr::new(vip, 8080)).await;
    let (mut ws, resp) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async("ws://chat:8080/room", tcp),
    )
    .await
    .expect("WebSocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through the mesh"] {
        ws.send(Message::text(text)).await.expect("send");
        let echo = within("the echo", ws.next())
            .await
            .expect("a message")
            .expect("no error");
        assert_eq!(echo.into_text().expect("text").as_str(), text);
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.expect("send");
    let echo = within("the binary echo", ws.next())
        .await
        .expect("a message")
        .expect("no error");
    assert_eq!(echo.into_data().as_ref(), &big[..]);
    ws.close(None).await.expect("close");
    assert_eq!(app.last().path, "/room");
}

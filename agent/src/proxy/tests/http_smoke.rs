//! The L7 outbound path end to end in one process: a request to a Service's `http` port is
//! routed by a VirtualService and reaches the chosen pod over HBONE.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::fixture::*;

/// An HTTP/1.1 server at `addr` answering `<name> <path>`.
async fn http_app(addr: SocketAddr, name: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let body = format!("{name} {}", req.uri().path());
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

#[tokio::test]
async fn a_header_route_picks_the_subset() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let v1 = world
        .pod("reviews-v1")
        .node("n2")
        .app("reviews")
        .label("version", "v1")
        .add();
    let v2 = world
        .pod("reviews-v2")
        .node("n2")
        .app("reviews")
        .label("version", "v2")
        .add();
    let vip = world
        .service("reviews")
        .named_port("http", 9080, 9080)
        .backends(&[&v1, &v2])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: mesh}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#,
    );
    let mesh = world.start().await;
    let _a = http_app(v1.addr(9080), "v1").await;
    let _b = http_app(v2.addr(9080), "v2").await;
    let conn = mesh.connect(&client, SocketAddr::new(vip, 9080)).await;
    let (mut sender, driver) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(conn))
            .await
            .expect("handshake");
    tokio::spawn(driver);
    for (user, want) in [
        ("jason", "v2 /reviews/1"),
        ("bob", "v1 /reviews/1"),
        ("jason", "v2 /reviews/1"),
    ] {
        let req = Request::get("/reviews/1")
            .header("host", "reviews:9080")
            .header("end-user", user)
            .body(Empty::new())
            .expect("request");
        let resp = within("response", sender.send_request(req))
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, want.as_bytes(), "end-user {user}");
    }
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.outbound_http), 1);
    assert_eq!(n1.count(|c| &c.http_requests), 3);
}

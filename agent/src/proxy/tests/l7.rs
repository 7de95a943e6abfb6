//! HTTP inside HBONE: a CONNECT stream as `AsyncRead + AsyncWrite` (`hbone::H2Stream`) carries an
//! HTTP/1.1 exchange (hyper) at either end, as the L7 work (a waypoint, the HTTP stages) will run
//! it.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::fixture::*;
use crate::proxy::hbone::server;
use crate::proxy::hbone::{H2Stream, Stream};

/// Answers `<method> <path> from <who>` to every request.
async fn serve_http1<I>(io: I, who: String)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let body = format!("{} {} from {who}", req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Sends GET for each path on one HTTP/1.1 connection over `io`; the bodies of the answers.
async fn get_each(io: H2Stream, paths: &[&str]) -> Vec<String> {
    let (mut sender, conn) = within(
        "HTTP/1.1 handshake",
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io)),
    )
    .await
    .expect("HTTP/1.1 handshake");
    let driver = tokio::spawn(conn);
    let mut out = Vec::new();
    for path in paths {
        let req = Request::get(*path)
            .header(http::header::HOST, "server")
            .body(Empty::new())
            .expect("request");
        let resp = within("a response", sender.send_request(req))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(resp.status(), 200, "GET {path}");
        let body = within("a body", resp.into_body().collect())
            .await
            .expect("body")
            .to_bytes();
        out.push(String::from_utf8(body.to_vec()).expect("utf-8"));
    }
    drop(sender);
    let _ = within("the HTTP/1.1 connection to end", driver).await;
    out
}

/// The client side: a pooled CONNECT stream carries keep-alive HTTP/1.1 to an app behind the
/// HBONE server (two requests, one tunnel, one app connection).
#[tokio::test]
async fn http1_runs_over_a_pooled_connect_stream_to_an_app() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").add();
    let mesh = world.start().await;
    let app = mesh.listen(server.addr(8080)).await;
    let tunnel = mesh
        .tunnel(&client, server.addr(8080))
        .await
        .unwrap_or_else(|e| panic!("tunnel: {e}"));
    let serving = tokio::spawn(async move {
        let (tcp, peer) = app.accept().await;
        serve_http1(tcp, peer.to_string()).await;
    });
    let bodies = get_each(tunnel.into_io(), &["/one", "/two"]).await;
    let from = format!(" from {}:", server.ip);
    assert!(
        bodies[0].starts_with("GET /one") && bodies[0].contains(&from),
        "{bodies:?}"
    );
    assert!(
        bodies[1].starts_with("GET /two") && bodies[1].contains(&from),
        "{bodies:?}"
    );
    assert_eq!(
        bodies[0].split(" from ").nth(1),
        bodies[1].split(" from ").nth(1),
        "both requests went over one app connection"
    );
    within("the app's connection to end", serving)
        .await
        .expect("app");
    assert_eq!(mesh.node("n2").count(|c| &c.hbone_inbound_streams), 1);
}

/// The server side: an HTTP/1.1 server reading requests straight from the CONNECT streams it
/// accepts (as a waypoint would), with the client's verified identity at hand.
#[tokio::test]
async fn http1_is_served_from_the_server_side_of_a_connect_stream() {
    let mut world = World::new();
    world.plain("infra");
    let client = world.pod("client").node("n1").sa("sleep").add();
    // Not enrolled: no stages on its address, so the test serves its HBONE port itself.
    let waypoint = world
        .pod("waypoint")
        .namespace("infra")
        .node("n2")
        .sa("waypoint")
        .add();
    let mesh = world.start().await;
    let (secrets, _lease) = mesh.secrets(&waypoint.identity()).await;
    let acceptor = TlsAcceptor::from(crate::tls::server_config(secrets, waypoint.identity()));
    let listener = TcpListener::bind(waypoint.addr(ambit_common::HBONE_PORT))
        .await
        .expect("bind the waypoint's HBONE port");
    let serving = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.expect("accept");
        server::serve(
            &acceptor,
            &Default::default(),
            tcp,
            peer,
            |identity, req, mut respond| async move {
                let authority = req.uri().to_string();
                let ok = Response::new(());
                let send = respond.send_response(ok, false).expect("200");
                let io = Stream::new(send, req.into_body()).into_io();
                serve_http1(io, format!("{identity} to {authority}")).await;
            },
        )
        .await
    });

    let tunnel = mesh
        .tunnel(&client, waypoint.addr(8080))
        .await
        .unwrap_or_else(|e| panic!("tunnel: {e}"));
    let bodies = get_each(tunnel.into_io(), &["/a", "/b"]).await;
    let who = format!("from {} to {}", client.principal(), waypoint.addr(8080));
    assert_eq!(bodies, [format!("GET /a {who}"), format!("GET /b {who}")]);
    serving.abort();
}

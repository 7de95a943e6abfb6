//! A peer's drain and the client's pooled L7 connections (HTTP/1.1's keep-alive race): when the
//! server's node agent drains, it sends GOAWAY on its HBONE connections; the client's agent then
//! lets the upstream HTTP connections carried on them go (it is the side that would send the next
//! request, so it is the one that closes), and the HBONE connection ends once they are closed.

use std::net::SocketAddr;

use super::fixture::*;

const PORT: u16 = 8080;

async fn web(port_name: &str) -> (Mesh, Pod, Pod, SocketAddr) {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let web = world.pod("web").node("n2").add();
    let vip = world
        .service("web")
        .named_port(port_name, PORT, PORT)
        .backends(&[&web])
        .add();
    let mesh = world.start().await;
    (mesh, client, web, SocketAddr::new(vip, PORT))
}

/// Serves one request, drains the server's node, and waits for the client's node to close what
/// it pooled: the upstream connection, its HBONE connection, and (through the server's agent)
/// the app's connection.
async fn peer_drain_lets_the_upstream_go(port_name: &str) {
    let (mesh, client, web, vip) = web(port_name).await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let (n1, n2) = (mesh.node("n1"), mesh.node("n2"));
    if port_name == "http2" {
        let conn = mesh.h2(&client, vip).await;
        assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    } else {
        let mut conn = mesh.h1(&client, vip).await;
        assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    }
    assert_eq!(n1.pi.upstreams.connections(), 1);
    assert_eq!(n1.pi.pool.connections(), 1);
    assert_eq!(n1.pi.upstreams.let_go(), 0);

    n2.pi.drain.start();
    if port_name == "http2" {
        // The draining inbound also sends GOAWAY inside the stream: the upstream HTTP/2
        // connection may end on its own before the HBONE GOAWAY lets it go.
        eventually("n1's upstream HTTP/2 connection ends", || {
            n1.pi.upstreams.sweep();
            n1.pi.upstreams.connections() == 0
        })
        .await;
    } else {
        // HTTP/1.1 has no GOAWAY of its own, and the draining inbound keeps the connection
        // open: only the HBONE GOAWAY ends it.
        eventually("n1 lets its upstream connection go on n2's GOAWAY", || {
            n1.pi.upstreams.let_go() == 1
        })
        .await;
        assert_eq!(n1.pi.upstreams.connections(), 0);
    }
    eventually("n1's HBONE connection to the draining n2 ends", || {
        n1.pi.pool.connections() == 0
    })
    .await;
    eventually("the app's connection is closed", || app.closed() == 1).await;
}

#[tokio::test]
async fn a_peers_goaway_lets_a_pooled_http1_connection_go() {
    peer_drain_lets_the_upstream_go("http").await;
}

/// HTTP/2 has GOAWAY of its own: the upstream connection ends either way (a regression test).
#[tokio::test]
async fn a_peers_goaway_ends_a_pooled_http2_connection() {
    peer_drain_lets_the_upstream_go("http2").await;
}

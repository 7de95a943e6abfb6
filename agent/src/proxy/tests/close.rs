//! How a connection ends, through the tunnel and in both directions, as a direct connection
//! would: a FIN ends one direction only (the other keeps flowing), a reset resets the other end
//! (ECONNRESET on its next read), and each side's telemetry says who ended it.

use std::io::ErrorKind;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::fixture::*;
use crate::identity::Identity;

/// A client on n1, an app the test drives on n2, one tunnelled connection between them with a
/// first exchange done (so the tunnel is up at both ends): (mesh, client, app).
async fn connection() -> (Mesh, TcpStream, TcpStream) {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").add();
    let mesh = world.start().await;
    let listener = mesh.listen(server.addr(8080)).await;
    let mut conn = mesh.connect(&client, server.addr(8080)).await;
    let (mut app, _) = listener.accept().await;
    conn.write_all(b"hello").await.expect("write");
    assert_eq!(read_exact(&mut app, 5).await, b"hello");
    app.write_all(b"hi").await.expect("write");
    assert_eq!(read_exact(&mut conn, 2).await, b"hi");
    (mesh, conn, app)
}

/// Waits until both nodes have recorded the end of the connection with `flags`, then checks how
/// ambit counted it.
async fn ended(mesh: &Mesh, flags: &str, reset: bool) {
    for (name, reporter) in [("n1", "source"), ("n2", "destination")] {
        let node = mesh.node(name);
        let labels = [("reporter", reporter), ("response_flags", flags)];
        node.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
            .await;
        let (completed, resets) = if reset { (0, 1) } else { (1, 0) };
        assert_eq!(node.count(|c| &c.relays_completed), completed, "{name}");
        assert_eq!(node.count(|c| &c.relays_reset), resets, "{name}");
    }
}

#[tokio::test]
async fn client_fin_reaches_the_app_as_fin_while_the_reply_still_flows() {
    let (mesh, mut client, mut app) = connection().await;
    client.write_all(b"request").await.expect("write");
    client.shutdown().await.expect("FIN");
    assert_eq!(
        read_to_end(&mut app).await,
        b"request",
        "the app reads the request, then EOF"
    );
    // The client's FIN ended one direction only.
    app.write_all(b"the reply, after your FIN")
        .await
        .expect("write after the client's FIN");
    assert_eq!(
        read_exact(&mut client, 25).await,
        b"the reply, after your FIN"
    );
    app.shutdown().await.expect("FIN");
    assert_eq!(next_read(&mut client).await.expect("EOF, not a reset"), b"");
    ended(&mesh, "-", false).await;
}

#[tokio::test]
async fn app_fin_reaches_the_client_as_fin_while_the_request_still_flows() {
    let (mesh, mut client, mut app) = connection().await;
    app.write_all(b"all of it").await.expect("write");
    app.shutdown().await.expect("FIN");
    assert_eq!(read_to_end(&mut client).await, b"all of it");
    client
        .write_all(b"more, after your FIN")
        .await
        .expect("write after the app's FIN");
    assert_eq!(read_exact(&mut app, 20).await, b"more, after your FIN");
    client.shutdown().await.expect("FIN");
    assert_eq!(next_read(&mut app).await.expect("EOF, not a reset"), b"");
    ended(&mesh, "-", false).await;
}

#[tokio::test]
async fn app_reset_reaches_the_client_as_a_reset() {
    let (mesh, mut client, app) = connection().await;
    reset(app);
    let err = next_read(&mut client)
        .await
        .expect_err("the client's read fails");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    // Istio: UR, the upstream reset, at both ends.
    ended(&mesh, "UR", true).await;
}

#[tokio::test]
async fn client_reset_reaches_the_app_as_a_reset() {
    let (mesh, client, mut app) = connection().await;
    reset(client);
    let err = next_read(&mut app).await.expect_err("the app's read fails");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    // Istio: DC, the downstream went away, at both ends.
    ended(&mesh, "DC", true).await;
}

/// RFC 9113 §8.5: a CONNECT proxy whose TCP connection fails resets the stream with
/// CONNECT_ERROR. An HBONE client (another node's ztunnel) sees exactly that when the app resets.
#[tokio::test]
async fn an_app_reset_reaches_an_hbone_client_as_connect_error() {
    let mut world = World::new();
    let server = world.pod("server").node("n2").add();
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let listener = mesh.listen(server.addr(8080)).await;
    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let mut c = mesh
        .hbone_client(&sleep, outside, &server)
        .await
        .unwrap_or_else(|e| panic!("HBONE client: {e}"));
    let (status, stream) = c
        .request(http::Method::CONNECT, &server.addr(8080).to_string())
        .await
        .unwrap_or_else(|e| panic!("CONNECT: {e}"));
    assert_eq!(status, 200);
    let mut stream = stream.expect("the tunnel");
    let (app, _) = listener.accept().await;
    reset(app);
    let err = within("the stream to end", stream.recv.data())
        .await
        .expect("a reset, not END_STREAM")
        .expect_err("a reset, not data");
    assert_eq!(err.reason(), Some(h2::Reason::CONNECT_ERROR), "{err}");
}

/// The admin's `/debug/connections` lists a tunnelled connection at both ends while it is open
/// (outbound HBONE on n1, inbound HBONE on n2), and neither once it has ended.
#[tokio::test]
async fn a_live_connection_is_listed_at_both_ends_until_it_ends() {
    use crate::admin::connections::{Direction, Protocol};
    let (mesh, mut client, mut app) = connection().await;
    for (name, direction) in [("n1", Direction::Outbound), ("n2", Direction::Inbound)] {
        let live = mesh.node(name).pi.connections.snapshot();
        assert_eq!(live.len(), 1, "{name}: {live:?}");
        assert_eq!(live[0].info.direction, direction, "{name}");
        assert_eq!(live[0].info.protocol, Protocol::Hbone, "{name}");
    }
    client.shutdown().await.expect("FIN");
    assert_eq!(read_to_end(&mut app).await, b"");
    app.shutdown().await.expect("FIN");
    assert_eq!(next_read(&mut client).await.expect("EOF"), b"");
    ended(&mesh, "-", false).await;
    for name in ["n1", "n2"] {
        let node = mesh.node(name);
        eventually(&format!("{name} lists no connection"), || {
            node.pi.connections.snapshot().is_empty()
        })
        .await;
    }
}

//! The outbound stage's other answers: nowhere known to go (reset), a Service without ready
//! endpoints (reset, `UH`), and destinations outside the mesh (plaintext, as a direct connection
//! would have gone).

use std::io::ErrorKind;
use std::net::SocketAddr;

use ambit_common::OUTBOUND_PORT;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::fixture::*;

#[tokio::test]
async fn a_connection_without_an_original_destination_is_reset() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let mesh = world.start().await;
    // Nothing registered: as if someone connected to 15001 directly.
    let mut conn = TcpStream::connect(client.addr(OUTBOUND_PORT))
        .await
        .expect("connect");
    let err = next_read(&mut conn).await.expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.outbound_orig_dst_missing), 1);
    assert_eq!(
        n1.count(|c| &c.outbound_hbone) + n1.count(|c| &c.outbound_plaintext),
        0
    );
}

#[tokio::test]
async fn a_service_without_ready_endpoints_is_reset_and_flagged_uh() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").app("echo").add();
    let vip = world
        .service("echo")
        .port(80, 8080)
        .backends(&[&server])
        .not_ready()
        .add();
    let mesh = world.start().await;
    let app = mesh.whoami(server.addr(8080)).await;
    let mut conn = mesh.connect(&client, SocketAddr::new(vip, 80)).await;
    let err = next_read(&mut conn).await.expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.outbound_no_endpoints), 1);
    // The Service the app addressed is named, as Istio names it for a 503 UH.
    let labels = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("response_flags", "UH"),
        ("destination_service", "echo.mesh.svc.cluster.local"),
    ];
    n1.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
        .await;
    assert!(app.peers().is_empty(), "the unready endpoint was not used");
}

/// A host the cluster does not know and a pod of a namespace outside the mesh are both reached
/// in plaintext, from the client's node, with no HBONE connection; the pod is named in the
/// telemetry, the unknown host is `unknown`.
#[tokio::test]
async fn destinations_outside_the_mesh_are_reached_in_plaintext() {
    let mut world = World::new();
    world.plain("legacy");
    let client = world.pod("client").node("n1").add();
    let legacy = world.pod("legacy").namespace("legacy").node("n2").add();
    let outside = SocketAddr::new(world.outside_ip(), 8080);
    let mesh = world.start().await;
    let _apps = (
        mesh.whoami(outside).await,
        mesh.whoami(legacy.addr(8080)).await,
    );
    let n1 = mesh.node("n1");
    for (dst, workload, namespace) in [
        (outside, "unknown", "unknown"),
        (legacy.addr(8080), "legacy", "legacy"),
    ] {
        let mut conn = mesh.connect(&client, dst).await;
        let greeting = read_line(&mut conn).await;
        assert!(greeting.starts_with(&format!("{dst} sees ")), "{greeting}");
        conn.write_all(b"ping").await.expect("write");
        assert_eq!(read_exact(&mut conn, 4).await, b"ping");
        conn.shutdown().await.expect("FIN");
        assert_eq!(read_to_end(&mut conn).await, b"");
        let labels = [
            ("reporter", "source"),
            ("source_workload", "client"),
            ("destination_workload", workload),
            ("destination_workload_namespace", namespace),
            ("connection_security_policy", "none"),
            ("response_flags", "-"),
        ];
        n1.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
            .await;
        let m = n1.metrics();
        assert_eq!(m.value("istio_tcp_received_bytes_total", &labels), Some(4));
        assert_eq!(
            m.value("istio_tcp_sent_bytes_total", &labels),
            Some(greeting.len() as u64 + 4)
        );
    }
    assert_eq!(n1.count(|c| &c.outbound_plaintext), 2);
    assert_eq!(n1.count(|c| &c.outbound_hbone), 0);
    assert_eq!(n1.pooled(|p| &p.connections_opened), 0, "no HBONE");
}

/// DestinationRule `connectionPool.tcp.maxConnections` on the TCP path (Envoy's circuit breaker
/// for a TCP proxy): past it a connection is refused (reset, flag `UO`); once one closes, the next
/// gets through.
#[tokio::test]
async fn tcp_connections_past_max_connections_are_reset_and_flagged_uo() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").app("echo").add();
    let vip = world
        .service("echo")
        .named_port("tcp-echo", 80, 8080)
        .backends(&[&server])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: mesh}
spec:
  host: echo
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1, connectTimeout: 2s, tcpKeepalive: {time: 60s, interval: 5s, probes: 3}}
"#,
    );
    let mesh = world.start().await;
    let app = mesh.whoami(server.addr(8080)).await;
    let mut first = mesh.connect(&client, SocketAddr::new(vip, 80)).await;
    assert!(
        !read_line(&mut first).await.is_empty(),
        "the first gets through"
    );
    let mut second = mesh.connect(&client, SocketAddr::new(vip, 80)).await;
    let err = next_read(&mut second).await.expect_err("reset");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.outbound_overflow), 1);
    let labels = [("reporter", "source"), ("response_flags", "UO")];
    n1.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
        .await;
    first.shutdown().await.expect("close");
    drop(first);
    eventually("the first connection's slot is freed", || {
        app.peers().len() == 1
            && n1.count(|c| &c.relays_completed) + n1.count(|c| &c.relays_reset) >= 1
    })
    .await;
    let mut third = mesh.connect(&client, SocketAddr::new(vip, 80)).await;
    assert!(
        !read_line(&mut third).await.is_empty(),
        "room again after a close"
    );
}

//! HBONE end to end: a captured connection of a pod on one node tunnelled to a pod on another
//! node, bytes intact both ways, and what ambit's counters and Istio's telemetry say on each side.

use std::sync::atomic::AtomicU64;

use tokio::io::AsyncWriteExt;

use super::fixture::*;
use crate::proxy::Counters;

#[tokio::test]
async fn hbone_round_trip_is_intact_and_reported_by_source_and_destination() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").sa("sleep").add();
    let server = world.pod("server").node("n2").sa("echo").add();
    let mesh = world.start().await;
    let app = mesh.whoami(server.addr(8080)).await;
    let (n1, n2) = (mesh.node("n1"), mesh.node("n2"));

    let mut conn = mesh.connect(&client, server.addr(8080)).await;
    let greeting = read_line(&mut conn).await;
    let payload = pattern(1 << 20);
    let (mut r, mut w) = conn.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write the request");
        w.shutdown().await.expect("FIN");
    });
    let echoed = read_to_end(&mut r).await;
    writer.await.expect("writer");
    assert_same("echoed through the tunnel", &echoed, &payload);

    // The app saw one connection, from the server pod's own address (the inbound stage connects
    // from it, so capture would not steer it again).
    let peers = app.peers();
    assert_eq!(peers.len(), 1, "one connection reached the app: {peers:?}");
    assert_eq!(peers[0].ip(), server.ip, "the app's peer is its own pod");
    assert_eq!(
        greeting,
        format!("{} sees {}\n", server.addr(8080), peers[0])
    );

    // Both ends record the connection once it has closed.
    let (up, down) = (
        payload.len() as u64,
        (greeting.len() + payload.len()) as u64,
    );
    let (src_principal, dst_principal) = (client.principal(), server.principal());
    for (node, reporter) in [(n1, "source"), (n2, "destination")] {
        let labels = [
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "mesh"),
            ("source_principal", src_principal.as_str()),
            ("source_app", "client"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "mesh"),
            ("destination_principal", dst_principal.as_str()),
            ("destination_service", "unknown"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
        ];
        node.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
            .await;
        let m = node.metrics();
        let get = |name| m.value(name, &labels);
        assert_eq!(get("istio_tcp_connections_opened_total"), Some(1), "{m}");
        // Istio: received = from the client (the request), sent = to the client (the response).
        assert_eq!(
            get("istio_tcp_received_bytes_total"),
            Some(up),
            "{reporter}"
        );
        assert_eq!(get("istio_tcp_sent_bytes_total"), Some(down), "{reporter}");
        assert_eq!(
            m.series("istio_tcp_connections_opened_total").len(),
            1,
            "one series only at the {reporter}: {}",
            lines_with(&m, "istio_tcp_connections_opened_total")
        );
    }

    type Get = fn(&Counters) -> &AtomicU64;
    let expect_n1: [(&str, Get, u64); 5] = [
        ("outbound_accepted", |c| &c.outbound_accepted, 1),
        ("outbound_hbone", |c| &c.outbound_hbone, 1),
        ("outbound_plaintext", |c| &c.outbound_plaintext, 0),
        ("relays_completed", |c| &c.relays_completed, 1),
        ("relays_reset", |c| &c.relays_reset, 0),
    ];
    for (name, get, want) in expect_n1 {
        assert_eq!(n1.count(get), want, "n1 {name}");
    }
    let expect_n2: [(&str, Get, u64); 4] = [
        ("hbone_inbound_accepted", |c| &c.hbone_inbound_accepted, 1),
        ("hbone_inbound_streams", |c| &c.hbone_inbound_streams, 1),
        ("relays_completed", |c| &c.relays_completed, 1),
        ("inbound_denied", |c| &c.inbound_denied, 0),
    ];
    for (name, get, want) in expect_n2 {
        assert_eq!(n2.count(get), want, "n2 {name}");
    }
    for node in [n1, n2] {
        assert_eq!(
            node.count(|c| &c.bytes_relayed),
            up + down,
            "{} relayed every byte once",
            node.name
        );
    }
    assert_eq!(n1.pooled(|p| &p.connections_opened), 1);
    assert_eq!(n1.pooled(|p| &p.streams_opened), 1);
}

/// A Service VIP is resolved to a ready endpoint before the tunnel: the CONNECT names the pod,
/// and both ends name the Service in `destination_service`.
#[tokio::test]
async fn a_service_vip_goes_over_hbone_to_its_endpoint_and_names_the_service() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").app("echo").add();
    let vip = world
        .service("echo")
        .port(80, 8080)
        .backends(&[&server])
        .add();
    let mesh = world.start().await;
    let _app = mesh.whoami(server.addr(8080)).await;

    let mut conn = mesh
        .connect(&client, std::net::SocketAddr::new(vip, 80))
        .await;
    let greeting = read_line(&mut conn).await;
    assert!(
        greeting.starts_with(&format!("{} sees ", server.addr(8080))),
        "the endpoint answered: {greeting}"
    );
    conn.shutdown().await.expect("FIN");
    assert_eq!(read_to_end(&mut conn).await, b"");

    for (node, reporter) in [("n1", "source"), ("n2", "destination")] {
        let labels = [
            ("reporter", reporter),
            ("destination_workload", "server"),
            ("destination_app", "echo"),
            ("destination_service", "echo.mesh.svc.cluster.local"),
            ("destination_service_name", "echo"),
            ("destination_service_namespace", "mesh"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let node = mesh.node(node);
        node.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
            .await;
    }
    assert_eq!(mesh.node("n1").count(|c| &c.outbound_hbone), 1);
}

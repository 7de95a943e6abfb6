//! Plaintext into an enrolled pod (the 15006 listener, where sk_lookup steers it) under
//! PeerAuthentication STRICT: refused before the app is reached, while HBONE still gets through.
//!
//! Only the refusal can run in process: the stage takes the original destination from the
//! accepted socket's local address and connects to it from the pod's own address, which only
//! sk_lookup tells apart from the listener itself. An allowed plaintext connection is the
//! namespaced tests' business.

use std::io::ErrorKind;

use ambit_common::INBOUND_PORT;
use tokio::net::TcpSocket;

use super::fixture::*;

const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec: {mtls: {mode: STRICT}}
"#;

#[tokio::test]
async fn strict_peer_authentication_refuses_plaintext_and_lets_hbone_through() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").add();
    world.yaml(STRICT);
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let app = mesh.whoami(server.addr(8080)).await;
    let n2 = mesh.node("n2");

    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::new(outside, 0))
        .expect("bind");
    let mut plain = within("connect", socket.connect(server.addr(INBOUND_PORT)))
        .await
        .expect("connect to the plaintext listener");
    let err = next_read(&mut plain).await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert_eq!(n2.count(|c| &c.inbound_accepted), 1);
    assert_eq!(n2.count(|c| &c.inbound_denied), 1);
    let m = n2.metrics();
    assert_eq!(
        m.value(
            "ambit_policy_denials_total",
            &[("policy", "mesh/strict"), ("workload", "mesh/server")]
        ),
        Some(1),
        "{}",
        lines_with(&m, "ambit_policy_denials")
    );
    let labels = [
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("destination_workload", "server"),
        ("connection_security_policy", "none"),
        ("response_flags", "DENY"),
    ];
    n2.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
        .await;

    // Mutual TLS is what STRICT asks for: HBONE gets through.
    let mut conn = mesh.connect(&client, server.addr(8080)).await;
    let greeting = read_line(&mut conn).await;
    assert!(
        greeting.starts_with(&server.addr(8080).to_string()),
        "{greeting}"
    );
    assert_eq!(
        app.peers().len(),
        1,
        "only the HBONE connection reached the app"
    );
    assert_eq!(n2.count(|c| &c.inbound_denied), 1);
}

//! The HBONE server (15008) as a raw HBONE client sees it: ztunnel's answers (400 for anything
//! but a CONNECT to this pod, 401 when policy denies, 503 when the app cannot be reached, when
//! the target is one of the proxy's own ports or a hostname no Service has, 200 and the tunnel
//! otherwise), a Service hostname as the target, the `baggage` of the 200, and the server's
//! identity checked by the client.

use http::Method;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::fixture::*;
use crate::identity::Identity;

const DENY_INTRUDER: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-intruder, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/mesh/sa/intruder"]}}]}]
"#;

#[tokio::test]
async fn hbone_server_answers_400_401_503_and_200() {
    let mut world = World::new();
    let server = world.pod("server").node("n2").sa("beta").add();
    let other = world.pod("other").node("n2").add();
    world.yaml(DENY_INTRUDER);
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let app = mesh.whoami(server.addr(8080)).await;
    let n2 = mesh.node("n2");
    let target = server.addr(8080).to_string();

    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let mut c = mesh
        .hbone_client(&sleep, outside, &server)
        .await
        .unwrap_or_else(|e| panic!("a client of the mesh's CA connects: {e}"));
    assert_eq!(c.status(Method::GET, &target).await, Ok(400), "GET");
    let elsewhere = other.addr(8080).to_string();
    assert_eq!(
        c.status(Method::CONNECT, &elsewhere).await,
        Ok(400),
        "CONNECT to another pod than the one reached"
    );
    assert_eq!(
        c.status(Method::CONNECT, "example.com:8080").await,
        Ok(503),
        "a hostname no Service has (ztunnel: no service or workload for hostname)"
    );
    assert_eq!(
        c.status(Method::CONNECT, &server.addr(9).to_string()).await,
        Ok(503),
        "nothing listens on the port"
    );
    assert_eq!(n2.count(|c| &c.hbone_inbound_bad_request), 2);
    assert_eq!(n2.count(|c| &c.hbone_inbound_unavailable), 1);
    assert_eq!(n2.count(|c| &c.inbound_connect_failed), 1);
    assert!(app.peers().is_empty(), "no refused request reached the app");

    // The one good request: 200, and the stream is the app's connection.
    let (status, stream) = c
        .request(Method::CONNECT, &target)
        .await
        .unwrap_or_else(|e| panic!("CONNECT {target}: {e}"));
    assert_eq!(status, 200, "a good CONNECT");
    let mut io = BufReader::new(stream.expect("the tunnel").into_io());
    let mut greeting = String::new();
    within("the greeting", io.read_line(&mut greeting))
        .await
        .expect("read the greeting");
    assert!(
        greeting.starts_with(&format!("{target} sees {}:", server.ip)),
        "{greeting}"
    );
    io.get_mut().write_all(b"ping").await.expect("write");
    assert_eq!(read_exact(&mut io, 4).await, b"ping");
    assert_eq!(app.peers().len(), 1);

    // A DENY policy for the client's identity: 401, counted against the policy.
    let intruder = Identity::new("cluster.local", "mesh", "intruder");
    let mut bad = mesh
        .hbone_client(&intruder, outside, &server)
        .await
        .unwrap_or_else(|e| panic!("the intruder's TLS is fine: {e}"));
    assert_eq!(bad.status(Method::CONNECT, &target).await, Ok(401));
    assert_eq!(n2.count(|c| &c.inbound_denied), 1);
    let m = n2.metrics();
    assert_eq!(
        m.value(
            "ambit_policy_denials_total",
            &[
                ("policy", "mesh/deny-intruder"),
                ("workload", "mesh/server")
            ]
        ),
        Some(1),
        "{}",
        lines_with(&m, "ambit_policy_denials")
    );
    assert_eq!(
        app.peers().len(),
        1,
        "the denied stream never reached the app"
    );

    // The destination's telemetry names the verified identities (no workload runs at the
    // client's address) and the failure flags.
    let intruder_id = intruder.to_string();
    let sleep_id = sleep.to_string();
    for (principal, flags) in [(&intruder_id, "DENY"), (&sleep_id, "UF")] {
        let labels = [
            ("reporter", "destination"),
            ("source_principal", principal.as_str()),
            ("source_workload", "unknown"),
            ("source_workload_namespace", "mesh"),
            ("destination_workload", "server"),
            ("response_flags", flags),
        ];
        n2.wait_metric("istio_tcp_connections_closed_total", &labels, 1)
            .await;
    }
    assert_eq!(n2.count(|c| &c.hbone_inbound_streams), 6);
    assert_eq!(n2.count(|c| &c.hbone_inbound_accepted), 2);
}

/// The client checks the server's SPIFFE identity: a server proving another identity than the
/// expected one is refused, and the server counts the aborted handshake.
#[tokio::test]
async fn a_server_with_another_identity_is_refused_by_the_client() {
    let mut world = World::new();
    let server = world.pod("server").node("n2").sa("beta").add();
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let alpha = Identity::new("cluster.local", "mesh", "alpha");
    let e = match mesh
        .hbone_client_expecting(&sleep, outside, &server, &alpha)
        .await
    {
        Ok(_) => panic!("a server proving mesh/beta was accepted as mesh/alpha"),
        Err(e) => e,
    };
    assert!(e.contains("sa/alpha") && e.contains("sa/beta"), "{e}");
    let n2 = mesh.node("n2");
    eventually("the server counts the refused handshake", || {
        n2.count(|c| &c.hbone_tls_refused) == 1
    })
    .await;
    assert_eq!(n2.count(|c| &c.hbone_inbound_streams), 0);
}

/// ztunnel's `illegal_ports`: a CONNECT to one of the proxy's own ports is a call to itself (a
/// tunnel in a tunnel for 15008), refused with 503 before anything is dialled, even where
/// something listens on that port.
#[tokio::test]
async fn a_connect_to_each_of_the_proxys_own_ports_gets_503() {
    let mut world = World::new();
    let server = world.pod("server").node("n2").sa("beta").add();
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let n2 = mesh.node("n2");
    // Something listens on every own port of the pod's address: the proxy itself (15008, and
    // 15001/15006 where this tier runs those stages), else an app.
    let mut apps = Vec::new();
    for port in crate::proxy::hbone::target::OWN_PORTS {
        if tokio::net::TcpListener::bind(server.addr(port))
            .await
            .is_ok()
        {
            apps.push(mesh.whoami(server.addr(port)).await);
        }
    }
    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let mut c = mesh
        .hbone_client(&sleep, outside, &server)
        .await
        .unwrap_or_else(|e| panic!("a client of the mesh's CA connects: {e}"));
    for port in [15001, 15006, 15008, 15020, 15021, 15000] {
        let target = server.addr(port).to_string();
        assert_eq!(
            c.status(Method::CONNECT, &target).await,
            Ok(503),
            "CONNECT {target}"
        );
    }
    assert_eq!(n2.count(|c| &c.hbone_inbound_unavailable), 6);
    assert_eq!(
        n2.count(|c| &c.inbound_connect_failed),
        0,
        "refused before dialling"
    );
    for app in &apps {
        assert!(app.peers().is_empty(), "no tunnel reached an own port");
    }
    // The connection is still good for a real target.
    let _app = mesh.whoami(server.addr(8080)).await;
    assert_eq!(
        c.status(Method::CONNECT, &server.addr(8080).to_string())
            .await,
        Ok(200)
    );
}

/// A Service hostname as the `:authority` (as gateways and waypoints send it): the Service port
/// maps to its target port on the pod the client reached, the 200 carries that pod's `baggage`
/// (as ztunnel's), and the stream is reported against the Service named.
#[tokio::test]
async fn a_service_hostname_reaches_the_pod_on_its_target_port_with_baggage() {
    let mut world = World::new();
    let one = world.pod("web-1").node("n2").app("web").sa("web").add();
    let two = world.pod("web-2").node("n2").app("web").sa("web").add();
    world
        .service("web")
        .port(80, 8080)
        .backends(&[&one, &two])
        .add();
    let outside = world.outside_ip();
    let mesh = world.start().await;
    let _apps = (
        mesh.whoami(one.addr(8080)).await,
        mesh.whoami(two.addr(8080)).await,
    );
    let n2 = mesh.node("n2");
    let sleep = Identity::new("cluster.local", "mesh", "sleep");
    let mut c = mesh
        .hbone_client(&sleep, outside, &two)
        .await
        .unwrap_or_else(|e| panic!("a client of the mesh's CA connects: {e}"));

    let (head, stream) = c
        .response(Method::CONNECT, "web.mesh.svc.cluster.local:80")
        .await
        .unwrap_or_else(|e| panic!("CONNECT web: {e}"));
    assert_eq!(head.status, 200, "{head:?}");
    let pod = n2.pods.get("mesh/web-2").expect("web-2 enrolled on n2");
    let want = pod.baggage.as_ref().expect("the pod's baggage");
    assert_eq!(head.headers.get("baggage"), Some(want), "{head:?}");
    let baggage = want.to_str().expect("ASCII");
    assert!(
        baggage.contains("k8s.namespace.name=mesh") && baggage.contains("k8s.pod.name=web-2"),
        "{baggage}"
    );
    let mut io = BufReader::new(stream.expect("the tunnel").into_io());
    let mut greeting = String::new();
    within("the greeting", io.read_line(&mut greeting))
        .await
        .expect("read the greeting");
    assert!(
        greeting.starts_with(&format!("{} sees {}:", two.addr(8080), two.ip)),
        "the reached pod, on the target port: {greeting}"
    );
    // A clean close (FIN both ways), so the stream is counted as such.
    io.get_mut().shutdown().await.expect("FIN");
    let mut rest = Vec::new();
    within("the app's FIN", io.read_to_end(&mut rest))
        .await
        .expect("read to the end");
    n2.wait_metric(
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "destination"),
            ("destination_workload", "web-2"),
            ("destination_service", "web.mesh.svc.cluster.local"),
            ("response_flags", "-"),
        ],
        1,
    )
    .await;

    // Hostnames that cannot be served: 503, as ztunnel answers; refusals carry no baggage.
    for authority in [
        "nothere.mesh.svc.cluster.local:80",
        "web.mesh.svc.cluster.local:81",
    ] {
        let (head, _) = c
            .response(Method::CONNECT, authority)
            .await
            .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"));
        assert_eq!(head.status, 503, "{authority}");
        assert!(head.headers.get("baggage").is_none(), "{authority}");
    }
    assert_eq!(n2.count(|c| &c.hbone_inbound_unavailable), 2);
}

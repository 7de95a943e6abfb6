//! Istio's automatic protocol selection on ports that declare nothing, through real agents
//! (issue 11, acceptance 7): HTTP/1.1 and HTTP/2 prior-knowledge clients are detected and routed
//! per request (gRPC too); a client-first TCP protocol passes unchanged; a server-first protocol gets its
//! greeting once the detection timeout has passed (the documented behaviour), not never.

mod l7support;
mod support;

use std::net::Ipv4Addr;

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::{sa, start_agents, Conn, GrpcApp, HttpApp, NS};
use support::{in_pod, Mode, Server, SETTLE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 16, 10);
const RAW: Ipv4Addr = Ipv4Addr::new(10, 96, 16, 11);
const GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 16, 12);

const ISTIO: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2}}]
  - route: [{destination: {host: web, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[test]
fn istio_automatic_protocol_selection_on_undeclared_ports() {
    support::raise_fd_limit();
    let world = World::new("l7-sniffing");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let server = |name: &str, version: &str| {
        world
            .pod(name)
            .node(&n2)
            .namespace(NS)
            .label("app", "web")
            .label("version", version)
            .spawn()
    };
    let (v1, v2) = (server("web-v1", "v1"), server("web-v2", "v2"));
    let _web = [&v1, &v2].map(|p| HttpApp::start(p, 8000));
    // Writes its whoami line first, then echoes: server-first to a client that waits, and
    // client-first to one that writes at once.
    let raw = Server::start(&v1, &[sa(v1.ip4(), 7000)], Mode::WhoamiEcho);
    let _grpc = GrpcApp::start(&v1, 9000);
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &v1, &v2])
        .service(
            "web",
            NS,
            WEB,
            &[SvcPort::unnamed(8000, 8000)],
            &[&v1, &v2],
            true,
        )
        .service(
            "raw",
            NS,
            RAW,
            &[SvcPort::unnamed(7000, 7000)],
            &[&v1],
            true,
        )
        .service(
            "grpc",
            NS,
            GRPC,
            &[SvcPort::unnamed(9000, 9000)],
            &[&v1],
            true,
        );
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&v1, &v2])],
        &yaml,
        ISTIO,
        &["--protocol-detection-timeout=500ms".to_string()],
    );

    // HTTP/1.1 and HTTP/2 prior knowledge on the undeclared port: routed per request by header.
    let web = sa(WEB, 8000);
    let routed = in_pod(&client, || async {
        let mut out = Vec::new();
        for conn in [Conn::h1(web).await, Conn::h2(web).await] {
            let mut seen = Vec::new();
            for i in 0..10 {
                let user = if i % 2 == 0 { "jason" } else { "bob" };
                let r = conn.get("web:8000", "/who", &[("end-user", user)]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                seen.push((user, r.served_by(), r.json()["version"].clone()));
            }
            out.push(seen);
        }
        out
    });
    for (seen, version) in routed.iter().zip(["HTTP/1.1", "HTTP/2.0"]) {
        for (user, who, v) in seen {
            let want = if *user == "jason" { "web-v2" } else { "web-v1" };
            assert_eq!(who, want, "{version} client, end-user {user}: {seen:?}");
            assert_eq!(v, version, "the app hears the client's version: {seen:?}");
        }
    }

    // gRPC is HTTP/2 with prior knowledge: detected, and kept HTTP/2 upstream.
    let status = in_pod(&client, || async {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{GRPC}:9000"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect");
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "ambit.Serving".into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .map_err(|e| format!("{e:?}"))
    });
    assert_eq!(
        status,
        Ok(tonic_health::pb::health_check_response::ServingStatus::Serving as i32),
        "{}",
        agents[0].log_tail()
    );

    // A client-first TCP protocol: bytes unchanged both ways, to the address it dialled.
    let dst = sa(RAW, 7000);
    let (line, echoed) = in_pod(&client, || async {
        let mut s = l7support::connect(dst).await;
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 256) as u8).collect();
        s.write_all(&payload).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.expect("whoami line");
        let mut echoed = Vec::new();
        r.read_to_end(&mut echoed).await.expect("echo");
        (line, echoed == payload)
    });
    assert!(
        line.split_whitespace().nth(1) == Some(&format!("{}:7000", v1.ip4())),
        "{line:?}"
    );
    assert!(echoed, "the echo is the bytes sent");

    // A server-first protocol: the client sends nothing; the greeting arrives once detection
    // gives up (500 ms here) and the connection is forwarded as TCP.
    let greeting = in_pod(&client, || async {
        let s = l7support::connect(dst).await;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        tokio::time::timeout(SETTLE, r.read_line(&mut line))
            .await
            .map(|read| read.map(|_| line))
    });
    let greeting = greeting
        .expect("the greeting arrives (not hung)")
        .expect("read the greeting");
    assert!(
        greeting.split_whitespace().nth(1) == Some(&format!("{}:7000", v1.ip4())),
        "{greeting:?}"
    );
    // The server records a connection when it has ended: wait for both records.
    support::wait_until("the server records both connections", || raw.count() >= 2);
    assert_eq!(raw.count(), 2, "two connections reached the server");
}

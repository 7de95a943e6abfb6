//! VirtualService `tcp` and `tls` routes through real agents (issue 11, acceptance 5): whole
//! connections shifted by weight, and TLS connections routed by the SNI of a real ClientHello.

mod l7support;
mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::{sa, start_agents, tls_hello, TlsApp, NS};
use support::{in_pod, whoami, Mode, Server};

const ECHO: Ipv4Addr = Ipv4Addr::new(10, 96, 14, 10);
const SECURE: Ipv4Addr = Ipv4Addr::new(10, 96, 14, 11);

/// Istio's "TCP Traffic Shifting" task (tcp-echo, 80/20 between v1 and v2), and `tls` routes by
/// `sniHosts` (the VirtualService reference's TLSRoute).
const ISTIO: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo, namespace: mesh}
spec:
  hosts: [tcp-echo]
  tcp:
  - match: [{port: 9000}]
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}
      weight: 80
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}
      weight: 20
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: mesh}
spec:
  host: tcp-echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: mesh}
spec:
  hosts: [secure, a.example.com, b.example.com]
  tls:
  - match: [{sniHosts: [a.example.com]}]
    route: [{destination: {host: secure, subset: a}}]
  - match: [{sniHosts: [b.example.com]}]
    route: [{destination: {host: secure, subset: b}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: secure, namespace: mesh}
spec:
  host: secure
  subsets:
  - {name: a, labels: {version: a}}
  - {name: b, labels: {version: b}}
"#;

#[test]
fn tcp_traffic_shifting_and_tls_routes_by_sni() {
    support::raise_fd_limit();
    let world = World::new("l7-l4routes");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let pod = |name: &str, app: &str, version: &str| {
        world
            .pod(name)
            .node(&n2)
            .namespace(NS)
            .label("app", app)
            .label("version", version)
            .spawn()
    };
    let (v1, v2) = (
        pod("tcp-echo-v1", "tcp-echo", "v1"),
        pod("tcp-echo-v2", "tcp-echo", "v2"),
    );
    let (ta, tb) = (
        pod("secure-a", "secure", "a"),
        pod("secure-b", "secure", "b"),
    );
    let _echo = [&v1, &v2].map(|p| Server::start(p, &[sa(p.ip4(), 9000)], Mode::WhoamiEcho));
    let _tls = [&ta, &tb].map(|p| TlsApp::start(p, 8443, &["a.example.com", "b.example.com"]));
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &v1, &v2, &ta, &tb])
        .service(
            "tcp-echo",
            NS,
            ECHO,
            &[SvcPort::named("tcp", 9000, 9000)],
            &[&v1, &v2],
            true,
        )
        .service(
            "secure",
            NS,
            SECURE,
            &[SvcPort::named("tls", 443, 8443)],
            &[&ta, &tb],
            true,
        );
    let _agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&v1, &v2, &ta, &tb])],
        &yaml,
        ISTIO,
        &[],
    );

    // 1,000 connections, 50 at a time: 80% to v1 within ±4% (40 connections).
    let dst = sa(ECHO, 9000);
    let reached = in_pod(&client, || async {
        let mut reached: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for _ in 0..20 {
            let batch = futures::future::join_all((0..50).map(|_| whoami(dst))).await;
            for r in batch {
                let (_, local, _): (SocketAddr, SocketAddr, SocketAddr) =
                    r.unwrap_or_else(|e| panic!("{dst}: {e}"));
                *reached.entry(local.ip()).or_insert(0) += 1;
            }
        }
        reached
    });
    let to = |p: &ambit::harness::Pod| reached.get(&IpAddr::from(p.ip4())).copied().unwrap_or(0);
    eprintln!(
        "80/20 over 1,000 connections: v1 {} v2 {}",
        to(&v1),
        to(&v2)
    );
    assert_eq!(
        to(&v1) + to(&v2),
        1000,
        "only v1 and v2 answer: {reached:?}"
    );
    assert!(
        (760..=840).contains(&to(&v1)),
        "80/20 within ±4%: v1 {} v2 {}",
        to(&v1),
        to(&v2)
    );

    // TLS: the ClientHello's SNI picks the subset; the handshake completes end to end.
    let secure = sa(SECURE, 443);
    let answers = in_pod(&client, || async {
        let mut out = Vec::new();
        for i in 0..20 {
            let sni = if i % 2 == 0 {
                "a.example.com"
            } else {
                "b.example.com"
            };
            let who = tls_hello(secure, sni)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            out.push((sni, who));
        }
        out
    });
    for (sni, who) in &answers {
        let want = if *sni == "a.example.com" {
            "secure-a"
        } else {
            "secure-b"
        };
        assert_eq!(who, want, "SNI {sni}: {answers:?}");
    }
}

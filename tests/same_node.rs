//! Same-node traffic (issue 14, Speed: "Same-node traffic"): a meshed connection between two pods
//! of one node is handed from the client's outbound to the server's inbound inside the agent,
//! without TLS, keeping what HBONE gives: the app sees the client pod's address, policy applies
//! at the destination with the client's identity, both reporters' telemetry (mutual_tls, the
//! source's principal), destination-side L7. `--same-node-shortcut=false` sends it over HBONE.

mod l7support;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ambit::harness::{ClusterYaml, LocalAgent, Pod, SvcPort, World};
use l7support::{metric, Conn, HttpApp};
use support::{ambit_bin, echo_transfer, in_pod, settled, whoami, Mode, Server, SETTLE};

const NS: &str = "mesh";
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 41, 10);
const GOOD: &str = "spiffe://cluster.local/ns/mesh/sa/good";

/// Clients `good` (sa good) and `bad` (sa bad) and the server (`app=server`: an echo on 8080, an
/// HTTP app on 9080 behind Service `web`, `http` 80 → 9080), all on one node and one agent.
struct OneNode {
    _world: World,
    good: Pod,
    bad: Pod,
    server: Pod,
    echo: SocketAddr,
    srv: Server,
    _web: HttpApp,
    agent: LocalAgent,
    /// The agent's `--access-log`.
    log: std::path::PathBuf,
}

fn one_node(test: &str, args: &[&str], policies: &str) -> OneNode {
    support::raise_fd_limit();
    let world = World::new(test);
    let n1 = world.node("n1");
    let pod = |name: &str| {
        world
            .pod(name)
            .node(&n1)
            .namespace(NS)
            .sa(name)
            .label("app", name)
            .spawn()
    };
    let (good, bad, server) = (pod("good"), pod("bad"), pod("server"));
    let echo = SocketAddr::new(server.ip4().into(), 8080);
    let srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let _web = HttpApp::start(&server, 9080);
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&good, &bad, &server])
        .service(
            "web",
            NS,
            WEB_VIP,
            &[SvcPort::named("http", 80, 9080)],
            &[&server],
            true,
        );
    let log = world.state_dir().join("access.log");
    let mut agent =
        LocalAgent::new(&world, &n1, &ambit_bin()).arg(&format!("--access-log={}", log.display()));
    for a in args {
        agent = agent.arg(a);
    }
    yaml.write(&agent.config_dir());
    let dir = agent.config_dir();
    std::fs::write(dir.join("policies.yaml"), policies).expect("write policies");
    agent.start(&world);
    agent.wait_enrolled(&[&good, &bad, &server]);
    agent.wait_for("ready", SETTLE, |s| s["ready"] == true);
    OneNode {
        _world: world,
        good,
        bad,
        server,
        echo,
        srv,
        _web,
        agent,
        log,
    }
}

fn counter(s: &serde_json::Value, path: &str) -> u64 {
    path.split('.')
        .fold(s, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {path} in the status: {s}"))
}

fn scrape(agent: &LocalAgent) -> String {
    agent.http_get("/metrics").1
}

/// The shortcut (on by default): a 4 MiB echo intact both ways (spliced), the app sees the
/// client pod's address, no TLS connection is opened on either side, and both reporters count the
/// connections as mutual TLS from the client's principal. HTTP is served at the destination too:
/// through the Service (source-side L7, then an in-process pipe) and to the pod's address
/// (detected at the destination from the client's socket).
#[test]
fn same_node_skips_tls_and_keeps_identity_and_telemetry() {
    let m = one_node("sn-on", &[], "");
    let (peer, local, _) = in_pod(&m.good, || whoami(m.echo))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.agent.log_tail()));
    assert_eq!(local, m.echo);
    assert_eq!(
        peer.ip(),
        IpAddr::from(m.good.ip4()),
        "the app sees the client pod's address"
    );
    let echo6 = SocketAddr::new(m.server.ip6().into(), 8080);
    let _srv6 = Server::start(&m.server, &[echo6], Mode::WhoamiEcho);
    let (peer6, _, _) = in_pod(&m.good, || whoami(echo6))
        .unwrap_or_else(|e| panic!("{echo6}: {e}\n{}", m.agent.log_tail()));
    assert_eq!(
        peer6.ip(),
        IpAddr::from(m.good.ip6()),
        "and its IPv6 address"
    );
    const TOTAL: u64 = 4 << 20;
    let (sent, got, n) = in_pod(&m.good, || echo_transfer(m.echo, TOTAL, None));
    assert_eq!((n, sent), (TOTAL, got), "4 MiB intact both ways");
    let seen = settled(|| m.srv.seen(), |s| s.len() == 2);
    assert_eq!(seen.len(), 2, "connections the app served");
    assert_eq!(seen[1].received, TOTAL);
    // Between the client's socket and the app's, the echo's bulk went kernel to kernel.
    let s = settled(
        || m.agent.fresh_status(),
        |s| counter(s, "proxy.bytes_spliced") > 0,
    );
    assert!(
        counter(&s, "proxy.bytes_spliced") > 0,
        "the 4 MiB echo was spliced: bytes_spliced {}, bytes_relayed {}",
        counter(&s, "proxy.bytes_spliced"),
        counter(&s, "proxy.bytes_relayed")
    );

    let by_service = in_pod(&m.good, || async {
        let conn = Conn::h1(SocketAddr::new(WEB_VIP.into(), 80)).await;
        conn.get("web", "/through-the-service", &[]).await.status
    });
    assert_eq!(by_service, 200, "HTTP through the Service");
    let by_pod = in_pod(&m.good, || async {
        let conn = Conn::h1(SocketAddr::new(m.server.ip4().into(), 9080)).await;
        conn.get("server", "/to-the-pod", &[]).await.status
    });
    assert_eq!(by_pod, 200, "HTTP to the pod's address");

    let s = settled(
        || m.agent.fresh_status(),
        |s| counter(s, "proxy.same_node_handoffs") == 5,
    );
    assert_eq!(
        counter(&s, "proxy.same_node_handoffs"),
        5,
        "3 echo connections (IPv4, IPv6), 1 HTTP connection through the Service, 1 to the pod"
    );
    assert_eq!(
        counter(&s, "proxy.hbone_inbound_accepted"),
        0,
        "no TLS accepted"
    );
    assert_eq!(counter(&s, "pool.connections_opened"), 0, "no TLS opened");
    assert_eq!(counter(&s, "pool.streams_opened"), 0, "no CONNECT sent");

    let tcp = |metrics: &str, reporter: &str| {
        metric(
            metrics,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", reporter),
                ("source_principal", GOOD),
                ("destination_workload", "server"),
                ("connection_security_policy", "mutual_tls"),
            ],
        )
    };
    let requests = |metrics: &str, reporter: &str| {
        metric(
            metrics,
            "istio_requests_total",
            &[
                ("reporter", reporter),
                ("source_principal", GOOD),
                ("destination_workload", "server"),
                ("response_code", "200"),
            ],
        )
    };
    let metrics = settled(
        || scrape(&m.agent),
        |t| tcp(t, "destination") >= 2 && requests(t, "destination") == 2,
    );
    assert!(
        tcp(&metrics, "destination") >= 2,
        "destination-reporter TCP connections from the client's principal, mutual TLS:\n{metrics}"
    );
    assert!(
        tcp(&metrics, "source") >= 2,
        "source-reporter TCP connections:\n{metrics}"
    );
    assert_eq!(
        requests(&metrics, "destination"),
        2,
        "both HTTP requests served at the destination:\n{metrics}"
    );

    // The access log has both ends of the first connection: the source's, and the
    // destination's from the client pod's address and principal, mutual TLS.
    let client = IpAddr::from(m.good.ip4());
    let from_client = |l: &serde_json::Value, reporter: &str| {
        l["reporter"] == reporter
            && l["protocol"] == "tcp"
            && l["source_principal"] == GOOD
            && l["connection_security_policy"] == "mutual_tls"
            && l["upstream_host"] == m.echo.to_string()
            && l["downstream_remote_address"]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .is_some_and(|a| a.ip() == client)
    };
    let lines = settled(
        || l7support::access_log(&m.log),
        |ls| ls.iter().any(|l| from_client(l, "destination")),
    );
    assert!(
        lines.iter().any(|l| from_client(l, "destination")),
        "the destination's line: {lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["reporter"] == "source" && l["source_principal"] == GOOD),
        "the source's line: {lines:#?}"
    );
}

const ALLOW_GOOD: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-good, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/mesh/sa/good]}
";

/// AuthorizationPolicy at the destination with the same-node client's identity: the principal
/// it allows gets through; another is refused (its connection reset, as a 401 over HBONE
/// leaves it) and the app never sees it. Still no TLS anywhere.
#[test]
fn same_node_client_is_authorized_by_its_principal() {
    let m = one_node("sn-policy", &[], ALLOW_GOOD);
    let (peer, _, _) = in_pod(&m.good, || whoami(m.echo))
        .unwrap_or_else(|e| panic!("the allowed principal: {e}\n{}", m.agent.log_tail()));
    assert_eq!(peer.ip(), IpAddr::from(m.good.ip4()));
    let count = settled(|| m.srv.count(), |c| *c == 1);
    assert_eq!(count, 1);

    let r = in_pod(&m.bad, || whoami(m.echo));
    assert!(r.is_err(), "sa/bad is not allowed: {r:?}");
    let s = m.agent.wait_for("denial counted", SETTLE, |s| {
        s["proxy"]["inbound_denied"] == 1 && s["proxy"]["outbound_hbone_failed"] == 1
    });
    // The denial is decided before the app is dialled, and it is counted: nothing of that
    // connection can reach the app after this point.
    assert_eq!(m.srv.count(), 1, "a denied connection reached the app");
    assert_eq!(counter(&s, "proxy.same_node_handoffs"), 2);
    assert_eq!(counter(&s, "proxy.hbone_inbound_accepted"), 0);
    assert_eq!(counter(&s, "pool.connections_opened"), 0);

    // Through the Service (source-side L7): the refused connection is the client proxy's, and
    // the app's request gets the 503 a refused tunnel gives, after Istio's default retries
    // (2) were refused as well: 3 more denials.
    let web = SocketAddr::new(WEB_VIP.into(), 80);
    let status = |pod: &Pod| {
        in_pod(pod, || async {
            let conn = Conn::h1(web).await;
            conn.get("web", "/", &[]).await.status
        })
    };
    assert_eq!(status(&m.good), 200, "the allowed principal");
    assert_eq!(status(&m.bad), 503, "a denied principal");
    m.agent
        .wait_for("the request's denials counted", SETTLE, |s| {
            s["proxy"]["inbound_denied"] == 4 && s["proxy"]["http_retries_exhausted"] == 1
        });
    let metrics = settled(
        || scrape(&m.agent),
        |t| {
            metric(
                t,
                "ambit_policy_denials_total",
                &[("workload", "mesh/server")],
            ) == 4
        },
    );
    assert_eq!(
        metric(
            &metrics,
            "ambit_policy_denials_total",
            &[("policy", "mesh/allow-good"), ("workload", "mesh/server")]
        ),
        4,
        "the denial is the policy's:\n{metrics}"
    );
}

/// `--same-node-shortcut=false`: the same connection goes over HBONE through the node's own
/// network (the app still sees the client pod).
#[test]
fn same_node_shortcut_off_goes_over_hbone() {
    let m = one_node("sn-off", &["--same-node-shortcut=false"], "");
    let (peer, _, _) = in_pod(&m.good, || whoami(m.echo))
        .unwrap_or_else(|e| panic!("{e}\n{}", m.agent.log_tail()));
    assert_eq!(peer.ip(), IpAddr::from(m.good.ip4()));
    // Both counters asserted are waited for: the client counts its pooled connection only after
    // the HTTP/2 handshake, which may be after the server counted the accept.
    let s = m.agent.wait_for("over HBONE", SETTLE, |s| {
        s["proxy"]["hbone_inbound_accepted"].as_u64() >= Some(1)
            && counter(s, "pool.connections_opened") >= 1
    });
    assert!(counter(&s, "pool.connections_opened") >= 1);
    assert_eq!(counter(&s, "proxy.same_node_handoffs"), 0);
    let _ = (&m.bad, &m.server);
}

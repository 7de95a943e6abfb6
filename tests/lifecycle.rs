//! Enrolment lifecycle on real namespaces: unenrol restores direct traffic and leaves nothing
//! behind; an agent crash fails closed; a restarted agent adopts its pins without attaching twice;
//! uninstall removes everything; two agents serve two nodes; a bad object is reported in the
//! status and as a metric.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit::harness::{ClusterYaml, LocalAgent, World};
use support::{
    ambit_bin, attached_links, in_pod, our_map_ids, proxy_listeners, settled, settled_status,
    wait_until, whoami, Mode, Server, SETTLE,
};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Opens a blocking connection from inside a pod (the socket stays in that netns), reading the
/// whoami line. Returns the stream and the peer the server saw.
fn open(pod: &ambit::harness::Pod, dst: SocketAddr) -> (TcpStream, SocketAddr) {
    let s = pod
        .run(move || TcpStream::connect_timeout(&dst, SETTLE))
        .expect("connect");
    s.set_read_timeout(Some(SETTLE)).expect("timeout");
    let mut line = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("whoami line");
    let peer = line
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("peer in whoami");
    (s, peer)
}

fn echo_works(s: &mut TcpStream, what: &str) {
    s.write_all(b"ping")
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: read: {e}"));
    assert_eq!(&buf, b"ping", "{what}");
}

fn map_sizes(status: &serde_json::Value) -> BTreeMap<String, u64> {
    status["maps"]
        .as_object()
        .expect("maps in status")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(u64::MAX)))
        .collect()
}

#[test]
fn unenrol_restores_direct_traffic_and_leaves_no_residue() {
    let world = World::new("life-unenrol");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let echo = sa(server.ip4(), 8080);
    let _srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    let enrolled = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let unlabelled = ClusterYaml::new().plain("mesh").pods([&client, &server]);
    enrolled.write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);

    // A connection established while enrolled goes through both proxies (the app sees the
    // client's address, as Istio's data plane delivers it).
    let (mut through_proxy, peer) = open(&client, echo);
    assert_eq!(
        peer.ip(),
        IpAddr::from(client.ip4()),
        "the app sees the client"
    );
    agent.wait_for("captured connection", SETTLE, |s| {
        s["proxy"]["outbound_accepted"] == 1 && s["proxy"]["hbone_inbound_streams"] == 1
    });
    let captured_before = agent.counter("proxy.outbound_accepted");

    // Live enrolment latency (printed, not asserted: machines are shared and noisy). The test agent
    // polls every 50 ms; the default is 200 ms.
    let t = std::time::Instant::now();
    unlabelled.write(&agent.config_dir());
    agent.wait_enrolled(&[]);
    eprintln!(
        "measured: namespace label removed -> pods unenrolled in {:?}",
        t.elapsed()
    );
    // The map sizes in a status are recounted apart from its pod list (at most once a second),
    // so the status that first shows no pods may hold older sizes: wait for sizes that show
    // the unenrolment, then assert on them.
    let status = settled_status(&agent, |s| no_residue(s, 2));
    let sizes = map_sizes(&status);
    // The fast path holds only sockets of connections still open (at most the proxied one kept
    // open here: its two loopback ends); each leaves with its socket, checked at the end.
    assert!(
        sizes["AMBIT_FAST_PATH"] <= 2,
        "fast path holds more than the open connection: {sizes:?}"
    );
    for (map, n) in &sizes {
        if map != "AMBIT_EXEMPT_SRC" && map != "AMBIT_FAST_PATH" {
            assert_eq!(
                *n, 0,
                "map {map} must be empty after unenrolment: {sizes:?}"
            );
        }
    }
    assert_eq!(
        status["netns_links"],
        serde_json::json!([]),
        "no sk_lookup link may remain"
    );
    let netns_pins = std::fs::read_dir(agent.bpffs().join(ambit_common::PIN_ABI).join("netns"))
        .expect("netns pin dir")
        .count();
    assert_eq!(netns_pins, 0, "no sk_lookup pin may remain");
    for pod in [&client, &server] {
        // Unenrolment aborts the accept tasks; each listener closes when the data-plane runtime
        // drops its task, shortly after the status already shows the pod gone.
        let left = settled(|| proxy_listeners(pod), BTreeMap::is_empty);
        assert!(
            left.is_empty(),
            "listeners left in {}: {left:?}",
            pod.name()
        );
    }

    // Direct traffic again: the server sees the client itself, and the proxy saw nothing.
    let (mut direct, peer) = open(&client, echo);
    assert_eq!(
        peer.ip(),
        IpAddr::from(client.ip4()),
        "unenrolled traffic must be direct"
    );
    assert_eq!(agent.counter("proxy.outbound_accepted"), captured_before);
    echo_works(
        &mut through_proxy,
        "connection established before unenrolment",
    );

    // Re-enrol: captured again, and both earlier connections still work.
    let t = std::time::Instant::now();
    enrolled.write(&agent.config_dir());
    agent.wait_enrolled(&[&client, &server]);
    eprintln!(
        "measured: namespace label added -> pods enrolled in {:?}",
        t.elapsed()
    );
    let (_, peer) = open(&client, echo);
    assert_eq!(
        peer.ip(),
        IpAddr::from(client.ip4()),
        "the app sees the client (server {})\n{}",
        server.ip4(),
        agent.log_tail()
    );
    agent.wait_for("captured again after re-enrolment", SETTLE, |s| {
        s["proxy"]["hbone_inbound_streams"] == 2
    });
    assert_eq!(
        agent.counter("proxy.outbound_accepted"),
        captured_before + 1
    );
    echo_works(
        &mut direct,
        "direct connection established before re-enrolment",
    );
    echo_works(
        &mut through_proxy,
        "proxied connection across unenrol and re-enrol",
    );

    // Once every connection is closed and the pods are unenrolled, nothing at all remains.
    drop((through_proxy, direct));
    unlabelled.write(&agent.config_dir());
    agent.wait_enrolled(&[]);
    let status = settled_status(&agent, |s| no_residue(s, 0));
    let sizes = map_sizes(&status);
    assert!(
        sizes
            .iter()
            .all(|(m, n)| m == "AMBIT_EXEMPT_SRC" || *n == 0),
        "every socket gone from the maps: {sizes:?}"
    );
    assert_eq!(status["netns_links"], serde_json::json!([]));
}

/// No pod enrolled, every map but the exempt sources empty (the fast path holding at most
/// `fast_path` sockets of connections still open), and no sk_lookup link.
fn no_residue(status: &serde_json::Value, fast_path: u64) -> bool {
    status["pods"].as_array().is_some_and(Vec::is_empty)
        && status["netns_links"] == serde_json::json!([])
        && status["maps"].is_object()
        && map_sizes(status).iter().all(|(m, n)| match m.as_str() {
            "AMBIT_EXEMPT_SRC" => true,
            "AMBIT_FAST_PATH" => *n <= fast_path,
            _ => *n == 0,
        })
}

#[test]
fn agent_crash_fails_closed_and_restart_adopts_the_pins() {
    let world = World::new("life-restart");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let echo = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &server, &outsider])
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);
    in_pod(&client, || whoami(echo)).expect("captured traffic works");
    let maps = our_map_ids(agent.bpffs());
    let expected: BTreeMap<String, usize> =
        [("cgroup".to_string(), 7), ("netns".to_string(), 2)].into();
    assert_eq!(
        attached_links(&maps),
        expected,
        "6 sock_addr + sockops on the cgroup, sk_lookup per pod"
    );

    // A client keeps connecting across the crash and the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let hammer = {
        let (client, stop, ok, refused) =
            (client.clone(), stop.clone(), ok.clone(), refused.clone());
        std::thread::spawn(move || {
            client.run(move || {
                while !stop.load(Ordering::Relaxed) {
                    match TcpStream::connect_timeout(&echo, Duration::from_secs(2)) {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        // A connect slower than its timeout on a busy machine proves nothing.
                        Err(_) => {}
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
    };
    wait_until("the client connected through the agent", || {
        ok.load(Ordering::Relaxed) > 0
    });

    agent.kill();
    // Connections the kill cut are recorded by the app as they close, which may be at any time
    // from now on; they all came from the inbound proxy (its mark on the app's socket). With the
    // agent down nothing else may reach the app, so anything else recorded from here on went
    // around it.
    let served = srv.count();
    // During the gap: every new connection is refused, outbound and inbound; none reaches the app.
    for i in 0..50 {
        let r = in_pod(&client, || whoami(echo));
        assert!(
            r.is_err(),
            "outbound connection {i} bypassed the dead proxy: {r:?}"
        );
        let r = in_pod(&outsider, || whoami(echo));
        assert!(
            r.is_err(),
            "inbound connection {i} bypassed the dead proxy: {r:?}"
        );
    }
    let e = client
        .run(move || TcpStream::connect_timeout(&echo, Duration::from_secs(2)))
        .expect_err("refused");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "fail closed means refused: {e:?}"
    );
    wait_until("the client was refused during the gap", || {
        refused.load(Ordering::Relaxed) > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    let around: Vec<_> = srv.seen()[served..]
        .iter()
        .filter(|s| s.mark != ambit_common::TRANSPARENT_MARK)
        .cloned()
        .collect();
    assert!(
        around.is_empty(),
        "nothing may reach the app while the agent is down: {around:?}"
    );
    assert_eq!(
        attached_links(&maps),
        expected,
        "capture stays attached while the agent is down"
    );
    let ok_in_gap = ok.load(Ordering::Relaxed);

    // Restart: adopts the pins, serves again, and attaches nothing twice.
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);
    let (peer, local, _) = in_pod(&client, || whoami(echo))
        .unwrap_or_else(|e| panic!("after restart: {e}\n{}", agent.log_tail()));
    assert_eq!(
        (peer.ip(), local),
        (IpAddr::from(client.ip4()), echo),
        "served again, the app seeing the client"
    );
    // Recorded as the connection closes.
    let last = settled(
        || srv.seen().into_iter().find(|s| s.peer == peer),
        Option::is_some,
    )
    .expect("recorded");
    assert_eq!(
        last.mark,
        ambit_common::TRANSPARENT_MARK,
        "through the proxies again"
    );
    in_pod(&outsider, || whoami(echo)).expect("inbound after restart");
    assert_eq!(
        our_map_ids(agent.bpffs()),
        maps,
        "the restarted agent reuses the pinned maps"
    );
    assert_eq!(
        attached_links(&maps),
        expected,
        "no program attached twice after restart"
    );
    wait_until("the client connected again after the restart", || {
        ok.load(Ordering::Relaxed) > ok_in_gap
    });
    stop.store(true, Ordering::Relaxed);
    hammer.join().expect("hammer");
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    assert!(ok > 0 && refused > 0, "the client connected before/after and was refused during the gap: ok={ok} refused={refused}");
    // Every connection the app ever saw came through the inbound proxy (its mark on the app's
    // socket), never straight from the client around the mesh.
    std::thread::sleep(Duration::from_millis(200));
    let bypassed: Vec<_> = srv
        .seen()
        .into_iter()
        .filter(|s| s.mark != ambit_common::TRANSPARENT_MARK)
        .collect();
    assert!(
        bypassed.is_empty(),
        "connections reached the app around the proxy: {bypassed:?}"
    );

    // Uninstall: everything goes, and traffic is direct.
    agent.stop();
    let out = std::process::Command::new(ambit_bin())
        .args(["uninstall", "--bpffs"])
        .arg(agent.bpffs())
        .output()
        .expect("ambit uninstall");
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.bpffs().exists(), "pins removed");
    assert_eq!(
        attached_links(&maps),
        BTreeMap::new(),
        "no program left attached"
    );
    let (peer, _, _) = in_pod(&client, || whoami(echo)).expect("direct after uninstall");
    assert_eq!(peer.ip(), IpAddr::from(client.ip4()));
}

#[test]
fn two_agents_serve_two_nodes() {
    let world = World::new("life-2nodes");
    let n1 = world.node("n1");
    let n2 = world.node("n2");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let dsts = [sa(server.ip4(), 8080), sa(server.ip6(), 8080)];
    let _srv = Server::start(&server, &dsts, Mode::WhoamiEcho);
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let mut a1 = LocalAgent::new(&world, &n1, &ambit_bin());
    let mut a2 = LocalAgent::new(&world, &n2, &ambit_bin());
    yaml.write(&a1.config_dir());
    yaml.write(&a2.config_dir());
    a1.start(&world);
    a2.start(&world);
    a1.wait_enrolled(&[&client]);
    a2.wait_enrolled(&[&server]);
    for dst in dsts {
        let (peer, local, our_peer) =
            in_pod(&client, || whoami(dst)).unwrap_or_else(|e| panic!("{dst}: {e}"));
        assert_eq!((local, our_peer), (dst, dst));
        assert!(
            peer.ip() == IpAddr::from(client.ip4()) || peer.ip() == IpAddr::from(client.ip6()),
            "the app on n2 sees the client: {peer}"
        );
    }
    // Both pods are in the mesh: node 1 tunnels over HBONE, node 2 terminates it (no plaintext
    // inbound).
    a1.wait_for("node 1 outbound over HBONE", SETTLE, |s| {
        s["proxy"]["outbound_accepted"] == 2 && s["proxy"]["outbound_hbone"] == 2
    });
    a2.wait_for("node 2 HBONE inbound", SETTLE, |s| {
        s["proxy"]["hbone_inbound_streams"] == 2
    });
    assert_eq!(a2.counter("proxy.inbound_accepted"), 0);
    assert_eq!(a1.counter("proxy.inbound_accepted"), 0);
    assert_eq!(a2.counter("proxy.outbound_accepted"), 0);
}

#[test]
fn a_bad_object_is_reported_by_the_running_agent_and_the_rest_applies() {
    let world = World::new("life-badcfg");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .pod(&client)
        .write(&agent.config_dir());
    std::fs::write(
        agent.config_dir().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: mesh}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 0}]}\n",
    )
    .expect("write broken object");
    agent.start(&world);
    agent.wait_enrolled(&[&client]);
    // Readiness (and with it the metrics below, which the agent sets before it writes each
    // status) is reported apart from enrolment: wait for it rather than assume one tick gives both.
    let status = agent.wait_for("the agent ready", SETTLE, |s| s["ready"] == true);
    let errors: Vec<String> = status["config_errors"]
        .as_array()
        .expect("config_errors")
        .iter()
        .filter_map(|e| e.as_str().map(String::from))
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("broken.yaml")
            && e.contains("Service mesh/bad")
            && e.contains("spec.ports[0].port")),
        "the agent reports the object, its file and its field: {errors:?}"
    );
    assert!(
        status["config_rejected_total"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );

    // The same rejection as a metric, scraped where Prometheus would: the node's netns.
    let series = "ambit_config_rejected_objects{kind=\"Service\",namespace=\"mesh\",name=\"bad\",field=\"spec.ports[0].port\"} 1";
    let (ready, _) = http_get(&n1, "/healthz/ready");
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "ready once enrolled:\n{ready}"
    );
    let (head, metrics) = http_get(&n1, "/metrics");
    assert!(
        head.contains("application/openmetrics-text"),
        "content type:\n{head}"
    );
    assert!(
        metrics.lines().any(|l| l == series),
        "no `{series}`:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ambit_config_rejections_total ") && !l.ends_with(" 0")),
        "rejection counter:\n{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "ambit_enrolled_pods 1"),
        "enrolled pods:\n{metrics}"
    );

    // Fixed: the series goes (the status and the metrics are updated in the same tick).
    std::fs::write(
        agent.config_dir().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: mesh}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 80}]}\n",
    )
    .expect("fix the object");
    agent.wait_for("the fixed object accepted", SETTLE, |s| {
        s["config_errors"].as_array().is_some_and(Vec::is_empty)
    });
    let (_, metrics) = http_get(&n1, "/metrics");
    assert!(
        !metrics.contains("ambit_config_rejected_objects{"),
        "the series must go once the object is fixed:\n{metrics}"
    );
}

/// GET on the agent's admin port from inside the node's netns; returns (head, body).
fn http_get(node: &ambit::harness::Node, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let raw = node.run(move || {
        let addr = sa([127, 0, 0, 1], 15020);
        let mut s = TcpStream::connect_timeout(&addr, SETTLE)
            .unwrap_or_else(|e| panic!("connect to the admin port {addr}: {e}"));
        s.set_read_timeout(Some(SETTLE)).expect("timeout");
        s.write_all(request.as_bytes()).expect("write request");
        let mut out = String::new();
        s.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        out
    });
    match raw.split_once("\r\n\r\n") {
        Some((head, body)) => (head.to_string(), body.to_string()),
        None => panic!("no HTTP response for {path}: {raw:?}"),
    }
}

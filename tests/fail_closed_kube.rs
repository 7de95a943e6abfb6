//! Fail closed through every gap (issue 9), with the agent in `--kube` mode against a fake API
//! server (`harness::FakeKube`, real HTTP on the node's loopback) and pods found under /proc by
//! UID through their sandbox processes: a restart while the API server is down, policies whose
//! discovery fails, a sandbox that starts late, a watch that expires across an API-server restart,
//! and a graceful pod delete.

mod support;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, FakeKube, LocalAgent, Node, World};
use support::{
    ambit_bin, attached_links, cgroup_attach_spec, in_pod, our_map_ids, whoami, Mode, Server,
};

/// Ceiling for waits: generous, because other jobs may hold both cores; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A fake API server on `node`'s loopback holding `yaml`, and an agent for `node` watching it.
fn kube_agent(world: &World, node: &Node, yaml: &ClusterYaml) -> (FakeKube, LocalAgent) {
    let fake = FakeKube::start(Some(node.netns_path()));
    fake.apply_yaml(&yaml.render())
        .unwrap_or_else(|e| panic!("seeding the fake API server: {e}"));
    let agent = LocalAgent::new(world, node, &ambit_bin());
    let kubeconfig = agent.config_dir().join("kubeconfig");
    fake.kubeconfig(&kubeconfig)
        .unwrap_or_else(|e| panic!("kubeconfig: {e}"));
    (fake, agent.kube(&kubeconfig))
}

fn log_since(agent: &LocalAgent, from: usize) -> Vec<String> {
    let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn log_len(agent: &LocalAgent) -> usize {
    std::fs::metadata(agent.log_path()).map_or(0, |m| m.len() as usize)
}

/// The value of one series in a scrape, e.g. `ambit_kube_relists_total{kind="Pod"}`.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_restart_while_the_api_server_is_down_keeps_adopted_pods_closed_and_does_not_flap() {
    let world = World::new("fck-down");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let _sandboxes = [client.start_sandbox(), server.start_sandbox()];
    let echo = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let (fake, mut agent) = kube_agent(&world, &n1, &yaml);
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);
    // Pods are enrolled once Pods and Namespaces are listed; outbound traffic flows once every
    // kind is (until then it fails closed): wait for that before using it.
    agent.wait_for("ready (every kind listed)", PATIENCE, |s| {
        s["ready"] == true
    });
    in_pod(&client, || whoami(echo)).expect("captured traffic works");
    let maps = our_map_ids(agent.bpffs());
    let links = attached_links(&maps);

    // The agent dies; when it comes back, the API server refuses connections.
    agent.kill();
    fake.down();
    let mark = log_len(&agent);
    agent.start(&world);
    agent.wait_for("not ready, the API unreachable", PATIENCE, |s| {
        s["ready"] == false
            && s["readiness"]
                .as_str()
                .is_some_and(|r| r.contains("Pod") && r.contains("failing"))
    });
    let (head, body) = agent.http_get("/healthz/ready");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}\n{body}");
    assert!(body.contains("Pod"), "{body}");

    let served = srv.count();
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let e = client
            .run(move || TcpStream::connect_timeout(&echo, Duration::from_secs(2)))
            .expect_err("an adopted pod must not connect around the mesh");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e:?}");
        assert_eq!(attached_links(&maps), links, "capture stays attached");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(srv.count(), served, "nothing reached the app");
    let status = agent.fresh_status();
    assert_eq!(status["pods"], serde_json::json!([]));
    assert_eq!(
        status["maps"]["AMBIT_ENROLLED"], 2,
        "nothing pruned: {status}"
    );
    let (_, metrics) = agent.http_get("/metrics");
    assert!(
        series(&metrics, "ambit_kube_watch_errors_total{kind=\"Pod\"}").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, "ambit_config_synced{kind=\"Pod\"}"),
        Some(0.0)
    );
    // One WARN for the Pod watch's failure streak, however many retries it took.
    let warns = log_since(&agent, mark)
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("kind=Pod") && l.contains("watch error"))
        .count();
    assert_eq!(warns, 1, "{}", agent.log_tail());

    fake.up();
    agent.wait_enrolled(&[&client, &server]);
    agent.wait_for("ready", PATIENCE, |s| s["ready"] == true);
    let streams = agent.counter("proxy.hbone_inbound_streams");
    let (peer, local, _) = in_pod(&client, || whoami(echo))
        .unwrap_or_else(|e| panic!("after the API returned: {e}\n{}", agent.log_tail()));
    assert_eq!((peer.ip(), local), (IpAddr::from(client.ip4()), echo));
    agent.wait_for("through the proxies", PATIENCE, |s| {
        s["proxy"]["hbone_inbound_streams"].as_u64() > Some(streams)
    });
    assert_eq!(attached_links(&maps), links, "no link replaced or added");
    let log = log_since(&agent, mark);
    let flaps: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("unenrolled") || l.contains("removing capture state"))
        .collect();
    assert!(flaps.is_empty(), "no unenrol/re-enrol: {flaps:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("kind=Pod") && l.contains("watch recovered")),
        "the streak's end is logged: {}",
        agent.log_tail()
    );
}

#[test]
fn while_policies_cannot_be_listed_every_client_is_refused_then_policy_applies() {
    let world = World::new("fck-authz");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let good = world
        .pod("good")
        .node(&n1)
        .namespace("mesh")
        .sa("good")
        .spawn();
    let bad = world
        .pod("bad")
        .node(&n1)
        .namespace("mesh")
        .sa("bad")
        .spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let _sandboxes = [
        good.start_sandbox(),
        bad.start_sandbox(),
        server.start_sandbox(),
    ];
    let echo = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .pods([&good, &bad, &server]);
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-good, namespace: mesh}\nspec:\n  action: ALLOW\n  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/good]}}]}]\n";
    // Node 1 sees everything; node 2 (the server's) cannot discover AuthorizationPolicy.
    let (fake1, mut a1) = kube_agent(&world, &n1, &yaml);
    let (fake2, mut a2) = kube_agent(&world, &n2, &yaml);
    for fake in [&fake1, &fake2] {
        fake.apply_yaml(policy).expect("policy");
    }
    fake2
        .fail_discovery("security.istio.io/v1", true)
        .expect("break discovery");
    a1.start(&world);
    a2.start(&world);
    a1.wait_enrolled(&[&bad, &good]);
    a1.wait_for("node 1 ready", PATIENCE, |s| s["ready"] == true);
    // Pods and namespaces are known on node 2, so the server is enrolled; its policies are not.
    let status = a2.wait_enrolled(&[&server]);
    assert_eq!(status["ready"], false, "{status}");
    a2.wait_for("node 2 says why", PATIENCE, |s| {
        s["readiness"]
            .as_str()
            .is_some_and(|r| r.contains("AuthorizationPolicy") && r.contains("discovery_failed"))
    });

    // Fail closed: the client the policy would allow is refused too, and the app sees nobody.
    for client in [&good, &bad] {
        let r = in_pod(client, || whoami(echo));
        assert!(r.is_err(), "{} got through: {r:?}", client.name());
    }
    assert_eq!(srv.count(), 0, "nothing reached the app");
    let (_, metrics) = a2.http_get("/metrics");
    assert!(
        metrics.contains("ambit_policy_denials_total{policy=\"(policies not listed yet)\",workload=\"mesh/server\"}"),
        "{metrics}"
    );

    // Discovery works again: the policy is listed, and applies.
    fake2
        .fail_discovery("security.istio.io/v1", false)
        .expect("repair discovery");
    a2.wait_for("node 2 ready", PATIENCE, |s| s["ready"] == true);
    let streams = a2.counter("proxy.hbone_inbound_streams");
    let (peer, _, _) = in_pod(&good, || whoami(echo))
        .unwrap_or_else(|e| panic!("the allowed client: {e}\n{}", a2.log_tail()));
    assert_eq!(
        peer.ip(),
        IpAddr::from(good.ip4()),
        "the app sees the client"
    );
    a2.wait_for("through the proxies", PATIENCE, |s| {
        s["proxy"]["hbone_inbound_streams"].as_u64() > Some(streams)
    });
    assert!(
        in_pod(&bad, || whoami(echo)).is_err(),
        "the denied client stays refused"
    );
    // The app records a connection when it has ended: wait for the allowed one's record.
    support::wait_until("the app records the allowed connection", || {
        srv.count() >= 1
    });
    assert_eq!(
        srv.count(),
        1,
        "only the allowed connection reached the app"
    );
}

#[test]
fn a_pod_whose_sandbox_starts_late_is_enrolled_without_an_api_change() {
    let world = World::new("fck-late");
    let n1 = world.node("n1");
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    // The agent runs as the DaemonSet runs it: in a netns of its own (here the test's), the node's
    // addresses read through --node-netns, the API server on its own loopback.
    let fake = FakeKube::start(None);
    fake.apply_yaml(&ClusterYaml::new().ambient("mesh").pod(&server).render())
        .expect("seed");
    let agent = LocalAgent::new(&world, &n1, &ambit_bin());
    let kubeconfig = agent.config_dir().join("kubeconfig");
    fake.kubeconfig(&kubeconfig).expect("kubeconfig");
    let mut agent = agent.kube(&kubeconfig).in_root_netns();
    agent.start(&world);
    let status = agent.wait_for("the pod waiting for its sandbox", PATIENCE, |s| {
        s["config_errors"]
            .to_string()
            .contains("Pod mesh/server: cannot enrol: no process of pod uid")
    });
    assert_eq!(status["pods"], serde_json::json!([]));
    // The first lists of every kind must be done before counting: a list still in flight would
    // otherwise look like a late re-list.
    agent.wait_for("every kind listed", PATIENCE, |s| {
        s["synced"].as_array().map_or(0, Vec::len) == ambit::config::Kind::ALL.len()
    });
    let requests = fake.requests().len();

    std::thread::sleep(Duration::from_secs(3));
    let _sandbox = server.start_sandbox();
    let started = Instant::now();
    agent.wait_enrolled(&[&server]);
    eprintln!(
        "measured: sandbox started -> pod enrolled in {:?} (issue 9 asks for under 1 s)",
        started.elapsed()
    );
    // Nothing changed on the API server meanwhile: no list or watch brought it.
    let late: Vec<String> = fake.requests()[requests..]
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .cloned()
        .collect();
    assert!(late.is_empty(), "no re-list was needed: {late:?}");
}

#[test]
fn after_an_api_server_restart_watches_relist_at_once_and_a_change_arrives_promptly() {
    let world = World::new("fck-410");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let late = world.pod("late").node(&n1).namespace("later").spawn();
    let _sandboxes = [client.start_sandbox(), late.start_sandbox()];
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("later")
        .pods([&client, &late]);
    let (fake, mut agent) = kube_agent(&world, &n1, &yaml);
    agent.start(&world);
    agent.wait_enrolled(&[&client]);
    agent.wait_for("ready", PATIENCE, |s| s["ready"] == true);
    let mark = log_len(&agent);

    // The API server restarts with a new watch cache (something changed while it was down, and
    // its history is gone): every resumed watch gets 410 Expired and must list again.
    fake.down();
    fake.apply_yaml(
        &ClusterYaml::new()
            .ambient("mesh")
            .plain("later")
            .plain("other")
            .render(),
    )
    .expect("a change while down");
    fake.compact();
    fake.up();
    let restarted = Instant::now();
    // The moment it is back, a namespace is labelled ambient.
    fake.apply_yaml(&ClusterYaml::new().ambient("later").render())
        .expect("label the namespace");
    agent.wait_enrolled(&[&client, &late]);
    eprintln!(
        "measured: API server restarted, namespace labelled -> pod enrolled in {:?}",
        restarted.elapsed()
    );
    let status = agent.wait_for("the Namespace relisted", PATIENCE, |s| {
        s["kube"]["Namespace"]["relists"].as_u64().unwrap_or(0) >= 1
    });
    assert!(status["ready"] == true, "{status}");
    let log = log_since(&agent, mark);
    assert!(
        log.iter()
            .any(|l| l.contains("resource version expired; listing again")),
        "the 410 path was taken: {}",
        agent.log_tail()
    );
    let flaps: Vec<&String> = log.iter().filter(|l| l.contains("unenrolled")).collect();
    assert!(flaps.is_empty(), "a relist unenrols nothing: {flaps:#?}");
}

#[test]
fn a_gracefully_deleted_pod_stays_enrolled_until_its_sandbox_exits() {
    let world = World::new("fck-term");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let _client_sandbox = client.start_sandbox();
    let server_sandbox = server.start_sandbox();
    let echo = sa(server.ip4(), 8080);
    let _srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let (fake, mut agent) = kube_agent(&world, &n1, &yaml);
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);

    let generation = agent.fresh_status()["generation"].as_u64().unwrap_or(0);
    fake.set_deleting("Pod", "mesh", "server")
        .expect("graceful delete");
    agent.wait_for("the deletion seen and rechecked", PATIENCE, |s| {
        s["generation"].as_u64().unwrap_or(0) > generation + 2
    });
    let pods = agent.fresh_status()["pods"].to_string();
    assert!(pods.contains("mesh/server"), "still enrolled: {pods}");
    let streams = agent.counter("proxy.hbone_inbound_streams");
    let (peer, _, _) = in_pod(&client, || whoami(echo)).expect("traffic during shutdown");
    assert_eq!(
        peer.ip(),
        IpAddr::from(client.ip4()),
        "the app sees the client"
    );
    agent.wait_for("still meshed", PATIENCE, |s| {
        s["proxy"]["hbone_inbound_streams"].as_u64() > Some(streams)
    });

    // The containers exit: no process of the pod is left.
    server_sandbox.kill();
    let _ = server_sandbox.wait_timeout(Duration::from_secs(5));
    agent.wait_enrolled(&[&client]);
}

/// The capture programs attach to one cgroup (`--cgroup-attach`, by default the kubelet's
/// `kubepods`). A pod whose cgroup is elsewhere would be enrolled and never captured: its
/// connections would bypass the mesh. Here n1's agent attaches to n2's node cgroup, so n1's pod is
/// outside it: the agent refuses the pod and says why. Attached at n1's own cgroup, it enrols it.
#[test]
fn a_pod_outside_the_capture_cgroup_is_refused_rather_than_enrolled_uncaptured() {
    let world = World::new("fck-cgroup");
    let n1 = world.node("n1");
    let n2 = world.node("n2");
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let _sandbox = server.start_sandbox();
    let (_fake, mut agent) = kube_agent(
        &world,
        &n1,
        &ClusterYaml::new().ambient("mesh").pod(&server),
    );
    agent.set_cgroup_attach(&cgroup_attach_spec(&world, &n2));
    agent.start(&world);
    let status = agent.wait_for("the pod refused, with the reason", PATIENCE, |s| {
        s["config_errors"]
            .to_string()
            .contains("Pod mesh/server: cannot enrol: pod uid")
    });
    let errors = status["config_errors"].to_string();
    assert!(
        errors.contains("where the capture programs attach (--cgroup-attach)")
            && errors.contains(&cgroup_attach_spec(&world, &n2)),
        "{errors}"
    );
    assert_eq!(
        status["pods"],
        serde_json::json!([]),
        "nothing enrolled uncaptured"
    );

    agent.stop();
    agent.set_cgroup_attach(&cgroup_attach_spec(&world, &n1));
    agent.start(&world);
    agent.wait_enrolled(&[&server]);
}

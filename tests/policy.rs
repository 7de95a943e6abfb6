//! Security policy at the destination, end to end: two agents (two nodes), real capture, real
//! HBONE. Each test names the acceptance item of issue 5 it checks.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, Node, Pod, World};
use ambit::identity::Identity;
use support::{ambit_bin, hbone_client, in_pod, settled, whoami, Mode, Server, SETTLE};

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

struct Mesh {
    _world: World,
    n2: Node,
    good: Pod,
    bad: Pod,
    outsider: Pod,
    server: Pod,
    app: SocketAddr,
    srv: Server,
    a1: LocalAgent,
    a2: LocalAgent,
}

/// Clients `good` (sa good) and `bad` (sa bad) in the mesh on node 1, `outsider` outside the mesh
/// on node 1, and the server (`app=server`) on node 2; `policies` is written next to the cluster.
fn mesh(test: &str, policies: &str) -> Mesh {
    let world = World::new(test);
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
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let server = world
        .pod("server")
        .node(&n2)
        .namespace("mesh")
        .label("app", "server")
        .spawn();
    let app = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[app], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&good, &bad, &outsider, &server]);
    let mut a1 = LocalAgent::new(&world, &n1, &ambit_bin());
    let mut a2 = LocalAgent::new(&world, &n2, &ambit_bin());
    for a in [&a1, &a2] {
        yaml.write(&a.config_dir());
        write_policies(a, policies);
    }
    a1.start(&world);
    a2.start(&world);
    a1.wait_enrolled(&[&good, &bad]);
    a2.wait_enrolled(&[&server]);
    Mesh {
        _world: world,
        n2,
        good,
        bad,
        outsider,
        server,
        app,
        srv,
        a1,
        a2,
    }
}

fn write_policies(agent: &LocalAgent, yaml: &str) {
    let dir = agent.config_dir();
    let tmp = dir.join(".policies.tmp");
    std::fs::write(&tmp, yaml).expect("write policies");
    std::fs::rename(&tmp, dir.join("policies.yaml")).expect("rename policies");
}

/// Waits until the server has recorded `n` finished connections (it records at close).
fn served(m: &Mesh, n: usize) {
    let count = settled(|| m.srv.count(), |c| *c >= n);
    assert_eq!(count, n, "connections the app served");
}

/// The app sees nothing more than `n` connections after a short settle.
fn app_saw_only(m: &Mesh, n: usize) {
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(m.srv.count(), n, "a denied connection reached the app");
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

/// Acceptance 3: an allowed identity gets through; a denied one gets 401 on HBONE and the app
/// never sees the connection; denials are counted by policy.
#[test]
fn allow_policy_admits_one_identity_and_denies_others_with_401() {
    let m = mesh("pol-allow", ALLOW_GOOD);
    let (_, local, _) = in_pod(&m.good, || whoami(m.app)).expect("the allowed identity connects");
    assert_eq!(local, m.app);
    served(&m, 1);

    let r = in_pod(&m.bad, || whoami(m.app));
    assert!(r.is_err(), "sa/bad is not allowed: {r:?}");
    app_saw_only(&m, 1);
    m.a1.wait_for("client saw the refusal", SETTLE, |s| {
        s["proxy"]["outbound_hbone_failed"] == 1
    });
    m.a2.wait_for("denial counted", SETTLE, |s| {
        s["proxy"]["inbound_denied"] == 1
    });

    // The status code itself, from an HBONE client of our CA with another identity.
    let ca = m.a1.ca_dir();
    let tester = Identity::new("cluster.local", "plain", "tester");
    let server_id = Identity::new("cluster.local", "mesh", "default");
    let hbone = sa(m.server.ip4(), 15008);
    let status = in_pod(&m.outsider, || async {
        let mut c = hbone_client(&ca, &tester, hbone, &server_id)
            .await
            .unwrap_or_else(|e| panic!("HBONE client: {e}"));
        c.status(http::Method::CONNECT, &m.app.to_string()).await
    });
    assert_eq!(status, Ok(401), "a denied CONNECT is answered 401");
    app_saw_only(&m, 1);
    let metrics = scrape(&m.n2);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ambit_policy_denials_total")
                && l.contains("policy=\"mesh/allow-good\"")
                && l.contains("workload=\"mesh/server\"")),
        "denials metric labelled with the policy:\n{metrics}"
    );
}

/// Acceptance 3: STRICT refuses a plaintext client (outside the mesh); PERMISSIVE lets it through;
/// a policy change applies to new connections without restarting anything.
#[test]
fn strict_refuses_plaintext_and_permissive_admits_it_live() {
    let strict = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec: {mtls: {mode: STRICT}}
";
    let m = mesh("pol-strict", strict);
    // Meshed clients are unaffected: they arrive over HBONE with an identity.
    in_pod(&m.good, || whoami(m.app)).expect("mTLS client under STRICT");
    served(&m, 1);
    let r = in_pod(&m.outsider, || whoami(m.app));
    assert!(r.is_err(), "STRICT refuses plaintext: {r:?}");
    app_saw_only(&m, 1);
    m.a2.wait_for("plaintext denial counted", SETTLE, |s| {
        s["proxy"]["inbound_denied"] == 1
    });

    // Switch to PERMISSIVE by editing the file: the running agents pick it up.
    let permissive = strict.replace("STRICT", "PERMISSIVE");
    let changed = Instant::now();
    for a in [&m.a1, &m.a2] {
        write_policies(a, &permissive);
    }
    let deadline = changed + SETTLE;
    loop {
        match in_pod(&m.outsider, || whoami(m.app)) {
            Ok((_, local, _)) => {
                assert_eq!(local, m.app);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("PERMISSIVE never admitted the plaintext client: {e}"),
        }
    }
    eprintln!(
        "policy change applied to new connections after {:?}",
        changed.elapsed()
    );
    served(&m, 2);
}

/// Acceptance 3 and 4: a policy change applies live, and a CUSTOM policy or a malformed one is
/// reported with its name and field while the workloads it selects deny.
#[test]
fn custom_and_malformed_policies_are_reported_and_fail_closed() {
    let m = mesh("pol-broken", ALLOW_GOOD);
    in_pod(&m.good, || whoami(m.app)).expect("allowed before");
    served(&m, 1);

    let custom = format!(
        "{ALLOW_GOOD}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext-authz, namespace: mesh}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: CUSTOM
  provider: {{name: my-authz}}
  rules: [{{}}]
"
    );
    write_policies(&m.a2, &custom);
    let status = m.a2.wait_for("CUSTOM reported", SETTLE, |s| {
        s["config_errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e.as_str().is_some_and(|e| e.contains("ext-authz")))
        })
    });
    let report = status["config_errors"].to_string();
    assert!(report.contains("CUSTOM"), "the report says why: {report}");
    let r = in_pod(&m.good, || whoami(m.app));
    assert!(
        r.is_err(),
        "a CUSTOM policy makes its workloads deny: {r:?}"
    );
    app_saw_only(&m, 1);

    // Malformed: an unknown action value. Same outcome, and the field is named.
    let malformed = format!(
        "{ALLOW_GOOD}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: typo, namespace: mesh}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALOW
"
    );
    write_policies(&m.a2, &malformed);
    let status = m.a2.wait_for("malformed policy reported", SETTLE, |s| {
        s["config_errors"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e.as_str().is_some_and(|e| e.contains("typo")))
        })
    });
    let report = status["config_errors"].to_string();
    assert!(report.contains("action"), "the field is named: {report}");
    assert!(
        !report.contains("ext-authz"),
        "the CUSTOM policy is gone: {report}"
    );
    let r = in_pod(&m.good, || whoami(m.app));
    assert!(
        r.is_err(),
        "a malformed policy makes its workloads deny: {r:?}"
    );
    app_saw_only(&m, 1);

    // Fixed: traffic flows again.
    write_policies(&m.a2, ALLOW_GOOD);
    let deadline = Instant::now() + SETTLE;
    while in_pod(&m.good, || whoami(m.app)).is_err() {
        assert!(Instant::now() < deadline, "the fixed policy never applied");
        std::thread::sleep(Duration::from_millis(20));
    }
    served(&m, 2);
    let _ = &m.bad;
}

/// GET /metrics from inside a node's netns.
fn scrape(node: &Node) -> String {
    node.run_async(|| async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect("127.0.0.1:15020")
            .await
            .expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("response");
        out
    })
}

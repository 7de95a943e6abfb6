//! The debug view of running agents (issue 13, acceptance 4): the real `ambit zc` binary,
//! run in a node's netns against the agent there (`--admin`, localhost:15000 as ztunnel's),
//! shows the workloads, services, policies, routes, clusters (one endpoint ejected by a
//! DestinationRule's `outlierDetection`), certificates and live connections, as tables and as
//! `-o json|yaml`; `/logging?level=debug` on the same endpoint changes the agent's log output
//! at once, without a restart.

mod l7support;
mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;
use std::time::SystemTime;

use ambit::harness::{ClusterYaml, LocalAgent, Node, SvcPort, World};
use l7support::{sa, start_agents, Behaviour, Conn, ScriptApp, NS};
use serde_json::Value;
use support::{ambit_bin, in_pod, settled};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 24, 10);
const DB: Ipv4Addr = Ipv4Addr::new(10, 96, 24, 11);
const PORT: u16 = 8080;
const DB_PORT: u16 = 9000;

/// `ambit zc <args>` in the node's netns, where the node's agent serves its debug endpoint on
/// the default address; its output, whatever the exit code.
fn zc_output(node: &Node, args: &[&str]) -> Output {
    node.command(ambit_bin())
        .arg("zc")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ambit zc {args:?}: {e}"))
}

/// `ambit zc <args>`'s stdout; it must succeed.
fn zc(node: &Node, args: &[&str]) -> String {
    let out = zc_output(node, args);
    assert!(
        out.status.success(),
        "ambit zc {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("zc prints UTF-8");
    eprintln!("$ ambit zc {}\n{text}", args.join(" "));
    text
}

/// `ambit zc <view> -o json`, decoded.
fn zc_json(node: &Node, view: &str) -> Value {
    let text = zc(node, &[view, "-o", "json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("zc {view} -o json: {e}\n{text}"))
}

/// The table's header line and the rows that contain every one of `cells` as a whole cell.
fn rows_with<'a>(table: &'a str, cells: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            cells.iter().all(|c| words.contains(c))
        })
        .collect()
}

fn header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default()
}

/// GET `path_and_query` on the agent's debug endpoint (127.0.0.1:15000 in the node's netns):
/// (status, body).
fn admin_get(node: &Node, path_and_query: &str) -> (u16, String) {
    let path = path_and_query.to_string();
    node.run_async(|| async move {
        let conn = Conn::h1(SocketAddr::from(([127, 0, 0, 1], 15000))).await;
        let r = conn.get("localhost", &path, &[]).await;
        (r.status, r.text())
    })
}

/// The agent's log from byte `from` on.
fn log_since(agent: &LocalAgent, from: usize) -> String {
    let log = std::fs::read(agent.log_path()).unwrap_or_default();
    String::from_utf8_lossy(log.get(from..).unwrap_or_default()).into_owned()
}

fn log_len(agent: &LocalAgent) -> usize {
    std::fs::metadata(agent.log_path()).map_or(0, |m| m.len() as usize)
}

fn debug_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" DEBUG ")).collect()
}

/// A sleep client on n1; `web` (HTTP, ROUND_ROBIN with outlier detection) on n2 with a good and a
/// bad (always 500) endpoint; `db` (TCP) on the good one; an AuthorizationPolicy and a STRICT
/// PeerAuthentication. The bad endpoint is ejected for 10 minutes after its second 5xx; `zc`
/// then shows everything on n1 and n2, and `/logging` turns debug lines on and off on n2.
#[test]
fn zc_shows_what_a_running_agent_holds_and_logging_changes_live() {
    support::raise_fd_limit();
    let world = World::new("debug-view");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .sa("sleep")
        .label("app", "sleep")
        .spawn();
    let web = |name: &str| {
        world
            .pod(name)
            .node(&n2)
            .namespace(NS)
            .sa("web")
            .label("app", "web")
            .spawn()
    };
    let (good, bad) = (web("web-good"), web("web-bad"));
    let _good_app = ScriptApp::start(&good, PORT, Behaviour::Ok);
    let _db_app = ScriptApp::start(&good, DB_PORT, Behaviour::Ok);
    let bad_app = ScriptApp::start(&bad, PORT, Behaviour::Status(500));
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &good, &bad])
        .service(
            "web",
            NS,
            WEB,
            &[SvcPort::named("http", 80, PORT)],
            &[&good, &bad],
            true,
        )
        .service(
            "db",
            NS,
            DB,
            &[SvcPort::named("tcp", DB_PORT, DB_PORT)],
            &[&good],
            true,
        );
    let istio = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 600s, maxEjectionPercent: 100}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - name: api
    match: [{uri: {prefix: /api}}]
    retries: {attempts: 0}
    route: [{destination: {host: web}}]
  - name: default
    retries: {attempts: 0}
    route: [{destination: {host: web}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/mesh/sa/sleep]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#;
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&good, &bad])],
        &yaml,
        istio,
        &[],
    );
    let bad_ep = format!("{}:{PORT}", bad.ip4());
    let good_ep = format!("{}:{PORT}", good.ip4());
    let cluster = "outbound|80||web.mesh.svc.cluster.local";

    // The outlier scenario: round robin sends every other request to the bad endpoint; its
    // second 500 in a row ejects it.
    in_pod(&client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        while bad_app.count() < 2 {
            let r = conn.get("web", "/api/x", &[]).await;
            assert!(r.status == 200 || r.status == 500, "{}", r.status);
        }
    });

    // -------- workloads: every pod the agent knows, with its IP and node
    let workloads = zc_json(&n1, "workloads");
    for (pod, node) in [(&client, "n1"), (&good, "n2"), (&bad, "n2")] {
        let w = workloads
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["name"] == pod.name()))
            .unwrap_or_else(|| panic!("{} in {workloads:#}", pod.name()));
        assert_eq!(w["namespace"], NS, "{w}");
        assert_eq!(w["node"], node, "{w}");
        assert_eq!(w["protocol"], "HBONE", "{w}");
        let ip = pod.ip4().to_string();
        assert!(
            w["workloadIps"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|i| i == ip.as_str())),
            "{w}"
        );
    }
    let table = zc(&n1, &["workloads"]);
    assert_eq!(
        header(&table),
        [
            "NAMESPACE",
            "POD",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL"
        ]
    );
    for (pod, node) in [(&client, "n1"), (&good, "n2"), (&bad, "n2")] {
        let rows = rows_with(&table, &[NS, pod.name(), node, "HBONE"]);
        assert_eq!(rows.len(), 1, "{}: {table}", pod.name());
        assert!(rows[0].contains(&pod.ip4().to_string()), "{table}");
    }
    let only_n2 = zc(&n1, &["workloads", "--node", "n2"]);
    assert!(
        rows_with(&only_n2, &[client.name()]).is_empty(),
        "{only_n2}"
    );
    assert_eq!(rows_with(&only_n2, &[NS]).len(), 2, "{only_n2}");

    // -------- services: VIPs and ready endpoints
    let services = zc_json(&n1, "services");
    let svc = |name: &str| {
        services
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("service {name} in {services:#}"))
    };
    let w = svc("web");
    assert_eq!(w["hostname"], "web.mesh.svc.cluster.local", "{w}");
    assert_eq!(w["vips"].as_array().map(Vec::len), Some(1), "{w}");
    assert!(
        w["vips"][0]
            .as_str()
            .is_some_and(|v| v.contains("10.96.24.10")),
        "{w}"
    );
    assert_eq!(w["endpoints"].as_array().map(Vec::len), Some(2), "{w}");
    assert_eq!(svc("db")["ports"][0]["port"], DB_PORT, "{services:#}");
    let table = zc(&n1, &["services"]);
    assert_eq!(rows_with(&table, &[NS, "web", "2/2"]).len(), 1, "{table}");
    assert_eq!(rows_with(&table, &[NS, "db", "1/1"]).len(), 1, "{table}");

    // -------- policies: the AuthorizationPolicy, the PeerAuthentication, what applies on n2
    let policies = zc_json(&n2, "policies");
    let p = &policies["policies"][0];
    assert_eq!(p["name"], "allow-sleep", "{policies:#}");
    assert_eq!(p["action"], "Allow", "{p}");
    assert_eq!(p["scope"], "WorkloadSelector", "{p}");
    assert_eq!(p["selector"]["app"], "web", "{p}");
    assert_eq!(
        policies["peerAuthentications"][0]["mode"], "STRICT",
        "{policies:#}"
    );
    let applied: Vec<&Value> = policies["workloadPolicies"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    assert_eq!(applied.len(), 2, "n2's two workloads: {policies:#}");
    for w in applied {
        assert_eq!(w["mtls"]["mode"], "STRICT", "{w}");
        assert!(
            w["authorizationPolicies"].as_array().is_some_and(|a| a
                .iter()
                .any(|p| p.as_str().is_some_and(|p| p.contains("allow-sleep")))),
            "{w}"
        );
    }
    let table = zc(&n2, &["policies"]);
    assert_eq!(
        rows_with(&table, &[NS, "allow-sleep", "Allow", "WorkloadSelector"]).len(),
        1,
        "{table}"
    );
    assert_eq!(
        rows_with(&table, &[NS, "strict", "STRICT", "Namespace"]).len(),
        1,
        "{table}"
    );

    // -------- routes: the VirtualService's two routes as compiled for n1's namespace
    let routes = zc_json(&n1, "routes");
    let vhosts: Vec<&Value> = routes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ns| ns["namespace"] == NS)
        .flat_map(|ns| ns["virtualHosts"].as_array().into_iter().flatten())
        .filter(|v| {
            v["virtualService"]
                .as_str()
                .is_some_and(|s| s.ends_with("mesh/web"))
        })
        .collect();
    assert_eq!(vhosts.len(), 1, "{routes:#}");
    let http = vhosts[0]["http"].as_array().expect("http routes");
    let names: Vec<&str> = http.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["api", "default"], "{routes:#}");
    assert_eq!(http[0]["matches"][0][0], "uri prefix /api", "{routes:#}");
    // A VirtualService destination without a port goes to the request's port: port 0.
    let route_cluster = "outbound|0||web.mesh.svc.cluster.local";
    assert_eq!(
        http[0]["destinations"][0]["cluster"], route_cluster,
        "{routes:#}"
    );
    assert_eq!(http[0]["destinations"][0]["weight"], 100, "{routes:#}");
    assert!(
        http[0]["retries"].is_null(),
        "attempts: 0 is no retry: {routes:#}"
    );
    let table = zc(&n1, &["routes"]);
    let api = rows_with(&table, &[NS, "HTTP", "api", "/api"]);
    assert_eq!(api.len(), 1, "{table}");
    assert!(
        api[0].contains(&format!("{route_cluster} (100)")),
        "{table}"
    );
    assert_eq!(
        rows_with(&table, &[NS, "HTTP", "default", "*"]).len(),
        1,
        "{table}"
    );

    // -------- clusters: the bad endpoint ejected, the good one healthy
    let ejected = |clusters: &Value| {
        clusters
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == cluster && c["namespace"] == NS)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let clusters = settled(
        || zc_json(&n1, "clusters"),
        |c| ejected(c)["ejectionsActive"] == 1,
    );
    let c = ejected(&clusters);
    assert_eq!(c["ejectionsActive"], 1, "{clusters:#}");
    assert_eq!(
        c["destinationRule"].as_str().map(|d| d.contains("web")),
        Some(true),
        "{c:#}"
    );
    assert_eq!(c["lbPolicy"], "ROUND_ROBIN", "{c:#}");
    assert_eq!(c["outlierDetection"], true, "{c:#}");
    assert_eq!(c["ejectionsTotal"]["consecutive_5xx"], 1, "{c:#}");
    let endpoint = |addr: &str| {
        c["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["address"] == addr))
            .cloned()
            .unwrap_or_else(|| panic!("{addr} in {c:#}"))
    };
    let b = endpoint(&bad_ep);
    assert_eq!(b["status"], "EJECTED", "{b}");
    assert_eq!(b["ejections"], 1, "{b}");
    let until = b["ejectedUntil"].as_str().expect("ejectedUntil");
    let until = humantime::parse_rfc3339(until).expect("ejectedUntil is RFC 3339");
    let left = until
        .duration_since(SystemTime::now())
        .expect("in the future");
    assert!(left.as_secs() > 500, "baseEjectionTime 600s: {left:?} left");
    let g = endpoint(&good_ep);
    assert_eq!(g["status"], "HEALTHY", "{g}");
    assert!(g["ejectedUntil"].is_null(), "{g}");
    let table = zc(&n1, &["clusters"]);
    assert_eq!(
        header(&table),
        [
            "NAMESPACE",
            "CLUSTER",
            "ENDPOINT",
            "STATUS",
            "EJECTIONS",
            "EJECTED",
            "UNTIL",
            "DESTINATION",
            "RULE"
        ]
    );
    assert_eq!(
        rows_with(&table, &[NS, cluster, &bad_ep, "EJECTED", "1"]).len(),
        1,
        "{table}"
    );
    assert_eq!(
        rows_with(&table, &[NS, cluster, &good_ep, "HEALTHY", "0", "-"]).len(),
        1,
        "{table}"
    );
    // YAML: the same section.
    let yaml = zc(&n1, &["clusters", "-o", "yaml"]);
    let from_yaml: Value = serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"));
    let y = ejected(&from_yaml);
    assert_eq!(
        y["endpoints"], c["endpoints"],
        "YAML and JSON agree: {yaml}"
    );
    // While it is out, the good endpoint serves every request.
    in_pod(&client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        for _ in 0..4 {
            let r = conn.get("web", "/", &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.served_by(), "web-good");
        }
    });

    // -------- certificates: each workload's SPIFFE id, its leaf valid until its expiry
    for (node, pods) in [(&n1, vec![("sleep", &client)]), (&n2, vec![("web", &good)])] {
        let certs = zc_json(node, "certificates");
        for (sa_name, _) in pods {
            let id = format!("spiffe://cluster.local/ns/{NS}/sa/{sa_name}");
            let c = certs
                .as_array()
                .and_then(|a| a.iter().find(|c| c["identity"] == id.as_str()))
                .unwrap_or_else(|| panic!("{id} on {}: {certs:#}", node.name()));
            assert_eq!(c["state"], "Available", "{c:#}");
            let leaf = &c["certChain"][0];
            assert_eq!(leaf["type"], "Leaf", "{c:#}");
            let expiry = leaf["expirationTime"].as_str().expect("expirationTime");
            let not_after = humantime::parse_rfc3339(expiry).expect("RFC 3339 expiry");
            let left = not_after
                .duration_since(SystemTime::now())
                .expect("not expired");
            let seconds = c["expiresInSeconds"].as_i64().expect("expiresInSeconds");
            assert!(
                (seconds - left.as_secs() as i64).abs() < 120,
                "{seconds} s vs {left:?}"
            );
            let table = zc(node, &["certificates"]);
            let rows = rows_with(&table, &[&id, "Leaf", "Available", "true", expiry]);
            assert_eq!(rows.len(), 1, "{table}");
            // The mesh root it chains to, as ztunnel's `rootCerts` and istioctl's Root row.
            let root = &c["rootCerts"][0];
            assert_eq!(root["type"], "Root", "{c:#}");
            assert_eq!(root["fingerprintSha256"], c["rootFingerprint"], "{c:#}");
            let root_expiry = root["expirationTime"].as_str().expect("root expiry");
            let rows = rows_with(&table, &[&id, "Root", "Available", "true", root_expiry]);
            assert_eq!(rows.len(), 1, "{table}");
        }
    }

    // -------- connections: one held open from the client to db (TCP over HBONE)
    let held = client.run(|| {
        std::net::TcpStream::connect(sa(DB, DB_PORT)).unwrap_or_else(|e| panic!("connect db: {e}"))
    });
    let db_vip = format!("{DB}:{DB_PORT}");
    let outbound = |conns: &Value| {
        conns
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["workload"] == "mesh/sleep" && c["original_dst"] == db_vip.as_str())
            .cloned()
            .collect::<Vec<Value>>()
    };
    let conns = settled(|| zc_json(&n1, "connections"), |c| outbound(c).len() == 1);
    let out = outbound(&conns);
    assert_eq!(out.len(), 1, "{conns:#}");
    assert_eq!(out[0]["direction"], "Outbound", "{conns:#}");
    assert_eq!(out[0]["protocol"], "HBONE", "{conns:#}");
    let local = held.local_addr().expect("local addr").to_string();
    assert_eq!(out[0]["src"], local.as_str(), "{conns:#}");
    let inbound = |conns: &Value| {
        conns
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| {
                c["workload"] == "mesh/web-good"
                    && c["direction"] == "Inbound"
                    && c["dst"] == format!("{}:{DB_PORT}", good.ip4()).as_str()
            })
            .count()
    };
    let on_n2 = settled(|| zc_json(&n2, "connections"), |c| inbound(c) == 1);
    assert_eq!(inbound(&on_n2), 1, "{on_n2:#}");
    let table = zc(&n1, &["connections"]);
    let rows = rows_with(
        &table,
        &["sleep.mesh", "Outbound", &local, &db_vip, "HBONE"],
    );
    assert_eq!(rows.len(), 1, "{table}");
    let only_ns = zc(&n1, &["connections", "--namespace", "other"]);
    assert_eq!(only_ns.lines().count(), 1, "header only: {only_ns}");
    drop(held);
    settled(|| zc_json(&n1, "connections"), |c| outbound(c).is_empty());

    // -------- all, and an agent that is not there
    let all = zc_json(&n1, "all");
    assert_eq!(all["node"], "n1", "{all:#}");
    assert_eq!(all["trustDomain"], "cluster.local", "{all:#}");
    let out = zc_output(&n1, &["workloads", "--admin", "127.0.0.1:15999"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:15999"), "names the address: {err}");

    // -------- /logging: debug from now on, without a restart; then info again
    let n2_agent = &agents[1];
    let (status, body) = admin_get(&n2, "/logging");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("info"), "{body}");
    let before = log_len(n2_agent);
    assert!(
        debug_lines(&log_since(n2_agent, 0)).is_empty(),
        "no debug lines at info: {}",
        n2_agent.log_tail()
    );
    let (status, body) = admin_get(&n2, "/logging?level=debug");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("debug"), "{body}");
    // Each new connection to db opens an HBONE tunnel, which n2 logs at debug.
    let seen = settled(
        || {
            let s = client.run(|| std::net::TcpStream::connect(sa(DB, DB_PORT)));
            drop(s);
            log_since(n2_agent, before)
        },
        |log| {
            log.lines()
                .any(|l| l.contains(" DEBUG ") && l.contains("HBONE tunnel open"))
        },
    );
    assert!(
        seen.lines()
            .any(|l| l.contains(" DEBUG ") && l.contains("HBONE tunnel open")),
        "a debug line after /logging?level=debug:\n{seen}"
    );
    // A bad level changes nothing and says why.
    let (status, body) = admin_get(&n2, "/logging?level=loud");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("loud"), "{body}");
    assert!(admin_get(&n2, "/logging").1.contains("debug"));
    // Back to info: between the two changes below (each logged at info), no debug line.
    let (status, body) = admin_get(&n2, "/logging?level=info");
    assert_eq!(status, 200, "{body}");
    let quiet_from = log_len(n2_agent);
    for _ in 0..5 {
        drop(client.run(|| std::net::TcpStream::connect(sa(DB, DB_PORT))));
    }
    in_pod(&client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    });
    let (status, body) = admin_get(&n2, "/logging?level=info");
    assert_eq!(status, 200, "{body}");
    let marker = "log filter changed through /logging";
    let quiet = settled(|| log_since(n2_agent, quiet_from), |l| l.contains(marker));
    let quiet = quiet.split(marker).next().unwrap_or_default();
    assert!(
        debug_lines(quiet).is_empty(),
        "debug lines at info: {:?}",
        debug_lines(quiet)
    );
}

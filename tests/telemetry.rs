//! Istio's L4 telemetry as users see it (issue 10): two agents, a meshed client on one node and a
//! meshed server on another, reached through its Service. After connections with known byte counts,
//! the client's node reports `istio_tcp_*` with `reporter="source"` and the server's with
//! `reporter="destination"`, with Istio's workload, principal, app, version and service labels,
//! `connection_security_policy="mutual_tls"` and the exact bytes; a plaintext client outside the
//! mesh shows `none`; each agent's access log has one JSON line per connection with the same facts.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit::harness::{ClusterYaml, LocalAgent, World};
use support::{ambit_bin, in_pod, Mode, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATIENCE: Duration = Duration::from_secs(30);
const CONNECTIONS: u64 = 7;
const REQUEST: usize = 10_000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

/// Connects, sends `REQUEST` bytes, half-closes, reads to the end; returns the bytes received.
async fn exchange(dst: SocketAddr) -> u64 {
    let mut s = tokio::net::TcpStream::connect(dst)
        .await
        .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    s.write_all(&vec![b'x'; REQUEST]).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read");
    got.len() as u64
}

/// The value of the one series of `family` whose labels contain every `label="value"` given.
fn value(metrics: &str, family: &str, labels: &[(&str, String)]) -> Option<u64> {
    let matching: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "more than one series of {family} match {labels:?}: {matching:#?}"
    );
    matching
        .first()
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// The echo app speaks raw bytes, so its port is declared TCP (`tcp-echo`): a port
/// named `http` would, as in Istio, be routed at L7 and refuse non-HTTP bytes.
fn service_yaml(server_ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: httpbin, namespace: mesh}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: httpbin}}\n  ports: [{{name: tcp-echo, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: httpbin-1\n  namespace: mesh\n  labels: {{kubernetes.io/service-name: httpbin}}\naddressType: IPv4\nports: [{{name: tcp-echo, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [\"{server_ip}\"], conditions: {{ready: true}}}}]\n"
    )
}

#[test]
fn istio_tcp_metrics_and_the_access_log_report_both_ends_exactly() {
    support::raise_fd_limit();
    let world = World::new("telemetry");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace("mesh")
        .sa("sleep")
        .label("app", "sleep")
        .label("version", "v1")
        .spawn();
    let server = world
        .pod("httpbin")
        .node(&n2)
        .namespace("mesh")
        .sa("httpbin")
        .label("app", "httpbin")
        .label("version", "v2")
        .spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let app = SocketAddr::new(server.ip4().into(), 8080);
    let _srv = Server::start(&server, &[app], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &server, &outsider]);
    let logs = [
        world.state_dir().join("access-n1.log"),
        world.state_dir().join("access-n2.log"),
    ];
    let mut agents = [(&n1, &logs[0]), (&n2, &logs[1])].map(|(node, log)| {
        let agent = LocalAgent::new(&world, node, &ambit_bin())
            .arg(&format!("--access-log={}", log.display()));
        yaml.write(&agent.config_dir());
        std::fs::write(
            agent.config_dir().join("service.yaml"),
            service_yaml(server.ip4()),
        )
        .expect("service");
        agent
    });
    for a in &mut agents {
        a.start(&world);
    }
    let [a1, a2] = &agents;
    a1.wait_enrolled(&[&client]);
    a2.wait_enrolled(&[&server]);
    for a in [a1, a2] {
        a.wait_for("ready", PATIENCE, |s| s["ready"] == true);
    }

    // Meshed: through the Service, over HBONE.
    let vip = SocketAddr::new(VIP.into(), 80);
    let mut received = 0;
    for _ in 0..CONNECTIONS {
        received += in_pod(&client, || exchange(vip));
    }
    // Outside the mesh: straight to the pod, plaintext into its 15006.
    let plain_received = in_pod(&outsider, || exchange(app));
    assert!(
        received > CONNECTIONS * REQUEST as u64,
        "echo and whoami lines"
    );

    let td = "spiffe://cluster.local/ns/mesh/sa";
    let meshed = |reporter: &str| {
        vec![
            ("reporter", reporter.to_string()),
            ("source_workload", "sleep".into()),
            ("source_workload_namespace", "mesh".into()),
            ("source_principal", format!("{td}/sleep")),
            ("source_app", "sleep".into()),
            ("source_version", "v1".into()),
            ("source_canonical_service", "sleep".into()),
            ("source_canonical_revision", "v1".into()),
            ("source_cluster", "Kubernetes".into()),
            ("destination_workload", "httpbin".into()),
            ("destination_workload_namespace", "mesh".into()),
            ("destination_principal", format!("{td}/httpbin")),
            ("destination_app", "httpbin".into()),
            ("destination_version", "v2".into()),
            (
                "destination_service",
                "httpbin.mesh.svc.cluster.local".into(),
            ),
            ("destination_service_name", "httpbin".into()),
            ("destination_service_namespace", "mesh".into()),
            ("request_protocol", "tcp".into()),
            ("response_flags", "-".into()),
            ("connection_security_policy", "mutual_tls".into()),
        ]
    };
    let expect = |agent: &LocalAgent, labels: &[(&str, String)], n: u64, req: u64, resp: u64| {
        // Recorded when each connection has ended on the agent's side: wait for the last.
        agent.wait_for_metrics(&format!("istio_tcp_* with {labels:?}"), PATIENCE, |m| {
            value(m, "istio_tcp_connections_closed_total", labels) == Some(n)
        });
        let (_, m) = agent.http_get("/metrics");
        assert_eq!(
            value(&m, "istio_tcp_connections_opened_total", labels),
            Some(n),
            "{m}"
        );
        assert_eq!(
            value(&m, "istio_tcp_received_bytes_total", labels),
            Some(req),
            "request bytes: {m}"
        );
        assert_eq!(
            value(&m, "istio_tcp_sent_bytes_total", labels),
            Some(resp),
            "response bytes: {m}"
        );
    };
    let sent = CONNECTIONS * REQUEST as u64;
    expect(a1, &meshed("source"), CONNECTIONS, sent, received);
    expect(a2, &meshed("destination"), CONNECTIONS, sent, received);
    let plain = vec![
        ("reporter", "destination".to_string()),
        ("source_workload", "outsider".into()),
        ("source_workload_namespace", "plain".into()),
        ("source_principal", "unknown".into()),
        ("destination_workload", "httpbin".into()),
        (
            "destination_service",
            "httpbin.mesh.svc.cluster.local".into(),
        ),
        ("connection_security_policy", "none".into()),
    ];
    expect(a2, &plain, 1, REQUEST as u64, plain_received);
    let (_, m1) = a1.http_get("/metrics");
    assert!(
        !m1.contains("connection_security_policy=\"none\""),
        "nothing left node 1 in plaintext: {m1}"
    );

    // One access-log line per connection, with the same facts.
    let lines = |path: &std::path::Path, want: usize| -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect();
            if lines.len() >= want || std::time::Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let l1 = lines(&logs[0], CONNECTIONS as usize);
    assert_eq!(l1.len(), CONNECTIONS as usize, "{l1:#?}");
    for l in &l1 {
        assert_eq!(l["reporter"], "source");
        assert_eq!(l["protocol"], "tcp");
        assert_eq!(l["source_workload"], "sleep");
        assert_eq!(l["destination_workload"], "httpbin");
        assert_eq!(l["destination_principal"], format!("{td}/httpbin"));
        assert_eq!(l["destination_service"], "httpbin.mesh.svc.cluster.local");
        assert_eq!(l["connection_security_policy"], "mutual_tls");
        assert_eq!(l["bytes_received"], REQUEST as u64);
        assert_eq!(l["response_flags"], "-");
        assert_eq!(l["downstream_local_address"], vip.to_string());
        assert_eq!(
            l["downstream_remote_address"]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(|a| a.ip()),
            Some(IpAddr::from(client.ip4())),
            "the app's own address, as the app knows it: {l}"
        );
        assert_eq!(l["upstream_host"], app.to_string());
        assert!(
            l["start_time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{l}"
        );
        assert!(l["duration"].as_u64().is_some(), "{l}");
    }
    let sent_total: u64 = l1.iter().filter_map(|l| l["bytes_sent"].as_u64()).sum();
    assert_eq!(sent_total, received, "response bytes in the log");
    let l2 = lines(&logs[1], CONNECTIONS as usize + 1);
    assert_eq!(l2.len(), CONNECTIONS as usize + 1, "{l2:#?}");
    let by_policy = |p: &str| {
        l2.iter()
            .filter(|l| l["connection_security_policy"] == p)
            .count()
    };
    assert_eq!(by_policy("mutual_tls"), CONNECTIONS as usize);
    assert_eq!(by_policy("none"), 1);
    assert!(l2.iter().all(|l| l["reporter"] == "destination"));
    assert!(l2
        .iter()
        .filter(|l| l["connection_security_policy"] == "mutual_tls")
        .all(|l| l["source_principal"] == format!("{td}/sleep")
            && l["downstream_local_address"] == app.to_string()));
    let plain_line = l2
        .iter()
        .find(|l| l["connection_security_policy"] == "none")
        .expect("the plaintext line");
    assert_eq!(
        plain_line["downstream_remote_address"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
        Some(IpAddr::from(outsider.ip4()))
    );
    assert_eq!(plain_line["source_workload"], "outsider");
}

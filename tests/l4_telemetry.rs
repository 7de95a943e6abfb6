//! The Telemetry API on TCP connections (issue 13), through real agents: a metric override that
//! turns `TCP_SENT_BYTES` off for the CLIENT side leaves `istio_tcp_sent_bytes_total` out at the
//! source while the destination keeps it, and an access-log provider gets one line per connection
//! at each end, with Envoy's TCP fields, in JSON when the mesh's encoding is JSON and in Istio's
//! default TEXT format otherwise.

mod l7support;
mod support;

use std::net::{Ipv4Addr, SocketAddr};

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::{metric, sa, start_agents, write_istio, NS};
use serde_json::Value;
use support::{in_pod, settled, Mode, Server, SETTLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DB: Ipv4Addr = Ipv4Addr::new(10, 96, 18, 10);
const PORT: u16 = 5432;
/// What each connection sends; the app echoes it after its whoami line.
const SENT: usize = 1000;
const CONNECTIONS: usize = 3;

/// The mesh config: the `envoy` file provider (following the mesh's encoding, as Istio's
/// built-in provider does) and the Telemetry object of the root namespace.
fn istio(log: &std::path::Path, encoding: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    accessLogEncoding: {encoding}
    extensionProviders:
    - name: envoy
      envoyFileAccessLog: {{path: {}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  accessLogging:
  - providers: [{{name: envoy}}]
  metrics:
  - providers: [{{name: prometheus}}]
    overrides:
    - match: {{metric: TCP_SENT_BYTES, mode: CLIENT}}
      disabled: true
"#,
        log.display()
    )
}

/// One connection: reads the whoami line, sends `SENT` bytes, half-closes, reads to the end.
/// Returns (the client's own address, bytes read).
async fn exchange(dst: SocketAddr) -> (SocketAddr, usize) {
    let mut s = tokio::net::TcpStream::connect(dst)
        .await
        .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    let me = s.local_addr().expect("local addr");
    s.write_all(&[b'x'; SENT]).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("read");
    assert!(got.ends_with(&[b'x'; SENT]), "the echo: {got:?}");
    (me, got.len())
}

fn lines(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn tcp_connections_follow_the_telemetry_api() {
    support::raise_fd_limit();
    let world = World::new("l4-telemetry");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let server = world
        .pod("db")
        .node(&n2)
        .namespace(NS)
        .label("app", "db")
        .spawn();
    let _db = Server::start(&server, &[sa(server.ip4(), PORT)], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &server])
        .service(
            "db",
            NS,
            DB,
            &[SvcPort::named("tcp", PORT, PORT)],
            &[&server],
            true,
        );
    let log = world.state_dir().join("tcp-access.log");
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        &istio(&log, "JSON"),
        &[],
    );

    let dst = sa(DB, PORT);
    let exchanged: Vec<(SocketAddr, usize)> = in_pod(&client, || async {
        let mut out = Vec::new();
        for _ in 0..CONNECTIONS {
            out.push(exchange(dst).await);
        }
        out
    });

    // Metrics: the destination counts the bytes it sent back; the source does not.
    let closed = |m: &str, reporter| {
        metric(
            m,
            "istio_tcp_connections_closed_total",
            &[("reporter", reporter), ("destination_workload", "db")],
        )
    };
    let want: u64 = exchanged.iter().map(|(_, n)| *n as u64).sum();
    agents[1].wait_for_metrics("the destination's sent bytes", SETTLE, |m| {
        closed(m, "destination") == CONNECTIONS as u64
            && metric(
                m,
                "istio_tcp_sent_bytes_total",
                &[("reporter", "destination"), ("destination_workload", "db")],
            ) == want
    });
    // The closed count and the bytes are added one after the other at a connection's end:
    // wait for the bytes asserted below, not only for their neighbour.
    agents[0].wait_for_metrics("the source's closed connections and bytes", SETTLE, |m| {
        closed(m, "source") == CONNECTIONS as u64
            && metric(
                m,
                "istio_tcp_received_bytes_total",
                &[("reporter", "source"), ("destination_workload", "db")],
            ) == (SENT * CONNECTIONS) as u64
    });
    let (_, m) = agents[0].http_get("/metrics");
    assert!(
        !m.lines()
            .any(|l| l.starts_with("istio_tcp_sent_bytes_total{")
                && l.contains("reporter=\"source\"")),
        "TCP_SENT_BYTES is off for the client side: {m}"
    );
    assert_eq!(
        metric(
            &m,
            "istio_tcp_received_bytes_total",
            &[("reporter", "source"), ("destination_workload", "db")]
        ),
        (SENT * CONNECTIONS) as u64,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("destination_workload", "db")]
        ),
        CONNECTIONS as u64,
        "{m}"
    );

    // Access logs: one JSON line per connection at each end (both agents write the same file).
    let source_cluster = format!("outbound|{PORT}||db.{NS}.svc.cluster.local");
    let destination_cluster = format!("inbound|{PORT}||");
    let parsed = || -> Vec<Value> {
        lines(&log)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let at = |all: &[Value], cluster: &str| -> Vec<Value> {
        all.iter()
            .filter(|v| v["upstream_cluster"] == cluster)
            .cloned()
            .collect()
    };
    let all = settled(parsed, |all| {
        at(all, &source_cluster).len() >= CONNECTIONS
            && at(all, &destination_cluster).len() >= CONNECTIONS
    });
    let (src, dst_lines) = (at(&all, &source_cluster), at(&all, &destination_cluster));
    assert_eq!(src.len(), CONNECTIONS, "{all:#?}");
    assert_eq!(dst_lines.len(), CONNECTIONS, "{all:#?}");
    assert_eq!(all.len(), 2 * CONNECTIONS, "nothing else: {all:#?}");
    let db = format!("{}:{PORT}", server.ip4());
    for v in src.iter().chain(&dst_lines) {
        // Envoy's TCP proxy: no request, response code 0.
        for absent in ["method", "path", "protocol", "request_id", "authority"] {
            assert_eq!(v[absent], Value::Null, "{absent}: {v}");
        }
        assert_eq!(v["response_code"], 0, "{v}");
        assert_eq!(v["response_flags"], "-", "{v}");
        assert_eq!(v["bytes_received"], SENT, "{v}");
        assert_eq!(v["upstream_host"], db.as_str(), "{v}");
        assert!(v["duration"].is_u64(), "{v}");
    }
    // At the source: from the app's address to the Service address; what the app read back.
    let mut seen: Vec<(String, u64)> = src
        .iter()
        .map(|v| {
            assert_eq!(
                v["downstream_local_address"],
                dst.to_string().as_str(),
                "{v}"
            );
            (
                v["downstream_remote_address"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                v["bytes_sent"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let mut expected: Vec<(String, u64)> = exchanged
        .iter()
        .map(|(me, n)| (me.to_string(), *n as u64))
        .collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected, "{src:#?}");
    // At the destination: the HBONE stream from the client's node to the pod's port.
    for v in &dst_lines {
        assert_eq!(v["downstream_local_address"], db.as_str(), "{v}");
        let remote: SocketAddr = v["downstream_remote_address"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("remote address: {v}"));
        assert_eq!(remote.ip(), std::net::IpAddr::from(client.ip4()), "{v}");
    }

    // TEXT encoding: the same provider writes Istio's default format, live.
    for a in &agents {
        write_istio(a, &istio(&log, "TEXT"));
    }
    let is_text = |l: &String| l.starts_with('[');
    // Applied once a connection's lines come out as text at both ends (earlier rounds may still
    // have been written as JSON while the agents reloaded).
    let text = settled(
        || {
            let before = lines(&log).len();
            in_pod(&client, || async { exchange(dst).await });
            let now = settled(|| lines(&log), |l| l.len() >= before + 2);
            now[before..].to_vec()
        },
        |new| new.len() == 2 && new.iter().all(is_text),
    );
    assert_eq!(text.len(), 2, "{text:#?}");
    for l in &text {
        assert!(l.contains("\"- - -\" 0 - - - \"-\" 1000 "), "{l}");
        assert!(l.contains(&format!("\"{db}\"")), "{l}");
    }
    assert!(
        text.iter().any(|l| l.contains(&source_cluster))
            && text.iter().any(|l| l.contains(&destination_cluster)),
        "{text:#?}"
    );
}

//! The Telemetry API's metric `tagOverrides` (issue 13) through real agents: a Telemetry that
//! REMOVEs `request_protocol` and UPSERTs `request_host: request.host` on REQUEST_COUNT for the
//! CLIENT side changes the source's `istio_requests_total` series only; the destination's keep
//! Istio's standard labels. The TCP metrics take their tags per connection.

mod l7support;
mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::scenes::{sleep_and_web, SleepAndWeb};
use l7support::{metric, sa, start_agents, Conn, NS};
use support::{in_pod, Mode, Server, SETTLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 40);
const ECHO: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 41);

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web}}]
"#;

/// The Istio task's tag overrides ("Customizing Istio Metrics with Telemetry API"), on the
/// client side.
const TAGS: &str = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides:
        request_protocol: {operation: REMOVE}
        request_host: {value: request.host}
"#;

/// The labels of each `family` series whose labels include `with`.
fn series(m: &str, family: &str, with: &[(&str, &str)]) -> Vec<BTreeMap<String, String>> {
    m.lines()
        .filter_map(|l| l.strip_prefix(&format!("{family}{{")))
        .filter_map(|l| l.rsplit_once("} ").map(|(labels, _)| labels))
        .map(|labels| {
            labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|l| {
            with.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The scrape parses as Prometheus' text format, series with their differing label sets and
/// all (Debian's `promtool`, from the `prometheus` package tests/prometheus.rs runs).
fn promtool_parses(m: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(m.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!said.contains("error"), "promtool: {said}\n{m}");
}

#[test]
fn tag_overrides_change_the_client_sides_request_count() {
    let SleepAndWeb {
        world,
        n1,
        n2,
        client,
        server,
        yaml,
        _web,
    } = sleep_and_web("l7-tags", WEB);
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        &format!("{TAGS}---\n{ROUTES}"),
        &[],
    );
    in_pod(&client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        for i in 0..4 {
            let r = conn.get("web", &format!("/tags/{i}"), &[]).await;
            assert_eq!(r.status, 200);
        }
    });
    let to_web = [
        ("destination_workload", "web"),
        ("source_workload", "sleep"),
    ];
    agents[0].wait_for_metrics("the source's counter", SETTLE, |m| {
        metric(
            m,
            "istio_requests_total",
            &[("reporter", "source"), to_web[0]],
        ) == 4
    });
    agents[1].wait_for_metrics("the destination's counter", SETTLE, |m| {
        metric(
            m,
            "istio_requests_total",
            &[("reporter", "destination"), to_web[0]],
        ) == 4
    });

    let (_, m) = agents[0].http_get("/metrics");
    let source = series(&m, "istio_requests_total", &[("reporter", "source")]);
    assert_eq!(source.len(), 1, "one series for the four requests: {m}");
    let s = &source[0];
    assert_eq!(
        s.get("request_host").map(String::as_str),
        Some("web"),
        "{m}"
    );
    assert!(!s.contains_key("request_protocol"), "removed: {m}");
    assert_eq!(s.get("response_code").map(String::as_str), Some("200"));
    assert_eq!(
        s.get("destination_workload").map(String::as_str),
        Some("web")
    );
    // Only REQUEST_COUNT was overridden: the source's histograms keep the standard labels.
    let hist = series(
        &m,
        "istio_request_duration_milliseconds_count",
        &[("reporter", "source")],
    );
    assert_eq!(hist.len(), 1, "{m}");
    assert_eq!(
        hist[0].get("request_protocol").map(String::as_str),
        Some("http")
    );
    assert!(!hist[0].contains_key("request_host"), "{m}");
    promtool_parses(&m);

    let (_, m) = agents[1].http_get("/metrics");
    let dest = series(&m, "istio_requests_total", &[("reporter", "destination")]);
    assert_eq!(dest.len(), 1, "{m}");
    assert_eq!(
        dest[0].get("request_protocol").map(String::as_str),
        Some("http"),
        "{m}"
    );
    assert!(!dest[0].contains_key("request_host"), "CLIENT only: {m}");
    for (k, v) in to_web {
        assert_eq!(dest[0].get(k).map(String::as_str), Some(v), "{m}");
    }
}

/// Every metric's client side gets `destination_port` (the Istio task's example); the opened
/// connections' counter loses `connection_security_policy`.
const TCP_TAGS: &str = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - overrides:
    - match: {metric: ALL_METRICS, mode: CLIENT}
      tagOverrides:
        destination_port: {value: string(destination.port)}
    - match: {metric: TCP_OPENED_CONNECTIONS, mode: CLIENT}
      tagOverrides:
        connection_security_policy: {operation: REMOVE}
"#;

#[test]
fn tag_overrides_change_the_client_sides_tcp_metrics() {
    support::raise_fd_limit();
    let world = World::new("l7-tcp-tags");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let server = world
        .pod("echo")
        .node(&n2)
        .namespace(NS)
        .label("app", "echo")
        .spawn();
    let _echo = Server::start(
        &server,
        &[std::net::SocketAddr::new(server.ip4().into(), 9000)],
        Mode::WhoamiEcho,
    );
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &server])
        .service(
            "echo",
            NS,
            ECHO,
            &[SvcPort::named("tcp", 9000, 9000)],
            &[&server],
            true,
        );
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        TCP_TAGS,
        &[],
    );
    in_pod(&client, || async {
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(sa(ECHO, 9000))
                .await
                .expect("connect");
            s.write_all(b"ping").await.expect("write");
            s.shutdown().await.expect("half-close");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            assert!(got.ends_with(b"ping"), "echoed: {got:?}");
        }
    });
    let to_echo = ("destination_workload", "echo");
    agents[0].wait_for_metrics("the source's closed connections", SETTLE, |m| {
        metric(
            m,
            "istio_tcp_connections_closed_total",
            &[("reporter", "source"), to_echo],
        ) == 3
    });
    agents[1].wait_for_metrics("the destination's closed connections", SETTLE, |m| {
        metric(
            m,
            "istio_tcp_connections_closed_total",
            &[("reporter", "destination"), to_echo],
        ) == 3
    });

    let (_, m) = agents[0].http_get("/metrics");
    let at_src = [("reporter", "source"), to_echo];
    let opened = series(&m, "istio_tcp_connections_opened_total", &at_src);
    assert_eq!(opened.len(), 1, "{m}");
    assert_eq!(
        opened[0].get("destination_port").map(String::as_str),
        Some("9000"),
        "{m}"
    );
    assert!(
        !opened[0].contains_key("connection_security_policy"),
        "removed: {m}"
    );
    let sent = series(&m, "istio_tcp_sent_bytes_total", &at_src);
    assert_eq!(sent.len(), 1, "{m}");
    assert_eq!(
        sent[0].get("destination_port").map(String::as_str),
        Some("9000"),
        "{m}"
    );
    assert_eq!(
        sent[0]
            .get("connection_security_policy")
            .map(String::as_str),
        Some("mutual_tls"),
        "{m}"
    );

    let (_, m) = agents[1].http_get("/metrics");
    let opened = series(
        &m,
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination")],
    );
    assert_eq!(opened.len(), 1, "{m}");
    assert!(
        !opened[0].contains_key("destination_port"),
        "CLIENT only: {m}"
    );
    assert_eq!(
        opened[0]
            .get("connection_security_policy")
            .map(String::as_str),
        Some("mutual_tls"),
        "{m}"
    );
}

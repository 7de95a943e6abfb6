//! Tracing through real agents (issue 13, acceptance 2 and 3), configured as Istio users do: the
//! mesh config from a typical install guide (`enableTracing`, `defaultConfig.tracing.sampling`,
//! `zipkin.address`), and a Telemetry object that overrides the sampling. Spans go to a Zipkin
//! v2 collector in a pod (Jaeger's collector port 9411), decoded as Zipkin's JSON, or to an
//! OpenTelemetry collector (OTLP over gRPC on 4317, over HTTP on 4318) decoded with the OTLP
//! protobuf types, selected by the mesh's `defaultProviders.tracing` or a Telemetry object.

mod l7support;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ambit::harness::{ClusterYaml, LocalAgent, Pod, SvcPort, World};
use l7support::otlp::{OtlpCollector, Received};
use l7support::zipkin::ZipkinCollector;
use l7support::{metric, sa, start_agents, write_istio, CallerApp, Conn, HttpApp, NS};
use support::{in_pod, settled, SETTLE};

const B: Ipv4Addr = Ipv4Addr::new(10, 96, 23, 10);
const C: Ipv4Addr = Ipv4Addr::new(10, 96, 23, 11);
const ZIPKIN_PORT: u16 = 9411;
/// An OpenTelemetry collector's OTLP/gRPC and OTLP/HTTP ports.
const OTLP_GRPC_PORT: u16 = 4317;
const OTLP_HTTP_PORT: u16 = 4318;

/// The `istio` ConfigMap of the root namespace with this mesh config.
fn mesh(config: &str) -> String {
    let indented: String = config.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n{indented}"
    )
}

/// The install guide's mesh config, with `sampling` and the collector's address.
fn guide_mesh(sampling: f64, collector: &Pod) -> String {
    mesh(&format!(
        "enableTracing: true\ndefaultConfig:\n  tracing:\n    sampling: {sampling}\n    zipkin:\n      address: {}:{ZIPKIN_PORT}\n",
        collector.ip4()
    ))
}

/// The collector the chain's agents send to.
enum Collector {
    Zipkin(ZipkinCollector),
    Otlp(OtlpCollector),
}

impl Collector {
    fn spans(&self) -> Vec<Received> {
        match self {
            Collector::Zipkin(z) => z.spans(),
            Collector::Otlp(o) => o.spans(),
        }
    }
}

struct Chain {
    _world: World,
    agents: Vec<LocalAgent>,
    a: Pod,
    collector: Collector,
    jaeger: Pod,
    _apps: (CallerApp, HttpApp),
}

/// A (n1) → B (n2) → C (n3), B forwarding the trace headers as Istio asks of apps, and a
/// Zipkin collector outside the mesh.
fn chain(name: &str, istio: impl Fn(&Pod) -> String) -> Chain {
    chain_to(
        name,
        |pod| Collector::Zipkin(ZipkinCollector::start(pod, ZIPKIN_PORT)),
        istio,
    )
}

/// [`chain`] with the collector `start` puts in the collector pod.
fn chain_to(
    name: &str,
    start: impl FnOnce(&Pod) -> Collector,
    istio: impl Fn(&Pod) -> String,
) -> Chain {
    support::raise_fd_limit();
    let world = World::new(name);
    let (n1, n2, n3) = (world.node("n1"), world.node("n2"), world.node("n3"));
    let a = world
        .pod("a")
        .node(&n1)
        .namespace(NS)
        .label("app", "a")
        .spawn();
    let b = world
        .pod("b")
        .node(&n2)
        .namespace(NS)
        .label("app", "b")
        .spawn();
    let c = world
        .pod("c")
        .node(&n3)
        .namespace(NS)
        .label("app", "c")
        .spawn();
    let jaeger = world
        .pod("jaeger-collector")
        .node(&n1)
        .namespace("observability")
        .label("app", "jaeger")
        .spawn();
    let collector = start(&jaeger);
    let caller = CallerApp::start(&b, 8080, sa(C, 80), "c");
    let app = HttpApp::start(&c, 8080);
    let http = |t| [SvcPort::named("http", 80, t)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&a, &b, &c, &jaeger])
        .service("b", NS, B, &http(8080), &[&b], true)
        .service("c", NS, C, &http(8080), &[&c], true);
    let agents = start_agents(
        &world,
        &[(&n1, &[&a]), (&n2, &[&b]), (&n3, &[&c])],
        &yaml,
        &istio(&jaeger),
        &[],
    );
    Chain {
        _world: world,
        agents,
        a,
        collector,
        jaeger,
        _apps: (caller, app),
    }
}

/// Requests A → B, each on its own connection, with `x-request-id` `<prefix>-<i>`.
fn call_b(a: &Pod, prefix: &str, n: usize) {
    let prefix = prefix.to_string();
    in_pod(a, || async move {
        let conn = Conn::h1(sa(B, 80)).await;
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let r = conn.get("b", "/", &[("x-request-id", &id)]).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    });
}

/// A counter without labels.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Spans of requests whose `x-request-id` starts with `prefix`, by trace id.
fn traces(spans: &[Received], prefix: &str) -> BTreeMap<String, Vec<Received>> {
    let mut out: BTreeMap<String, Vec<Received>> = BTreeMap::new();
    for s in spans {
        if s.tag("guid:x-request-id")
            .is_some_and(|id| id.starts_with(prefix))
        {
            out.entry(s.trace_id.clone()).or_default().push(s.clone());
        }
    }
    out
}

/// One trace of four spans for A → B → C: CLIENT (n1) ← SERVER (n2) ← CLIENT (n2) ← SERVER (n3),
/// each the parent of the next, with Envoy's names and Istio's tags, whichever collector got them.
fn assert_one_trace_of_four_spans(chain: &Chain) {
    call_b(&chain.a, "chain", 1);
    let spans = settled(
        || chain.collector.spans(),
        |s| traces(s, "chain").values().any(|t| t.len() >= 4),
    );
    let traces = traces(&spans, "chain");
    assert_eq!(traces.len(), 1, "one trace: {traces:#?}");
    let trace = traces.values().next().expect("the trace");
    assert_eq!(trace.len(), 4, "{trace:#?}");
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.id.as_str()).collect();
    // The root is A's CLIENT span; every other span's parent is the one before it.
    let root: Vec<&Received> = trace.iter().filter(|s| s.parent_id.is_none()).collect();
    assert_eq!(root.len(), 1, "one root: {trace:#?}");
    let mut order = vec![root[0]];
    while let Some(child) = trace
        .iter()
        .find(|s| s.parent_id.as_deref() == order.last().map(|p| p.id.as_str()))
    {
        order.push(child);
    }
    assert_eq!(order.len(), 4, "a chain of parents: {trace:#?}");
    assert_eq!(ids.len(), 4, "distinct span ids");
    let kinds: Vec<&str> = order.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["CLIENT", "SERVER", "CLIENT", "SERVER"]);
    let services: Vec<&str> = order.iter().map(|s| s.service_name.as_str()).collect();
    assert_eq!(services, ["a.mesh", "b.mesh", "b.mesh", "c.mesh"]);
    let names: Vec<&str> = order.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "b.mesh.svc.cluster.local:80/*",
            "b.mesh.svc.cluster.local:8080/*",
            "c.mesh.svc.cluster.local:80/*",
            "c.mesh.svc.cluster.local:8080/*",
        ]
    );
    for s in &order {
        assert_eq!(s.tag("http.method"), Some("GET"), "{s:?}");
        assert_eq!(s.tag("http.status_code"), Some("200"), "{s:?}");
        assert_eq!(s.tag("response_flags"), Some("-"), "{s:?}");
        assert_eq!(s.tag("istio.mesh_id"), Some("cluster.local"), "{s:?}");
        assert_eq!(s.tag("istio.namespace"), Some(NS), "{s:?}");
        assert_eq!(s.tag("component"), Some("proxy"), "{s:?}");
        assert!(
            s.tag("node_id").is_some_and(|n| n.starts_with("sidecar~")),
            "{s:?}"
        );
        assert!(s.tag("peer.address").is_some(), "{s:?}");
        assert!(s.tag("http.url").is_some(), "{s:?}");
        assert!(s.tag("request_size").is_some() && s.tag("response_size").is_some());
        assert!(s.tag("error").is_none(), "{s:?}");
    }
    assert_eq!(
        order[0].tag("upstream_cluster"),
        Some("outbound|80||b.mesh.svc.cluster.local")
    );
    assert_eq!(order[1].tag("upstream_cluster"), Some("inbound|8080||"));
    assert_eq!(order[0].tag("istio.canonical_service"), Some("a"));
    assert_eq!(order[3].tag("istio.canonical_service"), Some("c"));
    // The exporter counts a batch once the collector has answered: wait for it.
    chain.agents[0].wait_for_metrics("n1 counted its exported span", SETTLE, |m| {
        counter(m, "ambit_spans_exported_total") >= 1
    });
    // B's and C's SERVER spans above, and the context B's app passed on, came from the
    // destinations' byte relay (`http::passthrough`), not the full server.
    for (i, node) in [(1, "n2"), (2, "n3")] {
        chain.agents[i].wait_for_metrics(&format!("{node} relayed the request"), SETTLE, |m| {
            counter(m, "ambit_proxy_http_inbound_relayed_total") >= 1
        });
    }
}

/// The install guide's mesh config, to Jaeger's Zipkin port.
#[test]
fn a_request_chain_is_one_trace_of_four_spans() {
    let chain = chain("trace-chain", |jaeger| guide_mesh(100.0, jaeger));
    assert_one_trace_of_four_spans(&chain);
}

/// An `opentelemetry` extension provider (gRPC: neither `http` nor `grpc` set, Istio's default)
/// chosen by the mesh's `defaultProviders.tracing`, sampling from `defaultConfig.tracing`.
#[test]
fn a_request_chain_is_one_trace_of_four_spans_over_otlp_grpc() {
    let chain = chain_to(
        "trace-otlp-grpc",
        |pod| Collector::Otlp(OtlpCollector::grpc(pod, OTLP_GRPC_PORT)),
        |collector| {
            mesh(&format!(
                "enableTracing: true\ndefaultConfig:\n  tracing:\n    sampling: 100\nextensionProviders:\n- name: otel\n  opentelemetry:\n    service: {}\n    port: {OTLP_GRPC_PORT}\ndefaultProviders:\n  tracing: [otel]\n",
                collector.ip4()
            ))
        },
    );
    assert_one_trace_of_four_spans(&chain);
}

/// An `opentelemetry` provider with `http: {path}` (OTLP/HTTP, protobuf), chosen by a
/// root-namespace Telemetry object with `randomSamplingPercentage: 100`.
#[test]
fn a_request_chain_is_one_trace_of_four_spans_over_otlp_http() {
    const PATH: &str = "/otlp/v1/traces";
    let chain = chain_to(
        "trace-otlp-http",
        |pod| Collector::Otlp(OtlpCollector::http(pod, OTLP_HTTP_PORT, PATH)),
        |collector| {
            let mesh = mesh(&format!(
                "extensionProviders:\n- name: otel-http\n  opentelemetry:\n    service: {}\n    port: {OTLP_HTTP_PORT}\n    http:\n      path: {PATH}\n      timeout: 5s\n",
                collector.ip4()
            ));
            format!(
                "{mesh}---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\nspec:\n  tracing:\n  - providers: [{{name: otel-http}}]\n    randomSamplingPercentage: 100\n"
            )
        },
    );
    assert_one_trace_of_four_spans(&chain);
}

/// Sampling at 50 % (the guide's mesh config with `sampling: 50`) samples 50 % ± 7 % of 1,000
/// new traces; a Telemetry object with `randomSamplingPercentage: 100` takes over, and removing
/// it restores the mesh config's rate, without a restart.
#[test]
fn sampling_follows_the_mesh_config_and_the_telemetry_api_live() {
    let chain = chain("trace-sampling", |jaeger| guide_mesh(50.0, jaeger));
    // Half of 1,000: each request is its own trace (A sends no trace headers).
    call_b(&chain.a, "half", 1000);
    let sampled = |prefix: &str| {
        let spans = chain.collector.spans();
        traces(&spans, prefix)
            .values()
            .filter(|t| {
                t.iter()
                    .any(|s| s.kind == "CLIENT" && s.service_name == "a.mesh")
            })
            .count()
    };
    // n1's exporter sends its spans in order: once a marker request's span (sampled by its
    // caller's `x-b3-sampled: 1`) has arrived, every span before it has.
    let flushed = |prefix: &str| {
        let marker = format!("marker-{prefix}");
        let id = marker.clone();
        in_pod(&chain.a, || async move {
            let conn = Conn::h1(sa(B, 80)).await;
            let r = conn
                .get("b", "/", &[("x-request-id", &id), ("x-b3-sampled", "1")])
                .await;
            assert_eq!(r.status, 200);
        });
        let seen = settled(|| sampled(&marker), |n| *n == 1);
        assert_eq!(seen, 1, "the marker span of {prefix} reached the collector");
        sampled(prefix)
    };
    let n = flushed("half");
    assert!((430..=570).contains(&n), "50 % ± 7 % of 1,000: {n}");

    let telemetry = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 100
"#;
    let base = guide_mesh(50.0, &chain.jaeger);
    for a in &chain.agents {
        write_istio(a, &format!("{base}---\n{telemetry}"));
    }
    // Applied once a batch of 20 is sampled whole (at 50 %, one in a million by chance).
    let round = std::cell::Cell::new(0);
    settled(
        || {
            round.set(round.get() + 1);
            let prefix = format!("probe{}", round.get());
            call_b(&chain.a, &prefix, 20);
            flushed(&prefix)
        },
        |n| *n == 20,
    );
    call_b(&chain.a, "all", 100);
    assert_eq!(flushed("all"), 100, "randomSamplingPercentage: 100");

    // Removed: back to the mesh config's 50 % (a batch of 100 not sampled whole, then one
    // within 50 ± 25).
    for a in &chain.agents {
        write_istio(a, &base);
    }
    settled(
        || {
            round.set(round.get() + 1);
            let prefix = format!("back{}", round.get());
            call_b(&chain.a, &prefix, 100);
            flushed(&prefix)
        },
        |n| *n < 100,
    );
    call_b(&chain.a, "restored", 100);
    let n = flushed("restored");
    assert!((25..=75).contains(&n), "back to 50 %: {n} of 100");
}

/// A dead collector (nothing listening at the address) costs no request anything: every request
/// succeeds, and the agent counts the spans it could not deliver.
#[test]
fn a_dead_collector_drops_and_counts_spans() {
    let chain = chain("trace-dead", |_| {
        mesh("enableTracing: true\ndefaultConfig:\n  tracing:\n    sampling: 100\n    zipkin:\n      address: 10.96.23.99:9411\n")
    });
    call_b(&chain.a, "dead", 50);
    let n1 = &chain.agents[0];
    n1.wait_for_metrics("spans counted as dropped", SETTLE, |m| {
        metric(
            m,
            "ambit_spans_dropped_total",
            &[("reason", "export_failed")],
        ) + metric(
            m,
            "ambit_spans_dropped_total",
            &[("reason", "export_timeout")],
        ) >= 50
    });
}

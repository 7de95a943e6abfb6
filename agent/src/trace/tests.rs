//! Tracer tests against collectors that decode the real schemas (see `tests/collectors.rs`):
//! the A → B → C chain, sampling rates, an incoming "not sampled", and a dead or stalled
//! collector.

mod collectors;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Version;
use prometheus_client::registry::Registry;
use tokio::runtime::Handle;

use super::*;
use collectors::{Collector, Received};

fn workload(svc: &str, ip: &str) -> Arc<Workload> {
    Arc::new(Workload {
        canonical_service: svc.into(),
        canonical_revision: "v1".into(),
        namespace: "default".into(),
        mesh_id: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        node_id: format!("sidecar~{ip}~{svc}-0.default~default.svc.cluster.local"),
        ip: Some(ip.parse().expect("ip")),
    })
}

fn fast_batch() -> BatchSettings {
    BatchSettings {
        max_batch: 4,
        flush_interval: Duration::from_millis(50),
        ..BatchSettings::default()
    }
}

fn tracer(provider: Provider, batch: &BatchSettings) -> (Tracer, TraceMetrics) {
    let metrics = TraceMetrics::default();
    let t = Tracer::start(&provider, batch, metrics.clone(), &Handle::current()).expect("tracer");
    (t, metrics)
}

/// One proxy hop: extract what came in, decide, start a span, inject for the next hop, record,
/// end, finish. Returns the headers the next hop receives.
fn hop(
    tracer: &Tracer,
    kind: SpanKind,
    who: &Arc<Workload>,
    host: &str,
    percent: f64,
    headers: &HeaderMap,
    status: u16,
) -> HeaderMap {
    let incoming = extract(headers);
    let decision = decide(&incoming, percent);
    let mut span = SpanBuilder::start(kind, operation_name(host, 9080), &incoming, decision);
    let mut out = headers.clone();
    inject(span.context(), &mut out);
    span.record_request(
        &RequestInfo {
            headers,
            method: "GET",
            scheme: "http",
            authority: &format!("{host}:9080"),
            path: "/api",
            version: Version::HTTP_11,
            peer: who.ip,
        },
        who,
        &TagSettings::default(),
    );
    let cluster = format!("outbound|9080||{host}");
    tracer.finish(span.end(&ResponseInfo {
        status: Some(status),
        upstream_cluster: Some(&cluster),
        ..ResponseInfo::default()
    }));
    out
}

/// What an app that forwards trace headers copies from its request to its own call.
fn app_forwards(incoming: &HeaderMap, names: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        if let Some(v) = incoming.get(*name) {
            out.insert(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                v.clone(),
            );
        }
    }
    out
}

const B3_AND_W3C: [&str; 8] = [
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "traceparent",
    "tracestate",
];
const W3C_ONLY: [&str; 3] = ["x-request-id", "traceparent", "tracestate"];

/// A → B → C: four spans (client and server per hop), one trace, each span the child of the one
/// before it. `forwarded` is what app B copies onto its call to C.
async fn chain(provider: Provider, collector: &Collector, forwarded: &[&str]) {
    let (tracer, metrics) = tracer(provider, &fast_batch());
    let (a, b, c) = (
        workload("a", "10.0.0.1"),
        workload("b", "10.0.0.2"),
        workload("c", "10.0.0.3"),
    );
    let mut from_app_a = HeaderMap::new();
    from_app_a.insert("x-request-id", HeaderValue::from_static("req-chain"));
    // Node of A, outbound to B; node of B, inbound; app B calls C; node of B outbound; node of C.
    let to_b = hop(
        &tracer,
        SpanKind::Client,
        &a,
        "b.default.svc.cluster.local",
        100.0,
        &from_app_a,
        200,
    );
    let to_app_b = hop(
        &tracer,
        SpanKind::Server,
        &b,
        "b.default.svc.cluster.local",
        0.0,
        &to_b,
        200,
    );
    let from_app_b = app_forwards(&to_app_b, forwarded);
    let to_c = hop(
        &tracer,
        SpanKind::Client,
        &b,
        "c.default.svc.cluster.local",
        0.0,
        &from_app_b,
        503,
    );
    hop(
        &tracer,
        SpanKind::Server,
        &c,
        "c.default.svc.cluster.local",
        0.0,
        &to_c,
        503,
    );

    let spans = collector.store.wait_for(4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace: {spans:#?}");
    let find = |kind: &str, svc: &str| -> &Received {
        spans
            .iter()
            .find(|s| s.kind == kind && s.service_name == svc)
            .unwrap_or_else(|| panic!("no {kind} span of {svc}: {spans:#?}"))
    };
    let client_a = find("CLIENT", "a.default");
    let server_b = find("SERVER", "b.default");
    let client_b = find("CLIENT", "b.default");
    let server_c = find("SERVER", "c.default");
    assert_eq!(client_a.parent_id, None, "A's client span is the root");
    assert_eq!(server_b.parent_id.as_deref(), Some(client_a.id.as_str()));
    assert_eq!(client_b.parent_id.as_deref(), Some(server_b.id.as_str()));
    assert_eq!(server_c.parent_id.as_deref(), Some(client_b.id.as_str()));
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 4, "every span has its own id");

    assert_eq!(client_a.name, "b.default.svc.cluster.local:9080/*");
    assert_eq!(server_c.name, "c.default.svc.cluster.local:9080/*");
    for s in &spans {
        let tag = |k: &str| s.tags.get(k).map(String::as_str);
        assert_eq!(tag("guid:x-request-id"), Some("req-chain"), "{s:#?}");
        assert_eq!(tag("component"), Some("proxy"));
        assert_eq!(tag("http.method"), Some("GET"));
        assert_eq!(tag("http.protocol"), Some("HTTP/1.1"));
        assert_eq!(tag("istio.mesh_id"), Some("cluster.local"));
        assert!(tag("node_id").is_some_and(|n| n.starts_with("sidecar~")));
        assert!(s.duration_us >= 1 && s.timestamp_us > 1_600_000_000_000_000);
    }
    assert_eq!(
        server_c.tags.get("http.status_code").map(String::as_str),
        Some("503")
    );
    assert_eq!(server_c.tags.get("error").map(String::as_str), Some("true"));
    assert_eq!(server_b.tags.get("error"), None);
    // The collector stores a batch before it answers; the exporter counts after the answer.
    wait_until(|| metrics.exported() == 4, || format!("{metrics:?}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_to_zipkin() {
    let collector = collectors::zipkin().await;
    let provider = Provider::zipkin_address(&collector.addr.to_string());
    chain(provider, &collector, &B3_AND_W3C).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_to_zipkin_with_an_app_that_forwards_w3c_only() {
    let collector = collectors::zipkin().await;
    let provider = Provider::zipkin_address(&collector.addr.to_string());
    chain(provider, &collector, &W3C_ONLY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_to_otlp_grpc() {
    let collector = collectors::otlp_grpc().await;
    let provider = Provider::OtlpGrpc {
        endpoint: format!("http://{}", collector.addr),
        headers: vec![("x-tenant".into(), "blue".into())],
    };
    chain(provider, &collector, &B3_AND_W3C).await;
    // Istio's `grpc.initialMetadata` is on every call.
    let seen = collector.store.header_values("x-tenant");
    assert!(
        !seen.is_empty() && seen.iter().all(|v| v == "blue"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_to_otlp_http() {
    let collector = collectors::otlp_http().await;
    // No path: OTLP/HTTP's default `/v1/traces` applies.
    let provider = Provider::OtlpHttp {
        url: format!("http://{}", collector.addr),
        headers: vec![("Authorization".into(), "Bearer t0ken".into())],
    };
    chain(provider, &collector, &B3_AND_W3C).await;
    // Istio's `http.headers` is on every request.
    let seen = collector.store.header_values("authorization");
    assert!(
        !seen.is_empty() && seen.iter().all(|v| v == "Bearer t0ken"),
        "{seen:?}"
    );
}

/// 1,000 fresh traces at 50 %: 50 % ± 7 % are sampled, and each sampled trace arrives whole
/// (the second hop follows the first hop's decision even at 0 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_of_fresh_traces_are_sampled_and_whole() {
    let collector = collectors::zipkin().await;
    let batch = BatchSettings {
        max_batch: 64,
        ..fast_batch()
    };
    let (tracer, metrics) = tracer(
        Provider::zipkin_address(&collector.addr.to_string()),
        &batch,
    );
    let (a, b) = (workload("a", "10.0.0.1"), workload("b", "10.0.0.2"));
    let mut sampled_here = 0;
    for _ in 0..1_000 {
        let to_b = hop(
            &tracer,
            SpanKind::Client,
            &a,
            "b",
            50.0,
            &HeaderMap::new(),
            200,
        );
        if to_b["x-b3-sampled"] == "1" {
            sampled_here += 1;
        }
        hop(&tracer, SpanKind::Server, &b, "b", 0.0, &to_b, 200);
    }
    assert!(
        (430..=570).contains(&sampled_here),
        "{sampled_here} of 1000 traces sampled at 50 %"
    );
    let spans = collector.store.wait_for(2 * sampled_here).await;
    let mut per_trace: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &spans {
        *per_trace.entry(&s.trace_id).or_default() += 1;
    }
    assert_eq!(
        per_trace.len(),
        sampled_here,
        "collector traces = sampled traces"
    );
    assert!(
        per_trace.values().all(|n| *n == 2),
        "every sampled trace is whole"
    );
    assert_eq!(metrics.exported() as usize, 2 * sampled_here);
}

/// `x-b3-sampled: 0` (or W3C flags 00, or `b3: 0`) from the caller wins over 100 %: no span is
/// exported and the decision travels on. A sampled marker trace sent afterwards through the same
/// queue shows the collector has seen everything before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incoming_not_sampled_is_honoured() {
    let collector = collectors::zipkin().await;
    let (tracer, metrics) = tracer(
        Provider::zipkin_address(&collector.addr.to_string()),
        &fast_batch(),
    );
    let a = workload("a", "10.0.0.1");
    let denials: [&[(&str, &str)]; 3] = [
        &[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ],
        &[(
            "traceparent",
            "00-463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-00",
        )],
        &[("b3", "0")],
    ];
    for denial in denials {
        let mut h = HeaderMap::new();
        for (k, v) in denial {
            h.insert(*k, HeaderValue::from_static(v));
        }
        let next = hop(&tracer, SpanKind::Server, &a, "a", 100.0, &h, 200);
        assert_eq!(next["x-b3-sampled"], "0", "{denial:?}");
        assert!(next["traceparent"]
            .to_str()
            .expect("ascii")
            .ends_with("-00"));
        let after = hop(&tracer, SpanKind::Client, &a, "b", 100.0, &next, 200);
        assert_eq!(after["x-b3-sampled"], "0", "the next hop follows");
    }
    let mut marker = HeaderMap::new();
    marker.insert("x-request-id", HeaderValue::from_static("marker"));
    hop(&tracer, SpanKind::Client, &a, "b", 100.0, &marker, 200);
    let spans = collector.store.wait_for(1).await;
    assert_eq!(spans.len(), 1, "only the marker: {spans:#?}");
    assert_eq!(spans[0].tags["guid:x-request-id"], "marker");
    wait_until(|| metrics.exported() == 1, || format!("{metrics:?}")).await;
    assert_eq!(metrics.dropped("queue_full"), 0);
}

/// A port with nothing listening: every span is dropped and counted as an export failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_collector_drops_and_counts() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    for provider in [
        Provider::zipkin_address(&format!("127.0.0.1:{port}")),
        Provider::OtlpHttp {
            url: format!("http://127.0.0.1:{port}/v1/traces"),
            headers: vec![],
        },
        Provider::OtlpGrpc {
            endpoint: format!("http://127.0.0.1:{port}"),
            headers: vec![],
        },
    ] {
        let (tracer, metrics) = tracer(provider.clone(), &fast_batch());
        let a = workload("a", "10.0.0.1");
        for _ in 0..10 {
            hop(
                &tracer,
                SpanKind::Client,
                &a,
                "b",
                100.0,
                &HeaderMap::new(),
                200,
            );
        }
        wait_until(
            || metrics.dropped("export_failed") == 10,
            || format!("{provider:?}: {metrics:?}"),
        )
        .await;
        assert_eq!(metrics.exported(), 0);
        assert_eq!(metrics.dropped("queue_full"), 0);
    }
}

/// A collector that accepts connections and never answers holds the exporter in its first
/// send; the bounded queue fills, and `finish` keeps returning and counts what it drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_without_blocking() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
            let _ = accepted_tx.send(());
        }
    });
    let batch = BatchSettings {
        queue_capacity: 8,
        max_batch: 1,
        flush_interval: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(3600),
        request_timeout: Duration::from_secs(3600),
    };
    let (tracer, metrics) = tracer(Provider::zipkin_address(&addr.to_string()), &batch);
    let a = workload("a", "10.0.0.1");
    // The first span goes out and sticks in the collector.
    hop(
        &tracer,
        SpanKind::Client,
        &a,
        "b",
        100.0,
        &HeaderMap::new(),
        200,
    );
    accepted_rx.recv().await.expect("the exporter connected");
    // The data path goes on: the queue takes `queue_capacity` more, then drops.
    let calls = 100;
    for _ in 0..calls {
        hop(
            &tracer,
            SpanKind::Client,
            &a,
            "b",
            100.0,
            &HeaderMap::new(),
            200,
        );
    }
    let dropped = metrics.dropped("queue_full");
    assert!(
        dropped >= calls - batch.queue_capacity as u64,
        "{dropped} of {calls} dropped with a queue of {}",
        batch.queue_capacity
    );
    assert_eq!(metrics.exported(), 0);

    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains(&format!(
            "ambit_spans_dropped_total{{reason=\"queue_full\"}} {dropped}"
        )),
        "{text}"
    );
    assert!(text.contains("ambit_spans_exported_total 0"), "{text}");
}

/// Polls a counter until it holds; the deadline only turns a hang into a message.
async fn wait_until(done: impl Fn() -> bool, what: impl Fn() -> String) {
    let wait = async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .is_err()
    {
        panic!("never happened: {}", what());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracers_share_one_per_provider() {
    let tracers = Tracers::new(Handle::current(), TraceMetrics::default());
    let zipkin = TraceSettings::new(Provider::zipkin_address("127.0.0.1:9411"));
    let otlp = TraceSettings::new(Provider::OtlpGrpc {
        endpoint: "http://127.0.0.1:4317".into(),
        headers: vec![],
    });
    let one = tracers.get(&zipkin).expect("zipkin");
    let again = tracers.get(&TraceSettings {
        sampling_percent: 50.0,
        ..zipkin.clone()
    });
    assert!(std::sync::Arc::ptr_eq(&one, &again.expect("zipkin again")));
    let other = tracers.get(&otlp).expect("otlp");
    assert!(!std::sync::Arc::ptr_eq(&one, &other));
    assert_eq!(tracers.len(), 2);
    tracers.retain(|p| matches!(p, Provider::OtlpGrpc { .. }));
    assert_eq!(tracers.len(), 1);
}

#[test]
fn bad_settings_name_the_field() {
    let cases = [
        (
            TraceSettings::new(Provider::Zipkin {
                url: "https://zipkin:9411/api/v2/spans".into(),
            }),
            "zipkin.url",
        ),
        (
            TraceSettings::new(Provider::OtlpHttp {
                url: "not a url".into(),
                headers: vec![],
            }),
            "opentelemetry.http.url",
        ),
        (
            TraceSettings::new(Provider::OtlpGrpc {
                endpoint: "otel:4317".into(),
                headers: vec![],
            }),
            "opentelemetry.grpc.endpoint",
        ),
        (
            TraceSettings {
                sampling_percent: 150.0,
                ..TraceSettings::new(Provider::zipkin_address("zipkin:9411"))
            },
            "sampling_percent",
        ),
        (
            TraceSettings {
                batch: BatchSettings {
                    queue_capacity: 0,
                    ..BatchSettings::default()
                },
                ..TraceSettings::new(Provider::zipkin_address("zipkin:9411"))
            },
            "queue_capacity",
        ),
    ];
    for (settings, field) in cases {
        let err = settings.validate().expect_err(field).to_string();
        assert!(err.contains(field), "{err} should name {field}");
    }
    TraceSettings::new(Provider::zipkin_address(
        "jaeger-collector.observability:9411",
    ))
    .validate()
    .expect("Istio's install-guide address");
}

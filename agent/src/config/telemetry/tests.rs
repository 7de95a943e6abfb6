//! MeshConfig, Telemetry and their resolution, with Istio's documented examples.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::istio::IstioConfig;
use crate::config::mesh::MeshConfig;
use crate::config::{parse, Object, Parsed};

fn yaml(text: &str) -> serde_json::Value {
    serde_yaml::from_str(text).expect("test YAML")
}

fn mesh(text: &str) -> MeshConfig {
    MeshConfig::from_yaml(text).expect("valid mesh config").0
}

fn config_map(mesh_yaml: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": mesh_yaml},
    })
}

fn telemetry(text: &str) -> Arc<TelemetryObject> {
    match parse(yaml(text)) {
        Parsed::Object(Object::Istio(IstioConfig::Telemetry(t))) => Arc::new(*t),
        other => panic!("expected a valid Telemetry, got {other:?}"),
    }
}

fn rejected(value: serde_json::Value) -> Vec<(String, String)> {
    match parse(value) {
        Parsed::Rejected(r) => r
            .errors
            .into_iter()
            .map(|e| (format!("{}", e.object), e.field))
            .collect(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const GUIDE: &str = "
enableTracing: true
defaultConfig:
  tracing:
    sampling: 1.0
    zipkin:
      address: jaeger-collector.observability:9411
";

// ---- MeshConfig ---------------------------------------------------------------------------------

#[test]
fn the_install_guide_mesh_config_means_zipkin_at_one_percent() {
    let m = mesh(GUIDE);
    assert!(m.enable_tracing);
    let t = resolve(&m, &[], "istio-system", "default", &BTreeMap::new());
    let tracing = t.server.tracing.expect("tracing on");
    assert_eq!(tracing.sampling_percent, 1.0);
    assert_eq!(
        tracing.exporter,
        TraceExporter::Zipkin {
            endpoint: "jaeger-collector.observability:9411".into(),
            path: "/api/v2/spans".into(),
            max_tag_length: 0,
            w3c: false,
        }
    );
    // Envoy's Zipkin tracer as Istio configures it by default: B3 headers only.
    assert_eq!(tracing.export.propagation, crate::trace::Propagation::B3);
    assert!(tracing.report_spans);
    assert_eq!(t.client.tracing.map(|c| c.sampling_percent), Some(1.0));
}

#[test]
fn the_configmap_parses_and_unknown_fields_are_ignored() {
    let text = format!("{GUIDE}\nrootNamespace: istio-system\ndefaultConfig2: 1\n");
    match parse(config_map(&text)) {
        Parsed::Object(Object::Istio(IstioConfig::MeshConfig(m))) => {
            assert_eq!(m.mesh.default_sampling(), 1.0);
        }
        other => panic!("expected the mesh config, got {other:?}"),
    }
    let (_, ignored) = MeshConfig::from_yaml(&text).expect("valid");
    assert!(
        ignored.contains(&"rootNamespace".to_string()),
        "{ignored:?}"
    );
}

#[test]
fn other_configmaps_are_not_read() {
    let mut v = config_map(GUIDE);
    v["metadata"]["name"] = "kube-root-ca.crt".into();
    assert!(matches!(parse(v), Parsed::Ignored { .. }));
}

#[test]
fn istio_defaults_apply_without_a_mesh_config() {
    let m = MeshConfig::default();
    assert!(m.enable_tracing);
    assert_eq!(m.default_sampling(), 1.0);
    assert_eq!(
        m.access_log_encoding,
        crate::config::mesh::AccessLogEncoding::Text
    );
    let names: Vec<&str> = m
        .extension_providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["prometheus", "stackdriver", "envoy"]);
    // No tracer configured, no access log file: nothing but metrics.
    let t = resolve(&m, &[], "istio-system", "default", &BTreeMap::new());
    assert_eq!(t.server.tracing, None);
    assert!(!t.server.access_log.enabled());
    assert!(t
        .server
        .metrics
        .records(crate::config::istio::telemetry::IstioMetric::RequestCount));
}

#[test]
fn bad_mesh_values_name_the_configmap_and_field() {
    let cases = [
        ("defaultConfig:\n  tracing:\n    sampling: 150\n", "data.mesh.defaultConfig.tracing.sampling"),
        ("accessLogEncoding: XML\n", "data.mesh.accessLogEncoding"),
        (
            "extensionProviders:\n- name: z\n  zipkin:\n    service: zipkin.istio-system.svc.cluster.local\n    port: -1\n",
            "data.mesh.extensionProviders[0].zipkin.port",
        ),
        (
            "extensionProviders:\n- name: z\n  zipkin:\n    service: ''\n    port: 9411\n",
            "data.mesh.extensionProviders[0].zipkin.service",
        ),
        ("enableTracing: [1]\n", "data.mesh.enableTracing"),
        ("accessLogEncoding: JSON\naccessLogFormat: 'not json'\n", "data.mesh.accessLogFormat"),
        ("a: [\n", "data.mesh"),
    ];
    for (text, field) in cases {
        let errors = rejected(config_map(text));
        assert!(
            errors.contains(&("ConfigMap istio-system/istio".into(), field.into())),
            "{text}: {errors:?}"
        );
    }
}

#[test]
fn extension_providers_merge_with_the_builtin_ones() {
    let m = mesh(
        "
extensionProviders:
- name: otel
  opentelemetry:
    service: observability/otel-collector.observability.svc.cluster.local
    port: 4318
    http:
      path: /v1/traces
      timeout: 5s
      headers:
      - name: x-token
        value: abc
- name: envoy
  envoyFileAccessLog:
    path: /tmp/envoy.log
    logFormat:
      labels:
        code: '%RESPONSE_CODE%'
- name: jaeger
  zipkin:
    service: jaeger.observability.svc.cluster.local
    port: 9411
    maxTagLength: 64
    traceContextOption: USE_B3_WITH_W3C_PROPAGATION
defaultProviders:
  tracing: [otel]
  accessLogging: [envoy]
",
    );
    let names: Vec<&str> = m
        .extension_providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["prometheus", "stackdriver", "envoy", "otel", "jaeger"]
    );
    let t = resolve(&m, &[], "istio-system", "default", &BTreeMap::new());
    let tracing = t.server.tracing.expect("otel");
    assert_eq!(tracing.export.propagation, crate::trace::Propagation::W3c);
    // Istio's `[<namespace>/]<hostname>`: the collector is the hostname.
    assert_eq!(
        tracing.export.provider,
        crate::trace::Provider::OtlpHttp {
            url: "http://otel-collector.observability.svc.cluster.local:4318/v1/traces".into(),
            headers: vec![("x-token".into(), "abc".into())],
        }
    );
    let TraceExporter::OpenTelemetry(o) = tracing.exporter else {
        panic!("expected OpenTelemetry");
    };
    assert_eq!(o.port, 4318);
    let http = o.http.expect("http");
    assert_eq!(http.timeout, Some(Duration::from_secs(5)));
    assert_eq!(http.headers[0].value.as_deref(), Some("abc"));
    let sink = &t.server.access_log.sinks[0];
    assert_eq!(sink.path, "/tmp/envoy.log");
    assert!(matches!(&sink.format, LogFormat::Json(Some(l)) if l.contains_key("code")));
}

#[test]
fn legacy_access_log_file_and_encoding() {
    let m = mesh("accessLogFile: /dev/stdout\naccessLogEncoding: JSON\n");
    let t = resolve(&m, &[], "istio-system", "ns", &BTreeMap::new());
    assert_eq!(t.server.access_log.sinks.len(), 1);
    assert_eq!(t.server.access_log.sinks[0].format, LogFormat::Json(None));
    let m = mesh("accessLogFile: /tmp/a\naccessLogFormat: '%RESPONSE_CODE%'\n");
    let t = resolve(&m, &[], "istio-system", "ns", &BTreeMap::new());
    assert_eq!(
        t.client.access_log.sinks[0].format,
        LogFormat::Text(Some("%RESPONSE_CODE%\n".into()))
    );
}

// ---- Telemetry ----------------------------------------------------------------------------------

/// istio.io "Telemetry API" task / reference examples, verbatim but for the provider names.
const MESH_DEFAULT: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: mesh-default
  namespace: istio-system
spec:
  accessLogging:
  - providers:
    - name: envoy
";

const TRACING_100: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: mesh-default
  namespace: istio-system
spec:
  tracing:
  - randomSamplingPercentage: 100.00
";

const FILTER_400: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: default-exception-logging
  namespace: istio-system
spec:
  accessLogging:
  - providers:
    - name: envoy
    filter:
      expression: \"response.code >= 400\"
";

const DISABLE_NS: &str = "
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata:
  name: namespace-no-log
  namespace: frontend
spec:
  accessLogging:
  - disabled: true
";

const WORKLOAD_TRACING: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: workload-override
  namespace: myapp
spec:
  selector:
    matchLabels:
      service.istio.io/canonical-name: frontend
  tracing:
  - disableSpanReporting: true
";

const METRICS: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: namespace-metrics
  namespace: myapp
spec:
  metrics:
  - providers:
    - name: prometheus
    overrides:
    - match:
        metric: REQUEST_COUNT
        mode: CLIENT
      disabled: true
    - match:
        metric: REQUEST_DURATION
      tagOverrides:
        request_host:
          value: \"request.host\"
        request_protocol:
          operation: REMOVE
    reportingInterval: 10s
";

#[test]
fn documented_examples_parse() {
    for t in [
        MESH_DEFAULT,
        TRACING_100,
        FILTER_400,
        DISABLE_NS,
        WORKLOAD_TRACING,
        METRICS,
    ] {
        telemetry(t);
    }
}

#[test]
fn sampling_100_and_a_400_filter_with_the_guide_mesh_config() {
    let m = mesh(GUIDE);
    let objects = [telemetry(TRACING_100), telemetry(FILTER_400)];
    let mut objects = objects.to_vec();
    sort_by_creation(&mut objects);
    // Two namespace-wide objects in the root namespace: Istio uses the oldest only (by name here).
    let t = resolve(&m, &objects, "istio-system", "default", &BTreeMap::new());
    let sinks = &t.server.access_log.sinks;
    assert_eq!(sinks.len(), 1, "default-exception-logging sorts first");
    let filter = sinks[0].filter.as_ref().expect("filter");
    assert!(filter.matches(&RequestAttrs {
        response_code: Some(503),
        ..Default::default()
    }));
    assert!(!filter.matches(&RequestAttrs {
        response_code: Some(200),
        ..Default::default()
    }));
    // Tracing falls back to the legacy mesh settings (no Telemetry tracing applies).
    assert_eq!(t.server.tracing.map(|t| t.sampling_percent), Some(1.0));
    // Alone, the tracing object raises sampling to 100%, with the default provider it needs.
    let m = mesh(&format!(
        "{GUIDE}extensionProviders:\n- name: zipkin\n  zipkin:\n    service: jaeger-collector.observability\n    port: 9411\ndefaultProviders:\n  tracing: [zipkin]\n"
    ));
    let t = resolve(
        &m,
        &[telemetry(TRACING_100)],
        "istio-system",
        "default",
        &BTreeMap::new(),
    );
    assert_eq!(t.server.tracing.map(|t| t.sampling_percent), Some(100.0));
    // Removing the objects restores the defaults.
    let t = resolve(&m, &[], "istio-system", "default", &BTreeMap::new());
    assert_eq!(t.server.tracing.map(|t| t.sampling_percent), Some(1.0));
}

#[test]
fn namespace_overrides_root_and_workload_overrides_namespace() {
    let m = MeshConfig::default();
    let root = telemetry(MESH_DEFAULT);
    let ns = telemetry(DISABLE_NS);
    let objects = vec![root, ns];
    let on = resolve(&m, &objects, "istio-system", "backend", &BTreeMap::new());
    assert!(
        on.server.access_log.enabled(),
        "root enables envoy everywhere"
    );
    let off = resolve(&m, &objects, "istio-system", "frontend", &BTreeMap::new());
    assert!(!off.server.access_log.enabled(), "frontend disables it");

    let m = mesh(GUIDE);
    let w = telemetry(WORKLOAD_TRACING);
    let sel = labels(&[("service.istio.io/canonical-name", "frontend")]);
    let t = resolve(&m, std::slice::from_ref(&w), "istio-system", "myapp", &sel);
    // disableSpanReporting with no provider: Istio has no provider to use, so no tracer.
    assert_eq!(t.server.tracing, None);
    let m = mesh(&format!("{GUIDE}defaultProviders:\n  tracing: [envoy-zipkin]\nextensionProviders:\n- name: envoy-zipkin\n  zipkin:\n    service: zipkin.istio-system.svc.cluster.local\n    port: 9411\n"));
    let t = resolve(&m, std::slice::from_ref(&w), "istio-system", "myapp", &sel);
    assert_eq!(t.server.tracing.map(|t| t.report_spans), Some(false));
    let other = resolve(&m, &[w], "istio-system", "myapp", &labels(&[("app", "x")]));
    assert_eq!(other.server.tracing.map(|t| t.report_spans), Some(true));
}

#[test]
fn provider_lists_replace_and_client_server_modes_split() {
    let m = mesh("extensionProviders:\n- name: file\n  envoyFileAccessLog:\n    path: /tmp/x\n");
    let root = telemetry(MESH_DEFAULT);
    let ns = telemetry(
        "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: a, namespace: app}
spec:
  accessLogging:
  - providers: [{name: file}]
    match: {mode: SERVER}
",
    );
    let t = resolve(&m, &[root, ns], "istio-system", "app", &BTreeMap::new());
    let names = |s: &SideTelemetry| -> Vec<String> {
        s.access_log
            .sinks
            .iter()
            .map(|k| k.provider.clone())
            .collect()
    };
    assert_eq!(
        names(&t.server),
        ["file"],
        "the namespace's list replaces the root's"
    );
    // Istio mergeLogs: the namespace names no provider for the client side, so the root's stay.
    assert_eq!(names(&t.client), ["envoy"]);
}

#[test]
fn metric_overrides_resolve_per_side() {
    let t = resolve(
        &MeshConfig::default(),
        &[telemetry(METRICS)],
        "istio-system",
        "myapp",
        &BTreeMap::new(),
    );
    use crate::config::istio::telemetry::IstioMetric;
    assert!(!t.client.metrics.records(IstioMetric::RequestCount));
    assert!(t.server.metrics.records(IstioMetric::RequestCount));
    let o = &t.server.metrics.overrides["REQUEST_DURATION"];
    assert_eq!(
        o.tags["request_host"],
        TagAction::Upsert("request.host".into())
    );
    assert_eq!(o.tags["request_protocol"], TagAction::Remove);
    assert_eq!(
        t.server.metrics.reporting_interval,
        Some(Duration::from_secs(10))
    );
    let off = telemetry(
        "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: off, namespace: myapp}
spec:
  metrics:
  - overrides:
    - disabled: true
",
    );
    let t = resolve(
        &MeshConfig::default(),
        &[off],
        "istio-system",
        "myapp",
        &BTreeMap::new(),
    );
    assert!(!t.server.metrics.enabled && !t.client.metrics.enabled);
}

#[test]
fn bad_telemetry_names_object_and_field() {
    let cases = [
        (
            "spec:\n  tracing:\n  - randomSamplingPercentage: 150\n",
            "spec.tracing[0].randomSamplingPercentage",
        ),
        (
            "spec:\n  accessLogging:\n  - filter:\n      expression: 'response.code >='\n",
            "spec.accessLogging[0].filter.expression",
        ),
        (
            "spec:\n  metrics:\n  - overrides:\n    - tagOverrides:\n        t: {operation: UPSERT}\n",
            "spec.metrics[0].overrides[0].tagOverrides.t.value",
        ),
        (
            "spec:\n  metrics:\n  - overrides:\n    - match: {metric: NOPE}\n",
            "spec.metrics[0].overrides[0].match.metric",
        ),
        (
            "spec:\n  tracing:\n  - customTags:\n      a: {}\n",
            "spec.tracing[0].customTags.a",
        ),
        ("spec:\n  accessLogging:\n  - providers: [{name: ''}]\n", "spec.accessLogging[0].providers[0].name"),
    ];
    for (spec, field) in cases {
        let text = format!("apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t, namespace: ns}}\n{spec}");
        let errors = rejected(yaml(&text));
        assert!(
            errors.contains(&("Telemetry ns/t".into(), field.into())),
            "{spec}: {errors:?}"
        );
    }
}

#[test]
fn unknown_providers_are_named() {
    let t = telemetry(
        "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: ns}
spec:
  tracing:
  - providers: [{name: nowhere}]
  metrics:
  - providers: [{name: Prometheus}]
",
    );
    let errors = unknown_providers(&MeshConfig::default(), &t.spec);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "spec.tracing[0].providers[0].name");
    assert!(errors[0].message.contains("nowhere"));
}

// ---- filters ------------------------------------------------------------------------------------

#[test]
fn filter_forms_istio_documents() {
    let mut h = http::HeaderMap::new();
    h.insert("x-user", "jason".parse().expect("value"));
    let a = RequestAttrs {
        method: Some("GET"),
        path: Some("/api/v1/items?x=1"),
        host: Some("reviews:9080"),
        headers: Some(&h),
        response_code: Some(404),
        duration: Some(Duration::from_millis(1500)),
        mtls: Some(true),
        upstream_address: Some("10.0.0.9:9080".parse().expect("addr")),
        ..Default::default()
    };
    let yes = [
        "response.code >= 400",
        "response.code == 404 && request.method == 'GET'",
        "request.url_path == '/api/v1/items' && request.path != request.url_path",
        "request.host.startsWith('reviews')",
        "request.headers['x-user'] == 'jason'",
        "connection.mtls",
        "!(response.code < 400) || false",
        "upstream.address == '10.0.0.9:9080'",
        "response.duration > duration('1s') && request.duration <= duration('2s')",
        "(response.code > 500 || response.code <= 404) && true",
    ];
    for e in yes {
        let f = Filter::compile(e).expect(e);
        assert_eq!(f.evaluate(&a), Ok(true), "{e}");
    }
    let no = [
        "response.code < 400",
        "request.method != 'GET'",
        "!connection.mtls",
    ];
    for e in no {
        assert!(!Filter::compile(e).expect(e).matches(&a), "{e}");
    }
}

#[test]
fn filter_errors_do_not_log_as_envoy_does() {
    let f = Filter::compile("request.headers['missing'] == 'x'").expect("parses");
    let a = RequestAttrs {
        headers: None,
        ..Default::default()
    };
    assert!(f.evaluate(&a).is_err());
    assert!(!f.matches(&a));
    let f = Filter::compile("response.code").expect("parses");
    assert!(!f.matches(&RequestAttrs {
        response_code: Some(1),
        ..Default::default()
    }));
    assert!(matches!(
        Filter::compile("response.code >="),
        Err(FilterError::Parse { .. })
    ));
}

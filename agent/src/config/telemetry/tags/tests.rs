//! Tag overrides: Istio's merge per side and metric, the plan, evaluation and application.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::config::istio::IstioConfig;
use crate::config::mesh::MeshConfig;
use crate::config::telemetry::{resolve, TelemetryObject};
use crate::config::{parse, Object, Parsed};

fn telemetry(text: &str) -> Arc<TelemetryObject> {
    let value: serde_json::Value = serde_yaml::from_str(text).expect("test YAML");
    match parse(value) {
        Parsed::Object(Object::Istio(IstioConfig::Telemetry(t))) => Arc::new(*t),
        other => panic!("expected a valid Telemetry, got {other:?}"),
    }
}

fn rejected_fields(text: &str) -> Vec<String> {
    let value: serde_json::Value = serde_yaml::from_str(text).expect("test YAML");
    match parse(value) {
        Parsed::Rejected(r) => r
            .errors
            .into_iter()
            .inspect(|e| assert_eq!(format!("{}", e.object), "Telemetry ns/t"))
            .map(|e| e.field)
            .collect(),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// The Istio task's example, on the client side only, with a mesh-wide ALL_METRICS override
/// before it.
const CLIENT_TAGS: &str = "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: client-tags, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: ALL_METRICS, mode: CLIENT}
      tagOverrides:
        destination_port: {value: 'string(destination.port)'}
        request_protocol: {value: \"'first'\"}
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides:
        request_protocol: {operation: REMOVE}
        request_host: {value: request.host}
";

fn standard(metric: IstioMetric) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![
        ("reporter", "source"),
        ("source_workload", "sleep"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ];
    if TAGGED[..4].contains(&metric) {
        out.push(("response_code", "200"));
    }
    out
}

const SLEEP: Principals<'static> = Principals {
    source: Some("spiffe://cluster.local/ns/bookinfo/sa/sleep"),
    destination: None,
};

fn attrs() -> (http::HeaderMap, RequestAttrs<'static>) {
    let mut h = http::HeaderMap::new();
    h.insert("x-user", "jason".parse().expect("value"));
    h.insert("user-agent", "curl/8".parse().expect("value"));
    let a = RequestAttrs {
        method: Some("GET"),
        path: Some("/ratings/1"),
        host: Some("reviews.bookinfo:9080"),
        response_code: Some(200),
        mtls: Some(true),
        source_address: Some("10.0.0.1:40000".parse().expect("addr")),
        destination_address: Some("10.96.0.10:9080".parse().expect("addr")),
        ..Default::default()
    };
    (h, a)
}

#[test]
fn istio_merges_all_metrics_then_the_metric_per_side() {
    let t = resolve(
        &MeshConfig::default(),
        &[telemetry(CLIENT_TAGS)],
        "istio-system",
        "bookinfo",
        &BTreeMap::new(),
    );
    assert!(t.server.metrics.tags.is_none(), "CLIENT overrides only");
    let plan = t.client.metrics.tags.clone().expect("client tags");
    for m in TAGGED {
        assert!(plan.changes(m), "ALL_METRICS covers {m:?}");
    }
    let (_, a) = attrs();
    let tags = plan.evaluate(&a, SLEEP);
    // REQUEST_COUNT: the later, metric-specific REMOVE wins over ALL_METRICS' UPSERT; the new
    // tags come after the standard ones, in name order.
    assert_eq!(
        tags.apply(
            IstioMetric::RequestCount,
            &standard(IstioMetric::RequestCount)
        ),
        [
            ("reporter", "source"),
            ("source_workload", "sleep"),
            ("response_flags", "-"),
            ("response_code", "200"),
            ("destination_port", "9080"),
            ("request_host", "reviews.bookinfo:9080"),
        ]
    );
    // Another metric keeps ALL_METRICS' UPSERT of a standard tag, in its place.
    assert_eq!(
        tags.apply(
            IstioMetric::TcpSentBytes,
            &standard(IstioMetric::TcpSentBytes)
        ),
        [
            ("reporter", "source"),
            ("source_workload", "sleep"),
            ("request_protocol", "first"),
            ("response_flags", "-"),
            ("destination_port", "9080"),
        ]
    );
    // The same expression is compiled once for all eight metrics.
    assert_eq!(plan.exprs.len(), 3);
}

#[test]
fn no_tag_overrides_no_plan() {
    let t = resolve(
        &MeshConfig::default(),
        &[telemetry(
            "
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: off, namespace: istio-system}
spec:
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT}
      disabled: true
",
        )],
        "istio-system",
        "bookinfo",
        &BTreeMap::new(),
    );
    assert!(t.client.metrics.tags.is_none() && t.server.metrics.tags.is_none());
    // A GRPC metric's tags are not among the eight: still no plan.
    let mut overrides = BTreeMap::new();
    overrides.insert(
        "GRPC_REQUEST_MESSAGES".to_string(),
        MetricOverride {
            disabled: false,
            tags: BTreeMap::from([("x".to_string(), TagAction::Remove)]),
        },
    );
    assert!(TagPlan::build(&overrides).is_none());
}

fn plan(tags: &[(&str, Option<&str>)]) -> Arc<TagPlan> {
    let tags = tags
        .iter()
        .map(|(k, v)| {
            let action = v.map_or(TagAction::Remove, |e| TagAction::Upsert(e.to_string()));
            (k.to_string(), action)
        })
        .collect();
    let overrides = BTreeMap::from([(
        "REQUEST_COUNT".to_string(),
        MetricOverride {
            disabled: false,
            tags,
        },
    )]);
    TagPlan::build(&overrides).expect("a plan")
}

#[test]
fn expressions_evaluate_per_request_as_istio_prints_them() {
    let p = plan(&[
        ("a_host", Some("request.host")),
        ("b_method", Some("request.method")),
        ("c_port", Some("string(destination.port)")),
        ("d_literal", Some("\"literal\"")),
        ("e_user", Some("request.headers['x-user']")),
        ("f_principal", Some("source.principal")),
        ("g_int", Some("destination.port")),
        ("h_bool", Some("connection.mtls")),
        ("i_code", Some("response.code >= 400")),
        ("j_agent", Some("request.useragent")),
    ]);
    let (h, mut a) = attrs();
    a.headers = Some(&h);
    let tags = p.evaluate(&a, SLEEP);
    let out: BTreeMap<&str, &str> = tags
        .apply(IstioMetric::RequestCount, &[])
        .into_iter()
        .collect();
    assert_eq!(
        out,
        BTreeMap::from([
            ("a_host", "reviews.bookinfo:9080"),
            ("b_method", "GET"),
            ("c_port", "9080"),
            ("d_literal", "literal"),
            ("e_user", "jason"),
            ("f_principal", "spiffe://cluster.local/ns/bookinfo/sa/sleep"),
            ("g_int", "9080"),
            ("h_bool", "true"),
            ("i_code", "false"),
            ("j_agent", "curl/8"),
        ])
    );
    // Another request, other values: a different series.
    let other = p.evaluate(
        &RequestAttrs {
            host: Some("ratings:9080"),
            ..a
        },
        SLEEP,
    );
    assert_ne!(tags, other);
    assert_eq!(tags, p.evaluate(&a, SLEEP), "same values, same series");
}

#[test]
fn a_failing_expression_gives_unknown() {
    let p = plan(&[
        ("missing_header", Some("request.headers['x-missing']")),
        ("no_upstream", Some("string(upstream.port)")),
        ("type_error", Some("request.host + 1")),
        ("a_map", Some("request.headers")),
        ("request_protocol", Some("request.nope")),
    ]);
    let (h, mut a) = attrs();
    a.headers = Some(&h);
    let tags = p.evaluate(&a, SLEEP);
    let out = tags.apply(
        IstioMetric::RequestCount,
        &standard(IstioMetric::RequestCount),
    );
    for k in [
        "missing_header",
        "no_upstream",
        "type_error",
        "a_map",
        "request_protocol",
    ] {
        assert!(out.contains(&(k, "unknown")), "{k}: {out:?}");
    }
}

#[test]
fn upsert_of_a_standard_tag_a_metric_lacks_adds_nothing() {
    // Istio's filter: `response_code` is a standard tag, so an UPSERT only replaces it where the
    // metric has it; TCP metrics have none.
    let overrides = BTreeMap::from([(
        "TCP_OPENED_CONNECTIONS".to_string(),
        MetricOverride {
            disabled: false,
            tags: BTreeMap::from([("response_code".to_string(), TagAction::Upsert("'x'".into()))]),
        },
    )]);
    let p = TagPlan::build(&overrides).expect("plan");
    let tags = p.evaluate(&RequestAttrs::default(), Principals::default());
    let labels = standard(IstioMetric::TcpOpenedConnections);
    assert_eq!(
        tags.apply(IstioMetric::TcpOpenedConnections, &labels),
        labels
    );
    // Other metrics are untouched.
    let labels = standard(IstioMetric::RequestCount);
    assert_eq!(tags.apply(IstioMetric::RequestCount, &labels), labels);
}

#[test]
fn label_names() {
    for ok in ["request_host", "_x", "A9"] {
        assert!(valid_label_name(ok), "{ok}");
    }
    for bad in ["", "9a", "request-host", "__name__", "a.b", "é"] {
        assert!(!valid_label_name(bad), "{bad}");
    }
}

#[test]
fn bad_tag_overrides_are_rejected_with_their_field() {
    let head = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: ns}\nspec:\n  metrics:\n  - overrides:\n    - tagOverrides:\n";
    let cases = [
        (
            "        request-host: {value: request.host}\n",
            "spec.metrics[0].overrides[0].tagOverrides.request-host",
        ),
        (
            "        __name__: {value: request.host}\n",
            "spec.metrics[0].overrides[0].tagOverrides.__name__",
        ),
        (
            "        request_host: {value: 'request.host =='}\n",
            "spec.metrics[0].overrides[0].tagOverrides.request_host.value",
        ),
        (
            "        request_protocol: {operation: REMOVE, value: request.host}\n",
            "spec.metrics[0].overrides[0].tagOverrides.request_protocol.value",
        ),
    ];
    for (tags, field) in cases {
        let fields = rejected_fields(&format!("{head}{tags}"));
        assert_eq!(fields, [field], "{tags}");
    }
}

#[test]
fn equal_plans_of_two_snapshots_key_the_same_series() {
    use std::hash::BuildHasher;
    // Every snapshot resolves the settings again; a series must not split because of it.
    let tags = [
        ("request_host", Some("request.host")),
        ("request_protocol", None),
    ];
    let (a, b) = (plan(&tags), plan(&tags));
    assert!(!Arc::ptr_eq(&a, &b));
    let (_, attrs) = attrs();
    let (x, y) = (a.evaluate(&attrs, SLEEP), b.evaluate(&attrs, SLEEP));
    assert_eq!(x, y);
    let s = std::collections::hash_map::RandomState::new();
    assert_eq!(s.hash_one(&x), s.hash_one(&y));
    // A different plan with the same values is another series.
    let c = plan(&[("request_host", Some("request.host"))]);
    assert_ne!(x, c.evaluate(&attrs, SLEEP));
}

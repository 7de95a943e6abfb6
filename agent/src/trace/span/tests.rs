use super::*;
use crate::trace::sampling::{Decision, DecisionReason};
use http::HeaderValue;

fn workload(svc: &str) -> Arc<Workload> {
    Arc::new(Workload {
        canonical_service: svc.into(),
        canonical_revision: "v1".into(),
        namespace: "default".into(),
        mesh_id: "cluster.local".into(),
        cluster_id: "Kubernetes".into(),
        node_id: format!("sidecar~10.0.0.1~{svc}-1.default~default.svc.cluster.local"),
        ip: Some("10.0.0.1".parse().expect("ip")),
    })
}

fn yes() -> Decision {
    Decision {
        sampled: true,
        reason: DecisionReason::Random,
    }
}

#[test]
fn tags_as_envoy_names_them() {
    let mut h = HeaderMap::new();
    h.insert("x-request-id", HeaderValue::from_static("req-1"));
    h.insert("user-agent", HeaderValue::from_static("curl/8"));
    h.insert("x-tenant", HeaderValue::from_static("acme"));
    std::env::set_var("AMBIT_TRACE_TEST_ENV", "from-env");
    let tags = TagSettings {
        custom_tags: vec![
            CustomTag::literal("team", "blue"),
            CustomTag::header("tenant", HeaderName::from_static("x-tenant"), None),
            CustomTag::header("missing", HeaderName::from_static("x-none"), None),
            CustomTag::header("dflt", HeaderName::from_static("x-none"), Some("d".into())),
            CustomTag::environment("env", "AMBIT_TRACE_TEST_ENV", None),
        ],
        max_path_tag_length: 8,
        istio_tags: true,
    };
    let name = operation_name("reviews.default.svc.cluster.local", 9080);
    let mut b = SpanBuilder::start(SpanKind::Client, name, &Extracted::default(), yes());
    b.record_request(
        &RequestInfo {
            headers: &h,
            method: "GET",
            scheme: "http",
            authority: "reviews:9080",
            path: "/reviews/0?x=1",
            version: Version::HTTP_11,
            peer: Some("10.0.0.1".parse().expect("ip")),
        },
        &workload("productpage"),
        &tags,
    );
    let span = b.end(&ResponseInfo {
        status: Some(503),
        response_flags: "UF",
        request_size: 10,
        response_size: 20,
        upstream_cluster: Some("outbound|9080||reviews.default.svc.cluster.local"),
        upstream_cluster_name: None,
        remote_ip: None,
    });
    assert_eq!(span.name, "reviews.default.svc.cluster.local:9080/*");
    assert_eq!(span.service_name(), "productpage.default");
    let want = [
        ("http.method", "GET"),
        ("http.url", "http://reviews:9080/reviews"),
        ("http.protocol", "HTTP/1.1"),
        ("http.status_code", "503"),
        ("guid:x-request-id", "req-1"),
        ("user_agent", "curl/8"),
        ("downstream_cluster", "-"),
        ("peer.address", "10.0.0.1"),
        ("component", "proxy"),
        (
            "upstream_cluster",
            "outbound|9080||reviews.default.svc.cluster.local",
        ),
        (
            "upstream_cluster.name",
            "outbound|9080||reviews.default.svc.cluster.local",
        ),
        ("response_flags", "UF"),
        ("request_size", "10"),
        ("response_size", "20"),
        ("error", "true"),
        ("istio.canonical_service", "productpage"),
        ("istio.canonical_revision", "v1"),
        ("istio.namespace", "default"),
        ("istio.mesh_id", "cluster.local"),
        ("team", "blue"),
        ("tenant", "acme"),
        ("dflt", "d"),
        ("env", "from-env"),
    ];
    for (k, v) in want {
        assert_eq!(span.tag(k), Some(v), "tag {k}");
    }
    assert_eq!(span.tag("missing"), None);
    assert!(span.duration_us >= 1);
    assert!(span.context.parent_span_id.is_none());
}

#[test]
fn no_error_tag_below_500_and_unsampled_spans_stay_bare() {
    let span = SpanBuilder::start(SpanKind::Server, "x", &Extracted::default(), yes()).end(
        &ResponseInfo {
            status: Some(404),
            ..Default::default()
        },
    );
    assert_eq!(span.tag("error"), None);
    assert_eq!(span.tag("response_flags"), Some("-"));

    let no = Decision {
        sampled: false,
        reason: DecisionReason::Random,
    };
    let mut b = SpanBuilder::start(SpanKind::Server, "x", &Extracted::default(), no);
    let h = HeaderMap::new();
    b.record_request(
        &RequestInfo {
            headers: &h,
            method: "GET",
            scheme: "http",
            authority: "a",
            path: "/",
            version: Version::HTTP_2,
            peer: None,
        },
        &workload("a"),
        &TagSettings::default(),
    );
    let span = b.end(&ResponseInfo::default());
    assert!(span.tags.is_empty());
    assert!(!span.sampled());
}

#[test]
fn the_cluster_name_tag_has_its_own_value_when_it_differs() {
    let end = |name| {
        SpanBuilder::start(SpanKind::Client, "x", &Extracted::default(), yes()).end(&ResponseInfo {
            status: Some(200),
            response_flags: "URX,UF",
            upstream_cluster: Some("outbound|80|v1|a.ns.svc.cluster.local"),
            upstream_cluster_name: name,
            ..Default::default()
        })
    };
    let span = end(Some("a.ns.svc.cluster.local"));
    assert_eq!(
        span.tag("upstream_cluster"),
        Some("outbound|80|v1|a.ns.svc.cluster.local")
    );
    assert_eq!(
        span.tag("upstream_cluster.name"),
        Some("a.ns.svc.cluster.local")
    );
    assert_eq!(span.tag("response_flags"), Some("URX,UF"));
    let span = end(None);
    assert_eq!(
        span.tag("upstream_cluster.name"),
        Some("outbound|80|v1|a.ns.svc.cluster.local")
    );
    let names: Vec<&str> = span.tags.iter().map(|(k, _)| k).collect();
    assert_eq!(
        names,
        [
            "request_size",
            "response_size",
            "upstream_cluster",
            "upstream_cluster.name",
            "http.status_code",
            "response_flags"
        ]
    );
}

#[test]
fn a_repeated_header_is_tagged_by_its_first_value_as_get_finds_it() {
    let record = |h: &HeaderMap, peer: &str| {
        let mut b = SpanBuilder::start(SpanKind::Client, "x", &Extracted::default(), yes());
        b.record_request(
            &RequestInfo {
                headers: h,
                method: "GET",
                scheme: "http",
                authority: "a",
                path: "/p",
                version: Version::HTTP_11,
                peer: Some(peer.parse().expect("ip")),
            },
            &workload("a"),
            &TagSettings::default(),
        );
        b.end(&ResponseInfo::default())
    };
    let mut h = HeaderMap::new();
    h.append("user-agent", HeaderValue::from_static("first"));
    h.append("user-agent", HeaderValue::from_static("second"));
    h.append("x-forwarded-proto", HeaderValue::from_static("https"));
    h.append("x-forwarded-proto", HeaderValue::from_static("http"));
    h.append(
        "x-request-id",
        HeaderValue::from_bytes(b"caf\xc3\xa9").expect("value"),
    );
    h.append("x-request-id", HeaderValue::from_static("visible"));
    h.append("tracestate", HeaderValue::from_static("a=1"));
    let span = record(&h, "10.1.2.3");
    assert_eq!(span.tag("user_agent"), Some("first"));
    assert_eq!(span.tag("http.url"), Some("https://a/p"));
    // `get` finds the first value, which is not visible ASCII: no tag, as before.
    assert_eq!(span.tag("guid:x-request-id"), None);
    assert_eq!(span.trace_state, "a=1");
    assert_eq!(span.tag("peer.address"), Some("10.1.2.3"));
    for ip in [
        "0.0.0.0",
        "255.255.255.255",
        "10.0.0.1",
        "fd00::2",
        "::ffff:10.0.0.1",
    ] {
        let span = record(&HeaderMap::new(), ip);
        let want = ip.parse::<IpAddr>().expect("ip").to_string();
        assert_eq!(span.tag("peer.address"), Some(want.as_str()), "{ip}");
    }
}

#[test]
fn truncation_keeps_utf8_whole() {
    assert_eq!(truncate("/é", 2), "/");
    assert_eq!(truncate("/abc", 10), "/abc");
}

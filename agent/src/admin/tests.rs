use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

use super::problems::Problem;
use super::*;
use crate::config::{Kind, ObjectError, ObjectRef};
use crate::proxy::Counters as Metrics;

fn metrics_with_proxy() -> (Arc<Metrics>, AgentMetrics) {
    let proxy = Arc::new(Metrics::default());
    let p = proxy.clone();
    (proxy, AgentMetrics::new(Box::new(move || p.all())))
}

fn rendered(m: &AgentMetrics) -> String {
    m.render().unwrap_or_else(|e| panic!("render failed: {e}"))
}

fn bad_service() -> ObjectError {
    ObjectError::new(
        &ObjectRef::new(Kind::Service, "mesh", "bad"),
        "spec.ports[0].port",
        "must be 1..=65535",
    )
}

/// The store's problems as the control loop reports them.
trait SetConfig {
    fn set_config(&self, errors: &[ObjectError], rejected_total: u64);
}

impl SetConfig for AgentMetrics {
    fn set_config(&self, errors: &[ObjectError], rejected_total: u64) {
        let problems: Vec<Problem> = errors
            .iter()
            .map(|e| Problem {
                key: problems::ProblemKey::Object {
                    kind: e.object.kind.as_str(),
                    namespace: e.object.namespace.clone(),
                    name: e.object.name.clone(),
                    field: e.field.clone(),
                },
                message: e.to_string(),
            })
            .collect();
        self.set_problems(&problems, rejected_total);
    }
}

const BAD_SERVICE_SERIES: &str = "ambit_config_rejected_objects{kind=\"Service\",namespace=\"mesh\",name=\"bad\",field=\"spec.ports[0].port\"} 1";

#[test]
fn a_rejected_object_is_a_labelled_series_until_it_is_fixed() {
    let (_, m) = metrics_with_proxy();
    m.set_config(&[bad_service()], 1);
    let text = rendered(&m);
    assert!(
        text.contains(BAD_SERVICE_SERIES),
        "no series for the rejected object:\n{text}"
    );
    assert!(
        !text.contains("must be 1..=65535"),
        "the message must not be a label:\n{text}"
    );
    assert!(
        text.contains("ambit_config_rejections_total 1"),
        "rejection counter:\n{text}"
    );

    m.set_config(&[], 1);
    let text = rendered(&m);
    assert!(
        !text.contains("ambit_config_rejected_objects{"),
        "the series must go once the object is fixed:\n{text}"
    );
    assert!(
        text.contains("# TYPE ambit_config_rejected_objects gauge"),
        "the family stays described:\n{text}"
    );
    assert!(
        text.contains("ambit_config_rejections_total 1"),
        "the counter keeps its value:\n{text}"
    );
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with EOF:\n{text}"
    );
}

#[test]
fn two_errors_on_one_field_make_one_series_and_the_counter_only_grows() {
    let (_, m) = metrics_with_proxy();
    let mut again = bad_service();
    again.message = "another complaint".into();
    let other = ObjectError::new(
        &ObjectRef::new(Kind::Namespace, "", "shop"),
        "apiVersion",
        "unsupported",
    );
    m.set_config(&[bad_service(), again, other], 3);
    m.set_config(&[bad_service(), bad_service()], 2);
    let text = rendered(&m);
    assert_eq!(
        text.matches("ambit_config_rejected_objects{").count(),
        1,
        "one series per object and field:\n{text}"
    );
    assert!(
        text.contains("ambit_config_rejections_total 3"),
        "a counter never goes down:\n{text}"
    );
}

#[test]
fn label_values_are_escaped() {
    let (_, m) = metrics_with_proxy();
    let e = ObjectError::new(
        &ObjectRef::new(Kind::Pod, "mesh", "web"),
        "metadata.labels[\"a\\b\"]",
        "bad",
    );
    m.set_config(&[e], 1);
    let text = rendered(&m);
    assert!(
        text.contains("field=\"metadata.labels[\\\"a\\\\b\\\"]\"} 1"),
        "quote and backslash escaped:\n{text}"
    );
}

#[test]
fn proxy_and_kernel_counters_are_read_at_scrape_time() {
    let (proxy, m) = metrics_with_proxy();
    m.set_kernel(vec![("out_captured".into(), 7)]);
    m.set_enrolled_pods(2);
    proxy.outbound_accepted.fetch_add(3, Ordering::Relaxed);
    proxy.bytes_relayed.fetch_add(4096, Ordering::Relaxed);
    let text = rendered(&m);
    for line in [
        "# TYPE ambit_proxy_outbound_accepted counter",
        "ambit_proxy_outbound_accepted_total 3",
        "ambit_proxy_bytes_relayed_total 4096",
        "ambit_proxy_relays_reset_total 0",
        "ambit_capture_out_captured_total 7",
        "ambit_enrolled_pods 2",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}`:\n{text}");
    }
    proxy.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let text = rendered(&m);
    assert!(
        text.contains("ambit_proxy_outbound_accepted_total 4"),
        "a later scrape sees later values:\n{text}"
    );
}

#[test]
fn every_proxy_counter_is_exported() {
    let (proxy, m) = metrics_with_proxy();
    let text = rendered(&m);
    for (name, _, _) in proxy.all() {
        let line = format!("ambit_proxy_{name}_total 0");
        assert!(text.contains(&line), "missing `{line}`:\n{text}");
    }
}

#[test]
fn kernel_stats_become_named_counters() {
    let stats = crate::ebpf::KernelStats {
        in_steered: 5,
        ..Default::default()
    };
    let counters = kernel_counters(&stats);
    assert!(
        counters.contains(&("in_steered".to_string(), 5)),
        "{counters:?}"
    );
    assert!(
        counters.iter().any(|(n, _)| n == "out_captured"),
        "every field, zero or not: {counters:?}"
    );
}

fn request(method: Method, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .unwrap_or_else(|e| panic!("request {path}: {e}"))
}

async fn body_of(resp: http::Response<Full<Bytes>>) -> String {
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| match e {})
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn metrics_is_openmetrics_text() {
    let (_, m) = metrics_with_proxy();
    m.set_config(&[bad_service()], 1);
    // Also where Istio's scrape annotations point (`prometheus.io/path: /stats/prometheus`).
    for path in ["/metrics", "/stats/prometheus"] {
        let resp = respond(&request(Method::GET, path), &m);
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(
            resp.headers().get(CONTENT_TYPE).map(HeaderValue::as_bytes),
            Some(CONTENT_TYPE_OPENMETRICS.as_bytes())
        );
        let body = body_of(resp).await;
        assert!(body.contains(BAD_SERVICE_SERIES), "{path}: {body}");
    }
}

#[test]
fn unknown_paths_are_404_and_other_methods_405() {
    let (_, m) = metrics_with_proxy();
    for path in [
        "/",
        "/metrics/",
        "/healthz",
        "/stats/prometheus/",
        "/stats",
        "/%00",
    ] {
        let resp = respond(&request(Method::GET, path), &m);
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "GET {path}");
    }
    for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
        for path in [
            "/metrics",
            "/stats/prometheus",
            "/healthz/ready",
            "/healthz/live",
        ] {
            let resp = respond(&request(method.clone(), path), &m);
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(
                resp.headers().get(ALLOW).map(HeaderValue::as_bytes),
                Some(&b"GET"[..]),
                "{method} {path}: Allow header"
            );
        }
    }
}

#[tokio::test]
async fn readiness_says_why_not_and_flips_once_set() {
    let (_, m) = metrics_with_proxy();
    let get = |m: &AgentMetrics| respond(&request(Method::GET, "/healthz/ready"), m);
    assert_eq!(
        get(&m).status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "before the first config"
    );
    m.set_readiness(Err("waiting for the first complete list of Pod".into()));
    let resp = get(&m);
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body_of(resp).await,
        "not ready: waiting for the first complete list of Pod\n"
    );
    m.set_readiness(Ok(()));
    assert_eq!(get(&m).status(), StatusCode::OK, "after the first config");
}

#[tokio::test]
async fn readiness_port_serves_only_readiness_and_follows_the_same_state() {
    let (_, m) = metrics_with_proxy();
    let get = |m: &AgentMetrics, path: &str| respond_readiness(&request(Method::GET, path), m);
    m.set_readiness(Err("waiting for the first complete list of Pod".into()));
    let resp = get(&m, "/healthz/ready");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body_of(resp).await,
        "not ready: waiting for the first complete list of Pod\n"
    );
    m.set_readiness(Ok(()));
    assert_eq!(get(&m, "/healthz/ready").status(), StatusCode::OK);
    // Metrics and liveness stay on the metrics port: a probe of 15021 sees nothing else.
    for path in ["/metrics", "/stats/prometheus", "/healthz/live", "/"] {
        assert_eq!(get(&m, path).status(), StatusCode::NOT_FOUND, "GET {path}");
    }
    let post = respond_readiness(&request(Method::POST, "/healthz/ready"), &m);
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[test]
fn liveness_fails_only_when_the_control_loop_stops_coming_round() {
    let (_, m) = metrics_with_proxy();
    let status = |m: &AgentMetrics| respond(&request(Method::GET, "/healthz/live"), m).status();
    // Not ready is still live: waiting for the API server is not a reason to be restarted.
    m.set_readiness(Err("waiting".into()));
    m.alive();
    assert_eq!(status(&m), StatusCode::OK);
    *m.alive_at.lock().unwrap_or_else(PoisonError::into_inner) =
        Instant::now() - LIVENESS_WINDOW - Duration::from_secs(1);
    assert_eq!(status(&m), StatusCode::SERVICE_UNAVAILABLE, "wedged");
    m.alive();
    assert_eq!(status(&m), StatusCode::OK, "came round again");
}

#[test]
fn file_and_pod_problems_are_series_of_their_own() {
    let (_, m) = metrics_with_proxy();
    let problems = [
        Problem {
            key: problems::ProblemKey::File {
                path: "/etc/ambit/x.yaml: document 2".into(),
            },
            message: "bad".into(),
        },
        Problem {
            key: problems::ProblemKey::Pod {
                namespace: "mesh".into(),
                name: "web".into(),
            },
            message: "Pod mesh/web: cannot enrol: no sandbox".into(),
        },
    ];
    m.set_problems(&problems, 0);
    let text = rendered(&m);
    for line in [
        "ambit_config_file_problems{file=\"/etc/ambit/x.yaml: document 2\"} 1",
        "ambit_enrolment_problems{namespace=\"mesh\",pod=\"web\"} 1",
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
    m.set_problems(&[], 0);
    let text = rendered(&m);
    assert!(
        !text.contains("ambit_config_file_problems{")
            && !text.contains("ambit_enrolment_problems{"),
        "gone once cleared:\n{text}"
    );
}

#[test]
fn synced_kinds_and_kube_watch_state_are_exported() {
    let stats = crate::config::kube::KubeStats::for_tests();
    let proxy = Arc::new(Metrics::default());
    let p = proxy.clone();
    let m = AgentMetrics::new(Box::new(move || p.all())).with_kube(stats);
    m.set_synced(vec![(Kind::Pod, true), (Kind::AuthorizationPolicy, false)]);
    let text = rendered(&m);
    for line in [
        "ambit_config_synced{kind=\"Pod\"} 1",
        "ambit_config_synced{kind=\"AuthorizationPolicy\"} 0",
        "ambit_kube_watch_errors_total{kind=\"Pod\"} 0",
        "ambit_kube_relists_total{kind=\"Pod\"} 0",
        "ambit_kube_discovery_errors_total{kind=\"AuthorizationPolicy\"} 0",
        "ambit_kube_last_sync_timestamp_seconds{kind=\"Pod\"} 0",
        "ambit_kube_watch_state{kind=\"Pod\",state=\"discovering\"} 1",
        "ambit_kube_watch_state{kind=\"Pod\",state=\"watching\"} 0",
    ] {
        assert!(text.contains(line), "missing {line}:\n{text}");
    }
}

#[test]
fn each_problem_is_logged_once_when_it_appears_and_once_when_it_clears() {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let problem = |name: &str| Problem {
        key: problems::ProblemKey::Pod {
            namespace: "mesh".into(),
            name: name.into(),
        },
        message: format!("Pod mesh/{name}: cannot enrol"),
    };
    tracing::subscriber::with_default(subscriber, || {
        let mut log = problems::ProblemLog::default();
        // Recomputed on every tick: ten ticks with one problem, then a second, then both gone.
        for _ in 0..10 {
            log.update(&[problem("a")]);
        }
        for _ in 0..10 {
            log.update(&[problem("a"), problem("b")]);
        }
        for _ in 0..10 {
            log.update(&[]);
        }
    });
    let text =
        String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("Pod mesh/a: cannot enrol"),
        2,
        "appears + clears:\n{text}"
    );
    assert_eq!(
        count("Pod mesh/b: cannot enrol"),
        2,
        "appears + clears:\n{text}"
    );
    assert_eq!(count("WARN"), 2, "{text}");
    assert_eq!(count("config problem cleared"), 2, "{text}");
}

/// Over a real socket: a well-formed scrape, then garbage, then the server still answers.
#[tokio::test]
async fn the_server_answers_over_tcp_and_survives_garbage() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    let (_, m) = metrics_with_proxy();
    m.set_readiness(Ok(()));
    tokio::spawn(serve(listener, Arc::new(m)));

    async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.write_all(raw)
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    let ok = exchange(
        addr,
        b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("ready\n"), "{ok}");

    let bad = exchange(addr, b"\x00\x01 not http at all\r\n\r\n").await;
    assert!(bad.is_empty() || bad.starts_with("HTTP/1.1 400"), "{bad:?}");

    let scrape = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("# EOF"), "{scrape}");
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let first = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = first
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    let err = match bind(addr).await {
        Ok(_) => panic!("binding {addr} twice must fail"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&addr.to_string()) && err.contains("--metrics-addr"),
        "{err}"
    );
}

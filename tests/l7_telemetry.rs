//! Istio's request metrics at the source, as Prometheus scrapes them, through real agents
//! (issue 11, acceptance 6's `/metrics` half, and gRPC's status label): one
//! `istio_requests_total` series per outcome, with Envoy's response flags and the gRPC status.

mod l7support;
mod support;

use std::net::Ipv4Addr;

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::scenes::{sleep_and_web, SleepAndWeb};
use l7support::{metric, sa, start_agents, write_istio, Conn, GrpcApp, HttpApp, NS};
use support::{in_pod, settled, SETTLE};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 11);
const DOWN: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 12);
const GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 13);

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /known}}]
    route: [{destination: {host: web}}]
"#;

/// Istio's standard metrics: the counter is `istio_requests_total` (the Prometheus name Istio's
/// dashboards and docs query), one series per (response_code, response_flags,
/// grpc_response_status, ...).
#[test]
fn istio_requests_total_counts_each_outcome_with_its_flags_and_grpc_status() {
    support::raise_fd_limit();
    let world = World::new("l7-telemetry");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let server = world
        .pod("web")
        .node(&n2)
        .namespace(NS)
        .label("app", "web")
        .spawn();
    let _web = HttpApp::start(&server, 8080);
    let _grpc = GrpcApp::start(&server, 9090);
    let http = |target| [SvcPort::named("http", 80, target)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &server])
        .service("web", NS, WEB, &http(8080), &[&server], true)
        .service("empty", NS, EMPTY, &http(8080), &[&server], false)
        .service("down", NS, DOWN, &http(8099), &[&server], true)
        .service(
            "grpc",
            NS,
            GRPC,
            &[SvcPort::named("grpc", 9090, 9090)],
            &[&server],
            true,
        );
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        ROUTES,
        &[],
    );
    let a1 = &agents[0];

    in_pod(&client, || async {
        for (vip, host, path, want) in [
            (WEB, "web", "/known/1", 200),
            (WEB, "web", "/unknown", 404),
            (EMPTY, "empty", "/uh", 503),
            (DOWN, "down", "/uf", 503),
        ] {
            let conn = Conn::h1(sa(vip, 80)).await;
            assert_eq!(conn.get(host, path, &[]).await.status, want, "{path}");
        }
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{GRPC}:9090"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect");
        let mut health = HealthClient::new(channel);
        for service in ["ambit.Serving", "ambit.Missing"] {
            let _ = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
        }
    });

    let count = |m: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("reporter", "source")];
        all.extend_from_slice(labels);
        metric(m, "istio_requests_total", &all)
    };
    let expected: [(&[(&str, &str)], u64); 6] = [
        (
            &[
                ("request_protocol", "http"),
                ("response_code", "200"),
                ("response_flags", "-"),
            ],
            1,
        ),
        (&[("response_code", "404"), ("response_flags", "NR")], 1),
        (&[("response_code", "503"), ("response_flags", "UH")], 1),
        // Istio's default retry policy tries a connect failure three times, then URX.
        (&[("response_code", "503"), ("response_flags", "UF,URX")], 1),
        (
            &[
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "0"),
            ],
            1,
        ),
        (
            &[
                ("request_protocol", "grpc"),
                ("response_code", "200"),
                ("grpc_response_status", "5"),
            ],
            1,
        ),
    ];
    a1.wait_for_metrics("every request counted", SETTLE, |m| {
        expected.iter().all(|(l, n)| count(m, l) >= *n)
    });
    let (_, m) = a1.http_get("/metrics");
    for (labels, n) in &expected {
        assert_eq!(count(&m, labels), *n, "{labels:?}\n{m}");
    }
    assert!(
        !m.contains("istio_requests_total_total"),
        "no doubled suffix: {m}"
    );
}

const QUIET: Ipv4Addr = Ipv4Addr::new(10, 96, 17, 20);

/// Destination-side L7 (issue 13): the server's node serves the HTTP each HBONE stream carries
/// and records every request as a sidecar's inbound does, `reporter="destination"`, with the
/// source from the peer's verified certificate (a forged header changes nothing). A port declared
/// `tcp` stays opaque, and a pod annotated `ambit.dev/destination-l7: "false"` is relayed as
/// bytes: its requests are counted at the source and its streams as TCP at the destination only.
#[test]
fn the_destination_records_each_request_with_the_verified_source() {
    support::raise_fd_limit();
    let world = World::new("l7-dest");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .sa("sleeper")
        .label("app", "sleep")
        .spawn();
    let server = world
        .pod("web")
        .node(&n2)
        .namespace(NS)
        .sa("web-sa")
        .label("app", "web")
        .spawn();
    let quiet = world
        .pod("quiet")
        .node(&n2)
        .namespace(NS)
        .label("app", "quiet")
        .spawn();
    let _web = HttpApp::start(&server, 8080);
    let _raw = HttpApp::start(&server, 8081);
    let _quiet = HttpApp::start(&quiet, 8080);
    let _grpc = GrpcApp::start(&server, 9090);
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &server, &quiet])
        .annotate(&quiet, "ambit.dev/destination-l7", "false")
        .service(
            "web",
            NS,
            WEB,
            &[
                SvcPort::named("http", 80, 8080),
                SvcPort::named("tcp-raw", 81, 8081),
            ],
            &[&server],
            true,
        )
        .service(
            "grpc",
            NS,
            GRPC,
            &[SvcPort::named("grpc", 9090, 9090)],
            &[&server],
            true,
        )
        .service(
            "quiet",
            NS,
            QUIET,
            &[SvcPort::named("http", 80, 8080)],
            &[&quiet],
            true,
        );
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server, &quiet])],
        &yaml,
        "",
        &[],
    );
    let (a1, a2) = (&agents[0], &agents[1]);

    in_pod(&client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        for i in 0..3 {
            // A header claiming another source must not change the labels.
            let r = conn
                .get(
                    "web",
                    &format!("/get/{i}"),
                    &[(
                        "x-forwarded-client-cert",
                        "URI=spiffe://cluster.local/ns/x/sa/forged",
                    )],
                )
                .await;
            assert_eq!(r.status, 200);
        }
        let raw = Conn::h1(sa(WEB, 81)).await;
        assert_eq!(raw.get("web", "/raw", &[]).await.status, 200);
        let q = Conn::h1(sa(QUIET, 80)).await;
        assert_eq!(q.get("quiet", "/q", &[]).await.status, 200);
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{GRPC}:9090"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect");
        let mut health = HealthClient::new(channel);
        let _ = health
            .check(HealthCheckRequest {
                service: "ambit.Missing".into(),
            })
            .await;
    });

    let web_at_destination: &[(&str, &str)] = &[
        ("reporter", "destination"),
        ("source_workload", "sleep"),
        ("source_workload_namespace", NS),
        (
            "source_principal",
            "spiffe://cluster.local/ns/mesh/sa/sleeper",
        ),
        ("destination_workload", "web"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/mesh/sa/web-sa",
        ),
        ("destination_service", "web.mesh.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ];
    let grpc_at_destination: &[(&str, &str)] = &[
        ("reporter", "destination"),
        ("source_workload", "sleep"),
        ("destination_service", "grpc.mesh.svc.cluster.local"),
        ("request_protocol", "grpc"),
        ("grpc_response_status", "5"),
    ];
    a2.wait_for_metrics("the destination counted the requests", SETTLE, |m| {
        metric(m, "istio_requests_total", web_at_destination) >= 3
            && metric(m, "istio_requests_total", grpc_at_destination) >= 1
            && metric(
                m,
                "istio_tcp_connections_opened_total",
                &[
                    ("reporter", "destination"),
                    ("destination_workload", "quiet"),
                ],
            ) >= 1
    });
    a1.wait_for_metrics("the source counted the requests", SETTLE, |m| {
        metric(
            m,
            "istio_requests_total",
            &[("reporter", "source"), ("destination_workload", "quiet")],
        ) >= 1
    });
    let (_, m) = a2.http_get("/metrics");
    // Three on port 80; the request on the `tcp-raw` port is not one.
    assert_eq!(
        metric(&m, "istio_requests_total", web_at_destination),
        3,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &[("reporter", "destination"), ("destination_workload", "web")]
        ),
        4,
        "3 HTTP + 1 gRPC: {m}"
    );
    assert_eq!(
        metric(
            &m,
            "istio_request_duration_milliseconds_count",
            web_at_destination
        ),
        3,
        "{m}"
    );
    assert_eq!(
        metric(&m, "istio_requests_total", grpc_at_destination),
        1,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &[("destination_workload", "quiet")]
        ),
        0,
        "the opted-out pod's requests are not seen at L7: {m}"
    );
    assert!(!m.contains("forged"), "a header never sets a label: {m}");
}

const ALOG_ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /known}}, {uri: {prefix: /status}}]
    route: [{destination: {host: web}}]
"#;

/// Access logs as Istio configures them (issue 13, acceptance 3): the mesh config's
/// `accessLogFile` logs every request at both ends in Istio's default TEXT format; a Telemetry
/// object with the filter `response.code >= 400` keeps only the failures; removing it logs
/// everything again, without a restart.
#[test]
fn access_logs_follow_the_mesh_config_and_a_telemetry_filter() {
    let SleepAndWeb {
        world,
        n1,
        n2,
        client,
        server,
        yaml,
        _web,
    } = sleep_and_web("l7-alog", WEB);
    let log = world.state_dir().join("access.log");
    let mesh = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    accessLogFile: {}\n",
        log.display()
    );
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        &format!("{mesh}---\n{ALOG_ROUTES}"),
        &[],
    );
    let get = |path: &'static str, want: u16| {
        in_pod(&client, || async move {
            let conn = Conn::h1(sa(WEB, 80)).await;
            assert_eq!(conn.get("web", path, &[]).await.status, want, "{path}");
        })
    };
    let lines = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let with = |path: &str| {
        let needle = format!("\"GET {path} HTTP/1.1\"");
        lines().into_iter().filter(|l| l.contains(&needle)).count()
    };

    get("/known/1", 200);
    get("/unknown/1", 404);
    // The 200 at both ends (source and destination), the 404 (no route) at the source only.
    // Waited for and asserted on the same read of the file (both agents append to it).
    let count = |all: &[String], path: &str| {
        let needle = format!("\"GET {path} HTTP/1.1\"");
        all.iter().filter(|l| l.contains(&needle)).count()
    };
    let all = settled(lines, |all| {
        count(all, "/known/1") >= 2 && count(all, "/unknown/1") >= 1
    });
    let ok: Vec<&String> = all.iter().filter(|l| l.contains("/known/1")).collect();
    assert_eq!(ok.len(), 2, "{all:#?}");
    for l in &ok {
        // Istio's default TEXT format: [START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS ...
        assert!(l.starts_with('['), "{l}");
        assert!(
            l.contains("\"GET /known/1 HTTP/1.1\" 200 - via_upstream"),
            "{l}"
        );
    }
    assert_eq!(count(&all, "/unknown/1"), 1, "{all:#?}");
    assert!(
        all.iter()
            .any(|l| l.contains("\"GET /unknown/1 HTTP/1.1\" 404 NR route_not_found")),
        "{all:#?}"
    );

    let telemetry = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
    filter: {expression: "response.code >= 400"}
"#;
    let envoy_file = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    accessLogFile: {}\n    extensionProviders:\n    - name: envoy\n      envoyFileAccessLog: {{path: {}}}\n",
        log.display(),
        log.display()
    );
    for a in &agents {
        write_istio(
            a,
            &format!("{envoy_file}---\n{telemetry}---\n{ALOG_ROUTES}"),
        );
    }
    // One round: a 200, then a 500 from the app (logged at both ends under either config, so
    // once both agents wrote its lines they wrote whatever the round gives): the 200's and the
    // 500's line counts. Rounds are numbered so each has paths of its own.
    let round = std::cell::Cell::new(0);
    let logged_round = |tag: &str| {
        round.set(round.get() + 1);
        let (ok, bad) = (
            format!("/known/{tag}{}", round.get()),
            format!("/status/500?{tag}={}", round.get()),
        );
        let (o, b) = (ok.clone(), bad.clone());
        in_pod(&client, || async move {
            let conn = Conn::h1(sa(WEB, 80)).await;
            assert_eq!(conn.get("web", &o, &[]).await.status, 200);
            assert_eq!(conn.get("web", &b, &[]).await.status, 500);
        });
        settled(lines, |_| with(&bad) >= 2);
        (with(&ok), with(&bad))
    };
    // Applied once a 200 goes unlogged while the 500 is.
    settled(|| logged_round("f"), |(ok, bad)| *ok == 0 && *bad >= 2);
    let before = lines().len();
    get("/known/filtered", 200);
    get("/unknown/filtered", 404);
    let after = settled(lines, |_| with("/unknown/filtered") == 1);
    assert_eq!(with("/known/filtered"), 0, "{:#?}", &after[before..]);
    assert_eq!(with("/unknown/filtered"), 1, "{:#?}", &after[before..]);

    // Removed: everything is logged again.
    for a in &agents {
        write_istio(a, &format!("{mesh}---\n{ALOG_ROUTES}"));
    }
    // Applied once a 200 is logged at both ends again.
    settled(|| logged_round("back"), |(ok, _)| *ok == 2);
}

/// The Telemetry API's `metrics` overrides (issue 13): `REQUEST_COUNT` disabled for the server
/// side only leaves `istio_requests_total` out at the destination, while its duration histogram
/// and the source's counter stay.
#[test]
fn a_telemetry_override_disables_one_metric_on_one_side() {
    let SleepAndWeb {
        world,
        n1,
        n2,
        client,
        server,
        yaml,
        _web,
    } = sleep_and_web("l7-metric-off", WEB);
    let telemetry = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      disabled: true
"#;
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        &format!("{telemetry}---\n{ALOG_ROUTES}"),
        &[],
    );
    in_pod(&client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        for i in 0..5 {
            let r = conn.get("web", &format!("/known/{i}"), &[]).await;
            assert_eq!(r.status, 200);
        }
    });
    let at_dst = [("reporter", "destination"), ("destination_workload", "web")];
    agents[1].wait_for_metrics("the destination's duration histogram", SETTLE, |m| {
        metric(m, "istio_request_duration_milliseconds_count", &at_dst) == 5
    });
    agents[0].wait_for_metrics("the source's counter", SETTLE, |m| {
        metric(
            m,
            "istio_requests_total",
            &[("reporter", "source"), ("destination_workload", "web")],
        ) == 5
    });
    let (_, m) = agents[1].http_get("/metrics");
    assert_eq!(metric(&m, "istio_requests_total", &at_dst), 0, "{m}");
    assert!(
        !m.lines().any(|l| l.starts_with("istio_requests_total{")),
        "no series at all: {m}"
    );
}

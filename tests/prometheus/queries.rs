//! The PromQL that Kiali's service graph and Istio's Grafana dashboards run, copied from their
//! sources (each block names the file) with the dashboard variables replaced by this test's
//! values: namespace `mesh`, Grafana's `$__rate_interval` 1m, Kiali's graph duration 60s.

use super::checks::{check, Check, Value};

pub const NS: &str = "mesh";

/// HTTP edges: (source workload, destination service, destination workload, response codes).
pub const HTTP_EDGES: [(&str, &str, &str, &[&str]); 6] = [
    ("productpage-v1", "details", "details-v1", &DETAILS_CODES),
    ("productpage-v1", "reviews", "reviews-v1", &["200"]),
    ("productpage-v1", "reviews", "reviews-v2", &["200"]),
    ("productpage-v1", "reviews", "reviews-v3", &["200"]),
    ("reviews-v2", "ratings", "ratings-v1", &["200"]),
    ("reviews-v3", "ratings", "ratings-v1", &["200"]),
];
/// What productpage gets from details, so the error panels have data.
pub const DETAILS_CODES: [&str; 4] = ["200", "404", "500", "503"];
/// A client in another ambient namespace (an ingress's place): it calls details (200) and
/// `reviews-canary`, a Service whose only endpoint is not ready (503, `UH`, to workload
/// `unknown`): the traffic Kiali's "incoming" queries 0) and 1) look for.
pub const EXT_NS: &str = "ingress";
pub const EXT: &str = "loadgen-v1";
pub const CANARY: &str = "reviews-canary";
/// The TCP-only edge (a Service port named `tcp-mongo`).
pub const TCP_EDGE: (&str, &str, &str) = ("ratings-v1", "mongodb", "mongodb-v1");

pub fn host(service: &str) -> String {
    format!("{service}.{NS}.svc.cluster.local")
}
/// `reviews-v2` → (`reviews`, `v2`): the pods' `app` and `version` labels, which Istio reports
/// as the canonical service and revision.
pub fn app_version(workload: &str) -> (&str, &str) {
    workload.rsplit_once('-').expect("<app>-<version>")
}
pub fn principal(workload: &str) -> String {
    let ns = if workload == EXT { EXT_NS } else { NS };
    format!(
        "spiffe://cluster.local/ns/{ns}/sa/bookinfo-{}",
        app_version(workload).0
    )
}

const KIALI_GRAPH: &str = "kiali/kiali graph/telemetry/istio/istio.go";
const KIALI_RT: &str = "kiali/kiali graph/telemetry/istio/appender/response_time.go";
const KIALI_TP: &str = "kiali/kiali graph/telemetry/istio/appender/throughput.go";
const KIALI_SEC: &str = "kiali/kiali graph/telemetry/istio/appender/security_policy.go";
const KIALI_HEALTH: &str = "kiali/kiali prometheus/metrics.go";
const MESH: &str = "istio/istio manifests/addons/dashboards/istio-mesh-dashboard.gen.json";
const SERVICE: &str = "istio/istio manifests/addons/dashboards/istio-service-dashboard.json";
const WORKLOAD: &str = "istio/istio manifests/addons/dashboards/istio-workload-dashboard.json";

const GB_REQ: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,request_protocol,response_code,grpc_response_status,response_flags";
const GB_TCP: &str = "app,source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,response_flags";
const GB_RT: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,request_protocol";
const GB_TP: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,destination_cluster,destination_service_namespace,destination_service,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision";
const GB_SEC: &str = "source_cluster,source_workload_namespace,source_workload,source_canonical_service,source_canonical_revision,source_principal,destination_cluster,destination_service_namespace,destination_service_name,destination_workload_namespace,destination_workload,destination_canonical_service,destination_canonical_revision,destination_principal,connection_security_policy";

/// The labels of a Kiali graph row that name its two nodes and how they talk.
const EDGE: [&str; 13] = [
    "source_cluster",
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "response_flags",
];

fn edge_row(src: &str, svc: &str, dst: &str, flags: &str) -> Vec<String> {
    let (sa, sv) = app_version(src);
    let (da, dv) = app_version(dst);
    [
        "Kubernetes",
        if src == EXT { EXT_NS } else { NS },
        src,
        sa,
        sv,
        "Kubernetes",
        &host(svc),
        svc,
        NS,
        dst,
        da,
        dv,
        flags,
    ]
    .map(String::from)
    .to_vec()
}

/// Kiali's graph rows: each HTTP edge with each of its response codes, as `reporter` sees it.
fn request_rows(reporter: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for (src, svc, dst, codes) in HTTP_EDGES {
        for code in codes {
            // Istio's default retry policy retries a 503 twice (retriable_status_codes 503); when
            // the app answers 503 each time, the client's proxy reports Envoy's URX.
            let flags = if *code == "503" && reporter == "source" {
                "URX"
            } else {
                "-"
            };
            let mut row = edge_row(src, svc, dst, flags);
            row.extend(["http".to_string(), code.to_string()]);
            rows.push(row);
        }
    }
    if reporter == "destination" {
        rows.push(ext_details_row());
    }
    rows
}

/// loadgen → details as Kiali's graph rows show it.
fn ext_details_row() -> Vec<String> {
    let mut row = edge_row(EXT, "details", "details-v1", "-");
    row.extend(["http".to_string(), "200".to_string()]);
    row
}

fn pairs() -> Vec<[&'static str; 2]> {
    HTTP_EDGES.iter().map(|(s, _, d, _)| [*s, *d]).collect()
}

/// Kiali's graph (default options: ambient traffic "total", TCP rate "sent", response time
/// 95th percentile; Kiali wraps each graph query in `round(..,0.001)`).
pub fn kiali() -> Vec<Check> {
    let mut by_req = EDGE.to_vec();
    by_req.extend(["request_protocol", "response_code"]);
    let (s, d, m) = (TCP_EDGE.0, TCP_EDGE.1, TCP_EDGE.2);
    let unserviced = [
        "source_workload_namespace",
        "source_workload",
        "destination_service",
        "destination_service_name",
        "destination_workload_namespace",
        "destination_workload",
        "response_code",
        "response_flags",
    ];
    let mut out = vec![
        // istio.go, HTTP/GRPC request traffic, 0) incoming: source telemetry of requests that
        // never reached a destination.
        check(KIALI_GRAPH, "requests, unserviced", format!(
            r#"round(sum(rate(istio_requests_total{{reporter=~"waypoint|source",source_workload_namespace!="{NS}",destination_workload_namespace="unknown",destination_workload="unknown",destination_service=~"^.+\\.{NS}\\..+$"}} [60s])) by ({GB_REQ}) > 0,0.001)"#
        ))
        .rows(&unserviced, [[EXT_NS.to_string(), EXT.into(), host(CANARY), CANARY.into(), "unknown".into(), "unknown".into(), "503".into(), "UH".into()]]),
        // istio.go, 1) incoming, ambient only: source telemetry from outside the namespace.
        check(KIALI_GRAPH, "requests, ambient incoming source telemetry", format!(
            r#"round(sum(rate(istio_requests_total{{reporter="source",source_workload_namespace!="{NS}",destination_workload_namespace="{NS}"}} [60s])) by ({GB_REQ}) > 0,0.001)"#
        ))
        .rows(&by_req, [ext_details_row()]),
        // istio.go, HTTP/GRPC request traffic, 2) incoming: destination telemetry.
        check(KIALI_GRAPH, "requests, destination telemetry", format!(
            r#"round(sum(rate(istio_requests_total{{reporter=~"waypoint|destination",destination_workload_namespace="{NS}"}} [60s])) by ({GB_REQ}) > 0,0.001)"#
        ))
        .rows(&by_req, request_rows("destination")),
        // istio.go, 3) outgoing: source telemetry.
        check(KIALI_GRAPH, "requests, source telemetry", format!(
            r#"round(sum(rate(istio_requests_total{{reporter=~"waypoint|source",source_workload_namespace="{NS}"}} [60s])) by ({GB_REQ}) > 0,0.001)"#
        ))
        .rows(&by_req, request_rows("source")),
    ];
    // istio.go, TCP byte traffic ("L4 telemetry is backwards": rate "sent" reads received).
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        for (reporter, ns_label) in [
            ("destination", "destination_workload_namespace"),
            ("source", "source_workload_namespace"),
        ] {
            out.push(
                check(KIALI_GRAPH, format!("TCP {metric}, {reporter} telemetry"), format!(
                    r#"round(sum(rate({metric}{{reporter=~"waypoint|{reporter}",{ns_label}="{NS}"}} [60s])) by ({GB_TCP}) > 0,0.001)"#
                ))
                .rows(&EDGE, [edge_row(s, d, m, "-")]),
            );
        }
    }
    for (reporter, ns_label) in [
        ("destination", "destination_service_namespace"),
        ("source", "source_workload_namespace"),
    ] {
        let mut pairs = pairs();
        if reporter == "destination" {
            pairs.push([EXT, "details-v1"]);
        }
        // response_time.go: the quantile (default 95) and the average.
        out.push(
            check(KIALI_RT, format!("responseTime 0.95, {reporter} telemetry"), format!(
                r#"round(histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket{{reporter=~"waypoint|{reporter}",{ns_label}="{NS}"}}[60s])) by (le,{GB_RT})) > 0,0.001)"#
            ))
            .rows(&["source_workload", "destination_workload"], pairs.clone()),
        );
        out.push(
            check(KIALI_RT, format!("responseTime avg, {reporter} telemetry"), format!(
                r#"round(sum(rate(istio_request_duration_milliseconds_sum{{reporter=~"waypoint|{reporter}",{ns_label}="{NS}"}}[60s])) by ({GB_RT}) / sum(rate(istio_request_duration_milliseconds_count{{reporter=~"waypoint|{reporter}",{ns_label}="{NS}"}}[60s])) by ({GB_RT}) > 0,0.001)"#
            ))
            .rows(&["source_workload", "destination_workload"], pairs),
        );
    }
    // throughput.go: response bytes from destination telemetry, request bytes from source.
    for (kind, reporter) in [("response", "destination"), ("request", "source")] {
        out.push(
            check(KIALI_TP, format!("throughput {kind}"), format!(
                r#"round(sum(rate(istio_{kind}_bytes_sum{{reporter=~"waypoint|{reporter}",source_workload_namespace="{NS}"}}[60s])) by ({GB_TP}) > 0,0.001)"#
            ))
            .rows(&["source_workload", "destination_workload"], pairs()),
        );
    }
    // security_policy.go, 2) requests (and TCP bytes) from inside the namespace.
    let sec = [
        "source_principal",
        "destination_principal",
        "connection_security_policy",
    ];
    let mtls = |s: &str, d: &str| [principal(s), principal(d), "mutual_tls".into()];
    out.push(
        check(KIALI_SEC, "securityPolicy, requests from outside", format!(
            r#"round((sum(rate(istio_requests_total{{reporter=~"waypoint|destination",source_workload_namespace!="{NS}",destination_service_namespace="{NS}"}}[60s])) by ({GB_SEC}) > 0),0.001)"#
        ))
        .rows(&sec, [mtls(EXT, "details-v1")]),
    );
    out.push(
        check(KIALI_SEC, "securityPolicy, requests", format!(
            r#"round((sum(rate(istio_requests_total{{reporter=~"waypoint|destination",source_workload_namespace="{NS}"}}[60s])) by ({GB_SEC}) > 0),0.001)"#
        ))
        .rows(&sec, HTTP_EDGES.iter().map(|(s, _, d, _)| mtls(s, d))),
    );
    out.push(
        check(KIALI_SEC, "securityPolicy, TCP sent", format!(
            r#"round((sum(rate(istio_tcp_sent_bytes_total{{reporter=~"waypoint|destination",source_workload_namespace="{NS}"}}[60s])) by ({GB_SEC}) > 0),0.001)"#
        ))
        .rows(&sec, [mtls(s, m)]),
    );
    // prometheus/metrics.go getItemRequestRates (workload health), inbound and outbound.
    let both = |peer: &str, codes: &[&str]| {
        let mut rows = Vec::new();
        for reporter in ["source", "destination"] {
            for code in codes {
                rows.push([reporter.to_string(), peer.to_string(), code.to_string()]);
            }
        }
        rows
    };
    out.push(
        check(KIALI_HEALTH, "health, details-v1 inbound", format!(
            r#"rate(istio_requests_total{{destination_workload_namespace="{NS}",destination_workload="details-v1",destination_cluster="Kubernetes"}}[1m]) > 0"#
        ))
        .rows(&["reporter", "source_workload", "response_code"], [both("productpage-v1", &DETAILS_CODES), both(EXT, &["200"])].concat()),
    );
    out.push(
        check(KIALI_HEALTH, "health, reviews-v2 outbound", format!(
            r#"rate(istio_requests_total{{source_workload_namespace="{NS}",source_workload="reviews-v2",source_cluster="Kubernetes"}}[1m]) > 0"#
        ))
        .rows(&["reporter", "destination_workload", "response_code"], both("ratings-v1", &["200"])),
    );
    out
}

/// Istio's Mesh dashboard ("source|waypoint" telemetry only).
pub fn mesh() -> Vec<Check> {
    let http_workloads: Vec<&str> = {
        let mut w: Vec<&str> = HTTP_EDGES.iter().map(|e| e.2).collect();
        w.dedup();
        w
    };
    let wl_svc: Vec<[String; 2]> = HTTP_EDGES
        .iter()
        .map(|(_, svc, dst, _)| [dst.to_string(), host(svc)])
        .collect();
    let mut out = vec![
        check(MESH, "Traffic Volume", r#"round(sum (rate(istio_requests_total{reporter=~"source|waypoint"}[1m])), 0.01)"#),
        check(MESH, "Success Rate", r#"sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[1m])) / sum (rate(istio_requests_total{reporter=~"source|waypoint"}[1m]))"#)
            .value(Value::Degraded),
        check(MESH, "4xxs", r#"round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"4.."}[1m])), 0.01)or vector(0)"#),
        check(MESH, "5xxs", r#"round(sum (rate(istio_requests_total{reporter=~"source|waypoint",response_code=~"5.."}[1m])), 0.01)or vector(0)"#),
        check(MESH, "HTTP/gRPC Workloads: requests", r#"label_join(sum by (destination_workload,destination_workload_namespace,destination_service) (rate(istio_requests_total{reporter=~"source|waypoint"}[1m])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#)
            .rows(&["destination_workload", "destination_service"], wl_svc)
            .row(&["unknown", &host(CANARY)], Value::Positive),
        check(MESH, "HTTP/gRPC Workloads: success rate", r#"label_join(sum by (destination_workload,destination_workload_namespace) (rate(istio_requests_total{reporter=~"source|waypoint",response_code!~"5.."}[1m]))/sum by (destination_workload,destination_workload_namespace) (rate(istio_requests_total{reporter=~"source|waypoint"}[1m])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#)
            .rows(&["destination_workload"], http_workloads.iter().map(|w| [*w]))
            // No row for reviews-canary's `unknown` workload: with only 503s, the numerator has
            // no series to divide.
            .value(Value::Ratio),
    ];
    for q in ["0.5", "0.9", "0.99"] {
        out.push(
            check(MESH, format!("HTTP/gRPC Workloads: P{}", &q[2..]), format!(
                r#"label_join(histogram_quantile({q}, sum by (le,destination_workload,destination_workload_namespace) (rate(istio_request_duration_milliseconds_bucket{{reporter=~"source|waypoint"}}[1m]))), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#
            ))
            .rows(&["destination_workload"], http_workloads.iter().map(|w| [*w]))
            .row(&["unknown"], Value::Positive),
        );
    }
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        out.push(
            check(MESH, format!("TCP Workloads: {metric}"), format!(
                r#"label_join(sum by (destination_workload,destination_workload_namespace,destination_service) (rate({metric}{{reporter=~"source|waypoint"}}[1m])), "destination_workload_var", ".", "destination_workload", "destination_workload_namespace")"#
            ))
            .rows(&["destination_workload", "destination_service"], [[TCP_EDGE.2.to_string(), host(TCP_EDGE.1)]]),
        );
    }
    out
}

/// `(histogram_quantile(q, ...ms...) / 1000) or histogram_quantile(q, ...seconds...)`, the
/// dashboards' latency form, with the same selector and grouping in both halves.
fn duration(q: &str, selector: &str, by: &str) -> String {
    format!(
        r#"(histogram_quantile({q}, sum(irate(istio_request_duration_milliseconds_bucket{{{selector}}}[1m])) by ({by})) / 1000) or histogram_quantile({q}, sum(irate(istio_request_duration_seconds_bucket{{{selector}}}[1m])) by ({by}))"#
    )
}

/// Istio's Service dashboard for `details` (HTTP, with errors) and `mongodb` (TCP), with the
/// reporter variable `$qrep` set to each reporter in turn.
pub fn service() -> Vec<Check> {
    let svc = host("details");
    let db = host(TCP_EDGE.1);
    let (srcwl, dstwl) = ("productpage-v1", "details-v1");
    let mut out = vec![
        // The `$service` variable's own query.
        check(SERVICE, "variable service", r#"sum(istio_requests_total{}) by (destination_service) or sum(istio_tcp_sent_bytes_total{}) by (destination_service)"#)
            .rows(&["destination_service"], ["details", "reviews", "ratings", "mongodb", CANARY].map(|s| [host(s)])),
        check(SERVICE, "Server Request Volume", format!(
            r#"round(sum(irate(istio_requests_total{{reporter="destination",destination_service="{svc}"}}[1m])), 0.001)"#
        )),
        check(SERVICE, "Server Success Rate (non-5xx responses)", format!(
            r#"sum(irate(istio_requests_total{{reporter="destination",destination_service="{svc}",response_code!~"5.*"}}[1m])) / (sum(irate(istio_requests_total{{reporter="destination",destination_service="{svc}"}}[1m])) or on () vector(1))"#
        ))
        .value(Value::Degraded),
        check(SERVICE, "Server Request Duration P99", duration("0.99", &format!(r#"reporter="destination",destination_service="{svc}""#), "le")),
        check(SERVICE, "Incoming Requests By Destination Workload And Response Code", format!(
            r#"round(sum(irate(istio_requests_total{{connection_security_policy="mutual_tls",destination_service="{svc}",reporter="destination",destination_workload=~"{dstwl}",destination_workload_namespace=~"{NS}"}}[1m])) by (destination_workload, destination_workload_namespace, response_code), 0.001)"#
        ))
        .rows(&["destination_workload", "response_code"], DETAILS_CODES.map(|c| [dstwl, c])),
        check(SERVICE, "Incoming Success Rate (non-5xx responses) By Destination Workload", format!(
            r#"sum(irate(istio_requests_total{{reporter="destination", connection_security_policy="mutual_tls", destination_service="{svc}",response_code!~"5.*", destination_workload=~"{dstwl}", destination_workload_namespace=~"{NS}"}}[1m])) by (destination_workload, destination_workload_namespace) / sum(irate(istio_requests_total{{reporter="destination", connection_security_policy="mutual_tls", destination_service="{svc}", destination_workload=~"{dstwl}", destination_workload_namespace=~"{NS}"}}[1m])) by (destination_workload, destination_workload_namespace)"#
        ))
        .rows(&["destination_workload"], [[dstwl]])
        .value(Value::Degraded),
        check(SERVICE, "Incoming Request Duration By Service Workload P99", duration("0.99", &format!(
            r#"reporter="destination", connection_security_policy="mutual_tls", destination_service="{svc}", destination_workload=~"{dstwl}", destination_workload_namespace=~"{NS}""#
        ), "destination_workload, destination_workload_namespace, le"))
        .rows(&["destination_workload"], [[dstwl]]),
        check(SERVICE, "Bytes Received from Incoming TCP Connection (by workload)", format!(
            r#"round(sum(irate(istio_tcp_received_bytes_total{{reporter="destination", connection_security_policy="mutual_tls", destination_service="{db}", destination_workload=~"{}", destination_workload_namespace=~"{NS}"}}[1m])) by (destination_workload, destination_workload_namespace), 0.001)"#, TCP_EDGE.2
        ))
        .rows(&["destination_workload"], [[TCP_EDGE.2]]),
    ];
    for qrep in ["source", "destination"] {
        let sel = format!(r#"reporter=~"{qrep}",destination_service="{svc}""#);
        let by_src = format!(
            r#"reporter=~"{qrep}", connection_security_policy="mutual_tls", destination_service="{svc}", source_workload=~"{srcwl}", source_workload_namespace=~"{NS}""#
        );
        out.extend([
            check(SERVICE, format!("variable srcwl ({qrep})"), format!(
                r#"sum(istio_requests_total{{reporter=~"{qrep}", destination_service="{svc}", source_workload_namespace=~"{NS}"}}) by (source_workload) or sum(istio_tcp_sent_bytes_total{{reporter=~"{qrep}", destination_service="{svc}", source_workload_namespace=~"{NS}"}}) by (source_workload)"#
            ))
            .rows(&["source_workload"], [[srcwl]]),
            check(SERVICE, format!("Client Request Volume ({qrep})"), format!(
                r#"round(sum(irate(istio_requests_total{{{sel}}}[1m])), 0.001)"#
            )),
            check(SERVICE, format!("Client Success Rate ({qrep})"), format!(
                r#"sum(irate(istio_requests_total{{{sel},response_code!~"5.*"}}[1m])) / (sum(irate(istio_requests_total{{{sel}}}[1m])) or on () vector(1))"#
            ))
            .value(Value::Degraded),
            check(SERVICE, format!("Incoming Requests By Source And Response Code ({qrep})"), format!(
                r#"round(sum(irate(istio_requests_total{{connection_security_policy="mutual_tls",destination_service="{svc}",reporter=~"{qrep}",source_workload=~"{srcwl}",source_workload_namespace=~"{NS}"}}[1m])) by (source_workload, source_workload_namespace, response_code), 0.001)"#
            ))
            .rows(&["source_workload", "source_workload_namespace", "response_code"], DETAILS_CODES.map(|c| [srcwl, NS, c])),
            check(SERVICE, format!("Incoming Success Rate (non-5xx responses) By Source ({qrep})"), format!(
                r#"sum(irate(istio_requests_total{{{by_src},response_code!~"5.*"}}[1m])) by (source_workload, source_workload_namespace) / sum(irate(istio_requests_total{{{by_src}}}[1m])) by (source_workload, source_workload_namespace)"#
            ))
            .rows(&["source_workload"], [[srcwl]])
            .value(Value::Degraded),
            check(SERVICE, format!("TCP Received Bytes ({qrep})"), format!(
                r#"sum(irate(istio_tcp_received_bytes_total{{reporter=~"{qrep}", destination_service="{db}"}}[1m]))"#
            )),
            check(SERVICE, format!("TCP Sent Bytes ({qrep})"), format!(
                r#"sum(irate(istio_tcp_sent_bytes_total{{reporter=~"{qrep}", destination_service="{db}"}}[1m]))"#
            )),
            check(SERVICE, format!("Bytes Sent to Incoming TCP Connection ({qrep})"), format!(
                r#"round(sum(irate(istio_tcp_sent_bytes_total{{connection_security_policy="mutual_tls", reporter=~"{qrep}", destination_service="{db}", source_workload=~"{}", source_workload_namespace=~"{NS}"}}[1m])) by (source_workload, source_workload_namespace), 0.001)"#, TCP_EDGE.0
            ))
            .rows(&["source_workload"], [[TCP_EDGE.0]]),
        ]);
        for q in ["0.50", "0.90", "0.95", "0.99"] {
            out.push(check(
                SERVICE,
                format!("Client Request Duration P{} ({qrep})", &q[2..]),
                duration(q, &sel, "le"),
            ));
            out.push(
                check(
                    SERVICE,
                    format!("Incoming Request Duration By Source P{} ({qrep})", &q[2..]),
                    duration(q, &by_src, "source_workload, source_workload_namespace, le"),
                )
                .rows(&["source_workload"], [[srcwl]]),
            );
        }
    }
    out
}

/// Istio's Workload dashboard for `reviews-v2` (called by productpage, calls ratings),
/// `ratings-v1` (TCP client) and `mongodb-v1` (TCP server).
pub fn workload() -> Vec<Check> {
    let (wl, srcwl, dstsvc) = ("reviews-v2", "productpage-v1", host("ratings"));
    let (client, server, db) = (TCP_EDGE.0, TCP_EDGE.2, host(TCP_EDGE.1));
    let out_sel = format!(
        r#"reporter="source", connection_security_policy="mutual_tls", source_workload=~"{wl}", source_workload_namespace=~"{NS}", destination_service=~"{dstsvc}""#
    );
    let mut out = vec![
        check(WORKLOAD, "Outgoing Requests By Destination And Response Code", format!(
            r#"round(sum(irate(istio_requests_total{{destination_principal=~"spiffe.*", source_workload_namespace=~"{NS}", source_workload=~"{wl}", reporter="source", destination_service=~"{dstsvc}"}}[1m])) by (destination_service, response_code), 0.001)"#
        ))
        .rows(&["destination_service", "response_code"], [[dstsvc.clone(), "200".into()]]),
        check(WORKLOAD, "Outgoing Success Rate (non-5xx responses) By Destination", format!(
            r#"sum(irate(istio_requests_total{{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"{NS}", source_workload=~"{wl}",response_code!~"5.*", destination_service=~"{dstsvc}"}}[1m])) by (destination_service) / sum(irate(istio_requests_total{{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"{NS}", source_workload=~"{wl}", destination_service=~"{dstsvc}"}}[1m])) by (destination_service)"#
        ))
        .rows(&["destination_service"], [[dstsvc.clone()]])
        .value(Value::Ratio),
        check(WORKLOAD, "Outgoing Request Duration By Destination P99", duration("0.99", &out_sel, "destination_service, le"))
            .rows(&["destination_service"], [[dstsvc.clone()]]),
        check(WORKLOAD, "Bytes Sent on Outgoing TCP Connection", format!(
            r#"round(sum(irate(istio_tcp_received_bytes_total{{connection_security_policy="mutual_tls", reporter="source", source_workload_namespace=~"{NS}", source_workload=~"{client}", destination_service=~"{db}"}}[1m])) by (destination_service), 0.001)"#
        ))
        .rows(&["destination_service"], [[db.clone()]]),
        check(WORKLOAD, "Bytes Received from Outgoing TCP Connection", format!(
            r#"round(sum(irate(istio_tcp_sent_bytes_total{{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"{NS}", source_workload=~"{client}", destination_service=~"{db}"}}[1m])) by (destination_service), 0.001)"#
        ))
        .rows(&["destination_service"], [[db.clone()]]),
    ];
    for size in ["request", "response"] {
        out.push(
            check(WORKLOAD, format!("Outgoing {size} Size By Destination P50"), format!(
                r#"histogram_quantile(0.50, sum(irate(istio_{size}_bytes_bucket{{{out_sel}}}[1m])) by (destination_service, le))"#
            ))
            .rows(&["destination_service"], [[dstsvc.clone()]]),
        );
    }
    for qrep in ["source", "destination"] {
        let sel = format!(
            r#"reporter=~"{qrep}",destination_workload_namespace=~"{NS}",destination_workload=~"{wl}""#
        );
        let by_src = format!(
            r#"reporter=~"{qrep}", connection_security_policy="mutual_tls", destination_workload=~"{wl}", destination_workload_namespace=~"{NS}", source_workload=~"{srcwl}", source_workload_namespace=~"{NS}""#
        );
        out.extend([
            check(WORKLOAD, format!("Incoming Request Volume ({qrep})"), format!(
                r#"round(sum(irate(istio_requests_total{{{sel}}}[1m])), 0.001)"#
            )),
            check(WORKLOAD, format!("Incoming Success Rate ({qrep})"), format!(
                r#"sum(irate(istio_requests_total{{{sel},response_code!~"5.*"}}[1m])) / sum(irate(istio_requests_total{{{sel}}}[1m]))"#
            ))
            .value(Value::Ratio),
            check(WORKLOAD, format!("Incoming Requests By Source And Response Code ({qrep})"), format!(
                r#"round(sum(irate(istio_requests_total{{connection_security_policy="mutual_tls", destination_workload_namespace=~"{NS}", destination_workload=~"{wl}", reporter=~"{qrep}", source_workload=~"{srcwl}", source_workload_namespace=~"{NS}"}}[1m])) by (source_workload, source_workload_namespace, response_code), 0.001)"#
            ))
            .rows(&["source_workload", "response_code"], [[srcwl, "200"]]),
            check(WORKLOAD, format!("Incoming Success Rate By Source ({qrep})"), format!(
                r#"sum(irate(istio_requests_total{{{by_src},response_code!~"5.*"}}[1m])) by (source_workload, source_workload_namespace) / sum(irate(istio_requests_total{{{by_src}}}[1m])) by (source_workload, source_workload_namespace)"#
            ))
            .rows(&["source_workload"], [[srcwl]])
            .value(Value::Ratio),
            check(WORKLOAD, format!("Incoming Request Duration By Source P99 ({qrep})"),
                duration("0.99", &by_src, "source_workload, source_workload_namespace, le"))
            .rows(&["source_workload"], [[srcwl]]),
            check(WORKLOAD, format!("Incoming Request Size By Source P50 ({qrep})"), format!(
                r#"histogram_quantile(0.50, sum(irate(istio_request_bytes_bucket{{{by_src}}}[1m])) by (source_workload, source_workload_namespace, le))"#
            ))
            .rows(&["source_workload"], [[srcwl]]),
            check(WORKLOAD, format!("TCP Client Traffic, {client} ({qrep})"), format!(
                r#"sum(irate(istio_tcp_sent_bytes_total{{reporter=~"{qrep}", source_workload_namespace=~"{NS}", source_workload=~"{client}"}}[1m])) + sum(irate(istio_tcp_received_bytes_total{{reporter=~"{qrep}", source_workload_namespace=~"{NS}", source_workload=~"{client}"}}[1m]))"#
            )),
            check(WORKLOAD, format!("TCP Server Traffic, {server} ({qrep})"), format!(
                r#"sum(irate(istio_tcp_sent_bytes_total{{reporter=~"{qrep}", destination_workload_namespace=~"{NS}", destination_workload=~"{server}"}}[1m])) + sum(irate(istio_tcp_received_bytes_total{{reporter=~"{qrep}", destination_workload_namespace=~"{NS}", destination_workload=~"{server}"}}[1m]))"#
            )),
            check(WORKLOAD, format!("Bytes Received from Incoming TCP Connection, {server} ({qrep})"), format!(
                r#"round(sum(irate(istio_tcp_received_bytes_total{{reporter=~"{qrep}", connection_security_policy="mutual_tls", destination_workload_namespace=~"{NS}", destination_workload=~"{server}", source_workload=~"{client}", source_workload_namespace=~"{NS}"}}[1m])) by (source_workload, source_workload_namespace), 0.001)"#
            ))
            .rows(&["source_workload"], [[client]]),
        ]);
        for q in ["0.50", "0.90", "0.99"] {
            out.push(check(
                WORKLOAD,
                format!("Request Duration P{} ({qrep})", &q[2..]),
                duration(q, &format!(r#"reporter=~"{qrep}",destination_workload=~"{wl}", destination_workload_namespace=~"{NS}""#), "le"),
            ));
        }
    }
    out
}

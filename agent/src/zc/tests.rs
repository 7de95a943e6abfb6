//! `ambit zc`: the tables from a dump built by hand (so each expected line is written out), the
//! raw sections, the filters, and one run against a real debug endpoint on a loopback port.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::admin::dump::{CertDump, CertsDump, ClusterDump, ClusterEndpointDump, WorkloadDump};

fn args(view: View) -> ZcArgs {
    ZcArgs {
        view,
        admin: DEFAULT_ADMIN.into(),
        output: Output::Short,
        namespace: None,
        node: None,
    }
}

fn workload(ns: &str, name: &str, ip: &str, node: &str, enrolled: bool) -> WorkloadDump {
    WorkloadDump {
        name: name.into(),
        namespace: ns.into(),
        node: node.into(),
        workload_ips: vec![ip.into()],
        protocol: if enrolled { "HBONE" } else { "TCP" }.into(),
        enrolled,
        ..WorkloadDump::default()
    }
}

fn dump() -> ConfigDump {
    ConfigDump {
        workloads: vec![
            workload(
                "bookinfo",
                "productpage-v1",
                "10.244.2.53",
                "worker-2",
                true,
            ),
            workload(
                "kube-system",
                "coredns-5dd5",
                "10.244.0.2",
                "control-plane",
                false,
            ),
        ],
        clusters: vec![ClusterDump {
            name: "outbound|9080|v1|reviews.bookinfo.svc.cluster.local".into(),
            namespace: Some("bookinfo".into()),
            destination_rule: Some("DestinationRule/bookinfo/reviews".into()),
            endpoints: vec![
                ClusterEndpointDump {
                    address: "10.0.0.1:9080".into(),
                    status: "EJECTED".into(),
                    ejections: 2,
                    ejected_until: Some("2030-01-01T00:00:00Z".into()),
                },
                ClusterEndpointDump {
                    address: "10.0.0.2:9080".into(),
                    status: "HEALTHY".into(),
                    ..ClusterEndpointDump::default()
                },
            ],
            ..ClusterDump::default()
        }],
        certificates: vec![
            CertsDump {
                identity: "spiffe://cluster.local/ns/bookinfo/sa/productpage".into(),
                state: "Available".into(),
                cert_chain: vec![CertDump {
                    kind: "Leaf".into(),
                    serial_number: "0a1b".into(),
                    valid_from: "2025-01-01T00:00:00Z".into(),
                    expiration_time: "2025-01-02T00:00:00Z".into(),
                    fingerprint_sha256: None,
                }],
                root_certs: vec![CertDump {
                    kind: "Root".into(),
                    serial_number: "01".into(),
                    valid_from: "2024-01-01T00:00:00Z".into(),
                    expiration_time: "2034-01-01T00:00:00Z".into(),
                    fingerprint_sha256: Some("AB:CD".into()),
                }],
                ..CertsDump::default()
            },
            CertsDump {
                identity: "spiffe://cluster.local/ns/bookinfo/sa/ratings".into(),
                state: "Unavailable: CA refused".into(),
                ..CertsDump::default()
            },
        ],
        ..ConfigDump::default()
    }
}

fn at(t: &str) -> SystemTime {
    humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{t}: {e}"))
}

fn render_short(a: &ZcArgs, now: &str) -> String {
    render(a, dump(), Vec::new(), at(now)).unwrap_or_else(|e| panic!("render: {e}"))
}

#[test]
fn workloads_print_as_istioctl_prints_them() {
    let out = render_short(&args(View::Workloads), "2025-01-01T12:00:00Z");
    let expected = "\
NAMESPACE   POD NAME       ADDRESS     NODE          WAYPOINT PROTOCOL
bookinfo    productpage-v1 10.244.2.53 worker-2      None     HBONE
kube-system coredns-5dd5   10.244.0.2  control-plane None     TCP
";
    assert_eq!(out, expected);
}

#[test]
fn namespace_and_node_filter_the_rows() {
    let mut a = args(View::Workloads);
    a.namespace = Some("kube-system".into());
    let out = render_short(&a, "2025-01-01T12:00:00Z");
    assert!(
        out.contains("coredns-5dd5") && !out.contains("productpage"),
        "{out}"
    );
    let mut a = args(View::Workloads);
    a.node = Some("worker-2".into());
    let out = render_short(&a, "2025-01-01T12:00:00Z");
    assert!(
        out.contains("productpage") && !out.contains("coredns"),
        "{out}"
    );
}

#[test]
fn clusters_show_each_endpoint_and_the_ejected_one() {
    let out = render_short(&args(View::Clusters), "2025-01-01T12:00:00Z");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        vec![
            "NAMESPACE",
            "CLUSTER",
            "ENDPOINT",
            "STATUS",
            "EJECTIONS",
            "EJECTED",
            "UNTIL",
            "DESTINATION",
            "RULE"
        ]
    );
    let ejected: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        ejected,
        vec![
            "bookinfo",
            "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
            "10.0.0.1:9080",
            "EJECTED",
            "2",
            "2030-01-01T00:00:00Z",
            "DestinationRule/bookinfo/reviews"
        ]
    );
    let healthy: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(&healthy[2..6], &["10.0.0.2:9080", "HEALTHY", "0", "-"]);
}

#[test]
fn certificates_are_valid_only_inside_their_validity() {
    let inside = render_short(&args(View::Certificates), "2025-01-01T12:00:00Z");
    let after = render_short(&args(View::Certificates), "2025-01-03T00:00:00Z");
    let row = |out: &str, who: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.contains(who))
            .unwrap_or_else(|| panic!("{who} in\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row(&inside, "productpage"),
        vec![
            "spiffe://cluster.local/ns/bookinfo/sa/productpage",
            "Leaf",
            "Available",
            "true",
            "0a1b",
            "2025-01-02T00:00:00Z",
            "2025-01-01T00:00:00Z"
        ]
    );
    assert_eq!(row(&after, "productpage")[3], "false");
    // istioctl: the roots follow the chain, each a Root row of the same identity.
    let rows: Vec<&str> = inside
        .lines()
        .filter(|l| l.contains("sa/productpage"))
        .collect();
    assert_eq!(rows.len(), 2, "{inside}");
    let root: Vec<&str> = rows[1].split_whitespace().collect();
    assert_eq!(
        root,
        vec![
            "spiffe://cluster.local/ns/bookinfo/sa/productpage",
            "Root",
            "Available",
            "true",
            "01",
            "2034-01-01T00:00:00Z",
            "2024-01-01T00:00:00Z"
        ]
    );
    assert_eq!(
        row(&inside, "ratings"),
        vec![
            "spiffe://cluster.local/ns/bookinfo/sa/ratings",
            "NA",
            "Unavailable",
            "false",
            "NA",
            "NA",
            "NA"
        ]
    );
}

#[test]
fn json_and_yaml_print_the_raw_section() {
    let mut a = args(View::Workloads);
    a.output = Output::Json;
    let out = render(&a, dump(), Vec::new(), SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
    let back: Vec<WorkloadDump> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(back, dump().workloads);
    a.output = Output::Yaml;
    let out = render(&a, dump(), Vec::new(), SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
    let back: Vec<WorkloadDump> =
        serde_yaml::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(back, dump().workloads);
}

/// The whole path: the debug endpoint on a loopback port, serving the admin tests' world, and
/// `ambit zc`'s client and tables against it.
#[tokio::test]
async fn zc_reads_a_running_debug_endpoint() {
    use crate::admin::connections::{ConnectionInfo, Direction, Protocol};
    use crate::admin::debug::tests::fixture;

    let f = fixture(None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let server = tokio::spawn(crate::admin::debug::serve(listener, Arc::clone(&f.admin)));
    let _conn = f.admin.connections.register(ConnectionInfo {
        workload: "default/sleep".into(),
        direction: Direction::Outbound,
        protocol: Protocol::Hbone,
        src: "10.0.0.9:40000".parse().expect("address"),
        dst: "10.0.0.1:15008".parse().expect("address"),
        original_dst: Some("10.96.0.10:9080".parse().expect("address")),
    });

    let mut a = args(View::All);
    a.admin = addr.to_string();
    let (d, conns) = fetch(&a).await.unwrap_or_else(|e| panic!("fetch: {e}"));
    let out = render(&a, d, conns, SystemTime::now()).unwrap_or_else(|e| panic!("{e}"));
    let has_row = |cells: &[&str]| {
        out.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            cells.iter().all(|c| words.contains(c))
        })
    };
    assert!(
        has_row(&["default", "reviews-v1", "10.0.0.1", "n1", "HBONE"]),
        "{out}"
    );
    assert!(
        has_row(&["default", "reviews", "10.96.0.10", "2/3"]),
        "{out}"
    );
    assert!(
        has_row(&["default", "allow-sleep", "Allow", "WorkloadSelector"]),
        "{out}"
    );
    assert!(
        has_row(&[
            "outbound|9080|v1|reviews.default.svc.cluster.local",
            "10.0.0.1:9080",
            "EJECTED"
        ]),
        "{out}"
    );
    assert!(
        has_row(&[
            "default",
            "HTTP",
            "jason",
            "outbound|0|v2|reviews.default.svc.cluster.local"
        ]),
        "{out}"
    );
    assert!(
        has_row(&[
            "spiffe://cluster.local/ns/default/sa/sleep",
            "Leaf",
            "Available",
            "true"
        ]),
        "{out}"
    );
    assert!(
        has_row(&[
            "sleep.default",
            "Outbound",
            "10.0.0.9:40000",
            "10.0.0.1:15008",
            "10.96.0.10:9080",
            "HBONE"
        ]),
        "{out}"
    );

    // A wrong address is an error naming it, not a panic.
    let mut bad = args(View::Workloads);
    bad.admin = "127.0.0.1:1".into();
    let err = fetch(&bad).await.expect_err("nothing listens on port 1");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");

    server.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

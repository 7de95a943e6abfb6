//! The debug endpoint against a real snapshot (YAML through the store, compiled as the agent
//! compiles it), real balancers whose outlier detection ejected an endpoint, and a real
//! certificate manager with a local CA. `pub(crate)`: `ambit zc`'s tests serve the same world.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use tracing::Level;
use tracing_subscriber::layer::SubscriberExt as _;

use super::*;
use crate::admin::connections::{ConnectionInfo, ConnectionView, Direction, Protocol};
use crate::admin::dump::{EJECTED, HEALTHY};
use crate::admin::logging::LogReload;
use crate::config::files::{load_text, Loaded};
use crate::identity::tests::{id, local_ca, manager, TempDir};
use crate::identity::CertLease;
use crate::proxy::http::balance::{Balancers, Outcome, PickContext};
use crate::routing::ClusterKey;
use crate::snapshot::Snapshot;
use crate::state::store::Store;

pub(crate) const NODE: &str = "n1";
pub(crate) const REVIEWS: &str = "reviews.default.svc.cluster.local";

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- {addresses: [10.0.0.1], targetRef: {kind: Pod, name: reviews-v1, namespace: default}}
- {addresses: [10.0.0.2], targetRef: {kind: Pod, name: reviews-v2, namespace: default}}
- {addresses: [10.0.0.3], conditions: {ready: false}}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, uid: uid-r1, labels: {app: reviews, version: v1}}
spec: {nodeName: n1, serviceAccountName: bookinfo-reviews}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, uid: uid-r2, labels: {app: reviews, version: v2}}
spec: {nodeName: n2, serviceAccountName: bookinfo-reviews}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, uid: uid-s, labels: {app: sleep}}
spec: {nodeName: n1, serviceAccountName: sleep}
status: {podIP: 10.0.0.9}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}, uri: {prefix: /api}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}, weight: 90}, {destination: {host: reviews, subset: v2}, weight: 10}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 100}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"#;

/// The world's snapshot for node n1, compiled as the agent compiles it.
pub(crate) fn snapshot() -> Snapshot {
    let mut loaded = Loaded::default();
    load_text(&mut loaded, Path::new("debug.yaml"), WORLD);
    assert!(loaded.file_errors.is_empty(), "{:?}", loaded.file_errors);
    let mut store = Store::new("cluster.local");
    store.apply(loaded.into_event());
    store.publish();
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    Snapshot::build(store.reader().load_full(), "istio-system", NODE)
}

/// The v1 subset's cluster, as client namespace `default` sees it.
pub(crate) fn v1_cluster() -> ClusterKey {
    ClusterKey {
        host: Arc::from(REVIEWS),
        subset: Some(Arc::from("v1")),
        port: 9080,
    }
}

/// Balancers whose outlier detection ejected 10.0.0.1:9080 from the v1 cluster: five 500s in a
/// row, with the cluster's compiled DestinationRule policy (Istio: consecutive5xxErrors).
pub(crate) fn ejected_balancers(snapshot: &Snapshot) -> Balancers {
    let key = v1_cluster();
    let cluster = snapshot
        .routes
        .shaped_cluster("default", &key)
        .expect("the DestinationRule shapes the v1 cluster")
        .clone();
    let endpoints = cluster.endpoints.v4.clone();
    let bad: SocketAddr = "10.0.0.1:9080".parse().expect("address");
    assert!(endpoints.contains(&bad), "{endpoints:?}");
    let (balancers, _clock) = Balancers::with_manual_clock(7);
    let src: SocketAddr = "10.0.0.9:40000".parse().expect("address");
    let ctx = PickContext::connection(src, src);
    let mut failures = 0;
    for _ in 0..100 {
        let picked = balancers
            .pick(&key, &cluster.policy, &endpoints, &ctx)
            .expect("a pick");
        if picked.addr == bad {
            picked.report(Outcome::Status(500));
            failures += 1;
            if failures == 5 {
                break;
            }
        }
    }
    assert_eq!(failures, 5, "the bad endpoint was picked five times");
    balancers
}

/// A debug endpoint serving the world, with a certificate for `default/sleep` (the lease keeps
/// it) and the startup log filter `info` when `log` is given.
pub(crate) struct Fixture {
    pub admin: Arc<DebugAdmin>,
    pub _lease: CertLease,
    pub _ca_dir: TempDir,
}

pub(crate) async fn fixture(log: Option<LogReload>) -> Fixture {
    let snapshot = snapshot();
    let balancers = ejected_balancers(&snapshot);
    let dir = TempDir::new("debug-admin");
    let secrets = manager(local_ca(&dir), Duration::from_secs(3600));
    let lease = secrets.acquire(&id("default", "sleep"));
    secrets
        .fetch(&id("default", "sleep"))
        .await
        .unwrap_or_else(|e| panic!("certificate: {e}"));
    let admin = DebugAdmin {
        node: NODE.into(),
        trust_domain: "cluster.local".into(),
        root_namespace: "istio-system".into(),
        snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(snapshot)),
        secrets,
        outliers: crate::app::debug::outlier_reader(balancers),
        connections: Connections::new(),
        log: log.map(LogControl::new),
    };
    Fixture {
        admin: Arc::new(admin),
        _lease: lease,
        _ca_dir: dir,
    }
}

fn request(method: Method, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .unwrap_or_else(|e| panic!("request {path}: {e}"))
}

async fn call(admin: &DebugAdmin, method: Method, path: &str) -> (StatusCode, String) {
    let resp = respond(&request(method, path), admin);
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| match e {})
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn dump_of(admin: &DebugAdmin) -> ConfigDump {
    let (status, body) = call(admin, Method::GET, "/config_dump").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/config_dump is not a dump: {e}\n{body}"))
}

#[tokio::test]
async fn config_dump_shows_workloads_services_and_policies_of_the_snapshot() {
    let f = fixture(None).await;
    let d = dump_of(&f.admin).await;
    assert_eq!(d.node, NODE);
    let r1 = d
        .workloads
        .iter()
        .find(|w| w.name == "reviews-v1")
        .unwrap_or_else(|| panic!("reviews-v1 listed: {:?}", d.workloads));
    assert_eq!(
        (r1.uid.as_str(), r1.namespace.as_str(), r1.node.as_str()),
        ("uid-r1", "default", "n1")
    );
    assert_eq!(r1.workload_ips, vec!["10.0.0.1".to_string()]);
    assert_eq!(r1.service_account, "bookinfo-reviews");
    assert!(r1.enrolled);
    assert_eq!(r1.protocol, "HBONE");
    assert_eq!(d.workloads.len(), 3, "every pod, this node's or not");

    let reviews = d
        .services
        .iter()
        .find(|s| s.name == "reviews")
        .unwrap_or_else(|| panic!("reviews listed: {:?}", d.services));
    assert_eq!(reviews.vips, vec!["10.96.0.10".to_string()]);
    assert_eq!(reviews.hostname, REVIEWS);
    assert_eq!(reviews.ports[0].port, 9080);
    let ready: Vec<(&str, bool)> = reviews
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.ready))
        .collect();
    assert_eq!(
        ready,
        vec![("10.0.0.1", true), ("10.0.0.2", true), ("10.0.0.3", false)]
    );

    assert_eq!(d.policies.len(), 1, "{:?}", d.policies);
    let p = &d.policies[0];
    assert_eq!(
        (
            p.name.as_str(),
            p.action.as_str(),
            p.scope.as_str(),
            p.rules
        ),
        ("allow-sleep", "Allow", "WorkloadSelector", 1)
    );
    let pa = &d.peer_authentications[0];
    assert_eq!(
        (pa.name.as_str(), pa.scope.as_str(), pa.mode.as_str()),
        ("strict", "Global", "STRICT")
    );
    // As compiled for this node's enrolled workloads: the mesh-wide STRICT, and the ALLOW policy
    // on reviews-v1 only.
    let wp: Vec<(&str, &str, Vec<String>)> = d
        .workload_policies
        .iter()
        .map(|w| {
            (
                w.workload.as_str(),
                w.mtls.mode.as_str(),
                w.authorization_policies.clone(),
            )
        })
        .collect();
    assert_eq!(
        wp,
        vec![
            (
                "default/reviews-v1",
                "STRICT",
                vec!["default/allow-sleep".to_string()]
            ),
            ("default/sleep", "STRICT", vec![]),
        ]
    );
}

#[tokio::test]
async fn config_dump_shows_compiled_routes_and_clusters_with_the_ejected_endpoint() {
    let f = fixture(None).await;
    let d = dump_of(&f.admin).await;
    let ns = d
        .routes
        .iter()
        .find(|r| r.namespace == "default")
        .unwrap_or_else(|| panic!("routes for default: {:?}", d.routes));
    let vh = &ns.virtual_hosts[0];
    assert_eq!(vh.hosts, vec![REVIEWS.to_string()]);
    assert_eq!(vh.virtual_service, "VirtualService/default/reviews");
    assert_eq!(vh.http.len(), 2);
    assert_eq!(vh.http[0].name.as_deref(), Some("jason"));
    let mut conditions = vh.http[0].matches[0].clone();
    conditions.sort();
    assert_eq!(
        conditions,
        vec![
            "header end-user exact jason".to_string(),
            "uri prefix /api".to_string()
        ]
    );
    // Istio: a lone destination gets every request, whatever its (unset) weight.
    let lone: Vec<u32> = vh.http[0].destinations.iter().map(|d| d.weight).collect();
    assert_eq!(lone, vec![100]);
    let split: Vec<(&str, u32)> = vh.http[1]
        .destinations
        .iter()
        .map(|d| (d.cluster.as_str(), d.weight))
        .collect();
    assert_eq!(
        split,
        vec![
            ("outbound|0|v1|reviews.default.svc.cluster.local", 90),
            ("outbound|0|v2|reviews.default.svc.cluster.local", 10)
        ]
    );

    let name = v1_cluster().to_string();
    let v1 = d
        .clusters
        .iter()
        .find(|c| c.name == name && c.namespace.as_deref() == Some("default"))
        .unwrap_or_else(|| panic!("{name} listed: {:?}", d.clusters));
    assert_eq!(
        v1.destination_rule.as_deref(),
        Some("DestinationRule/default/reviews")
    );
    assert_eq!(v1.lb_policy, "ROUND_ROBIN");
    assert!(v1.outlier_detection);
    assert_eq!(v1.ejections_active, 1);
    assert_eq!(v1.ejections_total.get("consecutive_5xx"), Some(&1));
    let ep = &v1.endpoints[0];
    assert_eq!(
        (ep.address.as_str(), ep.status.as_str(), ep.ejections),
        ("10.0.0.1:9080", EJECTED, 1)
    );
    let until = ep
        .ejected_until
        .as_deref()
        .map(humantime::parse_rfc3339)
        .unwrap_or_else(|| panic!("an ejected endpoint says until when: {ep:?}"))
        .unwrap_or_else(|e| panic!("RFC 3339: {e}"));
    assert!(until > SystemTime::now(), "the ejection has not ended yet");
    // The Service port's own cluster is listed too, and nothing is ejected there.
    let plain = d
        .clusters
        .iter()
        .find(|c| {
            c.name == "outbound|9080||reviews.default.svc.cluster.local" && c.namespace.is_none()
        })
        .unwrap_or_else(|| panic!("the Service port's cluster: {:?}", d.clusters));
    let statuses: Vec<(&str, &str)> = plain
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.status.as_str()))
        .collect();
    assert_eq!(
        statuses,
        vec![("10.0.0.1:9080", HEALTHY), ("10.0.0.2:9080", HEALTHY)]
    );
}

#[tokio::test]
async fn config_dump_shows_the_certificates_the_manager_holds() {
    let f = fixture(None).await;
    let d = dump_of(&f.admin).await;
    let sleep = id("default", "sleep");
    let cert = f
        .admin
        .secrets
        .current(&sleep)
        .unwrap_or_else(|| panic!("a certificate for {sleep}"));
    assert_eq!(d.certificates.len(), 1, "{:?}", d.certificates);
    let c = &d.certificates[0];
    assert_eq!(c.identity, sleep.to_string());
    assert_eq!(c.state, "Available");
    let leaf = &c.cert_chain[0];
    assert_eq!(leaf.kind, "Leaf");
    let serial: String = crate::identity::tests::serial(cert.leaf())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(leaf.serial_number, serial);
    assert_eq!(
        leaf.expiration_time,
        humantime::format_rfc3339_seconds(cert.not_after).to_string()
    );
    let root = f.admin.secrets.trust_bundle().root_certs()[0].clone();
    let fp = config_dump::fingerprint(&root);
    assert_eq!(c.root_fingerprint.as_deref(), Some(fp.as_str()));
    // ztunnel's `rootCerts`, which istioctl prints as Root rows.
    let roots: Vec<(&str, Option<&str>)> = c
        .root_certs
        .iter()
        .map(|r| (r.kind.as_str(), r.fingerprint_sha256.as_deref()))
        .collect();
    assert_eq!(roots, vec![("Root", Some(fp.as_str()))]);
    assert_eq!(
        d.trust_bundle[0].fingerprint_sha256.as_deref(),
        Some(fp.as_str())
    );
    let left = c.expires_in_seconds.expect("expiry");
    assert!(
        (3000..=3600).contains(&left),
        "an hour's certificate: {left}s left"
    );
}

fn reloadable(startup: &str) -> (impl tracing::Subscriber + Send + Sync, LogReload) {
    let filter = tracing_subscriber::EnvFilter::new(startup);
    let (layer, handle) = tracing_subscriber::reload::Layer::new(filter);
    let subscriber = tracing_subscriber::registry().with(layer);
    (
        subscriber,
        LogReload {
            handle,
            startup: startup.into(),
        },
    )
}

#[tokio::test]
async fn logging_changes_the_level_at_run_time_and_rejects_a_bad_one() {
    let (subscriber, reload) = reloadable("info");
    let _default = tracing::subscriber::set_default(subscriber);
    let f = fixture(Some(reload)).await;
    assert!(!tracing::enabled!(Level::DEBUG), "info at start");

    let (status, body) = call(&f.admin, Method::GET, "/logging?level=debug").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("debug"), "{body}");
    assert!(
        tracing::enabled!(Level::DEBUG),
        "debug after /logging?level=debug"
    );

    let (status, body) = call(&f.admin, Method::GET, "/logging?level=verbose").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body.contains("\"verbose\""),
        "the error names the level: {body}"
    );
    assert!(
        tracing::enabled!(Level::DEBUG),
        "a bad level changes nothing"
    );

    // One target, by name (POST, as istioctl and Envoy send it).
    let (status, body) = call(
        &f.admin,
        Method::POST,
        "/logging?level=warn&ambit::zc=trace",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!tracing::enabled!(Level::INFO));
    assert!(tracing::enabled!(target: "ambit::zc", Level::TRACE));
    let (_, shown) = call(&f.admin, Method::GET, "/logging").await;
    assert!(shown.contains("ambit::zc=trace"), "{shown}");

    let (status, _) = call(&f.admin, Method::GET, "/logging?reset").await;
    assert_eq!(status, StatusCode::OK);
    assert!(tracing::enabled!(Level::INFO));
    assert!(!tracing::enabled!(target: "ambit::zc", Level::DEBUG));
}

#[tokio::test]
async fn connections_are_listed_while_their_guard_lives() {
    let f = fixture(None).await;
    let info = |port: u16| ConnectionInfo {
        workload: "default/sleep".into(),
        direction: Direction::Outbound,
        protocol: Protocol::Hbone,
        src: SocketAddr::from(([10, 0, 0, 9], port)),
        dst: "10.0.0.1:15008".parse().expect("address"),
        original_dst: Some("10.96.0.10:9080".parse().expect("address")),
    };
    let first = f.admin.connections.register(info(40001));
    let second = f.admin.connections.register(info(40002));
    first
        .bytes()
        .sent
        .fetch_add(42, std::sync::atomic::Ordering::Relaxed);
    let (status, body) = call(&f.admin, Method::GET, "/debug/connections").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<ConnectionView> =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(listed.len(), 2, "{body}");
    assert_eq!(listed[0].info, info(40001));
    assert_eq!(listed[0].bytes_sent, 42);
    drop(first);
    let (_, body) = call(&f.admin, Method::GET, "/debug/connections").await;
    let listed: Vec<ConnectionView> =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        listed.iter().map(|c| c.info.src.port()).collect::<Vec<_>>(),
        vec![40002]
    );
    drop(second);
    assert!(f.admin.connections.is_empty());
}

#[tokio::test]
async fn other_methods_are_refused_and_unknown_paths_list_the_endpoints() {
    let f = fixture(None).await;
    let (status, _) = call(&f.admin, Method::POST, "/config_dump").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _) = call(&f.admin, Method::DELETE, "/logging").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, body) = call(&f.admin, Method::GET, "/stats").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (path, _) in ENDPOINTS {
        assert!(body.contains(path), "404 lists {path}: {body}");
    }
    let (status, _) = call(&f.admin, Method::GET, "/logging").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no reload handle here"
    );
}

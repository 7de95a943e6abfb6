//! Where a CONNECT goes: the answers ztunnel gives, for each form of `:authority`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Method, Request, StatusCode};

use super::{own_ports, resolve, Reached, TargetError, OWN_PORTS};
use crate::snapshot::Snapshot;
use crate::state::{key, Service, ServicePort, State, TargetPort, Workload};

const POD_IP: [u8; 4] = [10, 0, 0, 5];

fn pod_ip() -> IpAddr {
    IpAddr::from(POD_IP)
}

fn port(port: u16, target: TargetPort) -> ServicePort {
    ServicePort {
        name: Some(format!("p{port}")),
        port,
        protocol: "TCP".into(),
        app_protocol: None,
        target_port: target,
    }
}

/// A snapshot with the pod `shop/web` (container port `http` = 8080) and the Service
/// `web.shop.svc.cluster.local`: 80 → 8080, 81 → `http`, 82 → `grpc` (no such container port),
/// 83 → 15008.
fn snapshot() -> Snapshot {
    let web = Workload {
        uid: "uid-web".into(),
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "default".into(),
        node: Some("n1".into()),
        host_network: false,
        ips: vec![pod_ip()],
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        named_ports: BTreeMap::from([("http".to_string(), 8080)]),
        annotations: Default::default(),
        running: true,
        terminating: false,
        istio: Default::default(),
    };
    let svc = Service {
        name: "web".into(),
        namespace: "shop".into(),
        hostname: "web.shop.svc.cluster.local".into(),
        vips: vec![IpAddr::from([10, 96, 0, 1])],
        headless: false,
        ports: vec![
            port(80, TargetPort::Number(8080)),
            port(81, TargetPort::Named("http".into())),
            port(82, TargetPort::Named("grpc".into())),
            port(83, TargetPort::Number(15008)),
        ],
        selector: BTreeMap::from([("app".to_string(), "web".to_string())]),
    };
    let mut state = State::new("cluster.local");
    state.workloads.insert(key("shop", "web"), Arc::new(web));
    state.workload_by_ip.insert(pod_ip(), key("shop", "web"));
    state
        .service_by_host
        .insert(Arc::from(svc.hostname.as_str()), svc.key());
    state.services.insert(svc.key(), Arc::new(svc));
    Snapshot {
        state: Arc::new(state),
        ..Default::default()
    }
}

fn connect(authority: &str) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"))
}

fn reached(ips: &[IpAddr]) -> Reached<'_> {
    Reached {
        namespace: "shop",
        name: "web",
        ips,
        local: SocketAddr::new(pod_ip(), 15008),
        own: &OWN_PORTS,
    }
}

/// The status and the app's port, or the status and the error.
fn answer(req: &Request<()>) -> (StatusCode, Result<u16, TargetError>) {
    let ips = [pod_ip()];
    match resolve(req, reached(&ips), &snapshot()) {
        Ok(t) => {
            assert_eq!(t.dst.0.ip(), pod_ip(), "always the reached pod");
            (StatusCode::OK, Ok(t.dst.0.port()))
        }
        Err(e) => (e.status(), Err(e)),
    }
}

#[test]
fn an_ip_authority_of_the_reached_pod_goes_to_its_port() {
    let (status, port) = answer(&connect("10.0.0.5:8080"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(port.ok(), Some(8080));
}

#[test]
fn each_own_port_is_refused_with_503_as_a_self_call() {
    for own in OWN_PORTS {
        let (status, e) = answer(&connect(&format!("10.0.0.5:{own}")));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "port {own}");
        assert!(
            matches!(e, Err(TargetError::SelfCall { port }) if port == own),
            "port {own}: {e:?}"
        );
    }
    for own in [15001, 15006, 15008, 15000, 15020, 15021] {
        assert!(OWN_PORTS.contains(&own), "{own} is one of the proxy's");
    }
}

/// Metrics and admin ports configured away from the defaults are refused too, and the defaults
/// stay refused (Istio reserves them); an app port stays open.
#[test]
fn configured_metrics_and_admin_ports_are_refused_as_well() {
    let own = own_ports([
        "0.0.0.0:9091".parse().expect("addr"),
        "127.0.0.1:9901".parse().expect("addr"),
    ]);
    let ips = [pod_ip()];
    let mut reached = reached(&ips);
    reached.own = &own;
    for port in [9091, 9901, 15020, 15000, 15008] {
        let e = resolve(&connect(&format!("10.0.0.5:{port}")), reached, &snapshot());
        assert!(
            matches!(e, Err(TargetError::SelfCall { port: p }) if p == port),
            "port {port}: {e:?}"
        );
    }
    let ok = resolve(&connect("10.0.0.5:8080"), reached, &snapshot()).expect("app port");
    assert_eq!(ok.dst.0.port(), 8080);
    assert_eq!(own.len(), OWN_PORTS.len() + 2, "no duplicates: {own:?}");
    assert_eq!(
        own_ports(["0.0.0.0:15020".parse().expect("addr")]).len(),
        OWN_PORTS.len()
    );
}

#[test]
fn a_service_hostname_maps_its_port_to_the_target_port() {
    let (status, port) = answer(&connect("web.shop.svc.cluster.local:80"));
    assert_eq!((status, port.ok()), (StatusCode::OK, Some(8080)), "number");
    let (status, port) = answer(&connect("web.shop.svc.cluster.local:81"));
    assert_eq!((status, port.ok()), (StatusCode::OK, Some(8080)), "name");
    let ips = [pod_ip()];
    let t = resolve(
        &connect("Web.Shop.svc.cluster.local.:80"),
        reached(&ips),
        &snapshot(),
    )
    .expect("case and a trailing dot do not matter");
    assert_eq!(
        t.service.map(|s| s.hostname.clone()).as_deref(),
        Some("web.shop.svc.cluster.local"),
        "the Service named is the one reported"
    );
}

#[test]
fn a_hostname_that_cannot_be_served_gets_503() {
    for (authority, label) in [
        ("nothere.shop.svc.cluster.local:80", "no_hostname"),
        ("example.com:8080", "no_hostname"),
        ("web.shop.svc.cluster.local:9999", "no_port_for_service"),
        ("web.shop.svc.cluster.local:82", "no_port_for_service"),
        ("web.shop.svc.cluster.local:83", "self_call"),
    ] {
        let (status, e) = answer(&connect(authority));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{authority}");
        let e = e.expect_err(authority);
        assert_eq!(e.metric_label(), label, "{authority}: {e}");
    }
}

#[test]
fn malformed_requests_get_400() {
    let get = Request::builder()
        .method(Method::GET)
        .uri("https://10.0.0.5:8080/")
        .body(())
        .expect("GET");
    for (req, label) in [
        (get, "not_connect"),
        (connect("10.0.0.6:8080"), "other_address"),
        (connect("web.shop.svc.cluster.local"), "invalid_authority"),
    ] {
        let (status, e) = answer(&req);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{}", req.uri());
        assert_eq!(e.expect_err("refused").metric_label(), label);
    }
    // The listener's address is no longer the pod's.
    let other = [IpAddr::from([10, 0, 0, 9])];
    let e = resolve(&connect("10.0.0.5:8080"), reached(&other), &snapshot())
        .expect_err("not the pod's address");
    assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e.metric_label(), "not_the_pod", "{e}");
}

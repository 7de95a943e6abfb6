//! Route compilation, case by case, each naming the Istio rule it checks.

use std::net::SocketAddr;

use super::*;
use crate::config::files::{load_text, Loaded};
use crate::routing::LbPolicy;
use crate::state::store::Store;

const DOMAIN: &str = "cluster.local";

/// A state from YAML, with a `reviews` Service (two ports) whose pods carry versions.
fn state(yaml: &str) -> Arc<State> {
    let base = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: reviews}, ports: [{name: http, port: 9080}, {name: http-admin, port: 9090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: default, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}, {name: http-admin, port: 9090}]
endpoints:
- {addresses: [10.0.0.1]}
- {addresses: [10.0.0.2]}
- {addresses: [10.0.0.3]}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: default, labels: {app: reviews, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: default, labels: {app: reviews, version: v2}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v3, namespace: default, labels: {app: reviews, version: v3}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.3}
"#;
    let mut loaded = Loaded::default();
    load_text(
        &mut loaded,
        std::path::Path::new("routes.yaml"),
        &format!("{base}\n---\n{yaml}"),
    );
    assert!(loaded.file_errors.is_empty(), "{:?}", loaded.file_errors);
    let mut store = Store::new(DOMAIN);
    store.apply(loaded.into_event());
    store.publish();
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    store.reader().load_full()
}

fn routes_for(state: &State, client: &str) -> (Routes, Vec<ObjectError>) {
    compile(state, "istio-system", [client], &Default::default())
}

fn vs_name(r: &Routes, ns: &str, host: &str) -> Option<String> {
    r.virtual_host(ns, host)
        .map(|v| v.virtual_service.to_string())
}

#[test]
fn a_short_host_is_relative_to_the_virtual_services_namespace() {
    // Istio VirtualService.hosts: "reviews" in namespace default means
    // reviews.default.svc.cluster.local.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: default}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}\n",
    );
    let (r, notes) = routes_for(&s, "other");
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        vs_name(&r, "other", "reviews.default.svc.cluster.local").as_deref(),
        Some("VirtualService/default/r")
    );
    assert!(r.virtual_host("other", "reviews").is_none());
    let Action::Route(d) = &r
        .virtual_host("other", "reviews.default.svc.cluster.local")
        .expect("vhost")
        .http[0]
        .action
    else {
        panic!("a route action");
    };
    assert_eq!(&*d[0].cluster.host, "reviews.default.svc.cluster.local");
    assert_eq!(d[0].cluster.port, 0, "no port: the request's");
}

#[test]
fn export_to_dot_hides_a_virtual_service_from_other_namespaces() {
    // Istio exportTo: "." exports only to the VirtualService's own namespace.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: default}\nspec: {exportTo: [.], hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}\n",
    );
    let (r, _) = compile(
        &s,
        "istio-system",
        ["default", "other"],
        &Default::default(),
    );
    assert!(r
        .virtual_host("default", "reviews.default.svc.cluster.local")
        .is_some());
    assert!(r
        .virtual_host("other", "reviews.default.svc.cluster.local")
        .is_none());
}

#[test]
fn an_exact_host_beats_a_wildcard_and_a_longer_wildcard_a_shorter_one() {
    // Istio host precedence: exact names before wildcards, the most specific wildcard first.
    let vs = |name: &str, host: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default}}\nspec: {{hosts: [\"{host}\"], http: [{{route: [{{destination: {{host: reviews}}}}]}}]}}\n---\n")
    };
    // (A bare `*` is refused for the mesh gateway by Istio's validation.)
    let s = state(&format!(
        "{}{}{}",
        vs("exact", "api.example.com"),
        vs("short", "*.com"),
        vs("long", "*.example.com"),
    ));
    let (r, _) = routes_for(&s, "default");
    let name = |h: &str| vs_name(&r, "default", h);
    assert_eq!(
        name("api.example.com").as_deref(),
        Some("VirtualService/default/exact")
    );
    assert_eq!(
        name("web.example.com").as_deref(),
        Some("VirtualService/default/long")
    );
    assert_eq!(
        name("web.other.com").as_deref(),
        Some("VirtualService/default/short")
    );
    assert_eq!(name("example.org"), None);
}

#[test]
fn two_virtual_services_for_one_host_the_clients_own_namespace_then_the_oldest_wins() {
    // Istio IST0109: conflicting mesh VirtualServices for one host; one is used, the other
    // reported with its field.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, namespace: default, creationTimestamp: \"2026-01-01T00:00:00Z\"}\nspec: {hosts: [reviews.default.svc.cluster.local], http: [{route: [{destination: {host: reviews}}]}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: b, namespace: default, creationTimestamp: \"2026-02-01T00:00:00Z\"}\nspec: {hosts: [reviews.default.svc.cluster.local], http: [{route: [{destination: {host: reviews}}]}]}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: mine, namespace: other, creationTimestamp: \"2026-03-01T00:00:00Z\"}\nspec: {hosts: [reviews.default.svc.cluster.local], http: [{route: [{destination: {host: reviews.default.svc.cluster.local}}]}]}\n",
    );
    let (r, notes) = compile(
        &s,
        "istio-system",
        ["default", "other"],
        &Default::default(),
    );
    let host = "reviews.default.svc.cluster.local";
    assert_eq!(
        vs_name(&r, "default", host).as_deref(),
        Some("VirtualService/default/a"),
        "oldest"
    );
    assert_eq!(
        vs_name(&r, "other", host).as_deref(),
        Some("VirtualService/other/mine"),
        "own namespace first"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.object.name == "b" && n.field == "spec.hosts[0]"),
        "the loser is reported: {notes:?}"
    );
}

#[test]
fn a_destination_host_nothing_defines_is_reported_with_its_field() {
    // Issue 11: a destination host that does not exist → 503 and a config warning naming the
    // VirtualService and field.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: default}\nspec: {hosts: [reviews], http: [{route: [{destination: {host: nope}}]}]}\n",
    );
    let (_, notes) = routes_for(&s, "default");
    assert!(
        notes
            .iter()
            .any(|n| n.field == "spec.http[0].route[0].destination.host"
                && n.message.contains("nope.default.svc.cluster.local")),
        "{notes:?}"
    );
}

#[test]
fn subsets_select_endpoints_by_label_and_override_the_rules_policy() {
    // Istio DestinationRule reference example: RANDOM at the top, ROUND_ROBIN in subset v2's
    // own trafficPolicy.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
    );
    let (r, _) = routes_for(&s, "default");
    let key = |subset: Option<&str>| ClusterKey {
        host: Arc::from("reviews.default.svc.cluster.local"),
        subset: subset.map(Arc::from),
        port: 9080,
    };
    let c = |subset| r.shaped_cluster("default", &key(subset)).expect("shaped");
    assert_eq!(c(None).policy.lb, LbPolicy::Random);
    assert_eq!(
        c(Some("v1")).policy.lb,
        LbPolicy::Random,
        "inherits the rule's"
    );
    assert_eq!(c(Some("v2")).policy.lb, LbPolicy::RoundRobin, "its own");
    assert_eq!(c(None).endpoints.v4.len(), 3);
    assert_eq!(
        &*c(Some("v2")).endpoints.v4,
        &["10.0.0.2:9080".parse::<SocketAddr>().expect("addr")]
    );
}

#[test]
fn port_level_settings_replace_the_policy_for_their_port() {
    // Istio TrafficPolicy.portLevelSettings: overrides for one port.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    portLevelSettings: [{port: {number: 9090}, loadBalancer: {simple: ROUND_ROBIN}}]\n",
    );
    let (r, _) = routes_for(&s, "default");
    let c = |port| {
        r.shaped_cluster(
            "default",
            &ClusterKey {
                host: Arc::from("reviews.default.svc.cluster.local"),
                subset: None,
                port,
            },
        )
        .expect("shaped")
        .policy
        .lb
        .clone()
    };
    assert_eq!(c(9080), LbPolicy::Random);
    assert_eq!(c(9090), LbPolicy::RoundRobin);
}

#[test]
fn the_destination_rule_lookup_path_prefers_the_clients_namespace() {
    // Istio: DestinationRule lookup: client namespace, then the service's, then the root.
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc-ns, namespace: default}\nspec: {host: reviews.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: client-ns, namespace: other}\nspec: {host: reviews.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}\n",
    );
    let (r, _) = compile(
        &s,
        "istio-system",
        ["default", "other"],
        &Default::default(),
    );
    let key = ClusterKey {
        host: Arc::from("reviews.default.svc.cluster.local"),
        subset: None,
        port: 9080,
    };
    assert_eq!(
        r.shaped_cluster("other", &key).expect("c").policy.lb,
        LbPolicy::RoundRobin
    );
    assert_eq!(
        r.shaped_cluster("default", &key).expect("c").policy.lb,
        LbPolicy::Random
    );
}

#[test]
fn no_load_balancer_means_least_request() {
    // Istio: "By default, Istio uses a least requests load balancing policy."
    let s = state(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\nspec: {host: reviews, subsets: [{name: v1, labels: {version: v1}}]}\n",
    );
    let (r, _) = routes_for(&s, "default");
    let key = ClusterKey {
        host: Arc::from("reviews.default.svc.cluster.local"),
        subset: Some(Arc::from("v1")),
        port: 9080,
    };
    assert_eq!(
        r.shaped_cluster("default", &key).expect("c").policy.lb,
        LbPolicy::LeastRequest
    );
}

#[test]
fn uri_regex_rewrite_keeps_re2_group_references() {
    // Istio HTTPRewrite.uriRegexRewrite, the reference's example: `rewrite: /\2/instance/\1`.
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: rw, namespace: default}
spec:
  hosts: [reviews]
  http:
  - rewrite:
      uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: '\2/instance/\1'}
    route: [{destination: {host: reviews}}]
"#,
    );
    let (r, notes) = routes_for(&s, "default");
    assert!(notes.is_empty(), "{notes:?}");
    let v = r
        .virtual_host("default", "reviews.default.svc.cluster.local")
        .expect("routed");
    let rw = v.http[0].rewrite.as_ref().expect("rewrite");
    assert_eq!(
        crate::routing::matching::rewrite_path(rw, None, "/service/foo/v1/api?x=1"),
        "/v1/api/instance/foo?x=1"
    );
}

#[test]
fn match_blocks_for_other_gateways_are_left_out() {
    // Istio HTTPMatchRequest.gateways: a block naming gateways applies to sidecars only when it
    // lists `mesh`, and then sourceLabels do not narrow it; a route whose every block is for
    // other gateways is not one of the sidecar's routes at all.
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gw, namespace: default}
spec:
  hosts: [reviews]
  gateways: [mesh, istio-system/ingress]
  http:
  - name: ingress-only
    match: [{gateways: [istio-system/ingress], uri: {prefix: /}}]
    route: [{destination: {host: reviews}}]
  - name: mesh
    match: [{gateways: [mesh], sourceLabels: {app: nobody}, uri: {prefix: /a}}, {gateways: [istio-system/ingress], uri: {prefix: /b}}]
    route: [{destination: {host: reviews}}]
"#,
    );
    let (r, _) = routes_for(&s, "default");
    let v = r
        .virtual_host("default", "reviews.default.svc.cluster.local")
        .expect("routed");
    assert_eq!(v.http.len(), 1, "the ingress-only route is left out");
    assert_eq!(v.http[0].name.as_deref(), Some("mesh"));
    assert_eq!(v.http[0].matches.len(), 1, "the ingress block is left out");
    assert!(v.http[0].matches[0].source_labels.is_empty());
}

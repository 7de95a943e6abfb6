//! State built from YAML through the one validated path: enrolment rules, lookups, and bad input
//! rejected alone with the last good version kept.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::store::Store;
use super::Destination;
use crate::config::files::{load_text, FileSource, Loaded};
use crate::config::{Kind, ObjectRef, SourceEvent};

fn replace_from(yaml: &str) -> SourceEvent {
    let mut l = Loaded::default();
    load_text(&mut l, Path::new("t.yaml"), yaml);
    assert!(l.file_errors.is_empty(), "{:?}", l.file_errors);
    l.into_event()
}

fn store_from(yaml: &str) -> Store {
    let mut s = Store::new("cluster.local");
    s.apply(replace_from(yaml));
    s.publish();
    s
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata:
  name: reviews-v1
  namespace: mesh
  uid: 1111-2222
  labels: {app: reviews, version: v1}
  annotations: {ambit.dev/netns: /run/netns/x, traffic.sidecar.istio.io/excludeOutboundPorts: "9000, 9001"}
spec:
  nodeName: n1
  serviceAccountName: bookinfo-reviews
  containers: [{name: app, image: x, ports: [{name: http-api, containerPort: 9080}]}]
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00::a"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other-node, namespace: mesh}
spec: {nodeName: n2, containers: []}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: mesh}
spec: {nodeName: n1, hostNetwork: true, containers: []}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: mesh}
spec: {nodeName: n1, containers: []}
status: {phase: Succeeded, podIP: 10.244.1.13}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: plain}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.244.1.12}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: mesh}
spec:
  clusterIP: 10.96.0.20
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  ports: [{name: http, port: 9080, targetPort: http-api}, {name: admin, port: 9901, targetPort: 9901, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: mesh}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-abc, namespace: mesh, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}, {name: admin, port: 9901}]
endpoints:
- {addresses: [10.244.1.10], conditions: {ready: true}, targetRef: {kind: Pod, name: reviews-v1, namespace: mesh}}
- {addresses: [10.244.2.30], conditions: {ready: false}}
- {addresses: [10.244.2.31]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored, namespace: mesh}
"#;

#[test]
fn enrolment_follows_istio_rules() {
    let store = store_from(CLUSTER);
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    let state = store.reader().load_full();
    let names: Vec<String> = state
        .enrolled_on("n1")
        .iter()
        .map(|w| w.name.clone())
        .collect();
    // Istio: namespace labelled ambient, pod not labelled none; hostNetwork and finished pods are not
    // captured; only pods scheduled on this node.
    assert_eq!(names, vec!["reviews-v1"]);
    let w = &state.enrolled_on("n1")[0];
    assert_eq!(w.ips, vec![ip("10.244.1.10"), ip("fd00::a")]);
    assert_eq!(w.service_account, "bookinfo-reviews");
    assert_eq!(w.uid, "1111-2222");
    assert_eq!(w.named_ports.get("http-api"), Some(&9080));
    assert_eq!(state.enrolled_on("n2").len(), 1);
}

#[test]
fn a_pod_label_enrols_in_any_namespace_and_a_sidecar_keeps_a_pod_out() {
    let store = store_from(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: chosen, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n1, containers: []}
status: {phase: Running, podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: unlabelled, namespace: plain}
spec: {nodeName: n1, containers: []}
status: {phase: Running, podIP: 10.244.1.21}
---
apiVersion: v1
kind: Pod
metadata: {name: injected, namespace: mesh, annotations: {sidecar.istio.io/status: '{"containers":["istio-proxy"]}'}}
spec: {nodeName: n1, containers: []}
status: {phase: Running, podIP: 10.244.1.22}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-member, namespace: mesh}
spec: {nodeName: n1, containers: []}
status: {phase: Running, podIP: 10.244.1.23}
"#,
    );
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    let state = store.reader().load_full();
    let names: Vec<String> = state
        .enrolled_on("n1")
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect();
    // Istio (istio-cni's PodRedirectionEnabled): the pod's own label enrols it wherever it runs;
    // a pod with an injected sidecar is never also in ambient.
    assert_eq!(names, vec!["mesh/plain-member", "plain/chosen"]);
}

#[test]
fn lookups_by_destination() {
    let state = store_from(CLUSTER).reader().load_full();
    // Table: destination address → what it is.
    let cases: [(&str, &str); 5] = [
        ("10.96.0.20:9080", "service mesh/reviews port http"),
        ("[fd00:96::20]:9901", "service mesh/reviews port admin"),
        ("10.96.0.20:1234", "service mesh/reviews port -"),
        ("10.244.1.10:9080", "workload mesh/reviews-v1"),
        ("10.244.9.9:80", "none"),
    ];
    for (addr, want) in cases {
        let got = match state.destination(addr.parse::<SocketAddr>().expect("addr")) {
            Some(Destination::Service { service, port }) => format!(
                "service {}/{} port {}",
                service.namespace,
                service.name,
                port.and_then(|p| p.name).unwrap_or_else(|| "-".into())
            ),
            Some(Destination::Workload(w)) => format!("workload {}/{}", w.namespace, w.name),
            Some(Destination::ServiceEntry(se)) => {
                format!("service entry {:?}", se.metadata().name)
            }
            None => "none".into(),
        };
        assert_eq!(got, want, "{addr}");
    }
    let reviews = state
        .service_by_host("reviews.mesh.svc.cluster.local")
        .expect("by hostname");
    // Ready endpoints only (nil ready counts as ready), target port resolved through the slice.
    assert_eq!(
        state.ready_endpoints(&reviews, 9080),
        vec![
            "10.244.1.10:9080".parse::<SocketAddr>().unwrap(),
            "10.244.2.31:9080".parse().unwrap()
        ]
    );
    assert_eq!(state.ready_endpoints(&reviews, 9901).len(), 2);
    assert!(
        state
            .service("mesh", "headless")
            .expect("headless")
            .headless
    );
}

#[test]
fn bad_objects_are_rejected_alone_and_the_last_good_version_stays() {
    let mut store = store_from(CLUSTER);
    // Each broken in a different way; every other object of the batch still applies.
    let broken = r#"
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: mesh, uid: 1111-2222}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.244.1.300}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: mesh}
spec: {clusterIP: 10.96.0.20, ports: [{port: 70000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-abc, namespace: mesh, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
endpoints: [{addresses: [not-an-ip]}]
---
apiVersion: v2
kind: Namespace
metadata: {name: mesh}
---
apiVersion: v1
kind: Pod
metadata: {namespace: mesh}
spec: {containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: typo, namespace: mesh}
spec: {hostNetwork: "yes", containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: fresh, namespace: mesh}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.244.1.50}
"#;
    let mut l = Loaded::default();
    load_text(&mut l, Path::new("t.yaml"), CLUSTER);
    load_text(&mut l, Path::new("u.yaml"), broken);
    // The same objects appear twice (good in t.yaml, broken in u.yaml): apply the broken ones after.
    store.apply(l.into_event());
    store.publish();
    let msgs: Vec<String> = store.errors().iter().map(ToString::to_string).collect();
    let expect = [
        ("Pod mesh/reviews-v1", "status.podIP"),
        ("Service mesh/reviews", "spec.ports[0].port"),
        (
            "EndpointSlice mesh/reviews-abc",
            "endpoints[0].addresses[0]",
        ),
        ("Namespace mesh", "apiVersion"),
        ("Pod mesh/", "metadata.name"),
        ("Pod mesh/typo", "spec.hostNetwork"),
    ];
    for (object, field) in expect {
        assert!(
            msgs.iter()
                .any(|m| m.contains(object) && m.contains(field) && m.contains("u.yaml")),
            "expected an error naming {object} and {field} with its file: {msgs:#?}"
        );
    }
    let state = store.reader().load_full();
    // Last good versions are still in force.
    assert_eq!(
        state
            .workload_by_ip(ip("10.244.1.10"))
            .expect("old pod kept")
            .name,
        "reviews-v1"
    );
    assert_eq!(
        state
            .service("mesh", "reviews")
            .expect("old service kept")
            .ports
            .len(),
        2
    );
    let reviews = state.service("mesh", "reviews").unwrap();
    assert_eq!(
        state.ready_endpoints(&reviews, 9080).len(),
        2,
        "old slice kept"
    );
    assert!(
        state.is_enrolled(
            &state
                .workloads
                .get(&super::key("mesh", "reviews-v1"))
                .unwrap()
                .clone()
        ),
        "namespace label kept"
    );
    // And the rest applied.
    assert_eq!(
        state
            .workload_by_ip(ip("10.244.1.50"))
            .expect("fresh pod")
            .name,
        "fresh"
    );
    assert!(store.rejected_total() >= 6);
}

#[test]
fn replace_removes_what_is_gone_and_delete_removes_one() {
    let mut store = store_from(CLUSTER);
    store.apply(SourceEvent::Delete(ObjectRef::new(
        Kind::EndpointSlice,
        "mesh",
        "reviews-abc",
    )));
    store.publish();
    let state = store.reader().load_full();
    assert!(state
        .ready_endpoints(&state.service("mesh", "reviews").unwrap(), 9080)
        .is_empty());
    store.apply(replace_from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n",
    ));
    assert!(store.publish());
    let state = store.reader().load_full();
    assert!(
        state.workloads.is_empty() && state.services.is_empty() && state.service_by_vip.is_empty()
    );
    assert!(state.workload_by_ip.is_empty());
    assert_eq!(state.namespaces.len(), 1);
    // Nothing changed: nothing to publish.
    store.apply(replace_from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n",
    ));
    assert!(!store.publish());
}

#[test]
fn a_broken_file_keeps_its_objects_last_good_versions() {
    let dir = std::env::temp_dir().join(format!("ambit-state-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), CLUSTER).unwrap();
    std::fs::write(
        dir.join("b.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    )
    .unwrap();
    let mut source = FileSource::new(&dir);
    let mut store = Store::new("cluster.local");
    store.apply(source.poll().expect("first load"));
    store.publish();
    assert!(source.poll().is_none(), "nothing changed");
    // A syntax error in a.yaml: its objects stay, the error names the file; b.yaml still applies.
    std::fs::write(dir.join("a.yaml"), "apiVersion: v1\nkind: [unclosed\n").unwrap();
    std::fs::write(
        dir.join("b.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other2}\n",
    )
    .unwrap();
    store.apply(source.poll().expect("reload"));
    store.publish();
    let state = store.reader().load_full();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        state.service("mesh", "reviews").is_some(),
        "objects of the broken file are kept"
    );
    assert!(state.namespaces.contains_key("other2") && !state.namespaces.contains_key("other"));
    assert!(
        source.file_errors.iter().any(|e| e.path.contains("a.yaml")),
        "{:?}",
        source.file_errors
    );
}

/// Istio's documented examples (bookinfo, istio.io/latest/docs/reference/config/...), trimmed.
const ISTIO: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-route, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 75}
    - {destination: {host: reviews, subset: v3}, weight: 25}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews-destination, namespace: mesh}
spec:
  host: reviews.mesh.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: external-svc-mongocluster, namespace: mesh}
spec:
  hosts: [mymongodb.somedomain]
  addresses: [192.192.192.192/24]
  ports: [{number: 27018, name: mongodb, protocol: MONGO}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{address: 2.2.2.2}, {address: 3.3.3.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-api, namespace: mesh}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.10]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: mesh}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{from: [{source: {notNamespaces: [mesh]}}], to: [{operation: {ports: ["9080"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: mesh}
spec: {}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews, namespace: mesh}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {"9080": {mode: DISABLE}}
"#;

#[test]
fn istio_objects_load_and_are_indexed() {
    let store = store_from(&format!("{CLUSTER}\n---\n{ISTIO}"));
    assert!(store.errors().is_empty(), "{:#?}", store.errors());
    let state = store.reader().load_full();
    let host = "reviews.mesh.svc.cluster.local";
    // Table: (kind, host or namespace, expected object names).
    let by_host = [
        (Kind::VirtualService, host, vec!["reviews-route"]),
        (Kind::DestinationRule, host, vec!["reviews-destination"]),
        (
            Kind::ServiceEntry,
            "mymongodb.somedomain",
            vec!["external-svc-mongocluster"],
        ),
        (
            Kind::VirtualService,
            "ratings.mesh.svc.cluster.local",
            vec![],
        ),
    ];
    for (kind, h, want) in by_host {
        let got: Vec<String> = state
            .istio_for_host(kind, h)
            .iter()
            .map(|c| c.metadata().name.clone().unwrap_or_default())
            .collect();
        assert_eq!(got, want, "{kind} for host {h}");
    }
    let by_ns = [
        (
            Kind::AuthorizationPolicy,
            "mesh",
            vec!["allow-nothing", "deny-method-get"],
        ),
        (Kind::PeerAuthentication, "istio-system", vec!["default"]),
        (Kind::PeerAuthentication, "mesh", vec!["reviews"]),
        (Kind::AuthorizationPolicy, "plain", vec![]),
    ];
    for (kind, ns, want) in by_ns {
        let got: Vec<String> = state
            .istio_in_namespace(kind, ns)
            .iter()
            .map(|c| c.metadata().name.clone().unwrap_or_default())
            .collect();
        assert_eq!(got, want, "{kind} in {ns}");
    }
    assert!(
        state.has_subset("reviews", "mesh", "v2") && !state.has_subset("reviews", "mesh", "v4")
    );
    match state.destination("240.0.0.10:443".parse().unwrap()) {
        Some(Destination::ServiceEntry(se)) => {
            assert_eq!(se.metadata().name.as_deref(), Some("external-api"))
        }
        other => panic!("ServiceEntry address lookup: {other:?}"),
    }
}

#[test]
fn bad_istio_objects_are_rejected_alone_and_the_last_good_version_stays() {
    let mut store = store_from(&format!("{CLUSTER}\n---\n{ISTIO}"));
    let broken = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-route, namespace: mesh}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v4}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: mesh}
spec: {action: DENNY}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-api, namespace: mesh}
spec: {hosts: [api.example.com], addresses: [240.0.0.300/33], ports: [{number: 443, name: https, protocol: TLS}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: regex, namespace: mesh}
spec:
  hosts: [ratings]
  http: [{match: [{uri: {regex: "(unclosed"}}], route: [{destination: {host: ratings}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: mesh}
spec: {action: CUSTOM, provider: {name: ext-authz}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: fresh, namespace: plain}
spec: {mtls: {mode: STRICT}}
"#;
    let mut l = Loaded::default();
    load_text(
        &mut l,
        Path::new("t.yaml"),
        &format!("{CLUSTER}\n---\n{ISTIO}"),
    );
    load_text(&mut l, Path::new("istio.yaml"), broken);
    store.apply(l.into_event());
    store.publish();
    let msgs: Vec<String> = store.errors().iter().map(ToString::to_string).collect();
    let expect = [
        (
            "VirtualService mesh/reviews-route",
            "spec.http[0].route[0].destination.subset",
        ),
        ("AuthorizationPolicy mesh/deny-method-get", "spec.action"),
        ("ServiceEntry mesh/external-api", "spec.addresses[0]"),
        (
            "VirtualService mesh/regex",
            "spec.http[0].match[0].uri.regex",
        ),
        ("AuthorizationPolicy mesh/custom", "spec.action"),
    ];
    for (object, field) in expect {
        assert!(
            msgs.iter()
                .any(|m| m.contains(object) && m.contains(field) && m.contains("istio.yaml")),
            "expected an error naming {object} and {field}: {msgs:#?}"
        );
    }
    let state = store.reader().load_full();
    let vs = state.istio_for_host(Kind::VirtualService, "reviews.mesh.svc.cluster.local");
    assert_eq!(vs.len(), 1, "the last good VirtualService stays");
    assert!(
        state
            .istio_in_namespace(Kind::AuthorizationPolicy, "mesh")
            .len()
            == 2,
        "last good policies stay; CUSTOM not added"
    );
    assert!(matches!(
        state.destination("240.0.0.10:443".parse().unwrap()),
        Some(Destination::ServiceEntry(_))
    ));
    assert_eq!(
        state
            .istio_in_namespace(Kind::PeerAuthentication, "plain")
            .len(),
        1,
        "the valid object applied"
    );
}

#[test]
fn reloading_unchanged_istio_objects_publishes_nothing() {
    let all = format!("{CLUSTER}\n---\n{ISTIO}");
    let mut store = store_from(&all);
    store.apply(replace_from(&all));
    assert!(
        !store.publish(),
        "an unchanged reload must not publish a new snapshot"
    );
    store.apply(replace_from(&all.replace("weight: 75", "weight: 70")));
    assert!(store.publish(), "a changed VirtualService publishes");
}

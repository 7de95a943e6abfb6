//! Compilation tests (which policies apply to which workload, and at what cost), and the fixture
//! the doc-example table shares: a state built from YAML through the real parsing path.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::config::files::{load_text, Loaded};
use crate::config::istio::IstioConfig;
use crate::config::{Kind, Object, ObjectError, PolicyScope, SourceEvent};
use crate::state::store::Store;

pub(super) const ROOT: &str = "istio-system";

/// Namespaces and pods the policy tests select from. All pods are enrolled (ambient namespaces,
/// running).
pub(super) const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {nodeName: n1, serviceAccountName: httpbin, containers: []}
status: {phase: Running, podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: foo, labels: {app: sleep}}
spec: {nodeName: n1, serviceAccountName: sleep, containers: []}
status: {phase: Running, podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: finance, namespace: foo, labels: {app: finance}}
spec: {nodeName: n2, serviceAccountName: finance, containers: []}
status: {phase: Running, podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: bar, labels: {app: httpbin}}
spec: {nodeName: n1, serviceAccountName: httpbin, containers: []}
status: {phase: Running, podIP: 10.0.2.1}
"#;

/// A snapshot as the agent would see it: rejected AuthorizationPolicies are in it
/// (`state.rejected_policies`), with the scope the parser read from their raw text.
pub(super) struct World {
    pub state: crate::state::State,
    pub errors: Vec<ObjectError>,
}

/// Loads `CLUSTER` plus `yaml` through the file source's parser and the store.
pub(super) fn world(yaml: &str) -> World {
    let text = format!("{CLUSTER}\n---\n{yaml}");
    let mut loaded = Loaded::default();
    load_text(&mut loaded, Path::new("policy.yaml"), &text);
    assert!(
        loaded.file_errors.is_empty(),
        "fixture YAML does not parse: {:?}",
        loaded.file_errors
    );
    let mut store = Store::new("cluster.local");
    store.apply(loaded.into_event());
    store.publish();
    World {
        state: (*store.reader().load_full()).clone(),
        errors: store.errors(),
    }
}

impl World {
    pub fn compile(&self) -> CompiledPolicies {
        CompiledPolicies::build(&self.state, ROOT)
    }

    /// Decides a connection from `peer` to `pod` (`namespace/name`) on `port`.
    pub fn check(&self, c: &CompiledPolicies, pod: &str, peer: &Peer, port: u16) -> Decision {
        let (ns, name) = pod.split_once('/').expect("pod as namespace/name");
        let policy = c
            .for_workload(ns, name)
            .unwrap_or_else(|| panic!("no compiled policy for enrolled pod {pod}"));
        let w = self
            .state
            .workloads
            .get(&crate::state::key(ns, name))
            .unwrap_or_else(|| panic!("pod {pod} not in the state"));
        let identity = peer.identity();
        let conn = ConnAttrs {
            src_ip: peer.ip(),
            dst_ip: w.ips[0],
            dst_port: port,
            identity: identity.as_ref(),
        };
        evaluate(&policy, &conn)
    }
}

/// A client: plaintext from an address, or mTLS with a `cluster.local` identity.
#[derive(Debug, Clone)]
pub(super) enum Peer {
    Plain(&'static str),
    Mtls(&'static str, &'static str, &'static str),
}

impl Peer {
    pub fn ip(&self) -> IpAddr {
        let s = match self {
            Peer::Plain(ip) | Peer::Mtls(ip, _, _) => ip,
        };
        s.parse().expect("peer IP")
    }

    pub fn identity(&self) -> Option<Identity> {
        match self {
            Peer::Plain(_) => None,
            Peer::Mtls(_, ns, sa) => Some(Identity::new("cluster.local", ns, sa)),
        }
    }
}

fn keys(c: &CompiledPolicies, ns: &str, name: &str) -> Vec<String> {
    c.for_workload(ns, name)
        .unwrap_or_else(|| panic!("no compiled policy for {ns}/{name}"))
        .authorization_policies()
        .iter()
        .map(|k| k.to_string())
        .collect()
}

#[test]
fn compiled_list_has_only_the_policies_that_apply() {
    let w = world(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-httpbin, namespace: istio-system}
spec: {selector: {matchLabels: {app: httpbin}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: foo}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-v1, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin, version: v1}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-v2, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin, version: v2}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: foo}
spec: {targetRefs: [{kind: Service, group: "", name: httpbin}], rules: [{}]}
"#,
    );
    assert!(w.errors.is_empty(), "fixture rejected: {:?}", w.errors);
    let c = w.compile();
    assert_eq!(
        keys(&c, "foo", "httpbin"),
        [
            "foo/httpbin-v1",
            "foo/ns-wide",
            "istio-system/mesh",
            "istio-system/mesh-httpbin"
        ],
        "foo/httpbin: mesh, mesh selector, namespace and its own selector; not v2, not targetRefs"
    );
    assert_eq!(
        keys(&c, "foo", "sleep"),
        ["foo/ns-wide", "istio-system/mesh"],
        "foo/sleep matches no selector"
    );
    assert_eq!(
        keys(&c, "bar", "httpbin"),
        ["istio-system/mesh", "istio-system/mesh-httpbin"],
        "bar/httpbin: foo's policies do not reach another namespace"
    );
    assert!(
        c.notes().iter().any(|n| matches!(n, PolicyNote::TargetRefsAtWaypoint { policy } if &**policy == "foo/waypoint")),
        "a targetRefs policy is reported as not enforced here: {:?}",
        c.notes()
    );
}

/// Adds `n` AuthorizationPolicies in other namespaces (each with a selector that shares the
/// target's labels, the worst case for a label index) to `state`.
pub(super) fn add_unrelated(state: &mut crate::state::State, n: usize) {
    let mut store = Store::new("cluster.local");
    let objects: Vec<Object> = (0..n)
        .map(|i| {
            let yaml = format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: other-{}}}\nspec: {{selector: {{matchLabels: {{app: httpbin}}}}, action: DENY, rules: [{{from: [{{source: {{namespaces: [x{i}]}}}}]}}]}}\n",
                i % 100
            );
            let value: serde_json::Value = serde_yaml::from_str(&yaml).expect("generated YAML");
            let (config, _) = IstioConfig::parse(value).expect("generated policy is valid");
            Object::Istio(config)
        })
        .collect();
    store.apply(SourceEvent::Replace {
        kinds: vec![Kind::AuthorizationPolicy],
        objects,
        rejected: Vec::new(),
        origins: Default::default(),
    });
    let other = store.state();
    for (k, v) in other.istio.iter() {
        state.istio.insert(k.clone(), v.clone());
    }
    for (k, v) in other.istio_by_namespace.iter() {
        state.istio_by_namespace.insert(k.clone(), v.clone());
    }
}

#[test]
fn ten_thousand_unrelated_policies_stay_out_of_the_workload_list() {
    let mut w = world(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: own, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin}}, rules: [{}]}
"#,
    );
    add_unrelated(&mut w.state, 10_000);
    let c = w.compile();
    assert_eq!(
        keys(&c, "foo", "httpbin"),
        ["foo/own"],
        "only the workload's own policy is compiled into its list"
    );
    let p = c.for_workload("foo", "httpbin").expect("compiled");
    assert_eq!(
        (p.deny.len(), p.allow.len()),
        (0, 1),
        "no DENY from other namespaces"
    );
}

#[test]
fn only_enrolled_workloads_are_compiled_and_node_filter_applies() {
    let w = world("");
    let all = w.compile();
    assert_eq!(all.len(), 4, "every enrolled pod of CLUSTER");
    let n2 = CompiledPolicies::build_for_node(&w.state, ROOT, "n2");
    assert!(
        n2.for_workload("foo", "finance").is_some() && n2.len() == 1,
        "build_for_node keeps only the node's pods"
    );
    let p = all.for_workload("foo", "httpbin").expect("compiled");
    assert_eq!(
        p.mtls.for_port(80).mode,
        MtlsMode::Permissive,
        "Istio: no PeerAuthentication means PERMISSIVE"
    );
}

/// A DENY policy without rules never matches (ztunnel: "empty rules" → no match). Istio's
/// validation rejects it, so it only reaches the engine when decoded without validation.
#[test]
fn deny_without_rules_matches_nothing_in_the_engine() {
    let mut w = world("");
    let value: serde_json::Value = serde_yaml::from_str(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: empty-deny, namespace: foo}\nspec: {action: DENY}\n",
    )
    .expect("YAML");
    let (config, _) = IstioConfig::decode(value).expect("decodes");
    assert!(
        !config.validate().is_empty(),
        "Istio validation rejects DENY without rules"
    );
    let k = crate::state::istio_key(Kind::AuthorizationPolicy, "foo", "empty-deny");
    w.state.istio.insert(k.clone(), Arc::new(config));
    let mut set = imbl::OrdSet::new();
    set.insert(k);
    w.state
        .istio_by_namespace
        .insert((Kind::AuthorizationPolicy, Arc::from("foo")), set);
    let c = w.compile();
    let d = w.check(&c, "foo/httpbin", &Peer::Plain("10.9.9.9"), 80);
    assert!(d.is_allowed(), "DENY with no rules must not deny: {d:?}");
}

#[test]
fn a_rejected_policys_scope_is_read_from_what_can_be_read() {
    let v: serde_json::Value = serde_json::json!({
        "spec": {"selector": {"matchLabels": {"app": "httpbin"}}, "action": "CUSTOM"}
    });
    assert_eq!(
        PolicyScope::from_json(&v),
        PolicyScope::Selector([("app".to_string(), "httpbin".to_string())].into()),
        "a readable selector is kept"
    );
    let v = serde_json::json!({"spec": {"selector": {"matchLabels": ["not", "a", "map"]}}});
    assert_eq!(
        PolicyScope::from_json(&v),
        PolicyScope::Namespace,
        "an unreadable selector widens to the namespace"
    );
    let v = serde_json::json!({"spec": {"targetRefs": [{"kind": "Service", "name": "a"}], "action": "BOGUS"}});
    assert_eq!(
        PolicyScope::from_json(&v),
        PolicyScope::TargetRefs,
        "a targetRefs policy belongs to a waypoint"
    );
}

#[test]
fn a_broken_version_replaces_the_last_good_one() {
    let w = world(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec: {rules: [{}]}
"#,
    );
    let mut state = w.state.clone();
    state.rejected_policies.insert(
        crate::state::key("foo", "allow-all"),
        std::sync::Arc::new(crate::state::RejectedPolicy {
            namespace: "foo".into(),
            name: "allow-all".into(),
            scope: PolicyScope::Namespace,
            reason: "spec.rules[0].to[0].operation.ports[0]: bad port (x)".into(),
        }),
    );
    let c = CompiledPolicies::build(&state, ROOT);
    let d = w.check(
        &c,
        "foo/sleep",
        &Peer::Mtls("10.0.1.1", "foo", "httpbin"),
        80,
    );
    match &d.verdict {
        Verdict::Deny {
            policy,
            reason: DenyReason::Unsupported { detail },
        } => {
            assert_eq!(&**policy, "foo/allow-all", "the broken policy is named");
            assert!(
                detail.contains("bad port"),
                "the reason is carried: {detail}"
            );
        }
        other => panic!("a broken policy must make its namespace deny, got {other:?}"),
    }
    assert_eq!(
        keys(&c, "foo", "sleep"),
        ["foo/allow-all"],
        "the last good version is not also applied"
    );
}

#[test]
fn principal_wildcards_match_without_building_the_string() {
    use super::compile::StrMatch;
    let id = Identity::new("cluster.local", "foo", "sleep");
    let cases = [
        ("cluster.local/ns/foo/sa/sleep", true),
        ("cluster.local/ns/foo/sa/slee", false),
        ("cluster.local/ns/foo/sa/sleepy", false),
        ("cluster.local/ns/foo/*", true),
        ("cluster.local/ns/fo*", true),
        ("cluster.local/ns/bar/*", false),
        ("*/sa/sleep", true),
        ("*/ns/foo/sa/sleep", true),
        ("*oo/sa/sleep", true),
        ("*/sa/other", false),
        ("*", true),
        ("*cluster.local/ns/foo/sa/sleep", true),
        ("cluster.local/ns/foo/sa/sleep*", true),
        ("x*", false),
    ];
    for (pattern, want) in cases {
        let m = StrMatch::parse(pattern);
        let whole = "cluster.local/ns/foo/sa/sleep";
        let by_string = match &m {
            StrMatch::Exact(e) => e == whole,
            StrMatch::Prefix(p) => whole.starts_with(p.as_str()),
            StrMatch::Suffix(s) => whole.ends_with(s.as_str()),
            StrMatch::Presence => true,
        };
        assert_eq!(by_string, want, "fixture expectation for {pattern}");
        assert_eq!(
            m.matches_principal(&id),
            want,
            "segment matching of {pattern} against {whole}"
        );
    }
}

//! deploy/rbac.yaml grants exactly what the agent asks the API server for. The agent's real
//! Kubernetes source runs against the fake API server until it watches every kind; then each of
//! its requests is authorised against the ClusterRole as Kubernetes' RBAC authoriser would
//! (group, resource, verb, and `resourceNames` only with a matching `metadata.name` field
//! selector), and each grant must have been used. No root needed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambit::config::kube::KubeSource;
use ambit::config::{Kind, SourceEvent};
use ambit::harness::FakeKube;
use serde::Deserialize as _;
use serde_json::Value;
use tokio::sync::mpsc;

/// Fails a test that would otherwise hang; never needed for it to pass.
mod rbac_rules;

use rbac_rules::{Attributes, Rule};

const PATIENCE: Duration = Duration::from_secs(30);

/// The ServiceAccount the DaemonSet runs as, and its ClusterRole.
const ROLE: &str = "ambit-agent";

fn deploy_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

/// The rules of the ClusterRole `ambit-agent`, after checking that the binding gives it to the
/// agent's ServiceAccount.
fn cluster_role_rules() -> Vec<Rule> {
    let path = deploy_file("rbac.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == ROLE)
            .unwrap_or_else(|| panic!("{}: no {kind} {ROLE}", path.display()))
    };
    let binding = find("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], ROLE);
    assert!(
        binding["subjects"].as_array().is_some_and(|s| s
            .iter()
            .any(|s| s["kind"] == "ServiceAccount"
                && s["name"] == ROLE
                && s["namespace"] == "ambit-system")),
        "{binding}"
    );
    find("ClusterRole")["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("ClusterRole {ROLE} has no rules"))
        .iter()
        .map(|r| Rule::of(r, &format!("ClusterRole {ROLE}")))
        .collect()
}

/// The authoriser's view of `GET path?query`; None for discovery (`/api`, `/apis/<g>/<v>`,
/// `/version`), which every authenticated user may read (`system:discovery`).
fn attributes(request: &str) -> Option<Attributes> {
    let target = request
        .strip_prefix("GET ")
        .unwrap_or_else(|| panic!("the agent sent {request}: it only reads"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, resource) = match rest {
        [] => return None,
        [resource] => (None, *resource),
        ["namespaces", ns, resource] => (Some((*ns).to_owned()), *resource),
        other => panic!("{request}: the agent reads collections only, not {other:?}"),
    };
    let mut verb = "list";
    let mut name = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "watch" if value == "true" || value == "1" => verb = "watch",
            "fieldSelector" => {
                name = value
                    .split(',')
                    .find_map(|s| s.strip_prefix("metadata.name="))
                    .map(str::to_owned)
            }
            _ => {}
        }
    }
    Some(Attributes {
        group: group.to_owned(),
        resource: resource.to_owned(),
        namespace,
        verb,
        name,
    })
}

#[tokio::test]
async fn the_cluster_role_grants_exactly_what_the_agent_watches() {
    let rules = cluster_role_rules();
    let fake = FakeKube::start(None);
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(
        KubeSource::new(fake.client(), tx)
            .with_discovery_retry(Duration::from_millis(50))
            .run(),
    );

    // Every kind listed, and then watched: only then has the agent made every kind of request.
    let mut listed: BTreeSet<Kind> = BTreeSet::new();
    let deadline = Instant::now() + PATIENCE;
    while listed.len() < Kind::ALL.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(SourceEvent::Replace { kinds, .. })) => listed.extend(kinds),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the source stopped"),
            Err(_) => panic!("listed only {listed:?} within {PATIENCE:?}"),
        }
    }
    let watched = |requests: &[Attributes]| {
        requests
            .iter()
            .filter(|a| a.verb == "watch")
            .map(|a| a.resource.clone())
            .collect::<BTreeSet<_>>()
    };
    let requests = loop {
        let requests: Vec<Attributes> = fake
            .requests()
            .iter()
            .filter_map(|r| attributes(r))
            .collect();
        let listed_resources: BTreeSet<String> =
            requests.iter().map(|a| a.resource.clone()).collect();
        if watched(&requests) == listed_resources {
            break requests;
        }
        assert!(
            Instant::now() < deadline,
            "not every listed resource was watched within {PATIENCE:?}: {requests:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // One resource per kind the agent reads.
    let resources: BTreeSet<&str> = requests.iter().map(|a| a.resource.as_str()).collect();
    assert_eq!(resources.len(), Kind::ALL.len(), "{resources:?}");
    for a in &requests {
        assert!(
            rules.iter().any(|r| r.allows(a)),
            "deploy/rbac.yaml does not allow the agent's request {a:?}"
        );
    }
    // Nothing granted that the agent does not use: every verb of every resource of every rule.
    for rule in &rules {
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    let used = requests
                        .iter()
                        .any(|a| &a.group == group && &a.resource == resource && a.verb == verb);
                    assert!(
                        used,
                        "deploy/rbac.yaml grants {verb} on {group}/{resource}, which the agent \
                         never does"
                    );
                }
            }
        }
    }
    // The ConfigMap grant is the mesh config alone, read in Istio's root namespace.
    let config_maps: Vec<&Attributes> = requests
        .iter()
        .filter(|a| a.resource == "configmaps")
        .collect();
    assert!(!config_maps.is_empty());
    for a in config_maps {
        assert_eq!(a.namespace.as_deref(), Some("istio-system"), "{a:?}");
        assert_eq!(a.name.as_deref(), Some("istio"), "{a:?}");
    }
}

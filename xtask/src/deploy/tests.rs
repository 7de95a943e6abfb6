//! The admission step on whole manifests: the old deploy/ that a real API server refused, and
//! today's deploy/ files.

use std::fs;

use super::*;

const OLD: &str = include_str!("testdata/deploy-8ba612b.yaml");

fn admission(yaml: &str) -> Admission {
    admit(&parse(yaml).expect("parse")).expect("admit")
}

#[test]
fn the_manifests_a_real_api_server_refused_are_refused_for_its_reasons() {
    let verdict = admission(OLD);
    assert!(verdict.admitted.is_empty(), "{verdict:?}");
    let [pod_security, propagation] = verdict.refused.as_slice() else {
        panic!("two problems expected: {verdict:?}");
    };
    // The API server: `The DaemonSet "ambit-agent" is invalid:
    // spec.template.spec.containers[0].volumeMounts.mountPropagation: Forbidden: Bidirectional
    // mount propagation is available only to privileged containers`.
    assert!(
        pod_security.starts_with(
            "pods of DaemonSet ambit-system/ambit-agent would be refused: violates PodSecurity \
             \"baseline:latest\": host namespaces (hostNetwork=true, hostPID=true)"
        ),
        "{pod_security}"
    );
    assert!(
        propagation.contains(
            "spec.template.spec.containers[0].volumeMounts[0].mountPropagation: Forbidden: \
             Bidirectional mount propagation is available only to privileged containers"
        ),
        "{propagation}"
    );
    // The cluster enforcing baseline: `non-default capabilities …, host namespaces …, hostPath
    // volumes …`, because ambit-system carried no Pod Security label.
    for reason in [
        "non-default capabilities",
        "hostPath volumes (volumes \"bpffs\", \"cgroup\", \"netns\")",
        "has no pod-security.kubernetes.io/enforce label",
    ] {
        assert!(pod_security.contains(reason), "{reason}: {pod_security}");
    }
}

#[test]
fn todays_deploy_files_are_admitted_at_the_level_their_namespace_enforces() {
    let dir = default_dir();
    let yaml: String = ["namespace.yaml", "rbac.yaml", "daemonset.yaml"]
        .iter()
        .map(|f| fs::read_to_string(dir.join(f)).expect("read deploy/"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let verdict = admission(&yaml);
    assert!(verdict.refused.is_empty(), "{verdict:?}");
    assert_eq!(verdict.admitted.len(), 1, "{verdict:?}");
    assert!(
        verdict.admitted[0].contains("namespace ambit-system enforces privileged"),
        "{verdict:?}"
    );
}

/// The old DaemonSet with its namespace labelled: privileged admits the pods, but no label lifts
/// the API server's own rule on mount propagation.
#[test]
fn a_privileged_namespace_does_not_lift_the_api_servers_rules() {
    let labelled = OLD.replacen(
        "    istio.io/dataplane-mode: none\n",
        "    istio.io/dataplane-mode: none\n    pod-security.kubernetes.io/enforce: privileged\n",
        1,
    );
    assert_ne!(labelled, OLD, "the fixture's namespace labels moved");
    let verdict = admission(&labelled);
    assert_eq!(verdict.refused.len(), 1, "{verdict:?}");
    assert!(verdict.refused[0].contains("Bidirectional"), "{verdict:?}");
}

#[test]
fn a_namespace_outside_the_manifests_is_held_to_the_cluster_default() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: elsewhere}\n\
               spec:\n  hostNetwork: true\n  containers: [{name: c, image: x}]\n";
    let verdict = admission(pod);
    assert_eq!(verdict.refused.len(), 1, "{verdict:?}");
    assert!(verdict.refused[0].contains("\"baseline:latest\": host namespaces (hostNetwork=true)"));
    assert!(verdict.refused[0].contains("namespace elsewhere is not in the manifests"));
}

#[test]
fn a_restricted_namespace_refuses_what_baseline_allows() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels:\n    \
                pod-security.kubernetes.io/enforce: restricted\n---\n\
                apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: j, namespace: apps}\n\
                spec:\n  schedule: '@daily'\n  jobTemplate:\n    spec:\n      template:\n        \
                spec:\n          restartPolicy: Never\n          containers: [{name: c, image: x}]\n";
    let verdict = admission(yaml);
    assert_eq!(verdict.refused.len(), 1, "{verdict:?}");
    for reason in [
        "allowPrivilegeEscalation != false",
        "unrestricted capabilities",
        "runAsNonRoot != true",
        "seccompProfile",
    ] {
        assert!(verdict.refused[0].contains(reason), "{reason}: {verdict:?}");
    }
}

#[test]
fn a_misspelt_level_is_an_error_not_a_default() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels:\n    \
                pod-security.kubernetes.io/enforce: priviledged\n";
    let err = admit(&parse(yaml).unwrap()).unwrap_err();
    assert!(format!("{err:#}").contains("\"priviledged\" is not a Pod Security level"));
}

#[test]
fn manifests_without_pods_check_nothing_and_say_so() {
    let yaml = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a, namespace: b}\n";
    let err = admit(&parse(yaml).unwrap()).unwrap_err();
    assert!(err.to_string().contains("no pod template"), "{err}");
}

#[test]
fn bad_documents_are_errors_naming_them() {
    let err = parse("apiVersion: v1\nkind: Pod\n---\n- a list\n").unwrap_err();
    assert!(
        format!("{err:#}").contains("rendered document 1"),
        "{err:#}"
    );
    assert!(parse("a: [unclosed\n").is_err());
    // An empty document (a trailing `---`) is no object and no error.
    assert_eq!(
        parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n")
            .unwrap()
            .len(),
        1
    );
}

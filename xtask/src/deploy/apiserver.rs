//! What the API server's own validation refuses in a pod template although every field is
//! well-typed, so no OpenAPI schema catches it (k8s.io/kubernetes pkg/apis/core/validation), plus
//! one mistake the API server lets through but the kubelet then trips on: a probe naming no port.

use std::collections::BTreeSet;

use serde_json::Value;

use super::pod::{Container, Pod};

/// Each problem as `field path: what is wrong`, the field path relative to the pod spec.
pub fn check(pod: &Pod) -> Vec<String> {
    let spec = &pod.spec;
    let volumes: BTreeSet<&str> = spec.volumes.iter().map(|v| v.name.as_str()).collect();
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for (path, c) in spec.all_containers() {
        if !names.insert(c.name.as_str()) {
            problems.push(format!("{path}.name: Duplicate value: {:?}", c.name));
        }
        mounts(&path, c, &volumes, &mut problems);
        escalation(&path, c, &mut problems);
        probe_ports(&path, c, &mut problems);
    }
    problems
}

fn mounts(path: &str, c: &Container, volumes: &BTreeSet<&str>, problems: &mut Vec<String>) {
    for (i, m) in c.volume_mounts.iter().enumerate() {
        let at = format!("{path}.volumeMounts[{i}]");
        if !volumes.contains(m.name.as_str()) {
            problems.push(format!("{at}.name: Not found: {:?}", m.name));
        }
        match m.mount_propagation.as_deref() {
            None | Some("None" | "HostToContainer") => {}
            // A privileged container is the only one whose mounts may reach the host.
            Some("Bidirectional") if c.privileged() => {}
            Some("Bidirectional") => problems.push(format!(
                "{at}.mountPropagation: Forbidden: Bidirectional mount propagation is available \
                 only to privileged containers (container {:?})",
                c.name
            )),
            Some(other) => problems.push(format!(
                "{at}.mountPropagation: Unsupported value: {other:?}: supported values: \
                 \"Bidirectional\", \"HostToContainer\", \"None\""
            )),
        }
    }
}

fn escalation(path: &str, c: &Container, problems: &mut Vec<String>) {
    let Some(sc) = c.security() else { return };
    if sc.allow_privilege_escalation != Some(false) {
        return;
    }
    if sc.privileged == Some(true) {
        problems.push(format!(
            "{path}.securityContext: Invalid value: cannot set `allowPrivilegeEscalation` to \
             false and `privileged` to true"
        ));
    }
    // The API server compares the name as written with CAP_ (kubernetes issue 119568), so only
    // this spelling is refused; `SYS_ADMIN` with no escalation is accepted and still means root.
    let adds_admin = sc
        .capabilities
        .as_ref()
        .is_some_and(|caps| caps.add.iter().any(|cap| cap == "CAP_SYS_ADMIN"));
    if adds_admin {
        problems.push(format!(
            "{path}.securityContext: Invalid value: cannot set `allowPrivilegeEscalation` to \
             false and `capabilities.Add` CAP_SYS_ADMIN"
        ));
    }
}

fn probe_ports(path: &str, c: &Container, problems: &mut Vec<String>) {
    let named: BTreeSet<&str> = c.ports.iter().filter_map(|p| p.name.as_deref()).collect();
    for (field, handler) in c.handlers() {
        for endpoint in handler.endpoints() {
            if let Value::String(port) = &endpoint.port {
                if !named.contains(port.as_str()) {
                    problems.push(format!(
                        "{path}.{field}: port {port:?} names none of the container's ports: the \
                         kubelet would fail every probe"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize as _;
    use serde_json::json;

    use super::*;

    fn problems(spec: Value) -> Vec<String> {
        let pod = Pod::deserialize(json!({ "spec": spec })).expect("pod");
        check(&pod)
    }

    fn bpffs_pod(privileged: bool, propagation: &str) -> Value {
        json!({
            "containers": [{
                "name": "agent",
                "securityContext": {"privileged": privileged},
                "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf",
                                  "mountPropagation": propagation}],
            }],
            "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}],
        })
    }

    #[test]
    fn bidirectional_propagation_needs_a_privileged_container() {
        let refused = problems(bpffs_pod(false, "Bidirectional"));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].starts_with("containers[0].volumeMounts[0].mountPropagation: Forbidden"),
            "{refused:?}"
        );
        assert_eq!(
            problems(bpffs_pod(true, "Bidirectional")),
            Vec::<String>::new()
        );
        assert_eq!(
            problems(bpffs_pod(false, "HostToContainer")),
            Vec::<String>::new()
        );
        let unknown = problems(bpffs_pod(false, "Shared"));
        assert!(
            unknown[0].contains("Unsupported value: \"Shared\""),
            "{unknown:?}"
        );
    }

    #[test]
    fn a_mount_names_a_declared_volume() {
        let mut spec = bpffs_pod(false, "None");
        spec["volumes"] = json!([]);
        assert_eq!(
            problems(spec),
            ["containers[0].volumeMounts[0].name: Not found: \"bpffs\""]
        );
    }

    #[test]
    fn no_escalation_contradicts_privileged_and_cap_sys_admin() {
        let spec = |sc: Value| json!({"initContainers": [{"name": "init", "securityContext": sc}]});
        let privileged = problems(spec(
            json!({"privileged": true, "allowPrivilegeEscalation": false}),
        ));
        assert_eq!(privileged.len(), 1, "{privileged:?}");
        assert!(privileged[0].contains("`privileged` to true"));
        let admin = problems(spec(json!({"allowPrivilegeEscalation": false,
                                         "capabilities": {"add": ["CAP_SYS_ADMIN"]}})));
        assert_eq!(admin.len(), 1, "{admin:?}");
        assert!(admin[0].contains("CAP_SYS_ADMIN"));
        // What ztunnel and this repository's agent write is accepted.
        assert!(problems(spec(
            json!({"allowPrivilegeEscalation": true, "privileged": true})
        ))
        .is_empty());
        assert!(problems(spec(json!({"allowPrivilegeEscalation": false,
                                     "capabilities": {"add": ["SYS_ADMIN"]}})))
        .is_empty());
    }

    #[test]
    fn container_names_are_unique_across_init_and_main() {
        let found = problems(json!({
            "initContainers": [{"name": "a"}],
            "containers": [{"name": "a"}],
        }));
        assert_eq!(found, ["containers[0].name: Duplicate value: \"a\""]);
    }

    #[test]
    fn a_probe_names_one_of_its_containers_ports() {
        let spec = |port: Value| {
            json!({"containers": [{
                "name": "agent",
                "ports": [{"name": "metrics", "containerPort": 15020}],
                "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": port}},
            }]})
        };
        assert!(problems(spec(json!("metrics"))).is_empty());
        assert!(problems(spec(json!(15020))).is_empty());
        let wrong = problems(spec(json!("admin")));
        assert_eq!(wrong.len(), 1, "{wrong:?}");
        assert!(wrong[0].starts_with("containers[0].readinessProbe: port \"admin\""));
    }
}

//! Which pods this node enrols (from the state snapshot) and where their network namespaces are.
//!
//! Local mode names each pod's netns in an annotation. In a cluster the agent runs with hostPID and
//! finds a pod's netns through its processes: the kubelet puts every container of a pod in a cgroup
//! whose path contains the pod UID (`pod<uid>` with cgroupfs, `pod<uid_with_underscores>` with the
//! systemd driver), so `/proc/<pid>/cgroup` leads to the pod and `/proc/<pid>/ns/net` to its netns.
//! The lowest matching pid is the sandbox (pause) process, which lives as long as the pod.
//! Race: a pod's first packets, before the agent has seen it, are not captured. Istio closes that
//! gap with a CNI plugin that holds pod start until enrolment; ambit will do the same (a CNI
//! plugin reporting the netns on ADD), and until then the window is one watch event plus one
//! enrolment (milliseconds), during which the pod's connections are plain.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::PodSpec;
use crate::config::{EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, NETNS_ANNOTATION};
use crate::state::convert::parse_port_list;
use crate::state::{State, Workload};

/// Finds a workload's network namespace.
pub trait NetnsResolver: Send {
    fn netns(&self, w: &Workload) -> Result<PathBuf, String>;
}

/// Local mode: the `ambit.dev/netns` annotation, else `<dir>/<pod name>`.
#[derive(Debug, Clone)]
pub struct AnnotatedNetns {
    pub dir: PathBuf,
}

impl NetnsResolver for AnnotatedNetns {
    fn netns(&self, w: &Workload) -> Result<PathBuf, String> {
        let path = match w.annotations.get(NETNS_ANNOTATION) {
            Some(p) => PathBuf::from(p),
            None => self.dir.join(&w.name),
        };
        if path.exists() {
            Ok(path)
        } else {
            Err(format!("netns {} does not exist", path.display()))
        }
    }
}

/// In a cluster: `/proc/<pid>/ns/net` of the pod's sandbox process, found by pod UID.
#[derive(Debug, Clone)]
pub struct ProcNetns {
    /// `/proc` normally; a fake tree in tests.
    pub proc_root: PathBuf,
}

impl NetnsResolver for ProcNetns {
    fn netns(&self, w: &Workload) -> Result<PathBuf, String> {
        let needles = [
            format!("pod{}", w.uid),
            format!("pod{}", w.uid.replace('-', "_")),
        ];
        let mut pids: Vec<u32> = std::fs::read_dir(&self.proc_root)
            .map_err(|e| format!("{}: {e}", self.proc_root.display()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let dir = self.proc_root.join(pid.to_string());
            let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else {
                continue;
            };
            if needles.iter().any(|n| cgroup.contains(n.as_str())) {
                return Ok(dir.join("ns").join("net"));
            }
        }
        Err(format!(
            "no process of pod uid {} under {}",
            w.uid,
            self.proc_root.display()
        ))
    }
}

/// The pods to enrol on `node`, and why any enrolled workload could not be.
pub fn desired_pods(
    state: &State,
    node: &str,
    resolver: &dyn NetnsResolver,
) -> (Vec<PodSpec>, Vec<String>) {
    let mut pods = Vec::new();
    let mut problems = Vec::new();
    for w in state.enrolled_on(node) {
        if w.ips.is_empty() {
            // Not running yet: nothing to capture until it has an address.
            continue;
        }
        let netns_path = match resolver.netns(&w) {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("Pod {}/{}: cannot enrol: {e}", w.namespace, w.name));
                continue;
            }
        };
        // Bad values were reported when the pod was read; here they just exclude nothing.
        let ports = |a: &str| {
            parse_port_list(w.annotations.get(a).map(String::as_str).unwrap_or(""))
                .unwrap_or_default()
        };
        pods.push(PodSpec {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            ips: w
                .ips
                .iter()
                .copied()
                .filter(|ip: &IpAddr| !ip.is_unspecified())
                .collect(),
            netns_path,
            excluded_outbound_ports: ports(EXCLUDE_OUTBOUND_PORTS),
            excluded_inbound_ports: ports(EXCLUDE_INBOUND_PORTS),
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account.clone()
            },
            baggage: baggage(&w),
        });
    }
    (pods, problems)
}

/// The `baggage` header of the pod's tunnels (W3C baggage, the keys ztunnel sends): namespace,
/// workload, and Istio's canonical service name and revision (from the same labels Istio reads).
pub fn baggage(w: &Workload) -> String {
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| w.labels.get(*k))
            .map(String::as_str)
    };
    let service = label(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or(&w.name);
    let version = label(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or("latest");
    format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={},k8s.pod.name={},service.name={},service.version={}",
        w.namespace, w.name, service, version
    )
}

/// `Path` helper for tests and callers that hold a `&str`.
pub fn proc_netns(root: &Path) -> ProcNetns {
    ProcNetns {
        proc_root: root.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str) -> Workload {
        Workload {
            uid: uid.into(),
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "default".into(),
            node: Some("n1".into()),
            host_network: false,
            ips: vec![],
            labels: Default::default(),
            named_ports: Default::default(),
            annotations: Default::default(),
            running: true,
        }
    }

    #[test]
    fn proc_discovery_finds_the_pod_sandbox_by_uid_with_either_cgroup_driver() {
        let root = std::env::temp_dir().join(format!("ambit-fake-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let proc_entry = |pid: u32, cgroup: &str| {
            let d = root.join(pid.to_string());
            std::fs::create_dir_all(d.join("ns")).expect("fake proc");
            std::fs::write(d.join("cgroup"), cgroup).expect("fake cgroup");
        };
        // cgroupfs driver (dashes), systemd driver (underscores), and an unrelated process.
        proc_entry(300, "0::/kubepods/besteffort/pod1234-abcd/c2\n");
        proc_entry(200, "0::/kubepods/besteffort/pod1234-abcd/pause\n");
        proc_entry(400, "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod9999_eeee.slice/cri-x.scope\n");
        proc_entry(100, "0::/system.slice/kubelet.service\n");
        std::fs::create_dir_all(root.join("self")).expect("non-numeric entry");
        let r = proc_netns(&root);
        let found = [
            r.netns(&workload("1234-abcd")),
            r.netns(&workload("9999-eeee")),
            r.netns(&workload("0000-none")),
        ];
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            found[0].as_ref().expect("cgroupfs pod"),
            &root.join("200/ns/net"),
            "lowest pid: the sandbox"
        );
        assert_eq!(
            found[1].as_ref().expect("systemd pod"),
            &root.join("400/ns/net")
        );
        assert!(
            found[2].as_ref().is_err_and(|e| e.contains("0000-none")),
            "{:?}",
            found[2]
        );
    }
}

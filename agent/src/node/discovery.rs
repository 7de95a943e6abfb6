//! Which pods this node enrols (from the state snapshot) and where their network namespaces are.
//!
//! Local mode names each pod's netns in an annotation. In a cluster the agent runs with hostPID and
//! finds a pod's netns through its processes: the kubelet puts every container of a pod in a cgroup
//! whose path contains the pod UID (`pod<uid>` with cgroupfs, `pod<uid_with_underscores>` with the
//! systemd driver), so `/proc/<pid>/cgroup` leads to the pod and `/proc/<pid>/ns/net` to its netns.
//! The lowest matching pid is the sandbox (pause) process, which lives as long as the pod.
//! Pods started after the agent are reported by the CNI plugin on ADD (`node::cni`), which holds
//! the pod until it is enrolled; what discovery finds here is then overridden. Discovery stays for
//! pods that started before the agent (or without the plugin installed). A pod whose sandbox is
//! not there yet is retried by the control loop, not left until the next config change.
//!
//! A terminating pod (deletionTimestamp set) stays enrolled while its sandbox runs, as ztunnel
//! keeps it until its containers have exited: its traffic while shutting down stays meshed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::PodSpec;
use crate::config::{EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, NETNS_ANNOTATION};
use crate::state::convert::parse_port_list;
use crate::state::{State, Workload};

/// Finds workloads' network namespaces.
pub trait NetnsResolver: Send {
    /// Each workload's netns path, or why it cannot be found (yet), in the order given. One call
    /// per reconcile: a resolver that scans (`/proc`) scans once for all of them.
    fn resolve(&self, ws: &[Arc<Workload>]) -> Vec<Result<PathBuf, String>>;
}

/// Local mode: the `ambit.dev/netns` annotation, else `<dir>/<pod name>`.
#[derive(Debug, Clone)]
pub struct AnnotatedNetns {
    pub dir: PathBuf,
}

impl AnnotatedNetns {
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

impl NetnsResolver for AnnotatedNetns {
    fn resolve(&self, ws: &[Arc<Workload>]) -> Vec<Result<PathBuf, String>> {
        ws.iter().map(|w| self.netns(w)).collect()
    }
}

/// In a cluster: `/proc/<pid>/ns/net` of the pod's sandbox process, found by pod UID.
#[derive(Debug, Clone)]
pub struct ProcNetns {
    /// `/proc` normally; a fake tree in tests.
    pub proc_root: PathBuf,
}

impl ProcNetns {
    /// Pod UID (dashes) → lowest pid whose cgroup names it, in one pass over `/proc`.
    fn sandboxes(&self) -> Result<HashMap<String, u32>, String> {
        let mut pids: Vec<u32> = std::fs::read_dir(&self.proc_root)
            .map_err(|e| format!("{}: {e}", self.proc_root.display()))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        let mut out = HashMap::new();
        for pid in pids {
            let path = self.proc_root.join(pid.to_string()).join("cgroup");
            // A process that exits mid-scan is simply not there.
            let Ok(cgroup) = std::fs::read_to_string(path) else {
                continue;
            };
            for uid in cgroup.lines().flat_map(pod_uids_in) {
                out.entry(uid).or_insert(pid);
            }
        }
        Ok(out)
    }
}

/// Pod UIDs named in one `/proc/<pid>/cgroup` line: a `pod<uid>` segment (the kubelet's cgroupfs
/// driver) or a `…-pod<uid_with_underscores>.slice` segment (its systemd driver).
fn pod_uids_in(line: &str) -> impl Iterator<Item = String> + '_ {
    let path = line.splitn(3, ':').nth(2).unwrap_or(line);
    path.split('/').filter_map(|segment| {
        let uid = match segment.strip_suffix(".slice") {
            Some(slice) => slice.rsplit_once("-pod")?.1,
            None => segment.strip_prefix("pod")?,
        };
        (!uid.is_empty()).then(|| uid.replace('_', "-"))
    })
}

impl NetnsResolver for ProcNetns {
    fn resolve(&self, ws: &[Arc<Workload>]) -> Vec<Result<PathBuf, String>> {
        if ws.is_empty() {
            return Vec::new();
        }
        let sandboxes = match self.sandboxes() {
            Ok(s) => s,
            Err(e) => return ws.iter().map(|_| Err(e.clone())).collect(),
        };
        ws.iter()
            .map(|w| match sandboxes.get(&w.uid.replace('_', "-")) {
                Some(pid) => Ok(self.proc_root.join(pid.to_string()).join("ns").join("net")),
                None => Err(format!(
                    "no process of pod uid {} under {}",
                    w.uid,
                    self.proc_root.display()
                )),
            })
            .collect()
    }
}

/// What this node should have enrolled, from one snapshot.
#[derive(Debug, Default)]
pub struct Desired {
    pub pods: Vec<PodSpec>,
    /// Pods to enrol whose netns cannot be found yet (sandbox not started), as (namespace, name,
    /// why): retried with a backoff, independent of config changes.
    pub waiting: Vec<(String, String, String)>,
    /// Terminating pods kept because their sandbox still runs: rechecked until it exits.
    pub terminating: usize,
}

/// The pods to enrol on `node`.
pub fn desired_pods(state: &State, node: &str, resolver: &dyn NetnsResolver) -> Desired {
    // Not running yet: nothing to capture until it has an address.
    let workloads: Vec<Arc<Workload>> = state
        .enrolled_on(node)
        .into_iter()
        .filter(|w| !w.ips.is_empty())
        .collect();
    let mut out = Desired::default();
    for (w, netns) in workloads.iter().zip(resolver.resolve(&workloads)) {
        let netns_path = match netns {
            Ok(p) => p,
            // A terminating pod whose sandbox is gone has finished: unenrolled, not retried.
            Err(_) if w.terminating => continue,
            Err(e) => {
                out.waiting.push((w.namespace.clone(), w.name.clone(), e));
                continue;
            }
        };
        if w.terminating {
            out.terminating += 1;
        }
        out.pods.push(pod_spec(w, netns_path));
    }
    out
}

/// What enrolling `w` in the netns at `netns_path` means (its addresses are its own, as the
/// source reports them).
pub fn pod_spec(w: &Workload, netns_path: PathBuf) -> PodSpec {
    // Bad values were reported when the pod was read; here they just exclude nothing.
    let ports = |a: &str| {
        parse_port_list(w.annotations.get(a).map(String::as_str).unwrap_or("")).unwrap_or_default()
    };
    PodSpec {
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
        baggage: baggage(w),
        istio: w.istio.clone(),
    }
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
            terminating: false,
            istio: Default::default(),
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
        let found = r.resolve(&[
            Arc::new(workload("1234-abcd")),
            Arc::new(workload("9999-eeee")),
            Arc::new(workload("0000-none")),
        ]);
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

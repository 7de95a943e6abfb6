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

use std::collections::{HashMap, HashSet};
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

/// Where the capture programs attach (`--cgroup-attach`) when that is not the cgroup hierarchy's
/// root. A pod whose cgroup is not under it would be enrolled and never captured: its connections
/// would bypass the mesh while the agent called it meshed. Such a pod is held back instead.
#[derive(Debug, Clone)]
pub struct CaptureScope {
    cgroup: PathBuf,
}

/// How deep under the capture cgroup the kubelet puts a pod's cgroup: `kubepods/pod<uid>`
/// (Guaranteed), `kubepods/<qos>/pod<uid>` with either driver, and one level to spare.
const POD_CGROUP_DEPTH: usize = 3;

impl CaptureScope {
    /// `None` at the hierarchy's root (the only cgroup without a `cgroup.type`): every pod is
    /// under it, and nothing needs checking.
    pub fn new(capture_cgroup: &Path) -> Option<CaptureScope> {
        capture_cgroup
            .join("cgroup.type")
            .exists()
            .then(|| CaptureScope {
                cgroup: capture_cgroup.to_path_buf(),
            })
    }

    /// Moves the pods of `desired` that are not enrolled yet (`is_enrolled(key)` tells those that
    /// are) and whose cgroup is not under the capture cgroup to `desired.waiting`, with the
    /// reason; `uid_of(namespace, name)` is the pod's UID. An enrolled pod is never taken out
    /// here: that would unenrol it, and a failed listing would stop capturing every pod.
    pub fn hold_outside(
        &self,
        desired: &mut Desired,
        is_enrolled: impl Fn(&str) -> bool,
        uid_of: impl Fn(&str, &str) -> Option<String>,
    ) {
        if desired.pods.iter().all(|p| is_enrolled(&p.key())) {
            return;
        }
        let under = self.pods_under();
        let mut kept = Vec::with_capacity(desired.pods.len());
        for pod in std::mem::take(&mut desired.pods) {
            if is_enrolled(&pod.key()) {
                kept.push(pod);
                continue;
            }
            let uid = uid_of(&pod.namespace, &pod.name).map(|u| u.replace('_', "-"));
            let why = match (&under, uid) {
                (Err(e), _) => Some(e.clone()),
                (Ok(_), None) => Some(format!(
                    "no pod UID to find its cgroup under {} by (--cgroup-attach)",
                    self.cgroup.display()
                )),
                (Ok(uids), Some(uid)) if !uids.contains(&uid) => Some(format!(
                    "pod uid {uid}: its cgroup is not under {}, where the capture programs \
                     attach (--cgroup-attach): its connections would not be captured",
                    self.cgroup.display()
                )),
                (Ok(_), Some(_)) => None,
            };
            match why {
                Some(why) => desired.waiting.push((pod.namespace, pod.name, why)),
                None => kept.push(pod),
            }
        }
        desired.pods = kept;
    }

    /// The pod UIDs with a cgroup under the capture cgroup, by the kubelet's names for pod
    /// cgroups (so the agent's own cgroup namespace does not matter).
    fn pods_under(&self) -> Result<HashSet<String>, String> {
        let mut found = HashSet::new();
        let mut todo = vec![(self.cgroup.clone(), 0)];
        while let Some((dir, depth)) = todo.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                // A cgroup removed mid-walk (a pod that ended) is simply not there.
                Err(_) if depth > 0 => continue,
                Err(e) => {
                    return Err(format!(
                        "cannot list {}, where the capture programs attach (--cgroup-attach): {e}",
                        dir.display()
                    ))
                }
            };
            for entry in entries.filter_map(Result::ok) {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let uid = pod_uids_in(name).next();
                match uid {
                    Some(uid) => {
                        found.insert(uid);
                    }
                    None if depth + 1 < POD_CGROUP_DEPTH => todo.push((entry.path(), depth + 1)),
                    None => {}
                }
            }
        }
        Ok(found)
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

    #[test]
    fn pods_outside_the_capture_cgroup_are_held_back_and_enrolled_ones_kept() {
        let root = std::env::temp_dir().join(format!("ambit-capture-scope-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // The hierarchy's root (no cgroup.type) and kubepods under it, with both drivers' names.
        let kubepods = root.join("kubepods.slice");
        for dir in [
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1111_aaaa.slice/cri-a.scope",
            "kubepods.slice/kubepods-pod2222_bbbb.slice",
            "elsewhere.slice/pod3333-cccc",
        ] {
            std::fs::create_dir_all(root.join(dir)).expect("fake cgroup");
        }
        std::fs::write(kubepods.join("cgroup.type"), "domain\n").expect("cgroup.type");
        let scope = CaptureScope::new(&kubepods).expect("kubepods is not the root");
        let at_root = CaptureScope::new(&root);
        let unlistable = CaptureScope {
            cgroup: root.join("gone"),
        };
        let spec = |name: &str| {
            let mut w = workload("");
            w.name = name.into();
            pod_spec(&w, PathBuf::from("/proc/1/ns/net"))
        };
        let uid_of = |_: &str, name: &str| match name {
            "burstable" => Some("1111_aaaa".to_string()),
            "guaranteed" => Some("2222-bbbb".to_string()),
            "outside" | "adopted" => Some("3333-cccc".to_string()),
            _ => None,
        };
        let desired = || Desired {
            pods: ["burstable", "guaranteed", "outside", "adopted", "no-uid"]
                .map(spec)
                .to_vec(),
            ..Desired::default()
        };
        // `adopted` is enrolled already: whatever its cgroup, it is not taken out (that would
        // unenrol it).
        let enrolled: HashSet<String> = ["shop/adopted".to_string()].into();
        let mut checked = desired();
        scope.hold_outside(&mut checked, |k| enrolled.contains(k), uid_of);
        let mut failed = desired();
        unlistable.hold_outside(&mut failed, |k| enrolled.contains(k), uid_of);
        let _ = std::fs::remove_dir_all(&root);

        let names = |d: &Desired| d.pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&checked), ["burstable", "guaranteed", "adopted"]);
        let why: HashMap<&str, &str> = checked
            .waiting
            .iter()
            .map(|(_, name, why)| (name.as_str(), why.as_str()))
            .collect();
        assert!(
            why["outside"].contains("3333-cccc")
                && why["outside"].contains("kubepods.slice")
                && why["outside"].contains("--cgroup-attach"),
            "{why:?}"
        );
        assert!(why["no-uid"].contains("no pod UID"), "{why:?}");
        assert!(
            at_root.is_none(),
            "the root covers every pod: nothing to check"
        );
        assert_eq!(
            names(&failed),
            ["adopted"],
            "a failed listing enrols nothing new"
        );
        assert!(
            failed
                .waiting
                .iter()
                .all(|(_, _, why)| why.contains("cannot list")),
            "{:?}",
            failed.waiting
        );
    }
}

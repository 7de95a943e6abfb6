//! Where the cgroup programs attach, and how their pinned links are named.
//!
//! cgroup programs run for every socket of every process under the cgroup they attach to. At the
//! root that is every process of the node (kubelet, the runtime, system daemons), which pay for
//! programs meant for pods. The kubelet puts every pod under one cgroup, `kubepods.slice` with the
//! systemd cgroup driver and `kubepods` with cgroupfs (Kubernetes' node-allocatable design), so
//! that is where the programs attach when it exists.

use std::path::{Component, Path, PathBuf};

/// The kubelet's parent cgroup of all pods, by cgroup driver (systemd, cgroupfs).
pub const KUBEPODS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// The cgroup the programs attach to, under the cgroup v2 root `root`, from `--cgroup-attach`:
/// `auto` is the kubelet's pod cgroup ([`KUBEPODS`]) when there is one and the root otherwise;
/// `/` is the root; anything else is a cgroup path under the root (leading `/` optional, as
/// `/proc/<pid>/cgroup` writes it), which must exist.
pub fn attach_point(root: &Path, spec: &str) -> Result<PathBuf, String> {
    match spec.trim() {
        "auto" => Ok(KUBEPODS
            .iter()
            .map(|k| root.join(k))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| root.to_path_buf())),
        "/" => Ok(root.to_path_buf()),
        spec => {
            let rel = Path::new(spec.trim_start_matches('/'));
            if spec.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(format!(
                    "{spec:?}: want `auto`, `/`, or a cgroup path under the cgroup root (no `.` or `..`)"
                ));
            }
            let path = root.join(rel);
            if !path.is_dir() {
                return Err(format!(
                    "{spec:?}: {} is not a cgroup (no such directory)",
                    path.display()
                ));
            }
            Ok(path)
        }
    }
}

/// The name a program's link to cgroup `cgroup_id` is pinned under. A link names its cgroup, so an
/// agent started with another attach point knows which pinned links are attached elsewhere.
pub fn link_pin_name(program: &str, cgroup_id: u64) -> String {
    format!("{program}@cgroup-{cgroup_id}")
}

/// Whether the pin named `pin` holds a link of `program` other than the one named `current`:
/// attached to another cgroup, or pinned by a version whose pin names did not name the cgroup.
pub fn is_other_link_of(pin: &str, program: &str, current: &str) -> bool {
    pin != current
        && (pin == program
            || pin
                .strip_prefix(program)
                .is_some_and(|rest| rest.starts_with("@cgroup-")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::TempDir;

    fn root(children: &[&str]) -> TempDir {
        let dir = TempDir::new("attach");
        for c in children {
            std::fs::create_dir_all(dir.path().join(c)).expect("mkdir");
        }
        dir
    }

    #[test]
    fn auto_prefers_the_kubelets_pod_cgroup_systemd_driver_first() {
        let r = root(&["kubepods.slice", "kubepods", "system.slice"]);
        assert_eq!(
            attach_point(r.path(), "auto").unwrap(),
            r.path().join("kubepods.slice")
        );
        let r = root(&["kubepods", "system.slice"]);
        assert_eq!(
            attach_point(r.path(), "auto").unwrap(),
            r.path().join("kubepods")
        );
    }

    #[test]
    fn auto_falls_back_to_the_root_without_a_kubelet() {
        let r = root(&["system.slice", "user.slice"]);
        assert_eq!(attach_point(r.path(), "auto").unwrap(), r.path());
        assert_eq!(attach_point(r.path(), " auto ").unwrap(), r.path());
    }

    #[test]
    fn slash_is_the_root_and_paths_are_under_it() {
        let r = root(&["kubepods.slice", "custom/pods"]);
        assert_eq!(attach_point(r.path(), "/").unwrap(), r.path());
        assert_eq!(
            attach_point(r.path(), "custom/pods").unwrap(),
            r.path().join("custom/pods")
        );
        assert_eq!(
            attach_point(r.path(), "/custom/pods").unwrap(),
            r.path().join("custom/pods")
        );
    }

    #[test]
    fn a_missing_or_escaping_path_is_an_error_naming_it() {
        let r = root(&["custom"]);
        for bad in ["custom/nope", "../etc", "custom/../..", "./custom", ""] {
            let e = attach_point(r.path(), bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn pin_names_tell_links_of_other_cgroups_apart() {
        let current = link_pin_name("ambit_conn4", 42);
        assert_eq!(current, "ambit_conn4@cgroup-42");
        assert!(!is_other_link_of(&current, "ambit_conn4", &current));
        // The same program attached elsewhere, or pinned before pins named their cgroup.
        assert!(is_other_link_of(
            "ambit_conn4@cgroup-7",
            "ambit_conn4",
            &current
        ));
        assert!(is_other_link_of("ambit_conn4", "ambit_conn4", &current));
        // Other programs' links, including one whose name extends this one's, are not touched.
        assert!(!is_other_link_of(
            "ambit_conn6@cgroup-7",
            "ambit_conn4",
            &current
        ));
        assert!(!is_other_link_of(
            "ambit_conn4x@cgroup-7",
            "ambit_conn4",
            &current
        ));
        assert!(!is_other_link_of("ambit_conn4x", "ambit_conn4", &current));
    }
}

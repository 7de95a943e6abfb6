//! Removing what a harness left on the host: shims, cgroups, mounts. Every step ignores
//! errors: it runs on drop, also after a failed test, and must go as far as it can.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

/// Runs a cleanup command, its output discarded.
pub(super) fn quiet(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Kills the containerd-shim processes started for the daemon on `socket`.
pub(super) fn kill_shims(socket: &Path) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let needle = socket.as_os_str().as_encoded_bytes();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let is_shim = cmdline.starts_with(b"/usr/bin/containerd-shim")
            || cmdline.windows(15).any(|w| w == b"containerd-shim");
        if is_shim && cmdline.split(|b| *b == 0).any(|arg| arg == needle) {
            let _ = quiet(Command::new("kill").arg("-KILL").arg(pid.to_string()));
        }
    }
}

/// Every cgroup hierarchy mounted: (mount point, is cgroup v2).
pub(super) fn cgroup_mounts() -> Vec<(PathBuf, bool)> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let point = line.split(' ').nth(4)?;
            let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
            match fstype {
                "cgroup2" => Some((PathBuf::from(point), true)),
                "cgroup" => Some((PathBuf::from(point), false)),
                _ => None,
            }
        })
        .collect()
}

/// Removes `parent` (and the container cgroups runc left in it) from every hierarchy.
pub(super) fn remove_cgroups(parent: &str) {
    if parent.trim_matches('/').is_empty() {
        return;
    }
    for (point, _) in cgroup_mounts() {
        let dir = point.join(parent.trim_start_matches('/'));
        if let Ok(children) = fs::read_dir(&dir) {
            for child in children.flatten() {
                if child.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = fs::remove_dir(child.path());
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// Lazily unmounts every mount at or below `dir` (snapshots and rootfs left by a killed task),
/// deepest first.
pub(super) fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let _ = quiet(Command::new("umount").arg("--lazy").arg(&point));
    }
}

//! cgroup v2 directories for nodes and pods: creation, killing everything inside, removal, and the
//! `sh` + `nsenter` wrapper that starts a program in a cgroup and then a netns without `pre_exec`.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::unistd::Pid;

use super::HarnessError;

/// The cgroup v2 mount: `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on unified ones.
pub fn cgroup_root() -> Result<PathBuf, HarnessError> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| statfs(p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC))
    })
    .clone()
    .ok_or(HarnessError::NoCgroup2)
}

pub(crate) fn create(path: &Path) -> Result<(), HarnessError> {
    std::fs::create_dir(path).map_err(|source| HarnessError::Io {
        op: "create cgroup",
        path: path.to_owned(),
        source,
    })
}

/// The path as `/proc/<pid>/cgroup` shows it (`0::<this>`).
pub(crate) fn proc_path(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(cgroup_root().ok()?).ok()?;
    Some(format!("/{}", rel.display()))
}

/// A command that joins `cgroup`, then the netns at `netns`, then execs `program`. The cgroup comes
/// first because entering it needs /sys, and the order keeps even `nsenter` inside the cgroup.
/// (`ip netns exec` would remount /sys and hide the cgroup v2 mount on hybrid hosts.)
pub(crate) fn command(cgroup: &Path, netns: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$1" && ns="$2" && shift 2 && exec nsenter --net="$ns" -- "$@""#)
        .arg("sh")
        .arg(cgroup.join("cgroup.procs"))
        .arg(netns)
        .arg(program);
    cmd
}

/// Kills every process in the cgroup and its descendants, then removes the directories, children
/// first. Returns Ok if the directory is already gone.
pub(crate) fn remove_tree(path: &Path) -> Result<(), HarnessError> {
    if !path.exists() {
        return Ok(());
    }
    kill_tree(path);
    // SIGKILLed tasks leave the cgroup asynchronously; rmdir fails with EBUSY until they have.
    let deadline = Instant::now() + Duration::from_secs(5);
    while populated(path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    rmdir_tree(path, deadline)
}

fn kill_tree(path: &Path) {
    // cgroup.kill (Linux 5.14) kills the whole subtree atomically, including forks in flight.
    if std::fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for _ in 0..3 {
        for_each_cgroup(path, &mut |cg| {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        });
    }
}

fn for_each_cgroup(path: &Path, f: &mut dyn FnMut(&Path)) {
    f(path);
    for child in subdirs(path) {
        for_each_cgroup(&child, f);
    }
}

fn subdirs(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

fn rmdir_tree(path: &Path, deadline: Instant) -> Result<(), HarnessError> {
    for child in subdirs(path) {
        rmdir_tree(&child, deadline)?;
    }
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(HarnessError::Io {
                    op: "remove cgroup",
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

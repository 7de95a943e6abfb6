//! Removing everything a world left behind: on its own teardown, and for worlds of processes that
//! died without one (the sweeper). Also the state files that let the sweeper find their processes.
//!
//! A world's prefix is `ambt-<pid>-<seq>`; it is dead when that pid is gone, or when the pid now
//! belongs to another process (its start time differs from the one recorded in `owner`).

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Once;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{cgroup, netns, HarnessError, PREFIX};

/// Per-world state: `<STATE_DIR>/<prefix>/owner` (`<pid> <starttime> <test name>`) and `procs`
/// (`<pid> <starttime>` per spawned process).
pub const STATE_DIR: &str = "/run/ambit-harness";

/// Where bpffs is (or gets) mounted; a world's pins go to `<BPFFS>/<prefix>`.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// Sweeps once per process; called by the first `World::new`.
pub(crate) fn sweep_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let swept = sweep();
        if !swept.is_empty() {
            eprintln!("ambit harness: swept leftovers of dead worlds {swept:?}");
        }
    });
}

/// Removes the netns, cgroups, bpffs dirs, state and processes of every world whose creating
/// process is dead. Returns the prefixes it removed; failures are logged to stderr.
pub fn sweep() -> Vec<String> {
    let mut prefixes = BTreeSet::new();
    let cgroup_names = cgroup::cgroup_root()
        .map(|r| dir_names(&r))
        .unwrap_or_default();
    let names = netns::list()
        .into_iter()
        .chain(cgroup_names)
        .chain(dir_names(Path::new(BPFFS)))
        .chain(dir_names(Path::new(STATE_DIR)));
    for name in names {
        if let Some((prefix, pid)) = parse(&name) {
            prefixes.insert((prefix, pid));
        }
    }
    let mut swept = Vec::new();
    for (prefix, pid) in prefixes {
        if owner_alive(&prefix, pid) {
            continue;
        }
        for e in remove_world(&prefix) {
            eprintln!("ambit harness: sweeping {prefix}: {e}");
        }
        swept.push(prefix);
    }
    swept
}

/// What still exists of world `prefix`: netns files, cgroup dirs, bpffs dir, state dir.
pub fn leftovers(prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = netns::list()
        .into_iter()
        .filter(|n| belongs(n, prefix))
        .map(|n| netns::path(&n))
        .collect();
    let mut dirs = vec![PathBuf::from(BPFFS), PathBuf::from(STATE_DIR)];
    dirs.extend(cgroup::cgroup_root().ok());
    for dir in dirs {
        found.extend(
            dir_names(&dir)
                .into_iter()
                .filter(|n| belongs(n, prefix))
                .map(|n| dir.join(n)),
        );
    }
    found
}

/// Removes everything named after `prefix`, killing its processes first. Never panics; returns
/// what failed.
pub(crate) fn remove_world(prefix: &str) -> Vec<HarnessError> {
    let mut errors = Vec::new();
    kill_recorded(prefix);
    // Cgroups before netns: killing the processes is what lets the netns actually go away.
    if let Ok(root) = cgroup::cgroup_root() {
        for name in dir_names(&root).into_iter().filter(|n| belongs(n, prefix)) {
            errors.extend(cgroup::remove_tree(&root.join(name)).err());
        }
    }
    for name in netns::list().into_iter().filter(|n| belongs(n, prefix)) {
        if let Err(e) = netns::delete(&name) {
            // A concurrent sweeper may have won the race.
            if netns::path(&name).exists() {
                errors.push(e);
            }
        }
    }
    for base in [BPFFS, STATE_DIR] {
        for name in dir_names(Path::new(base))
            .into_iter()
            .filter(|n| belongs(n, prefix))
        {
            let path = Path::new(base).join(name);
            // Unlinking a pin file unpins the map, program or link.
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    errors.push(HarnessError::Io {
                        op: "remove",
                        path,
                        source: e,
                    })
                }
                _ => {}
            }
        }
    }
    errors
}

/// Writes `<STATE_DIR>/<prefix>/owner` for the current process.
pub(crate) fn record_owner(prefix: &str, test_name: &str) -> Result<PathBuf, HarnessError> {
    let dir = Path::new(STATE_DIR).join(prefix);
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| HarnessError::Io { op, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io("create state dir", &dir))?;
    let pid = std::process::id();
    let start = starttime(pid).unwrap_or(0);
    let owner = dir.join("owner");
    std::fs::write(&owner, format!("{pid} {start} {test_name}\n")).map_err(io("write", &owner))?;
    Ok(dir)
}

/// Appends a spawned process to `<state dir>/procs`, so a sweeper can kill it if we die.
pub(crate) fn record_process(state_dir: &Path, pid: u32) -> Result<(), HarnessError> {
    let path = state_dir.join("procs");
    let start = starttime(pid).unwrap_or(0);
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{pid} {start}"))
        .map_err(|source| HarnessError::Io {
            op: "append to",
            path,
            source,
        })
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot; tells a reused pid apart.
pub(crate) fn starttime(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; fields after it don't.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn kill_recorded(prefix: &str) {
    let procs = Path::new(STATE_DIR).join(prefix).join("procs");
    let Ok(text) = std::fs::read_to_string(procs) else {
        return;
    };
    for line in text.lines() {
        let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().ok());
        let (Some(Some(pid)), Some(Some(start))) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(pid) = u32::try_from(pid) else {
            continue;
        };
        if starttime(pid) == Some(start) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn owner_alive(prefix: &str, pid: u32) -> bool {
    let Some(start) = starttime(pid) else {
        return false;
    };
    let owner = Path::new(STATE_DIR).join(prefix).join("owner");
    match std::fs::read_to_string(owner) {
        Ok(text) => text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u64>().ok())
            .is_none_or(|recorded| recorded == start),
        // No owner file (yet): trust the pid.
        Err(_) => true,
    }
}

/// `ambt-<pid>-<seq>[-anything]` -> (`ambt-<pid>-<seq>`, pid).
fn parse(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let seq: u64 = parts.next()?.parse().ok()?;
    Some((format!("{PREFIX}-{pid}-{seq}"), pid))
}

fn belongs(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

fn dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_prefixes() {
        assert_eq!(parse("ambt-12-3-n1"), Some(("ambt-12-3".into(), 12)));
        assert_eq!(parse("ambt-12-3"), Some(("ambt-12-3".into(), 12)));
        assert_eq!(parse("ambt-x-3"), None);
        assert_eq!(parse("other-12-3"), None);
        assert!(belongs("ambt-1-1-pod", "ambt-1-1"));
        assert!(belongs("ambt-1-1", "ambt-1-1"));
        assert!(!belongs("ambt-1-10-pod", "ambt-1-1"));
    }

    #[test]
    fn reads_own_start_time() {
        assert!(starttime(std::process::id()).is_some());
    }
}

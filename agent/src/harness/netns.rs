//! Named network namespaces (`ip netns add/del`) and running code inside one on a dedicated thread.
//!
//! A thread's netns is per-thread, so `setns(CLONE_NEWNET)` on a fresh thread moves only that thread,
//! and every socket it creates stays in that netns for its whole life, whichever thread uses it later.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::sched::{setns, CloneFlags};

use super::{cmd, HarnessError};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// `ip netns add` sets up the shared `/var/run/netns` mount the first time it runs; concurrent first
/// runs can stack that mount, so tests in one process take turns.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// The path of the named netns `name`.
pub(crate) fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates the named netns; returns its path.
pub(crate) fn add(name: &str) -> Result<PathBuf, HarnessError> {
    let _turn = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    cmd::ip(&["netns", "add", name])?;
    Ok(path(name))
}

/// Deletes the named netns. Its devices go when the last process or socket in it goes.
pub(crate) fn delete(name: &str) -> Result<(), HarnessError> {
    let _turn = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    cmd::ip(&["netns", "del", name]).map(drop)
}

/// Names of all named netns (empty if the directory does not exist yet).
pub(crate) fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inode of a netns file; it equals the number in `readlink /proc/<pid>/ns/net` (`net:[<inode>]`)
/// of every process in that netns.
pub fn netns_inode(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// Runs `f` on a fresh thread that first joins the netns at `path`; returns its result and re-raises
/// its panic. The thread ends with `f`, so no thread is ever left in the wrong netns.
pub fn run_in_netns<F, T>(path: &Path, f: F) -> Result<T, HarnessError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let file = File::open(path).map_err(|source| HarnessError::Io {
        op: "open netns",
        path: path.to_owned(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn_scoped(s, move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| HarnessError::Setns {
                    path: path.to_owned(),
                    source,
                })?;
                drop(file);
                Ok(f())
            })
            .map_err(|source| HarnessError::Io {
                op: "spawn a thread for netns",
                path: path.to_owned(),
                source,
            })?;
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Like [`run_in_netns`], with a tokio current-thread runtime on that thread, so every socket the
/// future creates is inside the netns.
pub fn run_async_in_netns<F, Fut, T>(path: &Path, f: F) -> Result<T, HarnessError>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    run_in_netns(path, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| HarnessError::Runtime {
                path: path.to_owned(),
                source,
            })?;
        Ok(runtime.block_on(f()))
    })?
}

/// Writes sysctls (`("net/ipv4/ip_forward", "1")`, relative to /proc/sys) inside the netns: the
/// kernel resolves /proc/sys/net against the netns of the thread that opens the file.
pub(crate) fn set_sysctls(path: &Path, sysctls: &[(&str, &str)]) -> Result<(), HarnessError> {
    run_in_netns(path, || {
        for (key, value) in sysctls {
            let file = Path::new("/proc/sys").join(key);
            std::fs::write(&file, value).map_err(|source| HarnessError::Io {
                op: "write sysctl",
                path: file,
                source,
            })?;
        }
        Ok(())
    })?
}

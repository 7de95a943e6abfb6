//! One container run by a foreground `ctr run` in a private mount namespace where the harness's
//! CNI directories are the node's.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::cleanup::quiet;
use super::daemon::Containerd;
use super::{CNI_BIN_PATHS, CNI_CACHE_PATH, CNI_CONF_PATH, START_TIMEOUT};
use crate::cmd;

/// A container about to be run; see [`Containerd::container`].
pub struct ContainerSpec<'a> {
    pub(super) harness: &'a Containerd,
    pub(super) id: String,
    pub(super) image: String,
    pub(super) cni: bool,
    pub(super) args: Vec<String>,
    pub(super) labels: Vec<String>,
    pub(super) options: Vec<String>,
}

impl<'a> ContainerSpec<'a> {
    /// Runs the container with `ctr run --cni`: ctr runs the chain in [`Containerd::cni_conf_dir`]
    /// (ADD before the process starts, DEL when it has exited).
    pub fn cni(mut self) -> Self {
        self.cni = true;
        self
    }

    /// The process to run (the image has no default command).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// More `ctr run` flags, before the image: how a pod spec would run it (`--mount`,
    /// `--cap-add`/`--cap-drop`, `--with-ns`, `--read-only`, `--seccomp`, `--env`).
    pub fn options<I, S>(mut self, options: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.options.extend(options.into_iter().map(Into::into));
        self
    }

    /// A containerd label on the container (`ctr run --label key=value`).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push(format!("{key}={value}"));
        self
    }

    /// Starts `ctr run --rm --cgroup <parent>/<id> [--cni] <image> <id> <args>` in the foreground, as a child of the
    /// test, in a private mount namespace where the harness's CNI directories are the node's.
    /// Returns at once: wait for what the test needs with [`Container`]'s methods.
    pub fn start(self) -> Result<Container<'a>> {
        let harness = self.harness;
        for path in [CNI_CONF_PATH, CNI_BIN_PATHS[0], CNI_CACHE_PATH] {
            fs::create_dir_all(path)
                .with_context(|| format!("failed to create the mount point {path}"))?;
        }
        let out_path = harness.dir.join(format!("{}.stdout", self.id));
        let err_path = harness.dir.join(format!("{}.stderr", self.id));
        let stdout = fs::File::create(&out_path)
            .with_context(|| format!("failed to create {}", out_path.display()))?;
        let stderr = fs::File::create(&err_path)
            .with_context(|| format!("failed to create {}", err_path.display()))?;
        // unshare execs sh, which execs ctr: the child's pid is ctr's.
        let script = format!(
            "set -e; mount --bind \"$1\" {CNI_CONF_PATH}; mount --bind \"$2\" {}; \
             mount --bind \"$2\" {}; mount --bind \"$3\" {CNI_CACHE_PATH}; shift 3; exec \"$@\"",
            CNI_BIN_PATHS[0], CNI_BIN_PATHS[1]
        );
        let ctr = harness.ctr();
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg("sh")
            .arg(harness.cni_conf_dir())
            .arg(harness.cni_bin_dir())
            .arg(harness.cni_cache_dir())
            .arg(ctr.get_program())
            .args(ctr.get_args())
            .args(["run", "--rm", "--cgroup"])
            .arg(format!("{}/{}", harness.cgroup_parent, self.id));
        if self.cni {
            command.arg("--cni");
        }
        for label in &self.labels {
            command.arg("--label").arg(label);
        }
        command.args(&self.options);
        command.arg(&self.image).arg(&self.id).args(&self.args);
        let description = cmd::describe(&command);
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("failed to start `{description}`"))?;
        Ok(Container {
            harness,
            id: self.id,
            ctr: Some(child),
            out_path,
            err_path,
        })
    }
}

/// A container run by a foreground `ctr run`. Dropping it kills the task and waits for ctr,
/// which runs CNI DEL and removes the container.
pub struct Container<'a> {
    harness: &'a Containerd,
    id: String,
    ctr: Option<Child>,
    out_path: PathBuf,
    err_path: PathBuf,
}

/// How a container's `ctr run` ended.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Container<'_> {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the container (and ctr) printed so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.out_path)
    }

    /// What ctr printed on stderr so far (CNI errors land here).
    pub fn stderr(&self) -> String {
        read_lossy(&self.err_path)
    }

    /// Waits until the task is running (after CNI ADD returned) and returns its pid; fails if
    /// `ctr run` ends first, with what it printed.
    pub fn wait_running(&mut self, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((pid, status)) = self.harness.task_status(&self.id)? {
                if status == "RUNNING" {
                    return Ok(pid);
                }
            }
            if let Some(status) = self.try_exit()? {
                bail!(
                    "container {} ended before running ({status}); ctr said: {}",
                    self.id,
                    self.stderr().trim()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "container {} not running within {timeout:?}; ctr said: {}",
                    self.id,
                    self.stderr().trim()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        match self.ctr.as_mut() {
            Some(child) => child.try_wait().context("failed to poll ctr"),
            None => Err(anyhow!("container {} was already waited for", self.id)),
        }
    }

    /// Waits until stdout contains `needle` and returns stdout; fails on timeout or if ctr ends
    /// without printing it.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if out.contains(needle) {
                return Ok(out);
            }
            if let Some(status) = self.try_exit()? {
                let out = self.stdout();
                if out.contains(needle) {
                    return Ok(out);
                }
                bail!(
                    "container {} ended ({status}) without printing {needle:?}; stdout: {out:?}; \
                     ctr said: {}",
                    self.id,
                    self.stderr().trim()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "container {} did not print {needle:?} within {timeout:?}; stdout: {out:?}; \
                     ctr said: {}",
                    self.id,
                    self.stderr().trim()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command in the running container (`ctr tasks exec`) and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let exec_id = format!("exec-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        cmd::output(
            self.harness
                .ctr()
                .args(["tasks", "exec", "--exec-id", &exec_id, &self.id])
                .args(args),
        )
    }

    /// The IPv4 address of the container's `eth0`, as the container sees it.
    pub fn ipv4(&self) -> Result<std::net::Ipv4Addr> {
        let out = self.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        // `2: eth0    inet 10.0.0.2/24 brd ... scope global eth0`
        let cidr = out
            .split_whitespace()
            .skip_while(|word| *word != "inet")
            .nth(1)
            .ok_or_else(|| anyhow!("no IPv4 address on eth0 of {}: {out:?}", self.id))?;
        let addr = cidr.split('/').next().unwrap_or(cidr);
        addr.parse()
            .with_context(|| format!("bad address {addr:?} on eth0 of {}", self.id))
    }

    /// Waits for `ctr run` to end (the process exited, or the start failed) within `timeout`;
    /// the container is gone afterwards.
    pub fn wait(mut self, timeout: Duration) -> Result<Exit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                self.ctr = None;
                // ctr 1.6 leaves a container whose start failed (CNI ADD refused) behind with
                // its created task, after running CNI DEL: remove it, as the kubelet removes a
                // failed sandbox.
                if self.harness.containers()?.contains(&self.id) {
                    self.harness.remove(&self.id);
                }
                return Ok(Exit {
                    status,
                    stdout: self.stdout(),
                    stderr: self.stderr(),
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "ctr run of {} did not end within {timeout:?}; ctr said: {}",
                    self.id,
                    self.stderr().trim()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the task and waits for `ctr run` to end: it runs CNI DEL, then removes the task and
    /// the container.
    pub fn stop(self) -> Result<Exit> {
        let _ = quiet(
            self.harness
                .ctr()
                .args(["tasks", "kill", "--signal", "SIGKILL", &self.id]),
        );
        self.wait(START_TIMEOUT)
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let Some(mut child) = self.ctr.take() else {
            return;
        };
        let _ = quiet(
            self.harness
                .ctr()
                .args(["tasks", "kill", "--signal", "SIGKILL", &self.id]),
        );
        let deadline = Instant::now() + START_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

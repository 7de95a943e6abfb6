//! A private containerd for tests: its own root, state, socket and config under a temporary
//! directory, started by [`Containerd::start`] and stopped (tasks killed, shims gone, mounts
//! removed, directory deleted) when dropped, also when a test panics. It imports OCI image
//! tarballs ([`busybox_image`] builds a tiny one with umoci) and runs containers with `ctr run`,
//! optionally with `--cni`.
//!
//! `ctr run --cni` (containerd 1.6) runs the CNI chain itself, not the daemon: it loads the first
//! network config of /etc/cni/net.d and executes plugins from /opt/cni/bin (Debian's build also
//! looks in /usr/lib/cni). So each `ctr run` here runs in a private mount namespace in which the
//! test's own config, plugin and cache directories are bind-mounted over those paths: no test
//! touches the node's CNI files, and parallel tests do not see each other's networks. The empty
//! directories are created as mount points when missing (a Kubernetes node has them anyway).
//!
//! `ctr` passes no `CNI_ARGS` (the CRI plugin passes `K8S_POD_NAMESPACE`/`K8S_POD_NAME`; ctr
//! only the container id `<namespace>-<id>`, the netns and the interface name). A plugin under test
//! must therefore find the pod by what it is given, e.g. the IP the IPAM plugin assigned.
//!
//! Everything runs as root (containerd, runc and CNI need it). The tools come from Debian:
//! `containerd`, `runc`, `containernetworking-plugins`, `busybox-static`, `umoci`.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::cmd;

/// The containerd namespace every container of the harness lives in.
pub const NAMESPACE: &str = "ambit-test";

/// Where Debian's containernetworking-plugins installs the reference plugins.
pub const DEBIAN_CNI_BIN: &str = "/usr/lib/cni";

/// The reference plugins copied into every harness's private CNI bin dir.
const REFERENCE_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];

/// The paths `ctr run --cni` reads, each covered by a private directory of the test.
const CNI_CONF_PATH: &str = "/etc/cni/net.d";
const CNI_BIN_PATHS: [&str; 2] = ["/opt/cni/bin", DEBIAN_CNI_BIN];
/// libcni's cache of results (`/var/lib/cni/results`), and host-local's default data dir.
const CNI_CACHE_PATH: &str = "/var/lib/cni";

/// How long the daemon may take to answer, and a container to reach a state.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A unique directory under the system's temp dir.
fn unique_dir(prefix: &str) -> Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Short on purpose: the daemon's socket path must fit a sockaddr_un (108 bytes).
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    Ok(dir)
}

/// A containerd daemon private to one test.
pub struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Child>,
    /// Host bridges the CNI chain made; deleted on drop.
    bridges: Mutex<Vec<String>>,
    /// The cgroup (as runc names it, `/<name>`) every container's cgroup is made under.
    cgroup_parent: String,
}

impl Containerd {
    /// Starts containerd with its own root, state, socket and config under a fresh temporary
    /// directory, and waits until it answers. The CNI directories ([`Self::cni_conf_dir`],
    /// [`Self::cni_bin_dir`]) are created, the bin dir seeded with Debian's `bridge`,
    /// `host-local` and `loopback`.
    pub fn start() -> Result<Self> {
        let dir = unique_dir("ambit-ctrd")?;
        let socket = dir.join("containerd.sock");
        let mut harness = Containerd {
            dir,
            socket,
            daemon: None,
            bridges: Mutex::new(Vec::new()),
            cgroup_parent: String::new(),
        };
        harness.cgroup_parent = format!(
            "/{}",
            harness
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        for sub in [
            "root",
            "state",
            "cni/net.d",
            "cni/bin",
            "cni/cache",
            "images",
        ] {
            let path = harness.dir.join(sub);
            fs::create_dir_all(&path)
                .with_context(|| format!("failed to create {}", path.display()))?;
        }
        for plugin in REFERENCE_PLUGINS {
            let from = Path::new(DEBIAN_CNI_BIN).join(plugin);
            // A copy, not a symlink: the bin dir is mounted over /usr/lib/cni itself.
            fs::copy(&from, harness.cni_bin_dir().join(plugin)).with_context(|| {
                format!(
                    "failed to copy the CNI plugin {} (is containernetworking-plugins installed?)",
                    from.display()
                )
            })?;
        }
        let config = harness.dir.join("config.toml");
        fs::write(&config, harness.config())
            .with_context(|| format!("failed to write {}", config.display()))?;
        let log_path = harness.log_path();
        let log = fs::File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        let daemon = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .context("failed to duplicate the log file")?,
            )
            .stderr(log)
            .spawn()
            .context("failed to start containerd (is the Debian package containerd installed?)")?;
        harness.daemon = Some(daemon);
        harness.wait_ready()?;
        Ok(harness)
    }

    fn config(&self) -> String {
        let root = self.dir.join("root");
        let state = self.dir.join("state");
        let ttrpc = self.dir.join("containerd.sock.ttrpc");
        // Only what `ctr` needs: no CRI (it would load CNI configs of its own), no snapshotters
        // this machine cannot have.
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{ttrpc}"
"#,
            root = root.display(),
            state = state.display(),
            socket = self.socket.display(),
            ttrpc = ttrpc.display(),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// The daemon's log, for error messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(daemon) = self.daemon.as_mut() {
                if let Some(status) = daemon.try_wait().context("failed to poll containerd")? {
                    bail!(
                        "containerd exited ({status}) at start; its log:\n{}",
                        self.log()
                    );
                }
            }
            let answered = self
                .ctr()
                .arg("version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("failed to run ctr (is the Debian package containerd installed?)")?;
            if answered.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer on {} within {START_TIMEOUT:?}; its log:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The harness's temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup every container of this harness runs under (`ctr run --cgroup <it>/<id>`), as
    /// a directory of the cgroup v2 hierarchy (`/sys/fs/cgroup/unified/...` on hybrid hosts, where
    /// runc joins it too), created if missing: attach cgroup programs here to see every container's
    /// processes from their first instruction. Removed on drop.
    pub fn cgroup_v2_dir(&self) -> Result<PathBuf> {
        let root = cgroup_mounts()
            .into_iter()
            .find_map(|(point, v2)| v2.then_some(point))
            .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))?;
        let dir = root.join(self.cgroup_parent.trim_start_matches('/'));
        fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(dir)
    }

    /// The daemon's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The CNI config dir `ctr run --cni` sees as /etc/cni/net.d.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }

    /// The CNI plugin dir `ctr run --cni` sees as /opt/cni/bin and /usr/lib/cni.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("cni/bin")
    }

    /// The CNI cache dir `ctr run --cni` sees as /var/lib/cni (libcni's results, host-local's
    /// leases unless the config names another `dataDir`).
    pub fn cni_cache_dir(&self) -> PathBuf {
        self.dir.join("cni/cache")
    }

    /// Writes a network config file into [`Self::cni_conf_dir`] (write to a temp file, rename).
    pub fn write_cni_config(&self, file_name: &str, content: &str) -> Result<PathBuf> {
        let path = self.cni_conf_dir().join(file_name);
        let tmp = self.cni_conf_dir().join(format!(".{file_name}.tmp"));
        fs::write(&tmp, content).with_context(|| format!("failed to write {}", tmp.display()))?;
        fs::rename(&tmp, &path)
            .with_context(|| format!("failed to rename to {}", path.display()))?;
        Ok(path)
    }

    /// Writes [`bridge_conflist`] as `file_name` into [`Self::cni_conf_dir`] and deletes the host
    /// bridge `bridge` (at most 15 bytes, unique per test) when the harness is dropped.
    pub fn write_bridge_network(
        &self,
        file_name: &str,
        cni_version: &str,
        network: &str,
        bridge: &str,
        subnet: &str,
        extra: &[&str],
    ) -> Result<PathBuf> {
        if bridge.len() > 15 {
            bail!("bridge name {bridge:?} is longer than 15 bytes (IFNAMSIZ)");
        }
        self.bridges
            .lock()
            .map_err(|_| anyhow!("bridge list poisoned"))?
            .push(bridge.to_owned());
        let conflist = bridge_conflist(cni_version, network, bridge, subnet, extra);
        self.write_cni_config(file_name, &conflist)
    }

    /// Copies a plugin binary into [`Self::cni_bin_dir`] under `name`.
    pub fn install_cni_plugin(&self, binary: &Path, name: &str) -> Result<()> {
        let to = self.cni_bin_dir().join(name);
        fs::copy(binary, &to)
            .with_context(|| format!("failed to copy {} to {}", binary.display(), to.display()))?;
        Ok(())
    }

    /// `ctr --address <socket> --namespace ambit-test`.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(NAMESPACE);
        cmd
    }

    /// Imports an OCI image tarball (an OCI layout, as [`busybox_image`] writes) as `<name>:latest`
    /// and returns that reference.
    pub fn import(&self, tarball: &Path, name: &str) -> Result<String> {
        cmd::output(
            self.ctr()
                .args(["images", "import", "--base-name", name])
                .arg(tarball),
        )?;
        let reference = format!("{name}:latest");
        let listed = cmd::output(self.ctr().args(["images", "ls", "-q"]))?;
        if !listed.lines().any(|line| line.trim() == reference) {
            bail!(
                "importing {} gave no image {reference}; images: {listed}",
                tarball.display()
            );
        }
        Ok(reference)
    }

    /// A container to run from `image` (a reference [`Self::import`] returned).
    pub fn container(&self, id: &str, image: &str) -> ContainerSpec<'_> {
        ContainerSpec {
            harness: self,
            id: id.to_owned(),
            image: image.to_owned(),
            cni: false,
            args: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// The status of a task (`RUNNING`, `STOPPED`, `CREATED`, ...), `None` when there is none.
    pub fn task_status(&self, id: &str) -> Result<Option<(u32, String)>> {
        let listed = cmd::output(self.ctr().args(["tasks", "ls"]))?;
        for line in listed.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [task, pid, status] = fields[..] {
                if task == id {
                    let pid = pid
                        .parse()
                        .with_context(|| format!("bad pid in `ctr tasks ls`: {line}"))?;
                    return Ok(Some((pid, status.to_owned())));
                }
            }
        }
        Ok(None)
    }

    /// Ids of the containers that exist.
    pub fn containers(&self) -> Result<Vec<String>> {
        let listed = cmd::output(self.ctr().args(["containers", "ls", "-q"]))?;
        Ok(listed.lines().map(|l| l.trim().to_owned()).collect())
    }

    /// Kills and deletes every task and container; errors are ignored (it is cleanup).
    fn remove_all(&self) {
        let Ok(listed) = cmd::output(self.ctr().args(["containers", "ls", "-q"])) else {
            return;
        };
        for id in listed.lines().map(str::trim).filter(|id| !id.is_empty()) {
            self.remove(id);
        }
    }

    /// Kills and deletes one container's task and the container; errors are ignored.
    fn remove(&self, id: &str) {
        let _ = quiet(
            self.ctr()
                .args(["tasks", "kill", "--signal", "SIGKILL", id]),
        );
        let _ = quiet(self.ctr().args(["tasks", "delete", "--force", id]));
        let _ = quiet(self.ctr().args(["containers", "delete", id]));
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all();
        if let Some(mut daemon) = self.daemon.take() {
            let _ = quiet(
                Command::new("kill")
                    .arg("-TERM")
                    .arg(daemon.id().to_string()),
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        // Shims outlive the daemon: each names our socket in its command line.
        kill_shims(&self.socket);
        if let Ok(bridges) = self.bridges.lock() {
            for bridge in bridges.iter() {
                let _ = quiet(Command::new("ip").args(["link", "delete", bridge]));
            }
        }
        unmount_below(&self.dir);
        remove_cgroups(&self.cgroup_parent);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs a cleanup command, its output discarded.
fn quiet(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Kills the containerd-shim processes started for the daemon on `socket`.
fn kill_shims(socket: &Path) {
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
fn cgroup_mounts() -> Vec<(PathBuf, bool)> {
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
fn remove_cgroups(parent: &str) {
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
fn unmount_below(dir: &Path) {
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

/// A container about to be run; see [`Containerd::container`].
pub struct ContainerSpec<'a> {
    harness: &'a Containerd,
    id: String,
    image: String,
    cni: bool,
    args: Vec<String>,
    labels: Vec<String>,
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

/// Builds a tiny OCI image with umoci: busybox-static's `/bin/busybox` and a symlink per applet
/// in `/bin`, `PATH=/bin`, no default command. Returns the OCI layout tarball written into `dir`
/// (import it with [`Containerd::import`]).
pub fn busybox_image(dir: &Path) -> Result<PathBuf> {
    let layout = dir.join("busybox-layout");
    let staging = dir.join("busybox-rootfs");
    let tarball = dir.join("busybox.oci.tar");
    let _ = fs::remove_dir_all(&layout);
    let _ = fs::remove_dir_all(&staging);
    let bin = staging.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("failed to create {}", bin.display()))?;
    let busybox = Path::new("/bin/busybox");
    fs::copy(busybox, bin.join("busybox"))
        .context("failed to copy /bin/busybox (is the Debian package busybox-static installed?)")?;
    let applets = cmd::output(Command::new(busybox).arg("--list"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))
                .with_context(|| format!("failed to link applet {applet}"))?;
        }
    }
    let image = format!("{}:latest", layout.display());
    cmd::output(
        Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout),
    )
    .context("umoci init failed (is the Debian package umoci installed?)")?;
    cmd::output(Command::new("umoci").args(["new", "--image", &image]))?;
    cmd::output(
        Command::new("umoci")
            .args(["insert", "--image", &image])
            .arg(&bin)
            .arg("/bin"),
    )?;
    cmd::output(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
    ]))?;
    cmd::output(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    )?;
    Ok(tarball)
}

/// A conflist for `ctr run --cni`: `bridge` (with `host-local` IPAM on `subnet`, the bridge the
/// gateway, a default route) then `loopback`, then the `extra` plugin objects (raw JSON) in
/// order. `cni_version` is e.g. `1.0.0` or `0.4.0`. host-local keeps its leases under the
/// harness's cache dir (its default /var/lib/cni/networks, mounted over).
pub fn bridge_conflist(
    cni_version: &str,
    network: &str,
    bridge: &str,
    subnet: &str,
    extra: &[&str],
) -> String {
    let mut plugins = vec![
        format!(
            r#"{{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
      "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{subnet}"}}]],
                "routes": [{{"dst": "0.0.0.0/0"}}]}}}}"#
        ),
        r#"{"type": "loopback"}"#.to_owned(),
    ];
    plugins.extend(extra.iter().map(|p| (*p).to_owned()));
    format!(
        "{{\n  \"cniVersion\": \"{cni_version}\",\n  \"name\": \"{network}\",\n  \"plugins\": [\n    {}\n  ]\n}}\n",
        plugins.join(",\n    ")
    )
}

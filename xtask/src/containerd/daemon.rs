//! The private containerd daemon: start, config, readiness, the `ctr` client, image import,
//! task and container listing, and its removal on drop.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::cleanup::{cgroup_mounts, kill_shims, quiet, remove_cgroups, unmount_below};
use super::cni::bridge_conflist;
use super::run::ContainerSpec;
use super::{unique_dir, DEBIAN_CNI_BIN, NAMESPACE, REFERENCE_PLUGINS, START_TIMEOUT};
use crate::cmd;

/// A containerd daemon private to one test.
pub struct Containerd {
    pub(super) dir: PathBuf,
    socket: PathBuf,
    daemon: Option<Child>,
    /// Host bridges the CNI chain made; deleted on drop.
    pub(super) bridges: Mutex<Vec<String>>,
    /// Network reservations ([`Containerd::reserve_network`]); released on drop.
    pub(super) reservations: Mutex<Vec<PathBuf>>,
    /// The cgroup (as runc names it, `/<name>`) every container's cgroup is made under.
    pub(super) cgroup_parent: String,
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
            reservations: Mutex::new(Vec::new()),
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
            options: Vec::new(),
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
    pub(super) fn remove(&self, id: &str) {
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
        // After the bridges: the next holder of a subnet finds its bridge name free.
        if let Ok(reservations) = self.reservations.lock() {
            for file in reservations.iter() {
                let _ = fs::remove_file(file);
            }
        }
        unmount_below(&self.dir);
        remove_cgroups(&self.cgroup_parent);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

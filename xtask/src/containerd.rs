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
//!
//! Split by concern: `daemon` (the daemon, its `ctr` client, images and tasks), `cleanup`
//! (what a dropped harness removes from the host), `run` (one `ctr run` container), `image`
//! (the busybox test image) and `cni` (network configs).

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};

mod cleanup;
mod cni;
mod daemon;
mod image;
mod run;

pub use cni::{bridge_conflist, ReservedNetwork};
pub use daemon::Containerd;
pub use image::busybox_image;
pub use run::{Container, ContainerSpec, Exit};

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

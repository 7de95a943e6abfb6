//! A local "world" of nodes and pods built from network namespaces and cgroups, for integration tests
//! and `ambit demo`.
//!
//! Layout of one world (prefix `ambt-<pid>-<seq>`):
//! - every node is a netns `<prefix>-<node>` with bridge `br0` (10.244.<k>.1/24, fd00:244:<k>::1/64),
//!   node address 172.30.0.<k> / fd00:30::<k>, and a veth `node<j>` to every other node;
//! - every pod is a netns `<prefix>-<pod>` with `eth0` on its node's bridge;
//! - cgroups `<cgroup2 root>/<prefix>-<node>/<pod>`; agent pins under `/sys/fs/bpf/<prefix>`;
//! - `/run/ambit-harness/<prefix>/` records the owner and spawned processes for the sweeper.
//!
//! Nothing is routed to the root netns, so test traffic never leaves the machine. Everything carrying
//! the prefix is removed on drop, and leftovers of crashed runs are swept by the next world.

pub mod agent;
pub mod apps;
mod cgroup;
mod cmd;
pub mod fake_kube;
mod netns;
pub mod pki;
mod process;
mod sweep;
mod topology;
mod world;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use agent::{ClusterYaml, LocalAgent, SvcPort};
pub use cgroup::cgroup_root;
pub use fake_kube::{FakeKube, FakeKubeError};
pub use netns::{netns_inode, run_async_in_netns, run_in_netns, NETNS_DIR};
pub use process::Process;
pub use sweep::{leftovers, sweep, STATE_DIR};
pub use world::{AsNodeName, Node, Pod, PodBuilder, World};

/// Every name this harness creates starts with this, then `-<pid>-<seq>`.
pub const PREFIX: &str = "ambt";

/// Why building or tearing down a world failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setns(CLONE_NEWNET) into {}", path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("build a tokio runtime in netns {}", path.display())]
    Runtime {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mount bpffs at {}", path.display())]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")]
    NoCgroup2,
    #[error("invalid name {name:?}: use 1-40 characters of [a-z0-9.-_]")]
    InvalidName { name: String },
    #[error("name {name:?} is already used by a node or pod in world {prefix}")]
    NameTaken { prefix: String, name: String },
    #[error("world {prefix} has no node {name:?}")]
    UnknownNode { prefix: String, name: String },
    #[error("world {prefix} has no node yet: create one with world.node(..) before pods")]
    NoNode { prefix: String },
    #[error("world {prefix} is limited to {max} nodes")]
    TooManyNodes { prefix: String, max: usize },
    #[error("node {node} has no free pod address left")]
    AddressesExhausted { node: String },
    #[error("address {addr} is already used by pod {pod}")]
    AddressInUse { addr: std::net::IpAddr, pod: String },
    #[error("world {prefix} was already torn down")]
    TornDown { prefix: String },
}

//! `World`, its `Node`s and `Pod`s, and the processes started in them; teardown on drop.

use std::collections::BTreeMap;
use std::error::Error;
use std::ffi::OsStr;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::process::{lock, Process};
use super::sweep::{self, BPFFS};
use super::{cgroup, cmd, netns, topology, HarnessError, PREFIX};

/// Node indexes k go into 10.244.k.0/24 and into interface names.
const MAX_NODES: usize = 250;
/// Pod hosts 10.244.k.10 ..= 10.244.k.254.
const FIRST_POD_HOST: u8 = 10;

/// A set of nodes and pods that exists until the `World` is dropped (also while unwinding from a
/// panic), named `ambt-<pid>-<seq>-*` so a later run can sweep it if this process dies first.
pub struct World {
    shared: Arc<Shared>,
}

struct Shared {
    prefix: String,
    test_name: String,
    state_dir: PathBuf,
    cgroup_root: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    nodes: Vec<Arc<NodeInfo>>,
    pods: Vec<Arc<PodInfo>>,
    processes: Vec<Process>,
    next_veth: u32,
    bpffs_dir: Option<PathBuf>,
    torn_down: bool,
}

#[derive(Debug)]
struct NodeInfo {
    name: String,
    index: u8,
    netns: String,
    netns_path: PathBuf,
    cgroup: PathBuf,
}

#[derive(Debug)]
struct PodInfo {
    name: String,
    /// A random UUID, as the API server gives one; the pod's cgroup is `pod<uid>` under its
    /// node's, as the kubelet names it, so `/proc` discovery by UID finds the pod's processes.
    uid: String,
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    node: Arc<NodeInfo>,
    netns: String,
    netns_path: PathBuf,
    cgroup: PathBuf,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
}

/// A node: its own netns with bridge `br0`, routed to every other node of the world.
#[derive(Clone)]
pub struct Node {
    info: Arc<NodeInfo>,
    shared: Arc<Shared>,
}

/// A pod: its own netns with `eth0` on its node's bridge, and a cgroup under its node's.
#[derive(Clone)]
pub struct Pod {
    info: Arc<PodInfo>,
    shared: Arc<Shared>,
}

/// Builds a pod: `world.pod("client").node(&n1).spawn()`.
#[must_use = "call .spawn() to create the pod"]
pub struct PodBuilder<'w> {
    world: &'w World,
    name: String,
    node: Option<String>,
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    ip4: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    uid: Option<String>,
}

/// What `PodBuilder::node` accepts: a `Node` or a node name.
pub trait AsNodeName {
    fn node_name(&self) -> &str;
}
impl AsNodeName for Node {
    fn node_name(&self) -> &str {
        &self.info.name
    }
}
impl AsNodeName for str {
    fn node_name(&self) -> &str {
        self
    }
}
impl AsNodeName for String {
    fn node_name(&self) -> &str {
        self
    }
}
impl<T: AsNodeName + ?Sized> AsNodeName for &T {
    fn node_name(&self) -> &str {
        (**self).node_name()
    }
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("World")
            .field("prefix", &self.shared.prefix)
            .field("test_name", &self.shared.test_name)
            .finish_non_exhaustive()
    }
}
impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.info.fmt(f)
    }
}
impl fmt::Debug for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.info.fmt(f)
    }
}

/// Panics with the error and its whole source chain (tests want the message, not a Result).
fn or_panic<T>(r: Result<T, HarnessError>) -> T {
    r.unwrap_or_else(|e| {
        let mut msg = format!("ambit harness: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        panic!("{msg}")
    })
}

fn validate(name: &str) -> Result<(), HarnessError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(HarnessError::InvalidName { name: name.into() })
    }
}

impl World {
    /// Creates an empty world; sweeps leftovers of dead processes first (once per process).
    /// Panics if the host lacks cgroup v2 or /run is not writable.
    pub fn new(test_name: &str) -> World {
        or_panic(World::try_new(test_name))
    }

    pub fn try_new(test_name: &str) -> Result<World, HarnessError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        sweep::sweep_once();
        let cgroup_root = cgroup::cgroup_root()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}-{}-{seq}", std::process::id());
        let test_name = test_name.replace(['\n', '\r'], " ");
        let state_dir = sweep::record_owner(&prefix, &test_name)?;
        tracing::debug!(%prefix, %test_name, "harness: new world");
        Ok(World {
            shared: Arc::new(Shared {
                prefix,
                test_name,
                state_dir,
                cgroup_root,
                inner: Mutex::new(Inner::default()),
            }),
        })
    }

    /// `ambt-<pid>-<seq>`: every netns, cgroup, bpffs and state dir of this world starts with it.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// A directory of this world's own (under the harness state dir), removed at teardown.
    pub fn state_dir(&self) -> PathBuf {
        let dir = self.shared.state_dir.clone();
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    pub fn test_name(&self) -> &str {
        &self.shared.test_name
    }

    /// The node named `name`, created (and routed to all other nodes) if it does not exist yet.
    pub fn node(&self, name: &str) -> Node {
        or_panic(self.try_node(name))
    }

    pub fn try_node(&self, name: &str) -> Result<Node, HarnessError> {
        let mut inner = self.shared.lock_live()?;
        let info = self.shared.node_info(&mut inner, name)?;
        Ok(Node {
            info,
            shared: self.shared.clone(),
        })
    }

    /// Starts building pod `name`. Without `.node(..)` it goes to the first node ("n1" is created
    /// if the world has none); a node named in `.node("n2")` is created if needed.
    pub fn pod(&self, name: &str) -> PodBuilder<'_> {
        PodBuilder {
            world: self,
            name: name.into(),
            node: None,
            namespace: "default".into(),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            ip4: None,
            ip6: None,
            uid: None,
        }
    }

    pub fn nodes(&self) -> Vec<Node> {
        let inner = lock(&self.shared.inner);
        let nodes = inner.nodes.iter().map(|info| Node {
            info: info.clone(),
            shared: self.shared.clone(),
        });
        nodes.collect()
    }

    pub fn pods(&self) -> Vec<Pod> {
        let inner = lock(&self.shared.inner);
        let pods = inner.pods.iter().map(|info| Pod {
            info: info.clone(),
            shared: self.shared.clone(),
        });
        pods.collect()
    }

    /// The cgroup v2 mount this world's cgroups live under.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// `/sys/fs/bpf/<prefix>`, for the agents' pins; created (and bpffs mounted) on first use,
    /// removed with everything in it on teardown.
    pub fn bpffs_dir(&self) -> PathBuf {
        or_panic(self.try_bpffs_dir())
    }

    pub fn try_bpffs_dir(&self) -> Result<PathBuf, HarnessError> {
        let mut inner = self.shared.lock_live()?;
        if let Some(dir) = &inner.bpffs_dir {
            return Ok(dir.clone());
        }
        mount_bpffs()?;
        let dir = Path::new(BPFFS).join(&self.shared.prefix);
        std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
            op: "create bpffs dir",
            path: dir.clone(),
            source,
        })?;
        inner.bpffs_dir = Some(dir.clone());
        Ok(dir)
    }

    /// Spawns `cmd` (typically from `pod.command(..)`) and tracks it for teardown.
    pub fn spawn(&self, cmd: &mut Command) -> Process {
        or_panic(self.shared.spawn(cmd))
    }

    pub fn try_spawn(&self, cmd: &mut Command) -> Result<Process, HarnessError> {
        self.shared.spawn(cmd)
    }

    /// Tears the world down now; the same happens on drop.
    pub fn teardown(self) {
        drop(self)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shared.teardown();
    }
}

impl Shared {
    fn lock_live(&self) -> Result<MutexGuard<'_, Inner>, HarnessError> {
        let inner = lock(&self.inner);
        if inner.torn_down {
            return Err(HarnessError::TornDown {
                prefix: self.prefix.clone(),
            });
        }
        Ok(inner)
    }

    fn name_taken(&self, inner: &Inner, name: &str) -> Result<(), HarnessError> {
        let taken =
            inner.nodes.iter().any(|n| n.name == name) || inner.pods.iter().any(|p| p.name == name);
        if taken {
            return Err(HarnessError::NameTaken {
                prefix: self.prefix.clone(),
                name: name.into(),
            });
        }
        Ok(())
    }

    /// The existing node `name`, or a new one linked to all others.
    fn node_info(&self, inner: &mut Inner, name: &str) -> Result<Arc<NodeInfo>, HarnessError> {
        if let Some(node) = inner.nodes.iter().find(|n| n.name == name) {
            return Ok(node.clone());
        }
        validate(name)?;
        self.name_taken(inner, name)?;
        if inner.nodes.len() >= MAX_NODES {
            return Err(HarnessError::TooManyNodes {
                prefix: self.prefix.clone(),
                max: MAX_NODES,
            });
        }
        let index = inner.nodes.len() as u8 + 1;
        let ns = format!("{}-{name}", self.prefix);
        let netns_path = netns::add(&ns)?;
        topology::setup_node(&ns, &netns_path, index)?;
        let cgroup = self.cgroup_root.join(&ns);
        cgroup::create(&cgroup)?;
        for other in &inner.nodes {
            topology::link_nodes((&ns, index), (&other.netns, other.index))?;
        }
        // Off-subnet pods of existing nodes need host routes on the new node too.
        for pod in &inner.pods {
            for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
                if !topology::on_subnet(pod.node.index, ip) {
                    topology::route_pod_via(&ns, ip, pod.node.index)?;
                }
            }
        }
        let info = Arc::new(NodeInfo {
            name: name.into(),
            index,
            netns: ns,
            netns_path,
            cgroup,
        });
        inner.nodes.push(info.clone());
        Ok(info)
    }

    fn spawn_pod(&self, b: PodBuilder<'_>) -> Result<Pod, HarnessError> {
        let mut inner = self.lock_live()?;
        validate(&b.name)?;
        self.name_taken(&inner, &b.name)?;
        let node = match &b.node {
            Some(name) => self.node_info(&mut inner, name)?,
            None => match inner.nodes.first() {
                Some(first) => first.clone(),
                None => self.node_info(&mut inner, "n1")?,
            },
        };
        let k = node.index;
        let used = |ip: IpAddr| {
            let pod = inner
                .pods
                .iter()
                .find(|p| IpAddr::V4(p.ip4) == ip || IpAddr::V6(p.ip6) == ip);
            pod.map(|p| p.name.clone())
        };
        for ip in [b.ip4.map(IpAddr::V4), b.ip6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
        {
            if let Some(pod) = used(ip) {
                return Err(HarnessError::AddressInUse { addr: ip, pod });
            }
        }
        let host = (FIRST_POD_HOST..=254)
            .find(|&h| {
                used(topology::pod_ip4(k, h).into()).is_none()
                    && used(topology::pod_ip6(k, h).into()).is_none()
                    && b.ip4 != Some(topology::pod_ip4(k, h))
                    && b.ip6 != Some(topology::pod_ip6(k, h))
            })
            .ok_or_else(|| HarnessError::AddressesExhausted {
                node: node.name.clone(),
            })?;
        let ip4 = b.ip4.unwrap_or(topology::pod_ip4(k, host));
        let ip6 = b.ip6.unwrap_or(topology::pod_ip6(k, host));

        let ns = format!("{}-{}", self.prefix, b.name);
        let netns_path = netns::add(&ns)?;
        let veth = format!("pod{}", inner.next_veth);
        inner.next_veth += 1;
        topology::setup_pod((&ns, &netns_path), (&node.netns, k), &veth, ip4, ip6)?;
        for ip in [IpAddr::V4(ip4), IpAddr::V6(ip6)] {
            if !topology::on_subnet(k, ip) {
                for other in inner.nodes.iter().filter(|n| n.index != k) {
                    topology::route_pod_via(&other.netns, ip, k)?;
                }
            }
        }
        let uid = b.uid.unwrap_or_else(random_uid);
        let cgroup = node.cgroup.join(format!("pod{uid}"));
        cgroup::create(&cgroup)?;
        let info = Arc::new(PodInfo {
            uid,
            name: b.name,
            namespace: b.namespace,
            service_account: b.service_account,
            labels: b.labels,
            node,
            netns: ns,
            netns_path,
            cgroup,
            ip4,
            ip6,
        });
        inner.pods.push(info.clone());
        Ok(Pod {
            info,
            shared: b.world.shared.clone(),
        })
    }

    fn spawn(&self, cmd: &mut Command) -> Result<Process, HarnessError> {
        // Under the lock, so that teardown cannot miss a process spawned concurrently.
        let mut inner = self.lock_live()?;
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            command: cmd::show(cmd),
            source,
        })?;
        if let Err(e) = sweep::record_process(&self.state_dir, child.id()) {
            eprintln!("ambit harness: {}: {e}", self.prefix);
        }
        let process = Process::new(child);
        inner.processes.push(process.clone());
        Ok(process)
    }

    /// Kills tracked processes, then removes everything named after the prefix. Never panics.
    fn teardown(&self) {
        let processes = {
            let mut inner = lock(&self.inner);
            if inner.torn_down {
                return;
            }
            inner.torn_down = true;
            std::mem::take(&mut inner.processes)
        };
        for process in processes {
            if let Err(e) = process.kill_and_reap() {
                eprintln!("ambit harness: {}: kill {}: {e}", self.prefix, process.id());
            }
        }
        for e in sweep::remove_world(&self.prefix) {
            eprintln!("ambit harness: teardown {}: {e}", self.prefix);
        }
        tracing::debug!(prefix = %self.prefix, "harness: world torn down");
    }
}

/// A version-4 UUID, as Kubernetes gives pods.
fn random_uid() -> String {
    let hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(fastrand::u32(..16), 16).unwrap_or('0'))
            .collect()
    };
    format!(
        "{}-{}-4{}-{}{}-{}",
        hex(8),
        hex(4),
        hex(3),
        ['8', '9', 'a', 'b'][fastrand::usize(..4)],
        hex(3),
        hex(12)
    )
}

/// Mounts bpffs at /sys/fs/bpf unless it already is; worlds in this process take turns.
fn mount_bpffs() -> Result<(), HarnessError> {
    static MOUNT: Mutex<()> = Mutex::new(());
    let _turn = lock(&MOUNT);
    crate::ebpf::mount_bpffs(Path::new(BPFFS))
        .map(|_| ())
        .map_err(|e| HarnessError::MountBpffs {
            path: BPFFS.into(),
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })
}

impl<'w> PodBuilder<'w> {
    /// The node to run on: a `Node` or a node name (created if it does not exist).
    pub fn node(mut self, node: impl AsNodeName) -> Self {
        self.node = Some(node.node_name().to_owned());
        self
    }

    /// The Kubernetes namespace the pod claims to be in (default "default").
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The service account (default "default").
    pub fn sa(mut self, service_account: &str) -> Self {
        self.service_account = service_account.into();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The pod's UID, e.g. the one a real API server gave its Pod object (default: a random one).
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.into());
        self
    }

    /// A fixed IPv4 address. Outside the node's 10.244.k.0/24 it gets host routes on all nodes.
    pub fn ip4(mut self, ip: impl Into<Ipv4Addr>) -> Self {
        self.ip4 = Some(ip.into());
        self
    }

    /// A fixed IPv6 address. Outside the node's fd00:244:k::/64 it gets host routes on all nodes.
    pub fn ip6(mut self, ip: impl Into<Ipv6Addr>) -> Self {
        self.ip6 = Some(ip.into());
        self
    }

    pub fn spawn(self) -> Pod {
        or_panic(self.try_spawn())
    }

    pub fn try_spawn(self) -> Result<Pod, HarnessError> {
        let shared = self.world.shared.clone();
        shared.spawn_pod(self)
    }
}

/// Runs `f` in `path`, panicking if the thread cannot join the netns.
fn run_in<F: FnOnce() -> T + Send, T: Send>(path: &Path, f: F) -> T {
    or_panic(netns::run_in_netns(path, f))
}

fn run_async_in<F, Fut, T>(path: &Path, f: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    or_panic(netns::run_async_in_netns(path, f))
}

impl Node {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// k: 1 for the first node of the world.
    pub fn index(&self) -> u8 {
        self.info.index
    }
    pub fn netns_name(&self) -> &str {
        &self.info.netns
    }
    /// `/var/run/netns/<prefix>-<node>`.
    pub fn netns_path(&self) -> &Path {
        &self.info.netns_path
    }
    /// `<cgroup root>/<prefix>-<node>`; pod cgroups are its children.
    pub fn cgroup(&self) -> &Path {
        &self.info.cgroup
    }
    /// The node address (172.30.0.k), reachable from every node and pod of the world.
    pub fn ip4(&self) -> Ipv4Addr {
        topology::node_ip4(self.info.index)
    }
    /// The node address (fd00:30::k).
    pub fn ip6(&self) -> Ipv6Addr {
        topology::node_ip6(self.info.index)
    }
    /// The bridge address, the pods' default gateway (10.244.k.1).
    pub fn gateway4(&self) -> Ipv4Addr {
        topology::pod_ip4(self.info.index, 1)
    }
    /// The bridge address, the pods' default gateway (fd00:244:k::1).
    pub fn gateway6(&self) -> Ipv6Addr {
        topology::pod_ip6(self.info.index, 1)
    }
    /// (10.244.k.0, 24)
    pub fn pod_cidr4(&self) -> (Ipv4Addr, u8) {
        topology::pod_cidr4(self.info.index)
    }
    /// (fd00:244:k::, 64)
    pub fn pod_cidr6(&self) -> (Ipv6Addr, u8) {
        topology::pod_cidr6(self.info.index)
    }
    /// Runs `f` on a fresh thread inside the node netns (see [`super::run_in_netns`]).
    pub fn run<F: FnOnce() -> T + Send, T: Send>(&self, f: F) -> T {
        run_in(&self.info.netns_path, f)
    }
    /// Runs the future on a current-thread tokio runtime on a fresh thread inside the node netns.
    pub fn run_async<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        run_async_in(&self.info.netns_path, f)
    }
    /// A command that runs `program` in the node cgroup and netns; add args, then `spawn` it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        cgroup::command(&self.info.cgroup, &self.info.netns_path, program)
    }
    /// Spawns `cmd` and tracks it for teardown (like [`World::spawn`]).
    pub fn spawn(&self, cmd: &mut Command) -> Process {
        or_panic(self.shared.spawn(cmd))
    }
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.info.name
    }
    /// The pod's UID (`metadata.uid`); its cgroup is `<node cgroup>/pod<uid>`.
    pub fn uid(&self) -> &str {
        &self.info.uid
    }
    /// Starts the pod's sandbox: a process in its cgroup and netns that lives until it is killed
    /// (or the world ends), as the pause container does. `/proc` discovery (`--kube` mode) finds
    /// the pod's netns through it.
    pub fn start_sandbox(&self) -> Process {
        let mut cmd = self.command("sleep");
        cmd.arg("infinity");
        self.spawn(&mut cmd)
    }
    /// The Kubernetes namespace (default "default").
    pub fn namespace(&self) -> &str {
        &self.info.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.info.service_account
    }
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.info.labels
    }
    pub fn node_name(&self) -> &str {
        &self.info.node.name
    }
    pub fn node(&self) -> Node {
        Node {
            info: self.info.node.clone(),
            shared: self.shared.clone(),
        }
    }
    pub fn netns_name(&self) -> &str {
        &self.info.netns
    }
    /// `/var/run/netns/<prefix>-<pod>`.
    pub fn netns_path(&self) -> &Path {
        &self.info.netns_path
    }
    /// `<node cgroup>/pod<uid>`.
    pub fn cgroup(&self) -> &Path {
        &self.info.cgroup
    }
    /// The cgroup as `/proc/<pid>/cgroup` shows it, e.g. `/ambt-1-0-n1/client`.
    pub fn cgroup_proc_path(&self) -> String {
        cgroup::proc_path(&self.info.cgroup).unwrap_or_default()
    }
    pub fn ip4(&self) -> Ipv4Addr {
        self.info.ip4
    }
    pub fn ip6(&self) -> Ipv6Addr {
        self.info.ip6
    }
    /// Runs `f` on a fresh thread inside the pod netns; sockets it creates stay in the pod netns.
    /// The thread stays in the test's cgroup: only `command` processes are in the pod cgroup.
    pub fn run<F: FnOnce() -> T + Send, T: Send>(&self, f: F) -> T {
        run_in(&self.info.netns_path, f)
    }
    /// Runs the future on a current-thread tokio runtime on a fresh thread inside the pod netns.
    pub fn run_async<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        run_async_in(&self.info.netns_path, f)
    }
    /// A command that runs `program` in the pod cgroup, then the pod netns; add args, then
    /// `spawn` it (with [`Pod::spawn`] to have it killed on teardown).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        cgroup::command(&self.info.cgroup, &self.info.netns_path, program)
    }
    /// Spawns `cmd` and tracks it for teardown (like [`World::spawn`]).
    pub fn spawn(&self, cmd: &mut Command) -> Process {
        or_panic(self.shared.spawn(cmd))
    }
}

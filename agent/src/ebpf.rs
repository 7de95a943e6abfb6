//! Loader and map sync: loads the capture programs, attaches them, pins programs' links and maps
//! under bpffs so capture holds (fail closed) while the agent restarts, adopts what a previous agent
//! pinned instead of attaching twice, keeps the maps in step with enrolment, and uninstalls.

mod attach;
mod links;
mod sys;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use ambit_common::{
    config, enrolled, excluded_in_ports, excluded_out_ports, exempt_sources, fast_path,
    inbound_listeners, orig_dst, orig_dst_sk, pod_ips, stats, IpKey, SockAddrKey,
};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, SockHash};
use aya::programs::links::FdLink;
use aya::programs::{CgroupSockAddr, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use thiserror::Error;

pub use attach::{attach_point, KUBEPODS};
use links::{adopt_link, attach_to_cgroup, list_pins, pin_link, AttachPoint};
pub use sys::netns_cookie;

/// The capture object, built by agent/build.rs from ebpf/ and embedded in the binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-ebpf"));

/// Programs attached to the cgroup hierarchy, by function name in ebpf/src/main.rs.
/// A restarted agent adopts the links pinned under these names and attaches the ones it lacks, so
/// a program added here reaches nodes upgraded from a version without it.
const CGROUP_SOCK_ADDR_PROGRAMS: [&str; 6] = [
    "ambit_conn4",
    "ambit_conn6",
    "ambit_peer4",
    "ambit_peer6",
    "ambit_sockname4",
    "ambit_sockname6",
];
const SOCKOPS_PROGRAM: &str = "ambit_sockops";
const SK_LOOKUP_PROGRAM: &str = "ambit_sk_lookup";
const SK_MSG_PROGRAM: &str = "ambit_sk_msg";
const BPFFS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum EbpfError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the capture object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "program {name}: attached without a BPF link, which cannot be pinned (kernel 5.7+ needed)"
    )]
    LegacyAttach { name: &'static str },
    #[error("program {name} is missing from the capture object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing or of the wrong type: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("link pin {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map {map} update for {what}: {source}")]
    MapUpdate {
        map: &'static str,
        what: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

impl EbpfError {
    fn program(name: &'static str, source: aya::programs::ProgramError) -> Self {
        EbpfError::Program {
            name,
            source: Box::new(source),
        }
    }
    fn map(name: &'static str, source: aya::maps::MapError) -> Self {
        EbpfError::Map {
            name,
            source: Box::new(source),
        }
    }
}

/// Where to pin and where to attach.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// bpffs directory owned by this agent, e.g. `/sys/fs/bpf/ambit`.
    pub bpffs_root: PathBuf,
    /// cgroup v2 directory the cgroup programs attach to (the root, or the pods' parent).
    pub cgroup: PathBuf,
    /// sk_msg fast path on the app ↔ proxy loopback hop.
    pub fast_path: bool,
}

impl CaptureConfig {
    /// The ABI-versioned pin directory.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs_root.join(ambit_common::PIN_ABI)
    }
}

/// An IP address in the maps' 16-byte form.
pub fn ip_key(ip: IpAddr) -> IpKey {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut addr = [0u32; 4];
    for (i, w) in addr.iter_mut().enumerate() {
        *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    IpKey { addr }
}

/// The map form back to an address; IPv4-mapped becomes IPv4.
pub fn ip_from_key(key: &IpKey) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in key.addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn sock_key(addr: SocketAddr) -> SockAddrKey {
    SockAddrKey {
        ip: ip_key(addr.ip()),
        port: addr.port() as u32,
    }
}

/// What the maps need to know about one enrolled pod.
#[derive(Debug, Clone)]
pub struct PodCapture {
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub excluded_outbound_ports: Vec<u16>,
    pub excluded_inbound_ports: Vec<u16>,
}

/// Original-destination lookups for the accept path. Cheap to share: one fd, `&self` only.
#[derive(Debug)]
pub struct OrigDstTable {
    map: MapData,
}

impl OrigDstTable {
    /// Takes the original destination of a captured connection accepted on a pod's outbound
    /// listener: `client` is the accepted peer, `listener` the accepted socket's local address.
    pub fn take(
        &self,
        netns_cookie: u64,
        client: SocketAddr,
        listener: SocketAddr,
    ) -> io::Result<Option<SocketAddr>> {
        let key = orig_dst::ConnKey {
            netns_cookie,
            src: sock_key(client),
            dst: sock_key(listener),
        };
        let value: Option<SockAddrKey> = sys::map_lookup_and_delete(self.map.fd().as_fd(), &key)?;
        Ok(value.map(|v| SocketAddr::new(ip_from_key(&v.ip), v.port as u16)))
    }
}

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KernelStats {
    pub out_captured: u64,
    pub out_skipped_mark: u64,
    pub in_steered: u64,
    pub in_dropped_no_listener: u64,
    pub orig_dst_recorded: u64,
    pub orig_dst_missing: u64,
    pub fast_path_sockets: u64,
    pub fast_path_redirects: u64,
    /// Connection directions that moved to loopback TCP: they reached the redirect limit
    /// (`fast_path_sent::LIMIT`), or their peer was missing.
    pub fast_path_to_tcp: u64,
}

/// The loaded, attached capture programs and their maps.
pub struct Capture {
    bpf: Ebpf,
    pin_dir: PathBuf,
    enrolled: BpfHashMap<MapData, u64, enrolled::PodNetns>,
    pod_ips: BpfHashMap<MapData, IpKey, pod_ips::PodIp>,
    listeners: SockHash<MapData, IpKey>,
    excl_out: BpfHashMap<MapData, excluded_out_ports::Key, u32>,
    excl_in: BpfHashMap<MapData, excluded_in_ports::Key, u32>,
    exempt: BpfHashMap<MapData, IpKey, u32>,
    orig_dst: BpfHashMap<MapData, orig_dst::ConnKey, SockAddrKey>,
    stats: PerCpuArray<MapData, u64>,
    fast_path: SockHash<MapData, orig_dst::ConnKey>,
    /// Pod IPs each netns cookie put into POD_IPS, so unenrolment removes exactly those.
    pods: BTreeMap<u64, PodCapture>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn ensure_bpffs(root: &Path) -> Result<(), EbpfError> {
    let err = |source| EbpfError::Bpffs {
        path: root.to_path_buf(),
        source,
    };
    // The bpffs mount is usually /sys/fs/bpf; mount it if the root's parent chain has none.
    let mount_point = Path::new("/sys/fs/bpf");
    if root.starts_with(mount_point) && !is_bpffs(mount_point) {
        // A mount made inside a container's mount namespace dies with the container, and the pins
        // with it: a restart would find nothing to adopt and capture would be gone (fail open).
        if !same_mount_namespace_as_init() {
            return Err(err(io::Error::other(
                "not a bpffs mount, and this process is in its own mount namespace, where a mount \
                 would die with it: mount the host's bpffs first (`ambit mount-bpffs`, the \
                 DaemonSet's init container)",
            )));
        }
        mount_bpffs(mount_point).map_err(err)?;
    }
    std::fs::create_dir_all(root).map_err(err)?;
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPFFS_MAGIC)
}

/// Whether this process shares the mount namespace of pid 1 (the host's init, with hostPID).
fn same_mount_namespace_as_init() -> bool {
    let ns = |p: &str| std::fs::read_link(p).ok();
    match (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt")) {
        (Some(a), Some(b)) => a == b,
        // Unknown: assume the host (a bare agent run by hand); the mount is then the host's.
        _ => true,
    }
}

/// Mounts bpffs at `path` unless it already is one; true if it mounted.
pub fn mount_bpffs(path: &Path) -> io::Result<bool> {
    if is_bpffs(path) {
        return Ok(false);
    }
    std::fs::create_dir_all(path)?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)?;
    Ok(true)
}

impl Capture {
    /// Loads the programs, reusing pinned maps, and attaches (or adopts) the cgroup links.
    pub fn install(cfg: &CaptureConfig) -> Result<Self, EbpfError> {
        ensure_bpffs(&cfg.bpffs_root)?;
        let pin_dir = cfg.pin_dir();
        for sub in ["maps", "links", "netns"] {
            let p = pin_dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|source| EbpfError::Bpffs { path: p, source })?;
        }
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir.join("maps"))
            .load(OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;
        // The loader's parse of the kernel's BTF is freed by now: give its pages back at once.
        if let Err(e) = sys::return_freed_pages() {
            tracing::warn!(error = %e, "could not return the eBPF loader's freed memory");
        }

        let cgroup = File::open(&cfg.cgroup).map_err(|source| EbpfError::Cgroup {
            path: cfg.cgroup.clone(),
            source,
        })?;
        // On cgroup v2 a cgroup's id is its directory's inode number (what `bpftool link` shows).
        let cgroup_id = cgroup
            .metadata()
            .map_err(|source| EbpfError::Cgroup {
                path: cfg.cgroup.clone(),
                source,
            })?
            .ino();
        let links = pin_dir.join("links");
        let at = AttachPoint {
            cgroup: &cgroup,
            id: cgroup_id,
            links: &links,
        };
        for name in CGROUP_SOCK_ADDR_PROGRAMS {
            attach_to_cgroup::<CgroupSockAddr>(&mut bpf, name, &at)?;
        }
        attach_to_cgroup::<SockOps>(&mut bpf, SOCKOPS_PROGRAM, &at)?;
        // The attached programs keep original destinations in socket storage (ORIG_DST_SK, which
        // the kernel frees with each socket): the cookie-keyed map an earlier version pinned is no
        // longer any program's, and goes with its pin.
        let legacy = pin_dir.join("maps").join(orig_dst_sk::LEGACY_COOKIE_MAP);
        match std::fs::remove_file(&legacy) {
            Ok(()) => {
                tracing::info!(pin = %legacy.display(), "removed an earlier version's map pin")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(EbpfError::Bpffs {
                    path: legacy,
                    source,
                })
            }
        }
        // Attached per pod netns (enrol) and to the fast-path map (below).
        program::<SkLookup>(&mut bpf, SK_LOOKUP_PROGRAM)?
            .load()
            .map_err(|e| EbpfError::program(SK_LOOKUP_PROGRAM, e))?;
        program::<SkMsg>(&mut bpf, SK_MSG_PROGRAM)?
            .load()
            .map_err(|e| EbpfError::program(SK_MSG_PROGRAM, e))?;

        macro_rules! take {
            ($name:expr) => {{
                let name: &'static str = $name;
                let map = bpf.take_map(name).ok_or(EbpfError::Map {
                    name,
                    source: Box::new(aya::maps::MapError::InvalidName {
                        name: name.to_string(),
                    }),
                })?;
                map.try_into().map_err(|e| EbpfError::map(name, e))?
            }};
        }
        let fast_path: SockHash<MapData, orig_dst::ConnKey> = take!(fast_path::MAP);
        // The verdict program belongs to the map (one slot): attaching replaces whatever a previous
        // agent attached, so there is nothing to adopt and nothing to duplicate.
        program::<SkMsg>(&mut bpf, SK_MSG_PROGRAM)?
            .attach(fast_path.fd())
            .map_err(|e| EbpfError::program(SK_MSG_PROGRAM, e))?;
        let mut cfg_map: Array<MapData, config::Config> = take!(config::MAP);
        let flags = if cfg.fast_path {
            config::FLAG_FAST_PATH
        } else {
            0
        };
        cfg_map
            .set(
                0,
                config::Config {
                    flags,
                    ..Default::default()
                },
                0,
            )
            .map_err(|e| EbpfError::MapUpdate {
                map: config::MAP,
                what: "flags".into(),
                source: Box::new(e),
            })?;
        Ok(Capture {
            enrolled: take!(enrolled::MAP),
            pod_ips: take!(pod_ips::MAP),
            listeners: take!(inbound_listeners::MAP),
            excl_out: take!(excluded_out_ports::MAP),
            excl_in: take!(excluded_in_ports::MAP),
            exempt: take!(exempt_sources::MAP),
            orig_dst: take!(orig_dst::MAP),
            stats: take!(stats::MAP),
            fast_path,
            bpf,
            pin_dir,
            pods: BTreeMap::new(),
        })
    }

    /// A second handle on the original-destination map for the accept path.
    pub fn orig_dst_table(&self) -> Result<OrigDstTable, EbpfError> {
        let path = self.pin_dir.join("maps").join(orig_dst::MAP);
        let map = MapData::from_pin(&path).map_err(|e| EbpfError::map(orig_dst::MAP, e))?;
        Ok(OrigDstTable { map })
    }

    /// Netns cookies a previous agent enrolled (adopted on start; reconciled away if stale).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Replaces the set of exempt inbound source addresses.
    pub fn set_exempt_sources(&mut self, ips: &[IpAddr]) -> Result<(), EbpfError> {
        let want: Vec<IpKey> = ips.iter().map(|ip| ip_key(*ip)).collect();
        let have: Vec<IpKey> = self.exempt.keys().filter_map(Result::ok).collect();
        for k in have.iter().filter(|k| !want.contains(k)) {
            let _ = self.exempt.remove(k);
        }
        for k in &want {
            self.exempt
                .insert(k, 1, 0)
                .map_err(|e| update_err(exempt_sources::MAP, ip_from_key(k), e))?;
        }
        Ok(())
    }

    /// Enrols a pod: its inbound listeners go into the SockHash, its IPs into POD_IPS, sk_lookup is
    /// attached to its netns, and finally outbound capture is switched on. Established connections
    /// are untouched: every hook acts only on new connects and SYNs.
    pub fn enrol(
        &mut self,
        pod: &PodCapture,
        netns: BorrowedFd<'_>,
        inbound_listeners: &[(IpAddr, BorrowedFd<'_>)],
    ) -> Result<(), EbpfError> {
        let cookie = pod.netns_cookie;
        // A re-enrolment with changed IPs must not leave the old ones behind.
        if let Some(old) = self.pods.get(&cookie).cloned() {
            self.remove_pod_entries(&old, Some(pod));
        }
        for (ip, fd) in inbound_listeners {
            self.listeners
                .insert(ip_key(*ip), fd.as_raw_fd(), 0)
                .map_err(|e| update_err(inbound_listeners::MAP, *ip, e))?;
        }
        for port in &pod.excluded_inbound_ports {
            for ip in &pod.ips {
                let key = excluded_in_ports::Key {
                    ip: ip_key(*ip),
                    port: *port as u32,
                };
                self.excl_in
                    .insert(key, 1, 0)
                    .map_err(|e| update_err(excluded_in_ports::MAP, *ip, e))?;
            }
        }
        for ip in &pod.ips {
            self.pod_ips
                .insert(ip_key(*ip), pod_ips::PodIp::default(), 0)
                .map_err(|e| update_err(pod_ips::MAP, *ip, e))?;
        }
        self.attach_sk_lookup(cookie, netns)?;
        for port in &pod.excluded_outbound_ports {
            let key = excluded_out_ports::Key {
                netns_cookie: cookie,
                port: *port as u32,
                reserved: 0,
            };
            self.excl_out
                .insert(key, 1, 0)
                .map_err(|e| EbpfError::MapUpdate {
                    map: excluded_out_ports::MAP,
                    what: format!("port {port}"),
                    source: Box::new(e),
                })?;
        }
        let mut value = enrolled::PodNetns::default();
        for ip in &pod.ips {
            match ip {
                IpAddr::V4(_) => {
                    value.flags |= enrolled::FLAG_HAS_IP4;
                    value.ip4 = ip_key(*ip);
                }
                IpAddr::V6(_) => {
                    value.flags |= enrolled::FLAG_HAS_IP6;
                    value.ip6 = ip_key(*ip);
                }
            }
        }
        self.enrolled
            .insert(cookie, value, 0)
            .map_err(|e| EbpfError::MapUpdate {
                map: enrolled::MAP,
                what: format!("netns {cookie}"),
                source: Box::new(e),
            })?;
        self.pods.insert(cookie, pod.clone());
        Ok(())
    }

    /// Unenrols a pod: outbound capture off first, then inbound steering, then every entry it owned.
    /// Works for a pod a previous agent enrolled too (only the cookie is needed then).
    pub fn unenrol(&mut self, cookie: u64) {
        let _ = self.enrolled.remove(&cookie);
        let pin = self.pin_dir.join("netns").join(cookie.to_string());
        let _ = std::fs::remove_file(&pin);
        let pod = self.pods.remove(&cookie);
        if let Some(pod) = pod {
            self.remove_pod_entries(&pod, None);
        }
        // Entries keyed by netns alone, whoever wrote them.
        let stale_out: Vec<_> = self
            .excl_out
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == cookie)
            .collect();
        for k in stale_out {
            let _ = self.excl_out.remove(&k);
        }
        let stale_conn: Vec<_> = self
            .orig_dst
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns_cookie == cookie)
            .collect();
        for k in stale_conn {
            let _ = self.orig_dst.remove(&k);
        }
    }

    /// Removes inbound entries for IPs of `old` that `new` (if any) does not keep.
    fn remove_pod_entries(&mut self, old: &PodCapture, new: Option<&PodCapture>) {
        for ip in &old.ips {
            if new.is_some_and(|n| n.ips.contains(ip)) {
                continue;
            }
            let key = ip_key(*ip);
            let _ = self.pod_ips.remove(&key);
            let _ = self.listeners.remove(&key);
            let stale: Vec<_> = self
                .excl_in
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.ip == key)
                .collect();
            for k in stale {
                let _ = self.excl_in.remove(&k);
            }
        }
    }

    fn attach_sk_lookup(&mut self, cookie: u64, netns: BorrowedFd<'_>) -> Result<(), EbpfError> {
        let name = SK_LOOKUP_PROGRAM;
        let prog: &mut SkLookup = program(&mut self.bpf, name)?;
        let pin = self.pin_dir.join("netns").join(cookie.to_string());
        let prog_fd = prog.fd().map_err(|e| EbpfError::program(name, e))?.as_fd();
        if adopt_link(&pin, prog_fd)? {
            return Ok(());
        }
        let id = prog
            .attach(netns)
            .map_err(|e| EbpfError::program(name, e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| EbpfError::program(name, e))?
            .into();
        pin_link(link, &pin)
    }

    /// Counters summed over CPUs.
    pub fn kernel_stats(&self) -> KernelStats {
        let get = |i: u32| -> u64 { self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        KernelStats {
            out_captured: get(stats::OUT_CAPTURED),
            out_skipped_mark: get(stats::OUT_SKIPPED_MARK),
            in_steered: get(stats::IN_STEERED),
            in_dropped_no_listener: get(stats::IN_DROPPED_NO_LISTENER),
            orig_dst_recorded: get(stats::ORIG_DST_RECORDED),
            orig_dst_missing: get(stats::ORIG_DST_MISSING),
            fast_path_sockets: get(stats::FAST_PATH_SOCKETS),
            fast_path_redirects: get(stats::FAST_PATH_REDIRECTS),
            fast_path_to_tcp: get(stats::FAST_PATH_TO_TCP),
        }
    }

    /// Map entry counts, for status and for tests asserting nothing stale remains.
    pub fn map_sizes(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        m.insert(enrolled::MAP, self.enrolled.keys().count());
        m.insert(pod_ips::MAP, self.pod_ips.keys().count());
        m.insert(inbound_listeners::MAP, self.listeners.keys().count());
        m.insert(excluded_out_ports::MAP, self.excl_out.keys().count());
        m.insert(excluded_in_ports::MAP, self.excl_in.keys().count());
        m.insert(exempt_sources::MAP, self.exempt.keys().count());
        m.insert(orig_dst::MAP, self.orig_dst.keys().count());
        // Live sockets of open captured connections; each leaves the map when its socket closes.
        // Unenrolment does not remove them: dropping a socket from a sockmap purges data the
        // fast path already queued for it.
        m.insert(fast_path::MAP, self.fast_path.keys().count());
        m
    }

    /// Netns link pins present (one per enrolled pod).
    pub fn netns_links(&self) -> Vec<u64> {
        list_pins(&self.pin_dir.join("netns"))
            .into_iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    /// Removes sk_lookup pins of netns no longer enrolled (pods that vanished while we were down).
    pub fn prune_netns_links(&mut self, keep: &[u64]) {
        for cookie in self.netns_links() {
            if !keep.contains(&cookie) {
                self.unenrol(cookie);
            }
        }
    }
}

/// A program of the capture object, as its concrete type.
fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram { name })?
        .try_into()
        .map_err(|e| EbpfError::program(name, e))
}

fn update_err(map: &'static str, ip: IpAddr, e: aya::maps::MapError) -> EbpfError {
    EbpfError::MapUpdate {
        map,
        what: ip.to_string(),
        source: Box::new(e),
    }
}

/// Removes everything a Capture pinned under `bpffs_root` (all ABI versions): links detach when their
/// last pin goes (the agent holds no link fds), maps are freed with their last user.
pub fn uninstall(bpffs_root: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(bpffs_root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_match_the_kernel_layout() {
        let k = ip_key("10.1.2.3".parse().unwrap());
        assert!(k.is_v4_mapped(), "IPv4 must be stored IPv4-mapped: {k:?}");
        assert_eq!(k, IpKey::from_v4_raw(u32::from_ne_bytes([10, 1, 2, 3])));
        assert!(ip_key("127.9.9.9".parse().unwrap()).is_loopback());
        assert!(ip_key("::1".parse().unwrap()).is_loopback());
        assert!(!ip_key("10.0.0.1".parse().unwrap()).is_loopback());
        assert!(!ip_key("fd00::1".parse().unwrap()).is_loopback());
        for s in ["10.1.2.3", "fd00:244:1::10", "::ffff:10.0.0.1", "::1"] {
            let ip: IpAddr = s.parse().unwrap();
            let back = ip_from_key(&ip_key(ip));
            assert_eq!(back, ip.to_canonical(), "{s} round-trips");
        }
    }
}

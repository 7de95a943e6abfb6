//! Plumbing of the proxied paths: the bench's relay stage for (b) and (c), the iptables REDIRECT
//! rules for (c), and ambit's own capture and outbound stage for (d).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use ambit::ebpf::{Capture, CaptureConfig, KernelStats};
use ambit::harness::Pod;
use ambit::node::netns::NetnsWorker;
use ambit::node::{Node, PodSpec};
use ambit::proxy::{copy, reset, Counters, ProxyInputs};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Where the bench relay sends a connection.
#[derive(Debug, Clone)]
pub enum Dst {
    /// (b): the server address of the current run (only the port changes between runs).
    Fixed(Arc<FixedDst>),
    /// (c): the address the client dialled before iptables REDIRECT, from conntrack.
    OriginalDst,
}

/// The server address (b) forwards to; the bench sets the port before each run.
#[derive(Debug)]
pub struct FixedDst {
    pub ip: Ipv4Addr,
    pub port: AtomicU16,
}

impl FixedDst {
    fn get(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port.load(Ordering::Relaxed)))
    }
}

/// Counters of one bench relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub accepted: AtomicU64,
    pub failed: AtomicU64,
}

/// A relay stage with ambit's outbound shape, minus the eBPF lookup: a listener in the client pod's
/// netns, upstream sockets made there by `NetnsWorker::upstream_socket` (SO_MARK 0x539), bytes moved
/// by `ambit::proxy::relay::relay`. The task is aborted on drop.
pub struct BenchRelay {
    pub stats: Arc<RelayStats>,
    task: JoinHandle<()>,
}

impl BenchRelay {
    /// Listens on 127.0.0.1:`port` in `pod`'s netns (made there by ambit's own listener code), and
    /// serves on `rt`.
    pub fn start(rt: &Handle, pod: &Pod, port: u16, dst: Dst) -> BenchRelay {
        let worker = Arc::new(
            NetnsWorker::spawn(pod.netns_path())
                .unwrap_or_else(|e| panic!("netns worker for {}: {e}", pod.name())),
        );
        let stats = Arc::new(RelayStats::default());
        let _guard = rt.enter();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let std_listener = worker
            .run(move || ambit::node::netns::listen(addr, false))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("relay listener {addr} in {}: {e}", pod.name()));
        let listener = TcpListener::from_std(std_listener)
            .unwrap_or_else(|e| panic!("relay listener {addr}: {e}"));
        let task = rt.spawn(serve(listener, worker, dst, stats.clone()));
        BenchRelay { stats, task }
    }
}

impl Drop for BenchRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, worker: Arc<NetnsWorker>, dst: Dst, stats: Arc<RelayStats>) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(handle(stream, worker.clone(), dst.clone(), stats.clone()));
    }
}

/// Mirrors `ambit::proxy::outbound::handle`, step for step, except where the destination comes from.
async fn handle(stream: TcpStream, worker: Arc<NetnsWorker>, dst: Dst, stats: Arc<RelayStats>) {
    let _ = stream.set_nodelay(true);
    let dst = match dst {
        Dst::Fixed(d) => d.get(),
        Dst::OriginalDst => match original_dst(&stream) {
            Ok(d) => d,
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return reset(stream);
            }
        },
    };
    let upstream = async {
        let socket = worker.upstream_socket(dst, None).await?;
        let s = socket.connect(dst).await?;
        s.set_nodelay(true)?;
        std::io::Result::Ok(s)
    };
    let upstream = match upstream.await {
        Ok(s) => s,
        Err(_) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return reset(stream);
        }
    };
    if copy::bidirectional(stream, upstream, None).await.reset() {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: the pre-REDIRECT destination, from the pod netns's
/// conntrack entry.
fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let sin = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
}

/// iptables NAT rules in one pod's netns; deleted on drop (the netns goes with the world anyway).
pub struct Iptables {
    pub bin: String,
    pub version: String,
    netns: PathBuf,
    rules: Vec<Vec<String>>,
}

/// The iptables front-ends tried, in order of preference.
const IPTABLES: [&str; 3] = ["iptables-nft", "iptables-legacy", "iptables"];

impl Iptables {
    /// The installed front-ends, or a message saying how to get one.
    pub fn available() -> Result<Vec<String>, String> {
        let found: Vec<String> = IPTABLES
            .iter()
            .filter(|bin| {
                Command::new(bin)
                    .arg("-V")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|s| s.to_string())
            .collect();
        if found.is_empty() {
            Err(
                "iptables is not installed (none of iptables-nft, iptables-legacy, iptables \
                 runs); install it with `apt-get install -y iptables`"
                    .into(),
            )
        } else {
            Ok(found)
        }
    }

    /// Appends `rules` (arguments after `-t nat -A`) with the first front-end that accepts all of
    /// them inside the netns at `netns`.
    pub fn install(netns: &Path, rules: &[Vec<String>]) -> Result<Iptables, String> {
        let mut errors = Vec::new();
        for bin in Self::available()? {
            let version = run(netns, &bin, &["-V".to_string()]).unwrap_or_default();
            let mut ipt = Iptables {
                bin: bin.clone(),
                version: version.trim().to_string(),
                netns: netns.to_path_buf(),
                rules: Vec::new(),
            };
            let mut ok = true;
            for rule in rules {
                let mut args = vec!["-w".into(), "-t".into(), "nat".into(), "-A".into()];
                args.extend(rule.iter().cloned());
                match run(netns, &bin, &args) {
                    Ok(_) => ipt.rules.push(rule.clone()),
                    Err(e) => {
                        errors.push(format!("{bin}: {e}"));
                        ok = false;
                        break;
                    }
                }
            }
            if ok {
                return Ok(ipt);
            }
            // Dropping `ipt` removes what was added; try the next front-end.
        }
        Err(format!(
            "no iptables front-end could install the rules: {}",
            errors.join("; ")
        ))
    }

    /// `iptables -t nat -S OUTPUT` in the netns, for the report.
    pub fn list(&self) -> String {
        run(
            &self.netns,
            &self.bin,
            &["-w", "-t", "nat", "-S", "OUTPUT"].map(String::from),
        )
        .unwrap_or_else(|e| e)
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        for rule in self.rules.iter().rev() {
            let mut args = vec!["-w".into(), "-t".into(), "nat".into(), "-D".into()];
            args.extend(rule.iter().cloned());
            if let Err(e) = run(&self.netns, &self.bin, &args) {
                eprintln!("warning: removing iptables rule {rule:?}: {e}");
            }
        }
    }
}

/// Runs `bin args` inside the netns with nsenter (which, unlike `ip netns exec`, leaves /sys alone).
fn run(netns: &Path, bin: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(bin)
        .args(args)
        .output()
        .map_err(|e| format!("running nsenter {bin}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{bin} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// ambit's capture and outbound stage for one pod, as `ambit::app` wires them, in this process
/// (its own bpffs root, so (d) and (e) each have their own maps and config).
/// On drop: unenrols, then removes the pins, so the links detach (also while unwinding).
pub struct Ambit {
    node: Option<Node>,
    pub pi: Arc<ProxyInputs>,
    bpffs_root: PathBuf,
    /// Where this capture's maps and links are pinned (ABI-versioned).
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
}

impl Ambit {
    /// `fast_path`: ambit's sk_msg redirect on the app <-> proxy loopback hop ((e)); off for (d).
    pub fn start(
        bpffs_root: PathBuf,
        cgroup: PathBuf,
        fast_path: bool,
        rt: &Handle,
        pod: &Pod,
    ) -> Ambit {
        let cfg = CaptureConfig {
            bpffs_root: bpffs_root.clone(),
            cgroup: cgroup.clone(),
            fast_path,
        };
        let capture = Capture::install(&cfg).unwrap_or_else(|e| panic!("capture install: {e}"));
        // Paths (d)/(e) go to a pod outside the mesh (empty state): plaintext, no certificate
        // is used, but every enrolled pod holds one.
        let ca_dir = std::env::temp_dir().join(format!("ambit-bench-ca-{}", std::process::id()));
        let ca = ambit::identity::LocalCa::load_or_create(&ca_dir, "cluster.local")
            .unwrap_or_else(|e| panic!("local CA: {e}"));
        let secrets = {
            let _rt = rt.enter();
            ambit::identity::SecretManager::new(
                Arc::new(ca),
                ambit::identity::CertConfig {
                    trust_domain: "cluster.local".into(),
                    ttl: std::time::Duration::from_secs(3600),
                },
            )
        };
        // A complete, empty view of the cluster: every kind listed, nothing in it, so the
        // destination is outside the mesh and goes in plaintext, as the agent would send it.
        let mut store = ambit::state::store::Store::new(ambit::config::DEFAULT_DOMAIN);
        store.apply(ambit::config::SourceEvent::Replace {
            kinds: ambit::config::Kind::ALL.to_vec(),
            objects: Vec::new(),
            rejected: Vec::new(),
            origins: Default::default(),
        });
        store.publish();
        let snapshot = ambit::snapshot::Snapshot::build(
            store.reader().load_full(),
            ambit::policy::DEFAULT_ROOT_NAMESPACE,
            pod.node_name(),
        );
        let pi = Arc::new(ProxyInputs {
            snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(snapshot)),
            orig_dst: Arc::new(
                capture
                    .orig_dst_table()
                    .unwrap_or_else(|e| panic!("orig dst table: {e}")),
            ),
            counters: Counters::default(),
            telemetry: Arc::new(ambit::proxy::metrics::Telemetry::new("cluster.local", None)),
            pool: ambit::proxy::hbone::Pool::new(Default::default(), secrets.clone()),
            secrets,
            upstreams: Default::default(),
            balancers: Default::default(),
            breakers: Default::default(),
            protocol_detection_timeout: std::time::Duration::from_secs(5),
            destination_l7: true,
            source_relay: true,
            splice: true,
            tracers: ambit::trace::Tracers::new(rt.clone(), Default::default()),
            connections: ambit::admin::connections::Connections::new(),
            // Stages started by hand register no pod: nothing is handed over in-process.
            local: ambit::proxy::local::LocalPods::new(false),
            own_ports: ambit::proxy::hbone::target::own_ports([]),
            drain: Default::default(),
        });
        // Built before enrolment, so a failing enrolment still unpins on drop.
        let mut ambit = Ambit {
            node: Some(Node::new(capture, pi.clone(), vec![rt.clone()])),
            pi,
            bpffs_root,
            pin_dir: cfg.pin_dir(),
            cgroup,
        };
        let spec = PodSpec {
            namespace: pod.namespace().to_string(),
            name: pod.name().to_string(),
            ips: vec![pod.ip4().into(), pod.ip6().into()],
            netns_path: pod.netns_path().to_path_buf(),
            excluded_outbound_ports: Vec::new(),
            excluded_inbound_ports: Vec::new(),
            service_account: "default".into(),
            baggage: String::new(),
            istio: Arc::new(ambit::state::IstioLabels::new(
                pod.name(),
                pod.namespace(),
                "default",
                &Default::default(),
            )),
        };
        if let Some(node) = ambit.node.as_mut() {
            node.enrol(spec)
                .unwrap_or_else(|e| panic!("enrol {}: {e}", pod.name()));
        }
        ambit
    }

    pub fn kernel_stats(&self) -> KernelStats {
        self.node
            .as_ref()
            .map(|n| n.capture().kernel_stats())
            .unwrap_or_default()
    }

    /// Entries per capture map: what a captured connection leaves behind.
    pub fn map_sizes(&self) -> std::collections::BTreeMap<&'static str, usize> {
        self.node
            .as_ref()
            .map(|n| n.capture().map_sizes())
            .unwrap_or_default()
    }

    pub fn outbound_accepted(&self) -> u64 {
        self.pi.counters.outbound_accepted.load(Ordering::Relaxed)
    }

    /// Connections the outbound stage could not finish cleanly.
    pub fn outbound_failed(&self) -> u64 {
        let m = &self.pi.counters;
        m.outbound_orig_dst_missing.load(Ordering::Relaxed)
            + m.outbound_connect_failed.load(Ordering::Relaxed)
            + m.outbound_incomplete_view.load(Ordering::Relaxed)
            + m.outbound_no_endpoints.load(Ordering::Relaxed)
            + m.relays_reset.load(Ordering::Relaxed)
    }
}

impl Drop for Ambit {
    fn drop(&mut self) {
        if let Some(mut node) = self.node.take() {
            node.unenrol_all();
        }
        if let Err(e) = ambit::ebpf::uninstall(&self.bpffs_root) {
            eprintln!(
                "warning: removing pins under {}: {e}",
                self.bpffs_root.display()
            );
        }
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("ambit-bench-ca-{}", std::process::id())),
        );
    }
}

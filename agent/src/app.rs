//! Wires the agent together: capture, the data-plane runtime serving the in-pod listeners, and the
//! control loop (config source → desired pods → enrolment, `control`) on a separate runtime, so
//! control work never stalls traffic.

mod control;
mod data_plane;
pub mod debug;
pub mod handover;
mod status;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::runtime::Runtime;
use tracing::{info, warn};

use crate::admin::{AdminError, AgentMetrics};
use crate::config::kube::{KubeSource, KubeStats};
use crate::config::{SourceEvent, DEFAULT_DOMAIN};
use crate::ebpf::{Capture, CaptureConfig, EbpfError};
use crate::identity::{CertConfig, CertificateAuthority, LocalCa, RemoteCa, SecretManager};
use crate::node::adopt::{NetnsId, Offer, Role, Taken};
use crate::node::Node;
use crate::proxy::access_log::{self, AccessLog};
use crate::proxy::hbone::{Pool, PoolConfig};
use crate::proxy::metrics::Telemetry;
use crate::proxy::{Counters, ProxyInputs};
use crate::state::store::Store;
use control::{Control, Source};
use data_plane::DataPlane;
use handover::Successor;

pub use status::Status;

#[derive(Debug, Error)]
pub enum AppError {
    #[error("entering netns {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("Kubernetes source")]
    Kube(#[source] crate::config::kube::KubeError),
    #[error("identity: {0}")]
    Identity(#[source] crate::identity::IdentityError),
    #[error("listing node addresses: {0}")]
    NodeAddresses(#[source] nix::Error),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    AccessLog(#[from] access_log::AccessLogError),
    #[error(transparent)]
    Cni(#[from] crate::node::cni::CniError),
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// Local mode: a YAML file or directory; pods' netns named by annotation.
    Files(PathBuf),
    /// A cluster: the API server (in-cluster service account or KUBECONFIG); pods' netns found
    /// under /proc by pod UID (needs hostPID).
    Kubernetes,
}

/// The agent's resolved configuration (built and validated by main from flags/env).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub source: ConfigSource,
    pub capture: CaptureConfig,
    /// Network namespace to run in (the node's); None = the current one.
    pub host_netns: Option<PathBuf>,
    /// Network namespace whose addresses are the node's (exempt from inbound capture, so kubelet
    /// probes reach pods), when the agent runs in a netns of its own; None = the one it runs in.
    pub node_netns: Option<PathBuf>,
    /// Inbound sources never captured; None = every address of the node's own interfaces.
    pub exempt_sources: Option<Vec<IpAddr>>,
    pub status_file: Option<PathBuf>,
    pub poll_interval: Duration,
    pub uninstall_on_exit: bool,
    pub data_plane_threads: usize,
    pub trust_domain: String,
    /// Istio's root namespace: its PeerAuthentication/AuthorizationPolicy apply mesh-wide.
    pub root_namespace: String,
    /// The local CA's directory (root certificate and key; created on first start). Unused when
    /// `remote_ca` is set.
    pub ca_dir: PathBuf,
    /// Cluster mode's CA (`ambit ca serve` or istiod): certificates come from it and the node
    /// holds no root key; None = the local CA in `ca_dir`.
    pub remote_ca: Option<crate::identity::RemoteCaConfig>,
    pub cert_ttl: Duration,
    pub pool: PoolConfig,
    /// `/metrics` and `/healthz/*`, in the netns the agent runs in; None = no admin endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz/ready` alone (Istio's health port, where ztunnel serves it); None = off.
    pub readiness_addr: Option<SocketAddr>,
    /// The debug endpoint (`/config_dump`, `/logging`, `/debug/connections`); None = off.
    pub admin_addr: Option<SocketAddr>,
    /// The log filter's reload handle (`/logging`); None = the filter cannot change.
    pub log: Option<crate::admin::logging::LogReload>,
    /// Where the per-connection access log goes; None = off (Istio's default).
    pub access_log: Option<access_log::Target>,
    /// See `--protocol-detection-timeout`.
    pub protocol_detection_timeout: Duration,
    /// See `--destination-l7`.
    pub destination_l7: bool,
    /// See `--same-node-shortcut`.
    pub same_node_shortcut: bool,
    /// See `--source-relay`.
    pub source_relay: bool,
    /// See `--splice` (off with the fast path, `capture.fast_path`).
    pub splice: bool,
    /// Where the CNI plugin's socket and node state live (`--cni-dir`); None = no plugin served.
    pub cni_dir: Option<PathBuf>,
    /// Install the plugin into the node's CNI config and keep it there (`--cni-conf-dir`);
    /// None = installed by someone else.
    pub cni_install: Option<crate::node::cni_install::InstallConfig>,
    /// Where the plugin's API credentials come from (in a cluster); None = the plugin decides
    /// from the node state alone while the agent is down.
    pub cni_kube: Option<crate::node::cni_kube::Source>,
    /// See `--handover-socket`; None = no handover (a new agent binds listeners of its own once
    /// the old one has exited).
    pub handover_socket: Option<PathBuf>,
    /// See `--drain-grace`.
    pub drain_grace: Duration,
}

/// Runs until SIGTERM/SIGINT.
pub fn run(cfg: AgentConfig) -> Result<(), AppError> {
    raise_fd_limit();
    if let Some(path) = &cfg.host_netns {
        // Before any thread exists, so every thread starts in the node's netns.
        enter_netns(path)?;
    }
    let data_plane = DataPlane::start(cfg.data_plane_threads).map_err(AppError::Runtime)?;
    let control_rt = control_runtime()?;
    // A running agent's listeners, if one serves the handover socket (an upgrade); it serves on
    // until we confirm, once we have a complete view (`Node::prune_adopted`).
    let offer = Offer::default();
    let (successor, mut taken) = start_handover(&cfg, &offer);
    // Bound here: after entering the node's netns, and before anything is installed, so a taken
    // port stops the agent with nothing to undo.
    let admin_listener = match cfg.metrics_addr {
        Some(addr) => Some(own_listener(
            &control_rt,
            &mut taken,
            Role::Admin,
            addr,
            &offer,
        )?),
        None => None,
    };
    let readiness_listener = match cfg.readiness_addr {
        Some(addr) => Some(own_listener(
            &control_rt,
            &mut taken,
            Role::Readiness,
            addr,
            &offer,
        )?),
        None => None,
    };
    let debug_listener = match cfg.admin_addr {
        Some(addr) => Some(own_listener(
            &control_rt,
            &mut taken,
            Role::Debug,
            addr,
            &offer,
        )?),
        None => None,
    };
    let cni_listener = cfg
        .cni_dir
        .as_deref()
        .map(crate::node::cni::bind)
        .transpose()?;
    // A cluster source must have credentials before anything is installed on the node.
    let source = start_source(&cfg, &control_rt)?;

    let mut capture = Capture::install(&cfg.capture)?;
    let exempt = match &cfg.exempt_sources {
        Some(ips) => ips.clone(),
        None => node_addresses(cfg.node_netns.as_deref())?,
    };
    capture.set_exempt_sources(&exempt)?;
    info!(node = %cfg.node, pin_dir = %cfg.capture.pin_dir().display(), cgroup = %cfg.capture.cgroup.display(), exempt = ?exempt, adopted = capture.enrolled_cookies().len(), "capture installed");
    let ca: Arc<dyn CertificateAuthority> = match &cfg.remote_ca {
        Some(remote) => {
            let ca = RemoteCa::new(remote.clone()).map_err(AppError::Identity)?;
            info!(ca = %remote.addr, roots = %remote.roots_file.display(), trust_domain = %cfg.trust_domain, "remote CA");
            Arc::new(ca)
        }
        None => {
            let ca = LocalCa::load_or_create(&cfg.ca_dir, &cfg.trust_domain)
                .map_err(AppError::Identity)?;
            info!(ca = %ca.root_cert_path().display(), trust_domain = %cfg.trust_domain, "local CA ready");
            Arc::new(ca)
        }
    };
    // Certificates are fetched and rotated on the control runtime.
    let secrets = {
        let _in_control = control_rt.enter();
        SecretManager::new(
            ca,
            CertConfig {
                trust_domain: cfg.trust_domain.clone(),
                ttl: cfg.cert_ttl,
            },
        )
    };
    let store = Store::new(DEFAULT_DOMAIN);
    let access_log = cfg.access_log.as_ref().map(AccessLog::start).transpose()?;
    let pi = Arc::new(ProxyInputs {
        snapshot: crate::snapshot::reader(),
        orig_dst: Arc::new(capture.orig_dst_table()?),
        counters: Counters::default(),
        telemetry: Arc::new(Telemetry::new(&cfg.trust_domain, access_log)),
        pool: Pool::new(cfg.pool.clone(), secrets.clone()),
        secrets,
        upstreams: Default::default(),
        balancers: Default::default(),
        breakers: Default::default(),
        protocol_detection_timeout: cfg.protocol_detection_timeout,
        destination_l7: cfg.destination_l7,
        source_relay: cfg.source_relay,
        splice: cfg.splice && !cfg.capture.fast_path,
        tracers: crate::trace::Tracers::new(control_rt.handle().clone(), Default::default()),
        connections: crate::admin::connections::Connections::new(),
        local: crate::proxy::local::LocalPods::new(cfg.same_node_shortcut),
        own_ports: crate::proxy::hbone::target::own_ports(
            cfg.metrics_addr
                .into_iter()
                .chain(cfg.admin_addr)
                .chain(cfg.readiness_addr),
        ),
        drain: Default::default(),
    });
    let node =
        Node::new(capture, pi.clone(), data_plane.handles()).with_handover(offer.clone(), taken);
    let metrics = Arc::new(agent_metrics(&pi, &source));
    if let Some(listener) = admin_listener {
        info!(addr = ?listener.local_addr().ok(), "serving /metrics, /healthz/ready and /healthz/live");
        control_rt.spawn(crate::admin::serve(listener, metrics.clone()));
    }
    if let Some(listener) = readiness_listener {
        info!(addr = ?listener.local_addr().ok(), "serving /healthz/ready");
        control_rt.spawn(crate::admin::serve_readiness(listener, metrics.clone()));
    }
    if let Some(listener) = debug_listener {
        info!(addr = ?listener.local_addr().ok(), "serving /config_dump, /logging and /debug/connections");
        let admin = debug::admin(&cfg, &pi, pi.connections.clone());
        control_rt.spawn(crate::admin::debug::serve(listener, Arc::new(admin)));
    }

    let cni = match (cni_listener, &cfg.cni_dir) {
        (Some(listener), Some(dir)) => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            info!(socket = %ambit_cni::proto::socket_path(dir).display(), "serving the CNI plugin");
            control_rt.spawn(crate::node::cni::serve(listener, tx));
            if let Some(install) = cfg.cni_install.clone() {
                // Only once the node state is written: from then on the plugin can let
                // non-ambient pods start even while the agent is down.
                let state = ambit_cni::proto::node_state_path(dir);
                control_rt.spawn(crate::node::cni_install::watch(
                    install,
                    crate::node::cni_install::WATCH_INTERVAL,
                    move || state.exists(),
                ));
            }
            if let Some(source) = cfg.cni_kube.clone() {
                control_rt.spawn(crate::node::cni_kube::keep(source, dir.clone()));
            }
            Some((rx, dir.clone()))
        }
        _ => None,
    };
    let mut control = Control::new(&cfg, node, pi.clone(), store, metrics, source, cni);
    if let Some(s) = &successor {
        control.stop_on(s.took_over(), s.handing());
    }
    control_rt.block_on(control.run());
    let mut node = control.into_node();
    let handed_over = successor.as_ref().is_some_and(|s| s.handed_over());
    offer.clear();
    control_rt.block_on(drain(&pi, cfg.drain_grace));
    match &cfg.cni_dir {
        // The successor bound its own socket at that path when it started: it stays.
        Some(_) if handed_over => {}
        Some(dir) => {
            // The plugin now finds nobody listening and decides from the node state, which stays
            // (fail closed for meshed pods) unless the agent is uninstalled.
            let _ = std::fs::remove_file(ambit_cni::proto::socket_path(dir));
            if cfg.uninstall_on_exit {
                if let Some(install) = &cfg.cni_install {
                    match crate::node::cni_install::uninstall(install) {
                        Ok(()) => info!("ambit-cni removed from the node's CNI config"),
                        Err(e) => {
                            warn!(error = %e, "removing ambit-cni from the node's CNI config")
                        }
                    }
                }
                let _ = std::fs::remove_file(ambit_cni::proto::node_state_path(dir));
                crate::node::cni_kube::remove(dir);
            }
        }
        None => {}
    }

    if handed_over {
        // Capture, pins and listeners are the successor's now: nothing here is undone.
        info!("exiting; a successor agent serves this node");
    } else if cfg.uninstall_on_exit {
        node.unenrol_all();
        if let Err(e) = crate::ebpf::uninstall(&cfg.capture.bpffs_root) {
            warn!(error = %e, "uninstall failed");
        }
        info!("uninstalled");
    } else {
        info!("exiting; capture stays pinned and refuses connections until an agent is back");
    }
    if let (false, Some(s)) = (handed_over, &successor) {
        s.remove_socket();
    }
    drop(data_plane);
    Ok(())
}

/// Takes the listeners of the agent serving the handover socket, if any (errors are logged: the
/// agent then starts afresh, its listeners bound once the old agent has exited), and prepares
/// ours for a successor: listening now, or once we have taken over.
fn start_handover(cfg: &AgentConfig, offer: &Offer) -> (Option<Arc<Successor>>, Taken) {
    let Some(path) = &cfg.handover_socket else {
        return (None, Taken::default());
    };
    let id = handover::Identity {
        path: path.clone(),
        node: cfg.node.clone(),
        pin_dir: cfg.capture.pin_dir(),
    };
    let successor = Successor::new(id.clone(), offer.clone());
    let listen = {
        let s = successor.clone();
        move || {
            if let Err(e) = s.listen() {
                warn!(error = %e, "no successor agent can take over from this one");
            }
        }
    };
    let received = handover::take(&id).unwrap_or_else(|e| {
        warn!(error = %e, "taking over from the running agent failed; starting afresh");
        None
    });
    let Some(received) = received else {
        listen();
        return (Some(successor), Taken::default());
    };
    info!(listeners = received.listeners.len(), socket = %path.display(), "took the running agent's listeners");
    let confirm = received.confirm;
    let taken = Taken::new(
        received.listeners,
        Box::new(move |_| {
            match confirm.send() {
                Ok(()) => info!("told the previous agent to stop accepting"),
                Err(e) => {
                    warn!(error = %e, "the previous agent could not be told to stop accepting; it drains when it is stopped")
                }
            }
            listen();
        }),
    );
    (Some(successor), taken)
}

/// The agent's own listener for `role` on `addr`: the previous agent's if it handed it over,
/// else bound here; offered to a successor either way.
fn own_listener(
    rt: &Runtime,
    taken: &mut Taken,
    role: Role,
    addr: SocketAddr,
    offer: &Offer,
) -> Result<tokio::net::TcpListener, AppError> {
    let _in_rt = rt.enter();
    let netns = NetnsId::current().ok();
    let handed = netns
        .and_then(|ns| taken.own(role, addr, ns))
        .and_then(|fd| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true).ok()?;
            tokio::net::TcpListener::from_std(l).ok()
        });
    let listener = match handed {
        Some(l) => l,
        None => match role {
            Role::Admin => rt.block_on(crate::admin::bind(addr))?,
            Role::Readiness => rt.block_on(crate::admin::bind_readiness(addr))?,
            _ => rt.block_on(debug::bind(addr))?,
        },
    };
    match crate::node::adopt::describe(None, netns, role, &listener, addr) {
        Ok(h) => offer.set(&format!("agent {role:?}"), vec![h]),
        Err(e) => warn!(?role, error = %e, "this listener cannot be handed to a successor"),
    }
    Ok(listener)
}

/// Stops accepting (every listener), sends GOAWAY on HBONE connections, and waits for the
/// established connections to end, for at most `grace`; those still open then are closed when
/// the data plane stops.
async fn drain(pi: &ProxyInputs, grace: Duration) {
    pi.drain.start();
    pi.pool.drain();
    let open = crate::proxy::worker::open_connections;
    info!(connections = open(), grace = ?grace, "draining");
    let deadline = tokio::time::Instant::now() + grace;
    while open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    match open() {
        0 => info!("drained: every connection ended"),
        n => warn!(
            connections = n,
            "drain grace period over: closing the connections still open"
        ),
    }
}

/// How often the drain looks at the connection count.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// `ambit check`: every problem in the files at `path`, as the agent would report them (file
/// errors, then object errors with their file and document), without touching the node.
pub fn check(path: &Path) -> Vec<String> {
    let mut loaded = crate::config::files::load(path);
    let mut problems: Vec<String> = std::mem::take(&mut loaded.file_errors)
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut store = Store::new(DEFAULT_DOMAIN);
    store.apply(loaded.into_event());
    problems.extend(store.errors().iter().map(ToString::to_string));
    // Cross-object: Telemetry providers must be defined by the mesh config.
    let (_, _, telemetry) =
        crate::snapshot::telemetry_inputs(store.state(), crate::policy::DEFAULT_ROOT_NAMESPACE);
    problems.extend(telemetry.iter().map(ToString::to_string));
    problems
}

/// The control runtime (one thread: watches, certificates, admin, the control loop); the data
/// plane's workers are started apart ([`data_plane::DataPlane`]).
fn control_runtime() -> Result<Runtime, AppError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)
}

/// The config source: the file source is polled by the control loop; the Kubernetes source runs
/// on the control runtime and sends events.
fn start_source(cfg: &AgentConfig, control: &Runtime) -> Result<Source, AppError> {
    Ok(match &cfg.source {
        ConfigSource::Files(path) => Source::files(path),
        ConfigSource::Kubernetes => {
            let (tx, rx) = tokio::sync::mpsc::channel::<SourceEvent>(1024);
            let source = control
                .block_on(KubeSource::from_env(tx))
                .map_err(AppError::Kube)?
                .with_root_namespace(&cfg.root_namespace);
            let stats: Arc<KubeStats> = source.stats();
            control.spawn(source.run());
            Source::kube(rx, stats)
        }
    })
}

fn agent_metrics(pi: &Arc<ProxyInputs>, source: &Source) -> AgentMetrics {
    let proxy = pi.clone();
    let metrics = AgentMetrics::new(Box::new(move || proxy.counters.all())).with_registry(|r| {
        pi.telemetry.register(r);
        pi.breakers.register(r);
        pi.balancers.register(r);
        pi.tracers.metrics().register(r);
    });
    match source.kube_stats() {
        Some(stats) => metrics.with_kube(stats),
        None => metrics,
    }
}

/// Moves the calling thread (and every thread it starts later) into the netns at `path`.
fn enter_netns(path: &Path) -> Result<(), AppError> {
    let err = |source: std::io::Error| AppError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(e.into()))
}

/// Every proxied connection holds two sockets; the default soft limit (1024) is far too low.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            warn!(soft, hard, "cannot raise the open-file limit");
        }
    }
}

/// Every address on the interfaces of `netns` (None: the current one) except loopback: the node's
/// own addresses. Another netns is read from a short-lived thread that enters it, so the agent's
/// own threads stay where they are.
fn node_addresses(netns: Option<&Path>) -> Result<Vec<IpAddr>, AppError> {
    let Some(path) = netns else {
        return local_addresses();
    };
    let path = path.to_path_buf();
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&path)?;
            local_addresses()
        })
        .join()
        .unwrap_or_else(|_| Err(AppError::NodeAddresses(nix::Error::EIO)))
    })
}

fn local_addresses() -> Result<Vec<IpAddr>, AppError> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(AppError::NodeAddresses)? {
        let Some(addr) = ifa.address else { continue };
        let ip: Option<IpAddr> = if let Some(v4) = addr.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        if let Some(ip) = ip.filter(|ip| !ip.is_loopback() && !out.contains(ip)) {
            out.push(ip);
        }
    }
    Ok(out)
}

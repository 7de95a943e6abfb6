//! Wires the agent together: capture, the data-plane runtime serving the in-pod listeners, and the
//! control loop (config source → desired pods → enrolment) on a separate runtime, so control work
//! never stalls traffic.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tracing::{error, info, warn};

use crate::admin::{AdminError, AgentMetrics};
use crate::config::files::FileSource;
use crate::config::kube::KubeSource;
use crate::config::DEFAULT_DOMAIN;
use crate::ebpf::{Capture, CaptureConfig, EbpfError};
use crate::identity::{CertConfig, LocalCa, SecretManager};
use crate::node::discovery::{desired_pods, AnnotatedNetns, NetnsResolver, ProcNetns};
use crate::node::Node;
use crate::policy::Enforcer;
use crate::proxy::pool::Pool;
use crate::proxy::{Metrics, ProxyInputs};
use crate::state::store::Store;

#[derive(Debug, Error)]
pub enum AppError {
    #[error("entering host netns {path}: {source}")]
    HostNetns {
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
    /// Inbound sources never captured; None = every address of the node's own interfaces.
    pub exempt_sources: Option<Vec<IpAddr>>,
    pub status_file: Option<PathBuf>,
    pub poll_interval: Duration,
    pub uninstall_on_exit: bool,
    pub data_plane_threads: usize,
    pub trust_domain: String,
    /// Istio's root namespace: its PeerAuthentication/AuthorizationPolicy apply mesh-wide.
    pub root_namespace: String,
    /// The local CA's directory (root certificate and key; created on first start).
    pub ca_dir: PathBuf,
    pub cert_ttl: Duration,
    pub pool: crate::proxy::pool::PoolConfig,
    /// `/metrics` and `/healthz/ready`, in the node's netns; None = no admin endpoint.
    pub metrics_addr: Option<SocketAddr>,
}

/// Runs until SIGTERM/SIGINT.
pub fn run(cfg: AgentConfig) -> Result<(), AppError> {
    raise_fd_limit();
    if let Some(path) = &cfg.host_netns {
        // Before any thread exists, so every thread starts in the node's netns.
        let f = std::fs::File::open(path).map_err(|source| AppError::HostNetns {
            path: path.clone(),
            source,
        })?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            AppError::HostNetns {
                path: path.clone(),
                source: e.into(),
            }
        })?;
    }
    let data_plane = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.data_plane_threads.max(1))
        .thread_name("ambit-data")
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    // Bound here: after entering the node's netns, and before anything is installed, so a taken
    // port stops the agent with nothing to undo.
    let admin_listener = match cfg.metrics_addr {
        Some(addr) => Some(control.block_on(crate::admin::bind(addr))?),
        None => None,
    };

    // A cluster source must have credentials before anything is installed on the node.
    let kube_events = match cfg.source {
        ConfigSource::Kubernetes => {
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            let source = control
                .block_on(KubeSource::from_env(tx))
                .map_err(AppError::Kube)?;
            control.spawn(source.run());
            Some(rx)
        }
        ConfigSource::Files(_) => None,
    };
    let mut capture = Capture::install(&cfg.capture)?;
    let exempt = match &cfg.exempt_sources {
        Some(ips) => ips.clone(),
        None => node_addresses()?,
    };
    capture.set_exempt_sources(&exempt)?;
    info!(node = %cfg.node, pin_dir = %cfg.capture.pin_dir().display(), cgroup = %cfg.capture.cgroup.display(), exempt = ?exempt, adopted = capture.enrolled_cookies().len(), "capture installed");
    let ca = LocalCa::load_or_create(&cfg.ca_dir, &cfg.trust_domain).map_err(AppError::Identity)?;
    info!(ca = %ca.root_cert_path().display(), trust_domain = %cfg.trust_domain, "local CA ready");
    // Certificates are fetched and rotated on the control runtime.
    let secrets = {
        let _in_control = control.enter();
        SecretManager::new(
            Arc::new(ca),
            CertConfig {
                trust_domain: cfg.trust_domain.clone(),
                ttl: cfg.cert_ttl,
            },
        )
    };
    let store = Store::new(DEFAULT_DOMAIN);
    let enforcer = Arc::new(Enforcer::new(&cfg.root_namespace, &cfg.node));
    let pi = Arc::new(ProxyInputs {
        orig_dst: capture.orig_dst_table()?,
        metrics: Metrics::default(),
        state: store.reader(),
        pool: Pool::new(cfg.pool.clone(), secrets.clone()),
        secrets,
        policy: enforcer.clone(),
    });
    let mut node = Node::new(capture, pi.clone(), data_plane.handle().clone());
    let proxy = pi.clone();
    let metrics = Arc::new(
        AgentMetrics::new(Box::new(move || proxy.metrics.counters()))
            .with_policy_denials(enforcer.denials()),
    );
    if let Some(listener) = admin_listener {
        info!(addr = ?listener.local_addr().ok(), "serving /metrics and /healthz/ready");
        control.spawn(crate::admin::serve(listener, metrics.clone()));
    }

    control.block_on(control_loop(
        &cfg,
        &enforcer,
        &mut node,
        &pi,
        store,
        &metrics,
        kube_events,
    ));

    if cfg.uninstall_on_exit {
        node.unenrol_all();
        if let Err(e) = crate::ebpf::uninstall(&cfg.capture.bpffs_root) {
            warn!(error = %e, "uninstall failed");
        }
        info!("uninstalled");
    } else {
        info!("exiting; capture stays pinned and refuses connections until an agent is back");
    }
    data_plane.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

async fn control_loop(
    cfg: &AgentConfig,
    enforcer: &Enforcer,
    node: &mut Node,
    pi: &ProxyInputs,
    mut store: Store,
    metrics: &AgentMetrics,
    mut kube_events: Option<tokio::sync::mpsc::Receiver<crate::config::SourceEvent>>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    // Files: polled on every tick. Kubernetes: watch events arrive on a channel.
    let (mut files, resolver): (Option<FileSource>, Box<dyn NetnsResolver>) = match &cfg.source {
        ConfigSource::Files(path) => (
            Some(FileSource::new(path)),
            Box::new(AnnotatedNetns {
                dir: PathBuf::from("/var/run/netns"),
            }),
        ),
        ConfigSource::Kubernetes => (
            None,
            Box::new(ProcNetns {
                proc_root: PathBuf::from("/proc"),
            }),
        ),
    };
    let mut ticker = tokio::time::interval(cfg.poll_interval);
    let mut problems: Vec<String> = Vec::new();
    let mut generation = 0u64;
    let mut seq = 0u64;
    let mut first = true;
    let mut map_sizes: MapSizes = None;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = ticker.tick() => {}
            Some(event) = async { kube_events.as_mut()?.recv().await }, if kube_events.is_some() => {
                store.apply(event);
                // Apply whatever else is queued before reconciling once.
                while let Some(Ok(e)) = kube_events.as_mut().map(|rx| rx.try_recv()) {
                    store.apply(e);
                }
            }
        }
        if let Some(event) = files.as_mut().and_then(FileSource::poll) {
            store.apply(event);
        }
        if store.publish() || std::mem::take(&mut first) {
            generation += 1;
            let state = store.reader().load_full();
            // Policies first: a pod enrolled below must find its compiled view.
            enforcer.update(&state, &store.broken_policies());
            let (desired, enrol_problems) = desired_pods(&state, &cfg.node, resolver.as_ref());
            problems = files
                .iter()
                .flat_map(|f| f.file_errors.iter().map(ToString::to_string))
                .collect();
            problems.extend(store.errors().iter().map(ToString::to_string));
            problems.extend(enrol_problems);
            problems.extend(node.reconcile(&desired).iter().map(ToString::to_string));
            for p in &problems {
                warn!(problem = %p, "config problem");
            }
            if generation == 1 {
                // Adopted state of pods that are gone now (they vanished while no agent ran).
                node.prune_adopted();
                // Capture is installed and the first config applied.
                metrics.set_ready(true);
            }
        }
        // Every tick, not only on publish: a rejection that keeps the last good object changes
        // the problems without changing the state.
        metrics.set_config(&store.errors(), store.rejected_total());
        metrics.set_enrolled_pods(node.pods().len());
        metrics.set_kernel(crate::admin::kernel_counters(
            &node.capture().kernel_stats(),
        ));
        seq += 1;
        write_status(
            cfg,
            node,
            pi,
            &mut map_sizes,
            generation,
            &problems,
            seq,
            store.rejected_total(),
        );
    }
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

/// Every address on this netns's interfaces except loopback: the node's own addresses.
fn node_addresses() -> Result<Vec<IpAddr>, AppError> {
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

/// What the agent is doing, as JSON: enrolled pods, config problems, kernel and proxy counters and
/// map sizes. Written atomically; tests and the demo read it.
#[derive(Debug, serde::Serialize)]
pub struct Status<'a> {
    pub node: &'a str,
    /// Increments on every write, so a reader can wait for a status newer than an event.
    pub seq: u64,
    pub generation: u64,
    pub pods: Vec<crate::node::PodStatus>,
    pub config_errors: &'a [String],
    /// Objects rejected since start (each also logged with its kind/namespace/name and field).
    pub config_rejected_total: u64,
    pub kernel: crate::ebpf::KernelStats,
    pub maps: std::collections::BTreeMap<&'static str, usize>,
    pub netns_links: Vec<u64>,
    pub proxy: &'a Metrics,
    /// HBONE client pool counters, and the connections open now.
    pub pool: &'a crate::proxy::pool::PoolStats,
    pub pool_connections: usize,
    pub certs: crate::identity::CertStats,
}

/// Map sizes and when they were counted: counting walks every bucket of every hash map (a
/// syscall per key, and an empty 64K-bucket LRU map is a full scan), which every 50 ms stalled
/// the data path measurably (p99 latency). Counted again after every reconcile (new generation)
/// and otherwise once a second.
type MapSizes = Option<(
    std::time::Instant,
    u64,
    std::collections::BTreeMap<&'static str, usize>,
)>;
const MAP_SIZES_EVERY: Duration = Duration::from_secs(1);

#[allow(clippy::too_many_arguments)]
fn write_status(
    cfg: &AgentConfig,
    node: &Node,
    pi: &ProxyInputs,
    map_sizes: &mut MapSizes,
    generation: u64,
    errors: &[String],
    seq: u64,
    rejected: u64,
) {
    let Some(path) = &cfg.status_file else { return };
    if map_sizes
        .as_ref()
        .is_none_or(|(at, g, _)| *g != generation || at.elapsed() >= MAP_SIZES_EVERY)
    {
        *map_sizes = Some((
            std::time::Instant::now(),
            generation,
            node.capture().map_sizes(),
        ));
    }
    let status = Status {
        node: &cfg.node,
        seq,
        generation,
        pods: node.pods(),
        config_errors: errors,
        config_rejected_total: rejected,
        kernel: node.capture().kernel_stats(),
        maps: map_sizes
            .as_ref()
            .map(|(_, _, m)| m.clone())
            .unwrap_or_default(),
        netns_links: node.capture().netns_links(),
        proxy: &pi.metrics,
        pool: pi.pool.stats(),
        pool_connections: pi.pool.connections(),
        certs: pi.secrets.stats(),
    };
    let Ok(json) = serde_json::to_vec_pretty(&status) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .is_err()
    {
        warn!(path = %path.display(), "cannot write status file");
    }
}

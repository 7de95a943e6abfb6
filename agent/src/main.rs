//! The `ambit` binary: run the node agent, uninstall it, or run the local demo.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ambit::app::{self, AgentConfig, ConfigSource};
use ambit::ebpf::CaptureConfig;
use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// jemalloc, not glibc malloc: after load, glibc kept the memory of every closed connection (the
/// agent's RSS grew with each cycle of 9,000 connections and never came down), while jemalloc's
/// background thread hands pages freed for 10 s (its `dirty_decay_ms`) back to the kernel.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for bad configuration (sysexits EX_USAGE), as STYLE.md asks.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "ambit",
    version,
    about = "eBPF sidecarless service-mesh node agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Validate a YAML file or directory the way the agent reads it; print every problem with its
    /// file, document, object and field; exit non-zero if there is any.
    Check {
        /// File or directory (read recursively).
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
    },
    /// Remove every pin, link and map entry the agent made (stop the agent first).
    Uninstall {
        #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf/ambit")]
        bpffs: PathBuf,
    },
    /// Remove `ambit-cni` from the node's CNI config and bin dir (what `run --cni-conf-dir`
    /// installed) and the agent's node state for it, e.g. after `kubectl delete -k deploy/`.
    CniUninstall {
        #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, env = "AMBIT_CNI_DIR", default_value = ambit_cni::proto::DEFAULT_RUN_DIR)]
        cni_dir: PathBuf,
    },
    /// Mount bpffs at PATH unless it already is one, then exit (the DaemonSet's init container:
    /// pins must live in the host's bpffs to survive agent restarts).
    MountBpffs {
        #[arg(long, default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
    /// Create the mesh's local root CA in a directory (or show the one already there). Every node
    /// must use the same one (`--ca-dir`).
    CaInit {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = ambit::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// The in-cluster CA (`ambit ca serve`).
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Build a small local world (network namespaces as pods), run the agent on it, send traffic,
    /// and print what was captured and relayed.
    Demo(ambit::demo::DemoArgs),
    /// Print what a running agent holds (its `/config_dump` and `/debug/connections`) as tables,
    /// the way `istioctl ztunnel-config` does.
    Zc(ambit::zc::ZcArgs),
}

#[derive(Subcommand)]
enum CaCmd {
    /// Serve Istio's certificate service (gRPC on TLS) to node agents: TokenReview authn, node
    /// authorisation from a Pod watch, signing with the root in --ca-dir.
    Serve(Box<CaServeArgs>),
}

#[derive(clap::Args)]
struct CaServeArgs {
    /// Directory with `root-cert.pem` and `root-key.pem` (the CA's Secret; made by `ca-init`).
    #[arg(long, env = "AMBIT_CA_DIR", default_value = "/etc/ambit/ca")]
    ca_dir: PathBuf,
    /// PEM file of a further root to publish in the trust bundle without signing with it (root
    /// rotation: the next root before the switch, the previous one after). Repeatable.
    #[arg(
        long = "extra-root",
        env = "AMBIT_CA_EXTRA_ROOTS",
        value_delimiter = ','
    )]
    extra_roots: Vec<PathBuf>,
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = ambit::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// gRPC (TLS) address; 15012 is istiod's.
    #[arg(long, env = "AMBIT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    listen: std::net::SocketAddr,
    /// `/metrics` and `/ready` (plain HTTP); `off` disables. 15014 is istiod's monitoring port.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15014")]
    metrics_addr: String,
    /// Audience a caller's token must have. Repeatable.
    #[arg(long = "token-audience", env = "AMBIT_CA_TOKEN_AUDIENCES", value_delimiter = ',', default_value = ambit::identity::DEFAULT_TOKEN_AUDIENCE)]
    token_audiences: Vec<String>,
    /// `namespace/service-account` of node agents, which may ask for the identities of pods on
    /// their node (Istio's CA_TRUSTED_NODE_ACCOUNTS). Repeatable.
    #[arg(long = "agent-account", env = "AMBIT_CA_AGENT_ACCOUNTS", value_delimiter = ',', default_value = ambit::ca::DEFAULT_AGENT_ACCOUNT)]
    agent_accounts: Vec<String>,
    /// The cluster this CA serves (Istio's `clusterid` metadata).
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = ambit::identity::proto::DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// Lifetime of a certificate whose request names none.
    #[arg(long, env = "AMBIT_CA_DEFAULT_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    default_cert_ttl: Duration,
    /// Longer requests are refused (Istio: 90 days).
    #[arg(long, env = "AMBIT_CA_MAX_CERT_TTL", default_value = "90days", value_parser = humantime::parse_duration)]
    max_cert_ttl: Duration,
    /// Names (or IPs) of the CA's serving certificate: what agents dial. Repeatable.
    #[arg(
        long = "tls-name",
        env = "AMBIT_CA_TLS_NAMES",
        value_delimiter = ',',
        default_value = "ambit-ca,ambit-ca.ambit-system,ambit-ca.ambit-system.svc,ambit-ca.ambit-system.svc.cluster.local"
    )]
    tls_names: Vec<String>,
    /// `namespace/name` of the ConfigMap the trust bundle is written to (key `root-cert.pem`),
    /// which agents mount; empty = none.
    #[arg(long, env = "AMBIT_CA_BUNDLE_CONFIGMAP", default_value = ambit::ca::DEFAULT_BUNDLE_CONFIGMAP)]
    bundle_configmap: String,
}

impl CaServeArgs {
    fn into_config(self) -> Result<ambit::ca::ServeConfig, String> {
        let metrics_addr = match self.metrics_addr.trim() {
            "" | "off" => None,
            a => Some(a.parse().map_err(|e| {
                format!("--metrics-addr (AMBIT_METRICS_ADDR) {a:?}: {e} (want ip:port, or `off`)")
            })?),
        };
        let agent_accounts = self
            .agent_accounts
            .iter()
            .map(|a| {
                ambit::ca::parse_namespaced(a).ok_or_else(|| {
                    format!("--agent-account (AMBIT_CA_AGENT_ACCOUNTS) {a:?}: want <namespace>/<service-account>")
                })
            })
            .collect::<Result<_, _>>()?;
        let bundle_configmap = match self.bundle_configmap.trim() {
            "" => None,
            v => Some(ambit::ca::parse_namespaced(v).ok_or_else(|| {
                format!("--bundle-configmap (AMBIT_CA_BUNDLE_CONFIGMAP) {v:?}: want <namespace>/<name>, or empty")
            })?),
        };
        if self.tls_names.is_empty() {
            return Err("--tls-name (AMBIT_CA_TLS_NAMES) needs at least one name".into());
        }
        let cfg = ambit::ca::ServeConfig {
            ca_dir: self.ca_dir,
            extra_roots: self.extra_roots,
            trust_domain: self.trust_domain,
            listen: self.listen,
            metrics_addr,
            audiences: self.token_audiences,
            agent_accounts,
            cluster_id: self.cluster_id,
            default_cert_ttl: self.default_cert_ttl,
            max_cert_ttl: self.max_cert_ttl,
            tls_names: self.tls_names,
            bundle_configmap,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name (pods with spec.nodeName equal to it are enrolled).
    #[arg(long, env = "AMBIT_NODE")]
    node: String,
    /// YAML file or directory (local mode's control plane): Kubernetes and Istio objects.
    #[arg(long, env = "AMBIT_CONFIG", conflicts_with = "kube")]
    config: Option<PathBuf>,
    /// Watch the Kubernetes API (in-cluster service account or KUBECONFIG) instead of files.
    #[arg(long, env = "AMBIT_KUBE")]
    kube: bool,
    /// bpffs directory for this agent's pins.
    #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf/ambit")]
    bpffs: PathBuf,
    /// The host's cgroup v2 root, under which the capture programs attach (`--cgroup-attach`): a
    /// cgroup2 mount, or a directory whose `unified/` child is one (hybrid v1/v2 hosts), told apart
    /// by filesystem type.
    #[arg(long, env = "AMBIT_CGROUP", default_value = "/sys/fs/cgroup")]
    cgroup: PathBuf,
    /// The cgroup under that root where the capture programs attach, so that only its processes
    /// run them: `auto` is the kubelet's parent of all pods (`kubepods.slice` with the systemd
    /// cgroup driver, `kubepods` with cgroupfs) and the root where there is none; `/` is the root;
    /// any other value is a cgroup path under the root.
    #[arg(long, env = "AMBIT_CGROUP_ATTACH", default_value = "auto")]
    cgroup_attach: String,
    /// Network namespace to run in (the node's), e.g. /var/run/netns/node1.
    #[arg(long, env = "AMBIT_HOST_NETNS")]
    host_netns: Option<PathBuf>,
    /// Network namespace whose addresses are the node's (exempt from inbound capture, so kubelet
    /// probes reach pods) when the agent runs in a netns of its own, e.g. /proc/1/ns/net with
    /// hostPID. Default: the netns the agent runs in.
    #[arg(long, env = "AMBIT_NODE_NETNS")]
    node_netns: Option<PathBuf>,
    /// Inbound source addresses never captured (default: the node's own addresses).
    #[arg(
        long = "exempt-source",
        env = "AMBIT_EXEMPT_SOURCES",
        value_delimiter = ','
    )]
    exempt_sources: Vec<IpAddr>,
    /// Write a JSON status (enrolled pods, counters) here.
    #[arg(long, env = "AMBIT_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// How often to look for config changes, in milliseconds.
    #[arg(long, env = "AMBIT_POLL_MS", default_value_t = 200)]
    poll_ms: u64,
    /// Remove all capture state on exit instead of leaving it pinned (fail closed).
    #[arg(long)]
    uninstall_on_exit: bool,
    /// sk_msg fast path on the app <-> proxy loopback hop: each direction of a connection skips
    /// loopback TCP for its first 4 MiB. Off until the bench shows it helps
    /// (agent/benches/README.md); `--fast-path=true` turns it on.
    #[arg(long, env = "AMBIT_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    fast_path: bool,
    /// Data-plane worker threads.
    #[arg(long, env = "AMBIT_WORKERS", default_value_t = 2)]
    workers: usize,
    /// SPIFFE trust domain of workload identities (`spiffe://<domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = ambit::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Istio's root namespace: PeerAuthentication/AuthorizationPolicy there apply mesh-wide.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = ambit::policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Local CA directory: root certificate and key, created on first start (0700/0600). Every
    /// node of a mesh must share the same root.
    #[arg(long, env = "AMBIT_CA_DIR", default_value = "/var/lib/ambit/ca")]
    ca_dir: PathBuf,
    /// Cluster mode: get certificates from this CA (`ambit ca serve`, or istiod) instead of a
    /// local root, e.g. https://ambit-ca.ambit-system.svc:15012. The node then holds no root key.
    #[arg(long, env = "AMBIT_CA_ADDR")]
    ca_addr: Option<String>,
    /// The CA's trust bundle (root certificates, no key), e.g. the mounted ConfigMap
    /// `ambit-ca-root-cert`; verifies the CA and every peer. Re-read when it changes.
    #[arg(
        long,
        env = "AMBIT_CA_ROOTS",
        default_value = "/var/run/secrets/ambit/ca/root-cert.pem"
    )]
    ca_roots: PathBuf,
    /// Projected ServiceAccount token presented to the CA (its audience is set where it is
    /// projected; Istio's is `istio-ca`). Re-read for every request.
    #[arg(
        long,
        env = "AMBIT_CA_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    ca_token: PathBuf,
    /// Sent to the CA as Istio's `clusterid` metadata.
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = ambit::identity::proto::DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// Workload certificate lifetime (rotated at half of it), e.g. `24h`, `10s`.
    #[arg(long, env = "AMBIT_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Streams per pooled HBONE connection before another is opened.
    #[arg(long, env = "AMBIT_POOL_MAX_STREAMS", default_value_t = 100)]
    pool_max_streams: u16,
    /// Idle time after which a pooled HBONE connection is closed; `0s` = no reuse.
    #[arg(long, env = "AMBIT_POOL_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Address for `/metrics` (OpenMetrics) and `/healthz/ready`, in the node's netns; `off` or
    /// empty disables it. 15020 is Istio's ztunnel stats port.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    metrics_addr: String,
    /// Address serving `/healthz/ready` alone, in the node's netns; `off` or empty disables it.
    /// 15021 is Istio's health port, where ztunnel serves its readiness.
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    readiness_addr: String,
    /// Address of the debug endpoint (`/config_dump`, `/logging`, `/debug/connections`; what
    /// `ambit zc` reads), in the node's netns; `off` or empty disables it. Localhost only by
    /// default, as ztunnel's 15000.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: String,
    /// Per-connection access log, one JSON object per line: `off` (the default, as Istio's empty
    /// `accessLogFile`), `stdout`, or a file path (appended to).
    #[arg(long, env = "AMBIT_ACCESS_LOG", default_value = "off")]
    access_log: String,
    /// How long to wait for the first bytes of a connection to a Service port that declares no
    /// protocol (HTTP is detected from them), and for the ClientHello on a TLS port, before
    /// forwarding it as plain TCP: a server-first protocol on an undeclared port starts after
    /// this delay. Declare such ports `tcp` (Istio's advice) to skip the wait.
    #[arg(long, env = "AMBIT_PROTOCOL_DETECTION_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    protocol_detection_timeout: Duration,
    /// Destination-side L7: the destination's proxy serves the HTTP an HBONE stream carries and
    /// records each request with `reporter="destination"`, as a sidecar's inbound does (`on`, the
    /// default), or relays every stream as bytes (`off`). A pod opts out with the annotation
    /// `ambit.dev/destination-l7: "false"`.
    #[arg(long, env = "AMBIT_DESTINATION_L7", default_value = "on", value_parser = ["on", "off"])]
    destination_l7: String,
    /// A meshed connection between two pods of this node is handed from the client's outbound to
    /// the server's inbound in-process (identity, policy, telemetry and destination-side L7 as
    /// over HBONE, without TLS), as ztunnel's same-node fast path does; `false` sends it over
    /// HBONE through the node's own network.
    #[arg(long, env = "AMBIT_SAME_NODE_SHORTCUT", default_value_t = true, action = clap::ArgAction::Set)]
    same_node_shortcut: bool,
    /// Source-side HTTP/1.1 relayed as bytes: a request whose route needs no more than a
    /// destination, header edits and retries goes out on a pooled upstream connection as the
    /// head the proxy writes and the bytes the upstream answers, without hyper's server and
    /// client (the same routing, load balancing, telemetry and response flags); `false` serves
    /// every request with them.
    #[arg(long, env = "AMBIT_SOURCE_RELAY", default_value_t = true, action = clap::ArgAction::Set)]
    source_relay: bool,
    /// A relay between two TCP sockets (a same-node handoff, plaintext inbound to the app,
    /// outbound to a destination outside the mesh) moves a bulk transfer with splice(2), kernel
    /// to kernel, instead of through the agent's memory; `false` copies every byte. Off with
    /// `--fast-path=true`, whose redirected bytes splice cannot read.
    #[arg(long, env = "AMBIT_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
    splice: bool,
    /// Serve the `ambit-cni` plugin: its socket (`cni.sock`) and the node state it reads while the
    /// agent is down (`cni-node.json`) live in this directory, the plugin's `runDir`
    /// (default /var/run/ambit). Unset: no plugin is served.
    #[arg(long, env = "AMBIT_CNI_DIR")]
    cni_dir: Option<PathBuf>,
    #[command(flatten)]
    cni_install: CniInstallArgs,
    /// Unix socket where a new agent process on this node takes the listeners of the running one
    /// over (an upgrade without refused connections); in a cluster a hostPath shared by the old
    /// and the new agent pod. `off` or empty: no handover.
    #[arg(
        long,
        env = "AMBIT_HANDOVER_SOCKET",
        default_value = "/var/run/ambit/handover.sock"
    )]
    handover_socket: String,
    /// How long a stopping agent (SIGTERM, or a successor took over) lets established connections
    /// finish before it closes them. Istio's default (ProxyConfig terminationDrainDuration, and
    /// ztunnel's drain) is 5s; keep it below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "AMBIT_DRAIN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
}

/// Where the node's CNI files are, for installing `ambit-cni` into them.
#[derive(clap::Args)]
struct CniInstallArgs {
    /// The node's CNI network config dir (mounted, e.g. /host/etc/cni/net.d): `ambit-cni` is
    /// added to its primary config and kept there (needs --cni-dir). Unset: not installed.
    #[arg(long, env = "AMBIT_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin dir (mounted, e.g. /host/opt/cni/bin) the binary is copied into.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The `ambit-cni` binary to install [default: `ambit-cni` next to this `ambit`].
    #[arg(long, env = "AMBIT_CNI_PLUGIN")]
    cni_plugin: Option<PathBuf>,
    /// Namespaces whose pods the plugin lets start while the agent is down, without a decision
    /// (comma-separated; istio-cni's `excludeNamespaces`; a value replaces the default, so keep
    /// kube-system in it). The agent's own namespace
    /// (`POD_NAMESPACE`) is always added: the agent's pod, and the CA's, must start for anything
    /// else on the node to start after a reboot. With the agent up, the agent decides for them.
    #[arg(
        long,
        env = "AMBIT_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    cni_exclude_namespaces: Vec<String>,
}

impl CniInstallArgs {
    fn into_config(
        self,
        run_dir: Option<&std::path::Path>,
    ) -> Result<Option<ambit::node::cni_install::InstallConfig>, String> {
        let Some(conf_dir) = self.cni_conf_dir else {
            return Ok(None);
        };
        let run_dir = run_dir.ok_or("--cni-conf-dir (AMBIT_CNI_CONF_DIR) needs --cni-dir (AMBIT_CNI_DIR): the plugin must have an agent to ask")?;
        let plugin = match self.cni_plugin {
            Some(p) => p,
            None => std::env::current_exe()
                .map_err(|e| format!("--cni-plugin (AMBIT_CNI_PLUGIN) unset and this binary's path is unknown: {e}"))?
                .with_file_name(ambit::node::cni_install::PLUGIN_TYPE),
        };
        if !plugin.is_file() {
            return Err(format!(
                "--cni-plugin (AMBIT_CNI_PLUGIN) {}: no such file",
                plugin.display()
            ));
        }
        let mut exclude_namespaces: Vec<String> = self
            .cni_exclude_namespaces
            .into_iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if let Ok(own) = std::env::var("POD_NAMESPACE") {
            if !own.is_empty() && !exclude_namespaces.contains(&own) {
                exclude_namespaces.push(own);
            }
        }
        Ok(Some(ambit::node::cni_install::InstallConfig {
            conf_dir,
            bin_dir: self.cni_bin_dir,
            plugin,
            run_dir: run_dir.to_path_buf(),
            exclude_namespaces,
            uninstalled: Default::default(),
        }))
    }
}

impl RunArgs {
    fn into_config(self) -> Result<AgentConfig, String> {
        if self.node.is_empty() {
            return Err("--node (AMBIT_NODE) must not be empty".into());
        }
        let source = match (self.config, self.kube) {
            // A path that is not there yet (a ConfigMap volume still being populated) is waited
            // for: the agent stays not ready and adopted pods fail closed until it can be read.
            (Some(path), false) => ConfigSource::Files(path),
            (None, true) => ConfigSource::Kubernetes,
            _ => {
                return Err(
                    "give exactly one of --config (AMBIT_CONFIG) and --kube (AMBIT_KUBE)".into(),
                )
            }
        };
        let cgroup = ambit::ebpf::attach_point(&cgroup_v2_root(&self.cgroup)?, &self.cgroup_attach)
            .map_err(|e| format!("--cgroup-attach (AMBIT_CGROUP_ATTACH) {e}"))?;
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err(format!(
                "--poll-ms (AMBIT_POLL_MS) {}: must be 10..=60000",
                self.poll_ms
            ));
        }
        if self.cert_ttl < Duration::from_secs(2) {
            return Err(format!(
                "--cert-ttl (AMBIT_CERT_TTL) {}: must be at least 2s",
                humantime::format_duration(self.cert_ttl)
            ));
        }
        if let Some(addr) = &self.ca_addr {
            if !addr.starts_with("https://") {
                return Err(format!(
                    "--ca-addr (AMBIT_CA_ADDR) {addr:?}: must be https://host:port (the token is never sent in clear)"
                ));
            }
        }
        if self.pool_max_streams == 0 {
            return Err("--pool-max-streams (AMBIT_POOL_MAX_STREAMS) must be at least 1".into());
        }
        let metrics_addr = match self.metrics_addr.trim() {
            "" | "off" => None,
            a => Some(a.parse().map_err(|e| {
                format!("--metrics-addr (AMBIT_METRICS_ADDR) {a:?}: {e} (want ip:port, or `off`)")
            })?),
        };
        let readiness_addr = match self.readiness_addr.trim() {
            "" | "off" => None,
            a => Some(a.parse().map_err(|e| {
                format!(
                    "--readiness-addr (AMBIT_READINESS_ADDR) {a:?}: {e} (want ip:port, or `off`)"
                )
            })?),
        };
        let admin_addr = match self.admin_addr.trim() {
            "" | "off" => None,
            a => Some(a.parse().map_err(|e| {
                format!("--admin-addr (AMBIT_ADMIN_ADDR) {a:?}: {e} (want ip:port, or `off`)")
            })?),
        };
        Ok(AgentConfig {
            node: self.node,
            source,
            capture: CaptureConfig {
                bpffs_root: self.bpffs,
                cgroup,
                fast_path: self.fast_path,
            },
            host_netns: self.host_netns,
            node_netns: self.node_netns,
            exempt_sources: (!self.exempt_sources.is_empty()).then_some(self.exempt_sources),
            status_file: self.status_file,
            poll_interval: Duration::from_millis(self.poll_ms),
            uninstall_on_exit: self.uninstall_on_exit,
            data_plane_threads: self.workers,
            metrics_addr,
            readiness_addr,
            admin_addr,
            log: None,
            trust_domain: self.trust_domain,
            root_namespace: self.root_namespace,
            ca_dir: self.ca_dir,
            remote_ca: self.ca_addr.map(|addr| ambit::identity::RemoteCaConfig {
                addr,
                roots_file: self.ca_roots,
                token_file: self.ca_token,
                cluster_id: self.cluster_id,
                timeout: Duration::from_secs(10),
            }),
            cert_ttl: self.cert_ttl,
            access_log: match self.access_log.trim() {
                "" | "off" => None,
                "stdout" | "-" => Some(ambit::proxy::access_log::Target::Stdout),
                path => Some(ambit::proxy::access_log::Target::File(path.into())),
            },
            protocol_detection_timeout: self.protocol_detection_timeout,
            destination_l7: self.destination_l7 == "on",
            same_node_shortcut: self.same_node_shortcut,
            source_relay: self.source_relay,
            splice: self.splice,
            // In a cluster the plugin gets the agent's API credentials for the pods the node
            // state cannot decide while the agent is down.
            cni_kube: if self.kube && self.cni_dir.is_some() {
                ambit::node::cni_kube::Source::in_cluster()
            } else {
                None
            },
            cni_install: self.cni_install.into_config(self.cni_dir.as_deref())?,
            cni_dir: self.cni_dir,
            handover_socket: match self.handover_socket.trim() {
                "" | "off" => None,
                path => Some(path.into()),
            },
            drain_grace: self.drain_grace,
            pool: ambit::proxy::hbone::PoolConfig {
                max_streams: self.pool_max_streams,
                idle_timeout: self.pool_idle_timeout,
            },
        })
    }
}

/// The cgroup v2 hierarchy at `path`, or at `path/unified` on a hybrid v1/v2 host.
fn cgroup_v2_root(path: &std::path::Path) -> Result<PathBuf, String> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    let is_v2 =
        |p: &std::path::Path| statfs(p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC);
    if is_v2(path) {
        return Ok(path.to_path_buf());
    }
    let unified = path.join("unified");
    if is_v2(&unified) {
        return Ok(unified);
    }
    Err(format!(
        "--cgroup (AMBIT_CGROUP) {}: neither it nor {} is a cgroup v2 mount",
        path.display(),
        unified.display()
    ))
}

/// `ambit mount-bpffs`: mounts bpffs at `path` unless it already is one.
fn mount_bpffs(path: &std::path::Path) -> anyhow::Result<()> {
    let mounted = ambit::ebpf::mount_bpffs(path)
        .map_err(|e| anyhow::anyhow!("mounting bpffs at {}: {e}", path.display()))?;
    let what = if mounted {
        "mounted"
    } else {
        "already mounted"
    };
    println!("{}: bpffs {what}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `check` prints its findings itself; the agent's own logs would repeat them.
    let default_level = if matches!(cli.cmd, Cmd::Check { .. }) {
        "error"
    } else {
        "info"
    };
    let mut filter = std::env::var("AMBIT_LOG").unwrap_or_else(|_| default_level.into());
    // kube's HTTP layer logs every failed request at ERROR; the source logs each failure streak
    // once, with its kind, so those lines would only repeat it (unless asked for by name).
    if !filter.contains("kube_client") {
        filter.push_str(",kube_client::client::builder=off");
    }
    // rustls warns of each peer's protocol errors (a Finished where a ClientHello must be): any
    // client can cause as many as it likes, and the proxy reports failed handshakes itself, at
    // most once a minute (`proxy::hbone::server::report_refused`).
    if !filter.contains("rustls") {
        filter.push_str(",rustls=error");
    }
    let env_filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| {
        filter = default_level.to_string();
        default_level.into()
    });
    // The filter sits behind a reload layer so `/logging` can change it at run time.
    let (filter_layer, reload) = tracing_subscriber::reload::Layer::new(env_filter);
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(
            tracing_subscriber::fmt::layer()
                // Colour codes only for a person at a terminal, not in files and log collectors.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .init();
    let result: anyhow::Result<()> = match cli.cmd {
        Cmd::Run(args) => {
            let cfg = match (*args).into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ambit: bad configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let cfg = AgentConfig {
                log: Some(ambit::admin::logging::LogReload {
                    handle: reload,
                    startup: filter,
                }),
                ..cfg
            };
            tracing::info!(config = ?cfg, "starting");
            app::run(cfg).map_err(anyhow::Error::from)
        }
        Cmd::Check { path } => {
            let problems = ambit::app::check(&path);
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("{}: no problems", path.display());
                return ExitCode::SUCCESS;
            }
            eprintln!("{} problem(s)", problems.len());
            return ExitCode::FAILURE;
        }
        Cmd::MountBpffs { path } => mount_bpffs(&path),
        Cmd::CniUninstall {
            cni_conf_dir,
            cni_bin_dir,
            cni_dir,
        } => ambit::node::cni_install::uninstall(&ambit::node::cni_install::InstallConfig {
            conf_dir: cni_conf_dir.clone(),
            bin_dir: cni_bin_dir,
            plugin: PathBuf::new(),
            run_dir: cni_dir.clone(),
            exclude_namespaces: Vec::new(),
            uninstalled: Default::default(),
        })
        .map_err(anyhow::Error::from)
        .map(|()| {
            for file in [
                ambit_cni::proto::node_state_path(&cni_dir),
                ambit_cni::proto::socket_path(&cni_dir),
                ambit_cni::kube::kube_access_path(&cni_dir),
            ] {
                let _ = std::fs::remove_file(file);
            }
            println!("ambit-cni removed from {}", cni_conf_dir.display())
        }),
        Cmd::Uninstall { bpffs } => ambit::ebpf::uninstall(&bpffs)
            .map_err(anyhow::Error::from)
            .map(|()| {
                println!("removed {}", bpffs.display());
            }),
        Cmd::CaInit { dir, trust_domain } => {
            ambit::identity::LocalCa::load_or_create(&dir, &trust_domain)
                .map_err(anyhow::Error::from)
                .map(|ca| println!("root CA: {}", ca.root_cert_path().display()))
        }
        Cmd::Ca {
            cmd: CaCmd::Serve(args),
        } => {
            let cfg = match (*args).into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ambit: bad configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            tracing::info!(config = ?cfg, "starting the CA");
            ambit::ca::serve(cfg).map_err(anyhow::Error::from)
        }
        Cmd::Demo(args) => ambit::demo::run(args).map_err(anyhow::Error::from),
        Cmd::Zc(args) => ambit::zc::run(args).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit: {e:#}");
            ExitCode::FAILURE
        }
    }
}

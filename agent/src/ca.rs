//! `ambit ca serve`: the in-cluster CA. Signs workload CSRs with Istio's certificate service
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`) over TLS, for callers that prove
//! with a projected ServiceAccount token (TokenReview) that they are a node agent pod, and only
//! for identities that run on that agent's node (its own Pod watch), as istiod's node
//! authorisation does. The only pod that holds the root key.
//!
//! Root rotation with a trust-bundle overlap (`--extra-root`): see deploy/README.md.

mod authn;
mod metrics;
mod pods;
mod service;
mod signer;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::identity::IdentityError;
pub use metrics::CaMetrics;
pub use service::Authority;
pub use signer::Signer;

/// Istio: the longest workload certificate the CA signs (`MAX_WORKLOAD_CERT_TTL`, 90 days).
pub const DEFAULT_MAX_CERT_TTL: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// Istio's default trusted node account is ztunnel's; ambit's agent runs as this one.
pub const DEFAULT_AGENT_ACCOUNT: &str = "ambit-system/ambit-agent";
/// The ConfigMap holding the trust bundle (the roots, no key), as Istio's `istio-ca-root-cert`.
pub const DEFAULT_BUNDLE_CONFIGMAP: &str = "ambit-system/ambit-ca-root-cert";
/// The key of the bundle in that ConfigMap (Istio's name).
pub const BUNDLE_KEY: &str = "root-cert.pem";

#[derive(Debug, Error)]
pub enum CaError {
    #[error("CA root")]
    Root(#[source] IdentityError),
    #[error("CA root directory {dir}: {missing} is missing (create a root with `ambit ca-init --dir {dir}` and mount it as the CA's Secret)")]
    NoRoot { dir: PathBuf, missing: PathBuf },
    #[error("--agent-account {value:?}: want <namespace>/<service-account>")]
    AgentAccount { value: String },
    #[error("--bundle-configmap {value:?}: want <namespace>/<name>, or empty for none")]
    BundleConfigMap { value: String },
    #[error("--max-cert-ttl {max:?} is shorter than --default-cert-ttl {default:?}")]
    Ttl { max: Duration, default: Duration },
    #[error("--default-cert-ttl {0:?}: want at least one second")]
    DefaultTtl(Duration),
    #[error("--token-audience {value:?}: want a non-empty audience (Istio's default is `istio-ca`); without one any token the API server accepts would do")]
    Audience { value: String },
    #[error("--agent-account: want at least one <namespace>/<service-account>; without one no agent may ask")]
    NoAgentAccount,
    #[error("--tls-name {value:?}: want a DNS name or an IP address agents dial")]
    TlsName { value: String },
    #[error("listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("Kubernetes client")]
    Kube(#[source] kube::Error),
    #[error("serving certificate")]
    ServingCert(#[source] IdentityError),
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// `ambit ca serve`'s resolved configuration.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// `root-cert.pem` (the signing root, possibly with other roots) and `root-key.pem`.
    pub ca_dir: PathBuf,
    /// PEM files of further roots published in the trust bundle (not signed with): the next
    /// root before signing switches to it, or the previous one after.
    pub extra_roots: Vec<PathBuf>,
    pub trust_domain: String,
    /// gRPC (TLS) address; 15012 as istiod.
    pub listen: SocketAddr,
    /// `/metrics` and `/ready` (plain HTTP); 15014 as istiod's monitoring port. None = off.
    pub metrics_addr: Option<SocketAddr>,
    /// Audiences a token must carry (Istio: `istio-ca`).
    pub audiences: Vec<String>,
    /// `namespace/service-account` of the node agents allowed to ask for workload identities
    /// (Istio's `CA_TRUSTED_NODE_ACCOUNTS`).
    pub agent_accounts: Vec<(String, String)>,
    /// The `clusterid` this CA answers for (Istio's default `Kubernetes`).
    pub cluster_id: String,
    /// Used when a request asks for no lifetime (Istio: 24h).
    pub default_cert_ttl: Duration,
    /// Longer requests are refused, as Istio does.
    pub max_cert_ttl: Duration,
    /// DNS names (or IPs) of the CA's serving certificate.
    pub tls_names: Vec<String>,
    /// `namespace/name` of the ConfigMap the trust bundle is written to; None = not written.
    pub bundle_configmap: Option<(String, String)>,
}

impl ServeConfig {
    /// Refuses what would make the CA serve without a check it promises: a token audience, a
    /// node-agent account, a serving name, a usable certificate lifetime.
    pub fn validate(&self) -> Result<(), CaError> {
        if self.audiences.is_empty() {
            return Err(CaError::Audience {
                value: String::new(),
            });
        }
        if let Some(a) = self.audiences.iter().find(|a| a.trim().is_empty()) {
            return Err(CaError::Audience { value: a.clone() });
        }
        if self.agent_accounts.is_empty() {
            return Err(CaError::NoAgentAccount);
        }
        if let Some(n) = self.tls_names.iter().find(|n| n.trim().is_empty()) {
            return Err(CaError::TlsName { value: n.clone() });
        }
        if self.tls_names.is_empty() {
            return Err(CaError::TlsName {
                value: String::new(),
            });
        }
        if self.default_cert_ttl < Duration::from_secs(1) {
            return Err(CaError::DefaultTtl(self.default_cert_ttl));
        }
        if self.max_cert_ttl < self.default_cert_ttl {
            return Err(CaError::Ttl {
                max: self.max_cert_ttl,
                default: self.default_cert_ttl,
            });
        }
        Ok(())
    }
}

/// Parses `namespace/name` (both non-empty).
pub fn parse_namespaced(value: &str) -> Option<(String, String)> {
    let (ns, name) = value.split_once('/')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains('/'))
        .then(|| (ns.to_owned(), name.to_owned()))
}

/// Runs the CA until SIGTERM/SIGINT, with the in-cluster (or KUBECONFIG) credentials.
pub fn serve(cfg: ServeConfig) -> Result<(), CaError> {
    cfg.validate()?;
    crate::tls::install_process_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ambit-ca")
        .build()
        .map_err(CaError::Runtime)?;
    // The root first: a missing Secret is the likelier mistake, and needs no API server to tell.
    Signer::load(&cfg)?;
    rt.block_on(async {
        let client = Client::try_default().await.map_err(CaError::Kube)?;
        let running = RunningCa::start(cfg, client).await?;
        info!(grpc = %running.grpc_addr, metrics = ?running.metrics_addr, "CA serving");
        wait_for_signal().await;
        info!("CA stopping");
        drop(running);
        Ok(())
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A started CA: its tasks stop when this is dropped.
pub struct RunningCa {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub authority: Arc<Authority>,
    _tasks: JoinSet<()>,
}

impl RunningCa {
    /// Loads the roots, binds the listeners and starts the Pod watch, the bundle publisher and
    /// the servers on the current runtime.
    pub async fn start(cfg: ServeConfig, client: Client) -> Result<RunningCa, CaError> {
        cfg.validate()?;
        let signer = Arc::new(Signer::load(&cfg)?);
        let metrics = Arc::new(CaMetrics::new());
        let pods = pods::PodIndex::new();
        let authority = Arc::new(Authority::new(
            &cfg,
            signer.clone(),
            authn::TokenReviewer::new(client.clone(), cfg.audiences.clone()),
            pods.clone(),
            metrics.clone(),
        ));
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| CaError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let grpc_addr = listener.local_addr().map_err(|source| CaError::Listen {
            addr: cfg.listen,
            source,
        })?;
        let mut tasks = JoinSet::new();
        let mut metrics_addr = None;
        if let Some(addr) = cfg.metrics_addr {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| CaError::Listen { addr, source })?;
            metrics_addr = l.local_addr().ok();
            tasks.spawn(metrics::serve(l, metrics.clone(), pods.clone()));
        }
        tasks.spawn(pods::watch(client.clone(), pods));
        if let Some((ns, name)) = cfg.bundle_configmap.clone() {
            tasks.spawn(publish_bundle(client, ns, name, signer.bundle_pem()));
        }
        let tls = signer.server_config()?;
        tasks.spawn(service::serve(listener, tls, authority.clone()));
        Ok(RunningCa {
            grpc_addr,
            metrics_addr,
            authority,
            _tasks: tasks,
        })
    }
}

/// How often the bundle is applied again once published, so that a ConfigMap deleted or edited
/// by hand comes back (as Istio's namespace controller restores `istio-ca-root-cert`). An apply
/// of unchanged content writes nothing.
const REPUBLISH_EVERY: Duration = Duration::from_secs(60);

/// Keeps the trust bundle in its ConfigMap (server-side apply), retrying with backoff on
/// failure, until the task is dropped.
async fn publish_bundle(client: Client, namespace: String, name: String, pem: String) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": namespace },
        "data": { BUNDLE_KEY: pem },
    });
    let params = PatchParams::apply("ambit-ca").force();
    let configmap = format!("{namespace}/{name}");
    let mut backoff = Duration::from_millis(500);
    let mut written: Option<String> = None;
    loop {
        match api.patch(&name, &params, &Patch::Apply(&cm)).await {
            Ok(applied) => {
                // A new resource version: created, or restored after a change by someone else.
                let version = applied.metadata.resource_version;
                if version.is_none() || version != written {
                    info!(configmap = %configmap, "trust bundle published");
                    written = version;
                }
                backoff = Duration::from_millis(500);
                tokio::time::sleep(REPUBLISH_EVERY).await;
            }
            Err(e) => {
                warn!(configmap = %configmap, error = %e, retry_in = ?backoff, "cannot publish the trust bundle");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

//! `CreateCertificate`: authenticate the caller, authorise the identity it asks for against the
//! caller's node, sign, answer as istiod does (leaf, then root, one PEM per entry). Every refusal
//! is a gRPC status whose message names what failed, logged and counted by reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateSigningRequestParams, SanType};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use super::authn::{Caller, TokenReviewer};
use super::metrics::CaMetrics;
use super::pods::PodIndex;
use super::signer::Signer;
use super::ServeConfig;
use crate::identity::proto::{
    pem_encode, IstioCertificateRequest, IstioCertificateResponse, CLUSTER_ID_HEADER,
    CREATE_CERTIFICATE_PATH, IMPERSONATED_IDENTITY,
};
use crate::identity::Identity;

/// How long a request whose caller pod or identity the Pod watch has not shown yet waits for it:
/// an agent may see a new pod (and ask for its certificate) a little before the CA does.
const WATCH_CATCH_UP: Duration = Duration::from_secs(2);

/// A refused request: the gRPC code, a metric label, and the message the caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: Code,
    pub reason: &'static str,
    pub message: String,
}

impl Denial {
    pub fn unauthenticated(reason: &'static str, message: String) -> Denial {
        Denial {
            code: Code::Unauthenticated,
            reason,
            message,
        }
    }
    pub fn denied(reason: &'static str, message: String) -> Denial {
        Denial {
            code: Code::PermissionDenied,
            reason,
            message,
        }
    }
    pub fn invalid(reason: &'static str, message: String) -> Denial {
        Denial {
            code: Code::InvalidArgument,
            reason,
            message,
        }
    }
    pub fn unavailable(reason: &'static str, message: String) -> Denial {
        Denial {
            code: Code::Unavailable,
            reason,
            message,
        }
    }
}

/// Decides and signs; shared by every connection.
pub struct Authority {
    signer: Arc<Signer>,
    tokens: TokenReviewer,
    pods: PodIndex,
    metrics: Arc<CaMetrics>,
    agent_accounts: Vec<(String, String)>,
    cluster_id: String,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl Authority {
    pub(super) fn new(
        cfg: &ServeConfig,
        signer: Arc<Signer>,
        tokens: TokenReviewer,
        pods: PodIndex,
        metrics: Arc<CaMetrics>,
    ) -> Authority {
        Authority {
            signer,
            tokens,
            pods,
            metrics,
            agent_accounts: cfg.agent_accounts.clone(),
            cluster_id: cfg.cluster_id.clone(),
            default_ttl: cfg.default_cert_ttl,
            max_ttl: cfg.max_cert_ttl,
        }
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }

    #[cfg(test)]
    pub(super) fn pods(&self) -> &PodIndex {
        &self.pods
    }

    pub fn pods_synced(&self) -> bool {
        self.pods.synced()
    }

    /// The trust bundle's roots.
    pub fn roots(&self) -> &[rustls_pki_types::CertificateDer<'static>] {
        self.signer.bundle()
    }

    /// One `CreateCertificate` call, counted and logged.
    pub async fn create_certificate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        request: &IstioCertificateRequest,
        peer: Option<SocketAddr>,
    ) -> Result<IstioCertificateResponse, Status> {
        self.metrics.csr.inc();
        let started = Instant::now();
        match self.decide_and_sign(metadata, request).await {
            Ok((caller, identity, response)) => {
                self.metrics.issued.inc();
                info!(caller = %caller, identity = %identity, peer = ?peer, took = ?started.elapsed(), "certificate issued");
                Ok(response)
            }
            Err(d) => {
                self.metrics
                    .denied(d.reason, d.code == Code::Unauthenticated);
                warn!(code = ?d.code, reason = d.reason, peer = ?peer, "certificate refused: {}", d.message);
                Err(Status::new(d.code, d.message))
            }
        }
    }

    async fn decide_and_sign(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        request: &IstioCertificateRequest,
    ) -> Result<(Caller, Identity, IstioCertificateResponse), Denial> {
        // Istio: an absent cluster ID means the CA's own cluster.
        if let Some(id) = metadata.get(CLUSTER_ID_HEADER) {
            // Fail closed: a value that is not text names no cluster, least of all ours.
            let id = id.to_str().map_err(|_| {
                Denial::unauthenticated(
                    "unknown_cluster",
                    format!("the {CLUSTER_ID_HEADER} metadata is not ASCII text"),
                )
            })?;
            if !id.is_empty() && id != self.cluster_id {
                return Err(Denial::unauthenticated(
                    "unknown_cluster",
                    format!(
                        "cluster {id:?} is not this CA's cluster {:?}",
                        self.cluster_id
                    ),
                ));
            }
        }
        let token = bearer_token(metadata)?;
        let caller = self.tokens.review(token).await?;
        let identity = self.authorize(&caller, request).await?;
        let ttl = self.ttl(request.validity_duration)?;
        let csr_der = csr_der(&request.csr)?;
        let chain = self
            .signer
            .sign(&csr_der, &identity, ttl)
            .await
            .map_err(|e| Denial::invalid("csr_rejected", e.to_string()))?;
        // Istio: leaf (and intermediates), then the root, one certificate per entry.
        let cert_chain = chain
            .iter()
            .chain(std::iter::once(self.signer.signing_root()))
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect();
        Ok((caller, identity, IstioCertificateResponse { cert_chain }))
    }

    /// Node authorisation (istiod's `authenticateImpersonation`, with reasons): the caller is a
    /// node agent's pod, as it exists now, and the identity runs on that pod's node.
    async fn authorize(
        &self,
        caller: &Caller,
        request: &IstioCertificateRequest,
    ) -> Result<Identity, Denial> {
        let account = (caller.namespace.clone(), caller.service_account.clone());
        if !self.agent_accounts.contains(&account) {
            return Err(Denial::denied(
                "not_node_agent",
                format!(
                    "caller {caller} is not a node agent account (allowed: {})",
                    self.agent_accounts
                        .iter()
                        .map(|(ns, sa)| format!("{ns}/{sa}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let (pod_name, pod_uid) = caller.pod.as_ref().ok_or_else(|| {
            Denial::denied(
                "no_pod_claims",
                format!("caller {caller}: the token is not bound to a pod (use a projected ServiceAccount token)"),
            )
        })?;
        if !self.pods.synced() {
            return Err(Denial::unavailable(
                "pods_not_synced",
                "the CA has not listed the cluster's pods yet; retry".into(),
            ));
        }
        let pod = self.pods.pod(&caller.namespace, pod_name).ok_or_else(|| {
            Denial::denied(
                "caller_pod_unknown",
                format!(
                    "caller {caller}: pod {}/{pod_name} is not running on any node",
                    caller.namespace
                ),
            )
        })?;
        if &pod.uid != pod_uid {
            return Err(Denial::denied(
                "caller_pod_uid",
                format!(
                    "caller {caller}: pod {}/{pod_name} now has uid {}, not the token's",
                    caller.namespace, pod.uid
                ),
            ));
        }
        if pod.service_account != caller.service_account {
            return Err(Denial::denied(
                "caller_pod_account",
                format!(
                    "caller {caller}: pod {}/{pod_name} runs as {}",
                    caller.namespace, pod.service_account
                ),
            ));
        }
        let identity = requested_identity(request)?;
        if identity.trust_domain != self.signer.trust_domain() {
            return Err(Denial::denied(
                "trust_domain",
                format!(
                    "identity {identity} is not in trust domain {:?}",
                    self.signer.trust_domain()
                ),
            ));
        }
        let (node, ns, sa) = (&pod.node, &identity.namespace, &identity.service_account);
        if !self
            .pods
            .within(WATCH_CATCH_UP, |p| p.runs_on(node, ns, sa))
            .await
        {
            return Err(Denial::denied(
                "identity_not_on_node",
                format!(
                    "caller {caller} on node {:?} asked for {identity}, but no pod of {}/{} runs on that node",
                    pod.node, identity.namespace, identity.service_account
                ),
            ));
        }
        debug!(caller = %caller, identity = %identity, node = %pod.node, "node authorised");
        Ok(identity)
    }

    /// Istio: 0 or less asks for the default; more than the maximum is refused, not shortened.
    fn ttl(&self, seconds: i64) -> Result<Duration, Denial> {
        if seconds <= 0 {
            return Ok(self.default_ttl);
        }
        let ttl = Duration::from_secs(seconds as u64);
        if ttl > self.max_ttl {
            return Err(Denial::invalid(
                "ttl",
                format!(
                    "requested TTL {} is greater than the max allowed TTL {}",
                    humantime::format_duration(ttl),
                    humantime::format_duration(self.max_ttl)
                ),
            ));
        }
        Ok(ttl)
    }
}

fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Denial> {
    let value = metadata.get("authorization").ok_or_else(|| {
        Denial::unauthenticated(
            "no_token",
            "no `authorization: Bearer <token>` metadata".into(),
        )
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Denial::unauthenticated(
                "no_token",
                "the authorization metadata is not `Bearer <token>`".into(),
            )
        })
}

fn csr_der(pem: &str) -> Result<Vec<u8>, Denial> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| {
            Denial::invalid(
                "bad_csr",
                format!("csr is not a PEM CERTIFICATE REQUEST: {e}"),
            )
        })
}

/// The identity asked for: Istio's `ImpersonatedIdentity` metadata, else the CSR's only URI SAN.
/// The CSR's URI SANs, if any, must be exactly that identity (checked again when signing).
fn requested_identity(request: &IstioCertificateRequest) -> Result<Identity, Denial> {
    let csr_der = csr_der(&request.csr)?;
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(
        csr_der.as_slice(),
    ))
    .map_err(|e| Denial::invalid("bad_csr", format!("unreadable CSR: {e}")))?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    let asked = request
        .metadata
        .as_ref()
        .and_then(|m| m.string(IMPERSONATED_IDENTITY));
    let uri = match (asked, uris.as_slice()) {
        (Some(asked), []) => asked,
        (Some(asked), [one]) if *one == asked => asked,
        (Some(asked), _) => {
            return Err(Denial::invalid(
                "csr_identity_mismatch",
                format!("the CSR asks for {uris:?}, the request for {asked}"),
            ))
        }
        (None, [one]) => one,
        (None, _) => {
            return Err(Denial::invalid(
                "no_identity",
                format!(
                    "no {IMPERSONATED_IDENTITY} metadata and the CSR has {} URI SANs (want one)",
                    uris.len()
                ),
            ))
        }
    };
    Identity::parse(uri).map_err(|e| Denial::invalid("bad_identity", e.to_string()))
}

/// The gRPC service for one request, as tonic's server side expects.
struct Handler {
    authority: Arc<Authority>,
    peer: Option<SocketAddr>,
}

type HandlerFuture = Pin<
    Box<
        dyn std::future::Future<Output = Result<tonic::Response<IstioCertificateResponse>, Status>>
            + Send,
    >,
>;

impl tonic::server::UnaryService<IstioCertificateRequest> for Handler {
    type Response = IstioCertificateResponse;
    type Future = HandlerFuture;

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let authority = self.authority.clone();
        let peer = self.peer;
        Box::pin(async move {
            let (metadata, _, message) = request.into_parts();
            authority
                .create_certificate(&metadata, &message, peer)
                .await
                .map(tonic::Response::new)
        })
    }
}

/// Accepts TLS connections and serves HTTP/2 gRPC on them until dropped.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, authority: Arc<Authority>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "CA accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let authority = authority.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(peer = %peer, error = %e, "CA TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let authority = authority.clone();
                async move {
                    if req.uri().path() != CREATE_CERTIFICATE_PATH {
                        return Ok::<_, Infallible>(
                            Status::unimplemented(format!(
                                "{} is not served here (only {CREATE_CERTIFICATE_PATH})",
                                req.uri().path()
                            ))
                            .into_http(),
                        );
                    }
                    let codec = tonic_prost::ProstCodec::<
                        IstioCertificateResponse,
                        IstioCertificateRequest,
                    >::default();
                    let mut grpc = tonic::server::Grpc::new(codec);
                    let handler = Handler {
                        authority,
                        peer: Some(peer),
                    };
                    Ok(grpc.unary(handler, req).await)
                }
            });
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                debug!(peer = %peer, error = %e, "CA connection ended with an error");
            }
        });
    }
}

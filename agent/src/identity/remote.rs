//! The agent's client of an in-cluster CA: Istio's `IstioCertificateService/CreateCertificate`
//! over gRPC on TLS, authenticated with the agent's projected ServiceAccount token, asking for a
//! workload's identity by impersonation (as ztunnel asks istiod). Works against `ambit ca serve`
//! and istiod alike. The trust bundle (the CA's roots, no key) is a mounted file, re-read when it
//! changes, and is what the CA's serving certificate is verified against.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use tracing::info;

use super::proto::{
    pem_encode, IstioCertificateRequest, IstioCertificateResponse, Struct, CLUSTER_ID_HEADER,
    CREATE_CERTIFICATE_PATH, IMPERSONATED_IDENTITY,
};
use super::{CertificateAuthority, Identity, IdentityError, SignFuture};

/// Istio: the audience of the token a workload's agent presents to the CA (`istio-ca`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "istio-ca";
/// The CA's Service as `deploy/ca.yaml` names it; 15012 is istiod's CA/xDS port.
pub const DEFAULT_CA_ADDR: &str = "https://ambit-ca.ambit-system.svc:15012";

/// Where and how to reach the CA.
#[derive(Clone, Debug)]
pub struct RemoteCaConfig {
    /// `https://host:port`; the host is the name the CA's serving certificate must carry.
    pub addr: String,
    /// PEM file with the CA's root certificate(s): the trust bundle (e.g. the mounted ConfigMap
    /// `ambit-ca-root-cert`, as Istio's `istio-ca-root-cert`).
    pub roots_file: PathBuf,
    /// The projected ServiceAccount token (re-read for every request: the kubelet rotates it).
    pub token_file: PathBuf,
    /// Sent as Istio's `clusterid` metadata.
    pub cluster_id: String,
    /// Per-request deadline (connect included).
    pub timeout: Duration,
}

/// A [`CertificateAuthority`] that is a remote CA.
pub struct RemoteCa {
    cfg: RemoteCaConfig,
    host: String,
    port: u16,
    roots: Arc<RootsFile>,
    /// Made on first use, inside the runtime that signs (tonic's channel spawns a task).
    channel: OnceLock<Channel>,
}

impl std::fmt::Debug for RemoteCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCa")
            .field("addr", &self.cfg.addr)
            .field("roots_file", &self.cfg.roots_file)
            .finish_non_exhaustive()
    }
}

impl RemoteCa {
    /// Checks the address and reads the trust bundle once (a missing bundle is an error at
    /// start: without it the CA cannot be verified).
    pub fn new(cfg: RemoteCaConfig) -> Result<RemoteCa, IdentityError> {
        let bad = |reason: String| IdentityError::CaAddr {
            addr: cfg.addr.clone(),
            reason,
        };
        let uri: Uri = cfg.addr.parse().map_err(|e| bad(format!("{e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad(
                "must be https://host:port (the token is never sent in clear)".into(),
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        ServerName::try_from(host.clone()).map_err(|e| bad(format!("host: {e}")))?;
        let roots = Arc::new(RootsFile::new(cfg.roots_file.clone()));
        roots.load()?;
        Ok(RemoteCa {
            cfg,
            host,
            port,
            roots,
            channel: OnceLock::new(),
        })
    }

    fn channel(&self) -> Result<Channel, IdentityError> {
        if let Some(c) = self.channel.get() {
            return Ok(c.clone());
        }
        // The URI only names the peer for tonic; the connector dials `host:port` and does TLS
        // itself (tonic's own TLS would pick a crypto provider and roots of its own).
        let endpoint = Endpoint::from_shared(format!("http://{}:{}", self.host, self.port))
            .map_err(|e| IdentityError::CaAddr {
                addr: self.cfg.addr.clone(),
                reason: e.to_string(),
            })?
            .connect_timeout(self.cfg.timeout)
            .timeout(self.cfg.timeout);
        let connector = TlsConnect {
            host: self.host.clone(),
            port: self.port,
            roots: self.roots.clone(),
        };
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(self.channel.get_or_init(|| channel).clone())
    }

    async fn create_certificate(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let failed = |reason: String| IdentityError::FetchFailed {
            identity: identity.clone(),
            reason,
        };
        let token = fs::read_to_string(&self.cfg.token_file).map_err(|e| {
            failed(format!(
                "reading the ServiceAccount token {}: {e}",
                self.cfg.token_file.display()
            ))
        })?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: pem_encode("CERTIFICATE REQUEST", csr_der),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(Struct::with_string(
                IMPERSONATED_IDENTITY,
                &identity.to_string(),
            )),
        });
        let md = request.metadata_mut();
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| failed("the ServiceAccount token is not a valid header value".into()))?;
        md.insert("authorization", bearer);
        // An unsendable cluster ID is an error, not a request the CA would take for its own.
        let cluster = self.cfg.cluster_id.parse().map_err(|_| {
            failed(format!(
                "cluster ID {:?} (--cluster-id) is not a valid {CLUSTER_ID_HEADER} metadata value",
                self.cfg.cluster_id
            ))
        })?;
        md.insert(CLUSTER_ID_HEADER, cluster);
        let mut grpc = tonic::client::Grpc::new(self.channel()?);
        grpc.ready()
            .await
            .map_err(|e| failed(format!("CA {}: {e}", self.cfg.addr)))?;
        let path = PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
        let codec =
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let response = grpc.unary(request, path, codec).await.map_err(|s| {
            failed(format!(
                "CA {} answered {:?}: {}",
                self.cfg.addr,
                s.code(),
                s.message()
            ))
        })?;
        let mut chain = Vec::new();
        for pem in &response.get_ref().cert_chain {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| {
                    failed(format!("CA {}: bad PEM in the chain: {e}", self.cfg.addr))
                })?);
            }
        }
        // Istio appends the root; peers have it in their bundle, so it is not sent in handshakes.
        let roots = self.roots.load()?;
        while chain.len() > 1 && chain.last().is_some_and(|c| roots.contains(c)) {
            chain.pop();
        }
        Ok(chain)
    }
}

impl CertificateAuthority for RemoteCa {
    fn sign<'a>(
        &'a self,
        csr_der: &'a [u8],
        identity: &'a Identity,
        ttl: Duration,
    ) -> SignFuture<'a> {
        Box::pin(self.create_certificate(csr_der, identity, ttl))
    }

    fn roots(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        self.roots.load()
    }
}

/// A PEM bundle file re-read when its size, inode or mtime change (a ConfigMap volume swaps a
/// symlink, so the inode changes).
struct RootsFile {
    path: PathBuf,
    cache: Mutex<(Option<FileStamp>, Vec<CertificateDer<'static>>)>,
}

/// Size, inode, mtime (s, ns): what tells one version of the file from another without reading.
type FileStamp = (u64, u64, i64, i64);

impl RootsFile {
    fn new(path: PathBuf) -> RootsFile {
        RootsFile {
            path,
            cache: Mutex::new((None, Vec::new())),
        }
    }

    fn load(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let err = |reason: String| IdentityError::TrustBundle {
            path: self.path.clone(),
            reason,
        };
        let md = fs::metadata(&self.path).map_err(|e| err(e.to_string()))?;
        let stamp = (md.len(), md.ino(), md.mtime(), md.mtime_nsec());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != Some(stamp) {
            let certs = read_bundle(&self.path)?;
            info!(path = %self.path.display(), roots = certs.len(), "trust bundle file read");
            *cache = (Some(stamp), certs);
        }
        Ok(cache.1.clone())
    }
}

/// The certificates of a PEM bundle file (at least one).
pub fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let err = |reason: String| IdentityError::TrustBundle {
        path: path.to_owned(),
        reason,
    };
    let pem = fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// Dials the CA and does TLS 1.2/1.3 with ALPN h2, verifying the CA against the trust bundle as
/// it is at connect time.
#[derive(Clone)]
struct TlsConnect {
    host: String,
    port: u16,
    roots: Arc<RootsFile>,
}

type ConnectFuture =
    Pin<Box<dyn std::future::Future<Output = Result<TokioIo<ClientTls>, IdentityError>> + Send>>;
type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

impl tonic::codegen::Service<Uri> for TlsConnect {
    type Response = TokioIo<ClientTls>;
    type Error = IdentityError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = format!("{}:{}", this.host, this.port);
            let err = |reason: String| IdentityError::CaConnect {
                addr: addr.clone(),
                reason,
            };
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(this.roots.load()?);
            let mut cfg = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| err(e.to_string()))?
            .with_root_certificates(store)
            .with_no_client_auth();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let name = ServerName::try_from(this.host.clone()).map_err(|e| err(e.to_string()))?;
            let tcp = TcpStream::connect((this.host.as_str(), this.port))
                .await
                .map_err(|e| err(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| err(format!("TLS: {e}")))?;
            Ok(TokioIo::new(tls))
        })
    }
}

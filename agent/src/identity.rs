//! Workload identities (SPIFFE ids), the CA that certifies them, and the certificate manager that
//! keeps one rotating certificate per service account with an enrolled pod on this node.

mod ca;
mod manager;
pub mod proto;
mod remote;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use thiserror::Error;

pub use ca::LocalCa;
pub use manager::{
    CertConfig, CertLease, CertState, CertStats, SecretManager, TrustBundle, WorkloadCert,
    ROOTS_REFRESH_INTERVAL,
};
pub use remote::{read_bundle, RemoteCa, RemoteCaConfig, DEFAULT_CA_ADDR, DEFAULT_TOKEN_AUDIENCE};

/// Istio: the default trust domain of a mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio: workload certificates live 24h by default (`SECRET_TTL`).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE identity {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    #[error("local CA {path}: {source}")]
    CaIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local CA {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("local CA in {dir} is incomplete: {missing} is missing (remove the directory to start a new CA)")]
    CaIncomplete { dir: PathBuf, missing: PathBuf },
    #[error("{what}: {source}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("CSR for {identity} rejected: {reason}")]
    CsrRejected { identity: Identity, reason: String },
    #[error("certificate TTL {ttl:?} is too short (at least 1s)")]
    InvalidTtl { ttl: Duration },
    #[error("no lease for {identity}: its certificate is not managed on this node")]
    NoLease { identity: Identity },
    #[error("certificate for {identity} could not be fetched: {reason}")]
    FetchFailed { identity: Identity, reason: String },
    #[error("certificate issued for {identity} is unusable: {reason}")]
    BadCertificate { identity: Identity, reason: String },
    #[error("CA address {addr:?}: {reason}")]
    CaAddr { addr: String, reason: String },
    #[error("connecting to the CA at {addr}: {reason}")]
    CaConnect { addr: String, reason: String },
    #[error("trust bundle {path}: {reason}")]
    TrustBundle { path: PathBuf, reason: String },
    #[error("private key for {identity}: {source}")]
    Key {
        identity: Identity,
        // Boxed: rustls errors are large and this one is rare.
        #[source]
        source: Box<rustls::Error>,
    },
}

impl IdentityError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            IdentityError::InvalidUri { .. } => "invalid_uri",
            IdentityError::CaIo { .. }
            | IdentityError::CaFile { .. }
            | IdentityError::CaIncomplete { .. } => "ca_files",
            IdentityError::Rcgen { .. } => "x509",
            IdentityError::CsrRejected { .. } => "csr_rejected",
            IdentityError::InvalidTtl { .. } => "invalid_ttl",
            IdentityError::NoLease { .. } => "no_lease",
            IdentityError::FetchFailed { .. } => "fetch_failed",
            IdentityError::BadCertificate { .. } => "bad_certificate",
            IdentityError::Key { .. } => "key",
            IdentityError::CaAddr { .. } => "ca_addr",
            IdentityError::CaConnect { .. } => "ca_connect",
            IdentityError::TrustBundle { .. } => "trust_bundle",
        }
    }
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, Istio's workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

const SPIFFE_SCHEME: &str = "spiffe://";

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses exactly `spiffe://td/ns/X/sa/Y`: no other path shape, no query, fragment, port or
    /// user info, and only the characters the SPIFFE spec allows.
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let bad = |reason| IdentityError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        let rest = uri
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| bad("scheme must be spiffe://"))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        if td.is_empty() {
            return Err(bad("empty trust domain"));
        }
        // SPIFFE: trust domain names are lowercase letters, digits, '.', '-' and '_'.
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad("trust domain has characters outside [a-z0-9._-]"));
        }
        let segments: Vec<&str> = parts.collect();
        let [ns_key, ns, sa_key, sa] = segments.as_slice() else {
            return Err(bad("path must be /ns/<namespace>/sa/<service-account>"));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(bad("path must be /ns/<namespace>/sa/<service-account>"));
        }
        for seg in [ns, sa] {
            if seg.is_empty() {
                return Err(bad("empty namespace or service account"));
            }
            if *seg == "." || *seg == ".." {
                return Err(bad("'.' and '..' are not allowed as path segments"));
            }
            // SPIFFE: path segments are letters, digits, '.', '-' and '_'.
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(bad(
                    "namespace or service account has characters outside [A-Za-z0-9._-]",
                ));
            }
        }
        Ok(Identity::new(td, ns, sa))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SPIFFE_SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Future returned by [`CertificateAuthority::sign`].
pub type SignFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<CertificateDer<'static>>, IdentityError>> + Send + 'a>>;

/// Issues workload certificates. Takes a CSR so that a remote CA (Istio's `CreateCertificate`
/// gRPC call carries a PEM CSR) fits the same shape as the local one; the private key never
/// leaves the node agent.
pub trait CertificateAuthority: Send + Sync + fmt::Debug {
    /// Signs a PKCS#10 CSR (DER) for `identity` with `ttl`; returns the chain, leaf first
    /// (the root may be left out).
    fn sign<'a>(
        &'a self,
        csr_der: &'a [u8],
        identity: &'a Identity,
        ttl: Duration,
    ) -> SignFuture<'a>;

    /// Current trust anchors (root certificates). Called about once a second by
    /// [`TrustBundle`]; implementations should make an unchanged answer cheap.
    fn roots(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError>;
}

/// The SPIFFE identities among a certificate's URI SANs, in order. URIs that are not valid
/// workload identities are skipped; a certificate that does not parse yields none.
pub fn cert_identities(cert: &CertificateDer<'_>) -> Vec<Identity> {
    cert_uri_sans(cert)
        .unwrap_or_default()
        .iter()
        .filter_map(|uri| Identity::parse(uri).ok())
        .collect()
}

/// All URI SANs of a certificate (`Err` when it does not parse as X.509).
pub fn cert_uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

//! The CA's keys: the signing root (a [`LocalCa`] over the mounted Secret), the trust bundle it
//! publishes (its roots plus `--extra-root`s, for rotation), and its own serving certificate,
//! signed by the same root and re-issued at half its life.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{CaError, ServeConfig};
use crate::identity::proto::pem_encode;
use crate::identity::{read_bundle, CertificateAuthority, Identity, IdentityError, LocalCa};

/// The serving certificate's lifetime; it is re-issued at half of it.
const SERVING_TTL: Duration = Duration::from_secs(24 * 60 * 60);

pub struct Signer {
    ca: LocalCa,
    bundle: Vec<CertificateDer<'static>>,
    tls_names: Vec<String>,
}

impl Signer {
    /// Loads `<ca_dir>/root-cert.pem` + `root-key.pem` (never creates them: the root is made
    /// once by `ambit ca-init` and lives in a Secret) and the extra roots.
    pub fn load(cfg: &ServeConfig) -> Result<Signer, CaError> {
        for file in ["root-cert.pem", "root-key.pem"] {
            let path = cfg.ca_dir.join(file);
            if !path.exists() {
                return Err(CaError::NoRoot {
                    dir: cfg.ca_dir.clone(),
                    missing: path,
                });
            }
        }
        let ca = LocalCa::load_or_create(&cfg.ca_dir, &cfg.trust_domain).map_err(CaError::Root)?;
        let mut bundle = ca.roots().map_err(CaError::Root)?;
        for path in &cfg.extra_roots {
            for root in read_bundle(path).map_err(CaError::Root)? {
                if !bundle.contains(&root) {
                    bundle.push(root);
                }
            }
        }
        info!(dir = %cfg.ca_dir.display(), roots = bundle.len(), "CA root loaded");
        Ok(Signer {
            ca,
            bundle,
            tls_names: cfg.tls_names.clone(),
        })
    }

    /// Every root agents must trust (signing root first).
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    pub fn bundle_pem(&self) -> String {
        let mut roots: Vec<&CertificateDer<'static>> = vec![self.ca.signing_root()];
        roots.extend(self.bundle.iter().filter(|r| *r != self.ca.signing_root()));
        roots
            .into_iter()
            .map(|r| pem_encode("CERTIFICATE", r))
            .collect()
    }

    pub fn signing_root(&self) -> &CertificateDer<'static> {
        self.ca.signing_root()
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// Signs a workload CSR (its URI SANs, if any, must be exactly `identity`).
    pub async fn sign(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        self.ca.sign(csr_der, identity, ttl).await
    }

    /// TLS for the gRPC port: TLS 1.2/1.3, ALPN h2, no client certificate (callers prove who
    /// they are with their token), the serving certificate re-issued as it ages.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, CaError> {
        let resolver = ServingCert {
            signer: self.clone(),
            current: Mutex::new(self.issue_serving().map_err(CaError::ServingCert)?),
        };
        let mut cfg =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(CaError::Tls)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn issue_serving(&self) -> Result<(Arc<CertifiedKey>, Instant), IdentityError> {
        let rc = |what| move |source| IdentityError::Rcgen { what, source };
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("serving key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ambit-ca");
        params.distinguished_name = dn;
        params.subject_alt_names = self
            .tls_names
            .iter()
            .map(|name| match name.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(rc("serving certificate DNS name")),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - Duration::from_secs(60));
        params.not_after = OffsetDateTime::from(now + SERVING_TTL);
        let leaf = self.ca.sign_unchecked(&params, &key)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|source| IdentityError::Key {
                identity: Identity::new(self.trust_domain(), "ambit-ca", "serving"),
                source: Box::new(source),
            })?;
        Ok((
            Arc::new(CertifiedKey::new(vec![leaf], signing_key)),
            Instant::now() + SERVING_TTL / 2,
        ))
    }
}

#[derive(Debug)]
struct ServingCert {
    signer: Arc<Signer>,
    current: Mutex<(Arc<CertifiedKey>, Instant)>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("ca", &self.ca)
            .field("roots", &self.bundle.len())
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if Instant::now() >= current.1 {
            match self.signer.issue_serving() {
                Ok(next) => {
                    info!("CA serving certificate re-issued");
                    *current = next;
                }
                // The old one is still valid for half its life; try again on the next handshake.
                Err(e) => warn!(error = %e, "cannot re-issue the CA's serving certificate"),
            }
        }
        Some(current.0.clone())
    }
}

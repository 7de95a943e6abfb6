//! rustls configs for HBONE mTLS, compatible with Istio ztunnel: TLS 1.3 only, ALPN `h2`, no SNI,
//! SPIFFE identities in URI SANs checked against the trust bundle. Certificates and roots are
//! read per handshake, so cached configs follow rotations and root changes.

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;

use crate::identity::{cert_uri_sans, Identity, SecretManager, TrustBundle};

/// Istio: HBONE is HTTP/2 CONNECT over mTLS.
pub const ALPN_H2: &[u8] = b"h2";

/// Handshake refusals of our verifiers. rustls prints the cause of a certificate error with
/// `Debug`, so `Debug` here is the readable message (it ends up in connect/accept errors).
#[derive(Error)]
pub enum TlsError {
    #[error("peer certificate is not X.509: {reason}")]
    BadCertificate { reason: String },
    #[error("peer certificate has no SPIFFE identity (URI SANs: {presented:?})")]
    NoSpiffeIdentity { presented: Vec<String> },
    #[error("peer identity {presented:?} is outside trust domain {trust_domain}")]
    WrongTrustDomain {
        trust_domain: String,
        presented: Vec<String>,
    },
    #[error(
        "peer identity mismatch: expected {}, presented {presented:?}",
        list(expected)
    )]
    IdentityMismatch {
        expected: Vec<Identity>,
        presented: Vec<String>,
    },
}

impl TlsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            TlsError::BadCertificate { .. } => "bad_certificate",
            TlsError::NoSpiffeIdentity { .. } => "no_spiffe_identity",
            TlsError::WrongTrustDomain { .. } => "wrong_trust_domain",
            TlsError::IdentityMismatch { .. } => "identity_mismatch",
        }
    }
}

impl std::fmt::Debug for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn list(ids: &[Identity]) -> String {
    let ids: Vec<String> = ids.iter().map(Identity::to_string).collect();
    ids.join(" or ")
}

/// The process-wide rustls provider, for the clients that take it rather than a config of ours
/// (kube's). Both of rustls' providers are compiled in (HBONE uses aws-lc-rs through
/// [`provider`]), so rustls cannot pick one by itself and would panic: kube keeps ring, as
/// before. Idempotent; call before building a kube client or config.
pub fn install_process_default() {
    // Err only when one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// aws-lc-rs, not ring: its AES-GCM has AVX-512 code that ring lacks, and halved the cipher's
/// share of a bulk HBONE transfer on this machine's CPUs (agent/benches/README.md, "TLS
/// provider"). Its default key exchange order is ring's (X25519 first; the post-quantum hybrid
/// offered last), so a ClientHello to ztunnel is what it was.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    // AES-128-GCM first: cheaper per byte than AES-256-GCM; every suite stays offered, so a peer
    // that prefers another still gets it.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Server config for one pod's HBONE listener: presents `identity`'s current cert, ALPN h2,
/// TLS 1.3 only, and requires a client certificate that chains to the trust bundle and carries a
/// SPIFFE identity in the manager's trust domain.
pub fn server_config(manager: Arc<SecretManager>, identity: Identity) -> Arc<ServerConfig> {
    let bundle = manager.trust_bundle();
    let trust_domain = manager.trust_domain().to_owned();
    build_server(
        bundle,
        trust_domain,
        Arc::new(CurrentCert { manager, identity }),
    )
}

fn build_server(
    bundle: TrustBundle,
    trust_domain: String,
    certs: Arc<dyn ResolvesServerCert>,
) -> Arc<ServerConfig> {
    let provider = provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        chain: ChainVerifier::new(bundle, &provider),
        trust_domain,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the aws-lc-rs provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session tickets: HBONE connections are long-lived and pooled, and no client resumes
    // (ours does not, nor does ztunnel's, whose server still sends rustls's default two).
    cfg.send_tls13_tickets = 0;
    Arc::new(cfg)
}

/// Client config: presents `source`'s current cert and accepts only a server that chains to
/// the trust bundle and carries `expected` as URI SAN.
pub fn client_config(
    manager: Arc<SecretManager>,
    source: Identity,
    expected: Identity,
) -> Arc<ClientConfig> {
    client_config_any(manager, source, vec![expected])
}

/// As [`client_config`], accepting a server with any one of `expected` (e.g. the identities of
/// all endpoints of a service).
pub fn client_config_any(
    manager: Arc<SecretManager>,
    source: Identity,
    expected: Vec<Identity>,
) -> Arc<ClientConfig> {
    let bundle = manager.trust_bundle();
    build_client(
        bundle,
        expected,
        Arc::new(CurrentCert {
            manager,
            identity: source,
        }),
    )
}

fn build_client(
    bundle: TrustBundle,
    expected: Vec<Identity>,
    certs: Arc<dyn ResolvesClientCert>,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        chain: ChainVerifier::new(bundle, &provider),
        expected,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the aws-lc-rs provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Istio ztunnel: the destination is identified by its SPIFFE id, not by a host name.
    cfg.enable_sni = false;
    // Istio ztunnel: every connection is a full handshake whose certificate is verified against
    // the identities expected now. A ticket from a ztunnel server (it sends two) would otherwise
    // let a later connection to that address resume without presenting a certificate.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// The name to connect with: the destination IP (SNI is off, so it is never sent).
pub fn server_name(dst: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(dst.into())
}

/// The SPIFFE identity in the peer's leaf certificate (after a handshake).
pub fn peer_identity(conn: &rustls::CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    cert_uri_sans(leaf)
        .ok()?
        .iter()
        .find_map(|uri| Identity::parse(uri).ok())
}

/// Hands rustls the manager's current certificate of one identity, on every handshake.
#[derive(Debug)]
struct CurrentCert {
    manager: Arc<SecretManager>,
    identity: Identity,
}

impl CurrentCert {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.manager.current(&self.identity);
        if cert.is_none() {
            tracing::warn!(identity = %self.identity, "TLS handshake without a certificate: none issued yet");
        }
        cert.map(|c| Arc::clone(&c.certified_key))
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What the client and the server verifier share: the trust bundle a peer must chain to, and the
/// signature algorithms it may use.
#[derive(Debug)]
struct ChainVerifier {
    bundle: TrustBundle,
    algs: WebPkiSupportedAlgorithms,
}

/// A peer's certificate that chains to the trust bundle.
struct VerifiedPeer {
    /// Every URI SAN, for errors.
    uris: Vec<String>,
    /// The URI SANs that are SPIFFE identities.
    ids: Vec<Identity>,
}

impl ChainVerifier {
    fn new(bundle: TrustBundle, provider: &CryptoProvider) -> ChainVerifier {
        ChainVerifier {
            bundle,
            algs: provider.signature_verification_algorithms,
        }
    }

    /// Verifies `end_entity` chains to the bundle's current roots (validity, signatures, EKU) and
    /// returns its URI SANs and the SPIFFE identities among them.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<VerifiedPeer, rustls::Error> {
        let roots = self.bundle.roots();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algs.all,
            &roots.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let uris = cert_uri_sans(end_entity)
            .map_err(|reason| other(TlsError::BadCertificate { reason }))?;
        let ids = spiffe_ids(&uris);
        Ok(VerifiedPeer { uris, ids })
    }
}

/// The handshake-signature methods, the same in `ClientCertVerifier` and `ServerCertVerifier`:
/// checked with the algorithms of `self.chain`.
macro_rules! verify_signatures_with_chain {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.chain.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.chain.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.chain.algs.supported_schemes()
        }
    };
}

fn other(e: TlsError) -> rustls::Error {
    CertificateError::Other(OtherError(Arc::new(e))).into()
}

/// The common webpki errors as rustls names them (rustls's own mapping is private).
fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    ce.into()
}

fn spiffe_ids(uris: &[String]) -> Vec<Identity> {
    uris.iter()
        .filter_map(|u| Identity::parse(u).ok())
        .collect()
}

/// Server side: any client with a SPIFFE identity of our trust domain, chained to the bundle.
/// Who may call what is policy's business, after the handshake.
#[derive(Debug)]
struct SpiffeClientVerifier {
    chain: ChainVerifier,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Istio ztunnel sends no CA names; every client has exactly one cert to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let VerifiedPeer { uris, ids } = self.chain.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        if ids.is_empty() {
            return Err(other(TlsError::NoSpiffeIdentity { presented: uris }));
        }
        if !ids.iter().any(|id| id.trust_domain == self.trust_domain) {
            return Err(other(TlsError::WrongTrustDomain {
                trust_domain: self.trust_domain.clone(),
                presented: uris,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    verify_signatures_with_chain!();
}

/// Client side: the server must chain to the bundle and be one of the expected identities.
#[derive(Debug)]
struct SpiffeServerVerifier {
    chain: ChainVerifier,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let VerifiedPeer { uris, ids } = self.chain.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        // Istio: the server name is irrelevant; the identity in the URI SAN is what we check.
        if ids.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(other(TlsError::IdentityMismatch {
            expected: self.expected.clone(),
            presented: uris,
        }))
    }

    verify_signatures_with_chain!();
}

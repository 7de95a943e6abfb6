//! Certificate helpers for tests of the CA and its clients: a CSR as an agent sends one, and the
//! check a peer makes of an issued chain.

use std::time::SystemTime;

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::Identity;

/// A PKCS#10 CSR (DER) for `identity`'s SPIFFE URI with a fresh P-256 key, as the agent makes.
pub fn csr_for(identity: &Identity) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().expect("IA5 URI"),
    )];
    params.serialize_request(&key).expect("CSR").der().to_vec()
}

/// Verifies `leaf` chains to `root`, now, for each of `usages`, as peers do.
pub fn verify(
    leaf: &CertificateDer<'_>,
    root: &CertificateDer<'_>,
    usages: &[webpki::KeyUsage],
) -> Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(root)?;
    let cert = webpki::EndEntityCert::try_from(leaf)?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let now = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    for usage in usages {
        cert.verify_for_usage(
            algs.all,
            std::slice::from_ref(&anchor),
            &[],
            now,
            *usage,
            None,
            None,
        )?;
    }
    Ok(())
}

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::X509Certificate;

use super::*;

/// A directory under the system temp dir, unique per process and test, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ambit-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(DEFAULT_TRUST_DOMAIN, ns, sa)
}

pub(crate) fn local_ca(dir: &TempDir) -> Arc<LocalCa> {
    Arc::new(
        LocalCa::load_or_create(dir.path(), DEFAULT_TRUST_DOMAIN)
            .unwrap_or_else(|e| panic!("local CA in {}: {e}", dir.path().display())),
    )
}

pub(crate) fn manager(ca: Arc<dyn CertificateAuthority>, ttl: Duration) -> Arc<SecretManager> {
    SecretManager::new(
        ca,
        CertConfig {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            ttl,
        },
    )
}

pub(crate) fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    x509_parser::parse_x509_certificate(der)
        .unwrap_or_else(|e| panic!("certificate does not parse: {e}"))
        .1
}

pub(crate) fn serial(der: &CertificateDer<'_>) -> Vec<u8> {
    parse(der).raw_serial().to_vec()
}

/// Polls `cond` every 20ms until it holds; panics with `what` after a generous deadline.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A CSR as a workload would send it, with `sans` as URI SANs.
fn csr(sans: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().expect("IA5 URI")))
        .collect();
    params.serialize_request(&key).expect("CSR").der().to_vec()
}

#[test]
fn identity_parse_display_round_trip() {
    let uri = "spiffe://cluster.local/ns/default/sa/sleep";
    let parsed = Identity::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
    assert_eq!(parsed, id("default", "sleep"), "fields of {uri}");
    assert_eq!(parsed.to_string(), uri, "display is the URI");
    let odd = "spiffe://td-1.example_x/ns/Kube.System-2/sa/a_b";
    let parsed = Identity::parse(odd).unwrap_or_else(|e| panic!("{odd}: {e}"));
    assert_eq!(parsed.to_string(), odd, "round trip of {odd}");
}

#[test]
fn identity_parse_rejects_malformed_uris() {
    for bad in [
        "",
        "spiffe://",
        "http://cluster.local/ns/a/sa/b",
        "SPIFFE://cluster.local/ns/a/sa/b",
        "spiffe:///ns/a/sa/b",
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa",
        "spiffe://cluster.local/ns/a/sa/",
        "spiffe://cluster.local/ns/a/sa/b/",
        "spiffe://cluster.local/ns/a/sa/b/c",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe://cluster.local/ns//sa/b",
        "spiffe://cluster.local/ns/../sa/b",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local:443/ns/a/sa/b",
        "spiffe://user@cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "spiffe://cluster.local/ns/a/sa/b#frag",
        "spiffe://cluster.local/ns/a b/sa/b",
    ] {
        match Identity::parse(bad) {
            Err(IdentityError::InvalidUri { uri, .. }) => assert_eq!(uri, bad, "error names input"),
            other => panic!("{bad:?} should be rejected, got {other:?}"),
        }
    }
}

#[test]
fn local_ca_creates_private_files_and_reuses_root() {
    let dir = TempDir::new("ca-files");
    let nested = dir.path().join("ca");
    let first = LocalCa::load_or_create(&nested, DEFAULT_TRUST_DOMAIN)
        .unwrap_or_else(|e| panic!("create: {e}"));
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&nested), 0o700, "CA directory mode");
    assert_eq!(mode(&first.root_key_path()), 0o600, "CA key mode");
    assert_eq!(first.root_cert_path(), nested.join("root-cert.pem"));
    let roots1 = first.roots().unwrap_or_else(|e| panic!("roots: {e}"));
    assert_eq!(roots1.len(), 1, "one root");
    let root = parse(&roots1[0]);
    assert!(root.is_ca(), "root is a CA");

    let key_before = std::fs::read(first.root_key_path()).expect("key file");
    let second = LocalCa::load_or_create(&nested, DEFAULT_TRUST_DOMAIN)
        .unwrap_or_else(|e| panic!("reload: {e}"));
    let roots2 = second.roots().unwrap_or_else(|e| panic!("roots: {e}"));
    assert_eq!(roots1, roots2, "second load reuses the root");
    assert_eq!(
        std::fs::read(second.root_key_path()).expect("key file"),
        key_before,
        "key file untouched"
    );
    // What the reloaded CA signs chains to the original root.
    let leaf = second
        .sign_csr(&csr(&[]), &id("default", "a"), Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("sign: {e}"));
    let leaf = parse(&leaf[0]);
    assert!(
        leaf.verify_signature(Some(root.public_key())).is_ok(),
        "leaf from the reloaded CA is signed by the first root"
    );
}

#[test]
fn local_ca_refuses_half_a_ca() {
    let dir = TempDir::new("ca-half");
    let ca = local_ca(&dir);
    std::fs::remove_file(ca.root_key_path()).expect("remove key");
    match LocalCa::load_or_create(dir.path(), DEFAULT_TRUST_DOMAIN) {
        Err(IdentityError::CaIncomplete { missing, .. }) => {
            assert_eq!(missing, ca.root_key_path(), "names the missing key")
        }
        other => panic!("a cert without its key must not be reused or replaced: {other:?}"),
    }
}

#[test]
fn signed_cert_has_only_the_spiffe_uri_p256_and_ttl() {
    let dir = TempDir::new("ca-sign");
    let ca = local_ca(&dir);
    let ident = id("default", "sleep");
    let ttl = Duration::from_secs(3600);
    let before = SystemTime::now();
    let chain = ca
        .sign_csr(&csr(&[&ident.to_string()]), &ident, ttl)
        .unwrap_or_else(|e| panic!("sign: {e}"));
    let after = SystemTime::now();
    let cert = parse(&chain[0]);

    let san = cert
        .subject_alternative_name()
        .expect("SAN parses")
        .expect("SAN present");
    match san.value.general_names.as_slice() {
        [GeneralName::URI(uri)] => assert_eq!(*uri, ident.to_string(), "URI SAN"),
        other => panic!("exactly one URI SAN expected, got {other:?}"),
    }
    // id-ecPublicKey with the prime256v1 curve.
    let spki = &cert.public_key().algorithm;
    assert_eq!(spki.algorithm.to_id_string(), "1.2.840.10045.2.1", "EC key");
    let curve = spki
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    assert_eq!(curve.as_deref(), Some("1.2.840.10045.3.1.7"), "P-256 curve");

    let nb = SystemTime::from(cert.validity().not_before.to_datetime());
    let na = SystemTime::from(cert.validity().not_after.to_datetime());
    // X.509 times have one-second resolution.
    let slack = Duration::from_secs(1);
    assert!(
        na + slack >= before + ttl && na <= after + ttl,
        "not_after = now + ttl"
    );
    assert!(nb <= before, "not_before is backdated");
    assert!(
        nb + Duration::from_secs(61) >= before,
        "backdated by at most 60s"
    );

    assert!(!cert.is_ca(), "leaf is not a CA");
    let mut seen_ku = false;
    let mut seen_eku = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::KeyUsage(ku) => {
                seen_ku = true;
                assert!(ku.digital_signature() && ku.key_encipherment(), "{ku:?}");
                assert!(!ku.key_cert_sign(), "leaf cannot sign certs");
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                seen_eku = true;
                assert!(eku.server_auth && eku.client_auth, "{eku:?}");
            }
            _ => {}
        }
    }
    assert!(seen_ku && seen_eku, "key usage and EKU present");
}

#[test]
fn short_ttl_backdates_by_a_quarter() {
    let dir = TempDir::new("ca-short");
    let ca = local_ca(&dir);
    let before = SystemTime::now();
    let chain = ca
        .sign_csr(&csr(&[]), &id("default", "a"), Duration::from_secs(4))
        .unwrap_or_else(|e| panic!("sign: {e}"));
    let cert = parse(&chain[0]);
    let nb = SystemTime::from(cert.validity().not_before.to_datetime());
    // 1s backdate plus up to 1s of truncation.
    assert!(
        nb + Duration::from_secs(2) >= before,
        "a 4s cert is backdated by about 1s, not 60s"
    );
}

#[test]
fn csr_for_another_identity_is_refused() {
    let dir = TempDir::new("ca-refuse");
    let ca = local_ca(&dir);
    let ident = id("default", "sleep");
    let ttl = Duration::from_secs(60);
    for sans in [
        vec!["spiffe://cluster.local/ns/kube-system/sa/admin"],
        vec![
            "spiffe://cluster.local/ns/default/sa/sleep",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        ],
    ] {
        match ca.sign_csr(&csr(&sans), &ident, ttl) {
            Err(IdentityError::CsrRejected { identity, .. }) => assert_eq!(identity, ident),
            other => panic!("CSR for {sans:?} signed as {ident}: {other:?}"),
        }
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let dns = CertificateParams::new(vec!["evil.example.com".to_owned()])
        .expect("params")
        .serialize_request(&key)
        .expect("CSR");
    assert!(
        matches!(
            ca.sign_csr(dns.der(), &ident, ttl),
            Err(IdentityError::CsrRejected { .. })
        ),
        "CSR with a DNS SAN refused"
    );
    assert!(
        matches!(
            ca.sign_csr(b"not a csr", &ident, ttl),
            Err(IdentityError::CsrRejected { .. })
        ),
        "garbage refused"
    );
}

#[tokio::test]
async fn acquire_fetch_and_release() {
    let dir = TempDir::new("mgr-lease");
    let mgr = manager(local_ca(&dir), DEFAULT_CERT_TTL);
    let ident = id("default", "sleep");
    assert!(
        matches!(mgr.fetch(&ident).await, Err(IdentityError::NoLease { .. })),
        "no lease, no cert"
    );
    let lease1 = mgr.acquire(&ident);
    let lease2 = mgr.acquire(&ident);
    let cert = mgr
        .fetch(&ident)
        .await
        .unwrap_or_else(|e| panic!("fetch: {e}"));
    assert_eq!(cert.identity, ident);
    assert_eq!(cert_identities(&cert.chain[0]), vec![ident.clone()]);
    assert!(cert.not_after > SystemTime::now() + Duration::from_secs(23 * 3600));
    let stats = mgr.stats();
    assert_eq!(
        (stats.identities, stats.issued_total),
        (1, 1),
        "one cert for two leases: {stats:?}"
    );
    assert!(mgr.current(&ident).is_some(), "current after fetch");

    drop(lease1);
    assert!(mgr.current(&ident).is_some(), "still leased once");
    drop(lease2);
    assert!(mgr.current(&ident).is_none(), "last lease dropped the cert");
    assert_eq!(mgr.stats().identities, 0);
    assert!(
        matches!(mgr.fetch(&ident).await, Err(IdentityError::NoLease { .. })),
        "fetch after release"
    );
}

#[tokio::test]
async fn short_ttl_rotates_at_half_life() {
    let dir = TempDir::new("mgr-rotate");
    let mgr = manager(local_ca(&dir), Duration::from_secs(4));
    let ident = id("default", "sleep");
    let _lease = mgr.acquire(&ident);
    let first = mgr
        .fetch(&ident)
        .await
        .unwrap_or_else(|e| panic!("fetch: {e}"));
    assert!(
        first.refresh_at() < first.not_after && first.refresh_at() > first.not_before,
        "refresh point inside the validity"
    );
    eventually("a rotation", || mgr.stats().rotations_total >= 1).await;
    let second = mgr.current(&ident).expect("rotated cert is current");
    assert_ne!(
        serial(&first.chain[0]),
        serial(&second.chain[0]),
        "rotation issues a new certificate"
    );
    assert!(second.not_after >= first.not_after, "new cert lives longer");
    let stats = mgr.stats();
    assert!(stats.issued_total >= 2, "{stats:?}");
    assert_eq!(stats.fetch_errors_total, 0, "{stats:?}");
}

/// Signs with a LocalCa until told to fail.
#[derive(Debug)]
struct FlakyCa {
    ca: Arc<LocalCa>,
    fail: AtomicBool,
}

impl CertificateAuthority for FlakyCa {
    fn sign<'a>(&'a self, csr: &'a [u8], identity: &'a Identity, ttl: Duration) -> SignFuture<'a> {
        if self.fail.load(Ordering::Relaxed) {
            let e = IdentityError::FetchFailed {
                identity: identity.clone(),
                reason: "CA unavailable (test)".into(),
            };
            return Box::pin(async move { Err(e) });
        }
        self.ca.sign(csr, identity, ttl)
    }

    fn roots(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        self.ca.roots()
    }
}

#[tokio::test]
async fn fetch_reports_ca_errors_and_rotation_keeps_old_cert() {
    let dir = TempDir::new("mgr-flaky");
    let flaky = Arc::new(FlakyCa {
        ca: local_ca(&dir),
        fail: AtomicBool::new(true),
    });
    let mgr = manager(flaky.clone(), Duration::from_secs(4));
    let ident = id("default", "sleep");
    let lease = mgr.acquire(&ident);
    match mgr.fetch(&ident).await {
        Err(IdentityError::FetchFailed { reason, .. }) => {
            assert!(
                reason.contains("CA unavailable"),
                "reason says why: {reason}"
            )
        }
        other => panic!("fetch should fail while the CA fails: {other:?}"),
    }
    assert!(mgr.stats().fetch_errors_total >= 1);

    // The retry succeeds once the CA recovers.
    flaky.fail.store(false, Ordering::Relaxed);
    eventually("first cert after recovery", || {
        mgr.current(&ident).is_some()
    })
    .await;
    let cert = mgr.current(&ident).expect("cert");

    // Rotation fails: the old cert stays current until it expires.
    flaky.fail.store(true, Ordering::Relaxed);
    let errors = mgr.stats().fetch_errors_total;
    eventually("a failed rotation", || {
        mgr.stats().fetch_errors_total > errors
    })
    .await;
    let still = mgr.current(&ident);
    let t1 = SystemTime::now();
    // (If this thread was slow enough for a rotation to succeed first, the kept cert is that one.)
    if t1 < cert.not_after && mgr.stats().rotations_total == 0 {
        let still = still.expect("old cert kept while valid despite the failed rotation");
        assert!(Arc::ptr_eq(&still, &cert), "the kept cert is the old one");
    }
    eventually("expired cert no longer served", || {
        mgr.current(&ident).is_none()
    })
    .await;
    assert!(
        SystemTime::now() >= cert.not_after,
        "cert dropped only after it expired"
    );
    drop(lease);
}

#[tokio::test]
async fn trust_bundle_picks_up_replaced_root_file() {
    let dir = TempDir::new("bundle-a");
    let other_dir = TempDir::new("bundle-b");
    let ca = local_ca(&dir);
    let other = local_ca(&other_dir);
    let mgr = manager(ca.clone(), DEFAULT_CERT_TTL);
    let bundle = mgr.trust_bundle();
    let old = ca.roots().expect("roots");
    assert_eq!(bundle.root_certs(), old, "bundle starts with the CA root");
    assert_eq!(bundle.roots().roots.len(), 1);

    // Replace the file the way an operator would: write elsewhere, rename over it.
    let new = other.roots().expect("roots");
    let tmp = dir.path().join("incoming.pem");
    std::fs::copy(other.root_cert_path(), &tmp).expect("copy root");
    std::fs::rename(&tmp, ca.root_cert_path()).expect("replace root");

    eventually("the bundle to load the new root", || {
        bundle.roots();
        bundle.root_certs() == new
    })
    .await;
    assert_ne!(old, new, "the two CAs have different roots");
    assert_eq!(bundle.roots().roots.len(), 1, "new root replaced the old");
}

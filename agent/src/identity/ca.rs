//! The local CA: a self-signed root kept on disk that signs workload CSRs. Stands in for Istio's
//! in-cluster CA (istiod) until that client exists, behind the same [`CertificateAuthority`] trait.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;
use tracing::{info, warn};

use super::{CertificateAuthority, Identity, IdentityError, SignFuture};

const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";
/// The local root lives ten years; it is reused across restarts.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Workload certs are backdated by this much (or a quarter of their TTL, if shorter) so that
/// peers whose clocks lag a little still accept them.
const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// A CA whose self-signed root (`root-cert.pem`, `root-key.pem`) lives in a directory.
///
/// The signing key is loaded once. `roots()` re-reads `root-cert.pem` whenever its size, mtime
/// or inode change, so an operator can replace it (e.g. with a bundle holding the old and a new
/// root during a root rotation) without a restart.
pub struct LocalCa {
    dir: PathBuf,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    signing_root: CertificateDer<'static>,
    roots: Mutex<RootsCache>,
}

struct RootsCache {
    stamp: Option<FileStamp>,
    roots: Vec<CertificateDer<'static>>,
}

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    len: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileStamp {
    fn of(md: &fs::Metadata) -> FileStamp {
        FileStamp {
            len: md.len(),
            ino: md.ino(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
        }
    }
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IdentityError + '_ {
    move |source| IdentityError::CaIo {
        path: path.to_owned(),
        source,
    }
}

impl LocalCa {
    /// Loads `<dir>/root-cert.pem` + `<dir>/root-key.pem`, or creates them (dir 0700, key 0600)
    /// on first start.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<LocalCa, IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let md = fs::metadata(dir).map_err(io_err(dir))?;
        if md.permissions().mode() & 0o077 != 0 {
            warn!(dir = %dir.display(), mode = format!("{:o}", md.permissions().mode() & 0o777), "local CA directory was readable by others; setting 0700");
            // A read-only mount (a Kubernetes Secret holding a shared root) cannot be changed;
            // its files are what matters, and they are only read.
            if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
                warn!(dir = %dir.display(), error = %e, "cannot tighten the CA directory's mode");
            }
        }
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let (cert_pem, key_pem) = match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let key_md = fs::metadata(&key_path).map_err(io_err(&key_path))?;
                if key_md.permissions().mode() & 0o077 != 0 {
                    warn!(path = %key_path.display(), "local CA key is readable by group or others");
                }
                let cert = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
                let key = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
                info!(dir = %dir.display(), "local CA: reusing root");
                (cert, key)
            }
            (false, false) => {
                let (cert, key) = create_root(trust_domain)?;
                // Key first: a root cert on disk always has its key next to it.
                write_new(&key_path, key.as_bytes(), 0o600)?;
                write_new(&cert_path, cert.as_bytes(), 0o644)?;
                info!(dir = %dir.display(), "local CA: created a new root");
                (cert, key)
            }
            (true, false) => {
                return Err(IdentityError::CaIncomplete {
                    dir: dir.to_owned(),
                    missing: key_path,
                })
            }
            (false, true) => {
                return Err(IdentityError::CaIncomplete {
                    dir: dir.to_owned(),
                    missing: cert_path,
                })
            }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::CaFile {
            path: key_path.clone(),
            reason: format!("not a PKCS#8 PEM private key: {e}"),
        })?;
        let roots = parse_pem_certs(&cert_path, cert_pem.as_bytes())?;
        // The signing root is the one whose public key matches the key file; a bundle may also
        // hold other roots that are trusted but not signed with.
        let signing_root = roots
            .iter()
            .find(|der| spki_matches(der, &key))
            .ok_or_else(|| IdentityError::CaFile {
                path: cert_path.clone(),
                reason: format!("no certificate matches the key in {}", key_path.display()),
            })?;
        let signing_root = signing_root.clone();
        let issuer = Issuer::from_ca_cert_der(&signing_root, key).map_err(|source| {
            IdentityError::Rcgen {
                what: "local CA root certificate",
                source,
            }
        })?;
        let stamp = fs::metadata(&cert_path).ok().map(|md| FileStamp::of(&md));
        Ok(LocalCa {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            issuer,
            signing_root,
            roots: Mutex::new(RootsCache { stamp, roots }),
        })
    }

    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT_FILE)
    }

    pub fn root_key_path(&self) -> PathBuf {
        self.dir.join(ROOT_KEY_FILE)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate workload certificates are signed with (the one matching the key).
    pub fn signing_root(&self) -> &CertificateDer<'static> {
        &self.signing_root
    }

    /// Signs `params` for `public_key` with the root key as given, without any of the checks
    /// [`CertificateAuthority::sign`] applies. For tests and tooling that need certificates the
    /// CA would refuse to issue (expired, no SPIFFE SAN, ...).
    pub fn sign_unchecked(
        &self,
        params: &CertificateParams,
        public_key: &impl PublicKeyData,
    ) -> Result<CertificateDer<'static>, IdentityError> {
        params
            .signed_by(public_key, &self.issuer)
            .map(|cert| cert.der().clone())
            .map_err(|source| IdentityError::Rcgen {
                what: "signing a certificate",
                source,
            })
    }

    pub(super) fn sign_csr(
        &self,
        csr_der: &[u8],
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let reject = |reason: String| IdentityError::CsrRejected {
            identity: identity.clone(),
            reason,
        };
        if ttl < Duration::from_secs(1) {
            return Err(IdentityError::InvalidTtl { ttl });
        }
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| reject(format!("unreadable CSR: {e}")))?;
        let want = identity.to_string();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == want => {}
                other => return Err(reject(format!("CSR asks for SAN {other:?}, not {want}"))),
            }
        }
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(reject("CSR asks for a CA certificate".to_owned()));
        }
        let uri = want
            .clone()
            .try_into()
            .map_err(|e| reject(format!("identity is not an IA5 string: {e}")))?;
        let mut params = CertificateParams::default();
        // Istio workload certs have an empty subject; the identity is in the SAN only.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = OffsetDateTime::from(now - MAX_BACKDATE.min(ttl / 4));
        params.not_after = OffsetDateTime::from(now + ttl);
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| IdentityError::Rcgen {
                what: "signing a workload certificate",
                source,
            })?;
        Ok(vec![leaf.der().clone()])
    }
}

impl CertificateAuthority for LocalCa {
    fn sign<'a>(
        &'a self,
        csr_der: &'a [u8],
        identity: &'a Identity,
        ttl: Duration,
    ) -> SignFuture<'a> {
        // Signing is a few microseconds of CPU; no need to leave the calling task.
        let result = self.sign_csr(csr_der, identity, ttl);
        Box::pin(async move { result })
    }

    fn roots(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let path = self.root_cert_path();
        let md = fs::metadata(&path).map_err(io_err(&path))?;
        let stamp = FileStamp::of(&md);
        let mut cache = self.roots.lock().unwrap_or_else(|p| p.into_inner());
        if cache.stamp != Some(stamp) {
            let pem = fs::read(&path).map_err(io_err(&path))?;
            cache.roots = parse_pem_certs(&path, &pem)?;
            cache.stamp = Some(stamp);
            info!(path = %path.display(), roots = cache.roots.len(), "local CA: root file changed");
        }
        Ok(cache.roots.clone())
    }
}

fn create_root(trust_domain: &str) -> Result<(String, String), IdentityError> {
    let rc = |what| move |source| IdentityError::Rcgen { what, source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("root key"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    // A distinct name per CA, so a peer's chain from another local CA is an unknown issuer
    // rather than a bad signature from a namesake.
    dn.push(
        DnType::CommonName,
        format!("ambit local CA {:08x}", fastrand::u32(..)),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - MAX_BACKDATE);
    params.not_after = OffsetDateTime::from(now + ROOT_TTL);
    let cert = params.self_signed(&key).map_err(rc("root certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a file that must not exist yet, with `mode` from the start (never briefly wider), via
/// a temporary name so a crash leaves no half-written file under the real name.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    // The umask may have narrowed the mode; set it exactly.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn parse_pem_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::CaFile {
            path: path.to_owned(),
            reason: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::CaFile {
            path: path.to_owned(),
            reason: "no certificate in the file".to_owned(),
        });
    }
    Ok(certs)
}

fn spki_matches(cert: &CertificateDer<'_>, key: &KeyPair) -> bool {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, x509)| x509.public_key().raw == key.subject_public_key_info().as_slice())
        .unwrap_or(false)
}

/// 16 random bytes, top bit clear so the DER INTEGER stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

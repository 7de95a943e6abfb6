//! The certificate manager: one certificate per identity with a lease on this node, fetched when
//! the first lease is taken, rotated at half-life, dropped with the last lease; and the trust
//! bundle peers are verified against.

use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use super::{
    cert_identities, CertificateAuthority, Identity, IdentityError, DEFAULT_CERT_TTL,
    DEFAULT_TRUST_DOMAIN,
};

/// How often [`TrustBundle::roots`] asks the CA whether its roots changed.
pub const ROOTS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Retry after a failed fetch: doubling from the first value up to the second, with jitter.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(30));
/// Never re-issue sooner than this after an issue, whatever the CA's validity says, so a CA
/// handing out nearly expired certificates cannot make us spin.
const MIN_REFRESH: Duration = Duration::from_millis(500);

/// A workload certificate and its private key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub certified_key: Arc<CertifiedKey>,
}

impl WorkloadCert {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// When the manager replaces this certificate: halfway through its validity, as written in
    /// the certificate. The local CA backdates `not_before` by min(60s, ttl/4) for clock skew,
    /// so a 4s TTL rotates about 1.5s after issue and a 24h TTL about 30s before 12h.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

#[derive(Debug, Clone)]
pub struct CertConfig {
    pub trust_domain: String,
    pub ttl: Duration,
}

impl Default for CertConfig {
    fn default() -> Self {
        CertConfig {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            ttl: DEFAULT_CERT_TTL,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CertStats {
    /// Identities with at least one lease.
    pub identities: usize,
    pub issued_total: u64,
    pub rotations_total: u64,
    pub fetch_errors_total: u64,
}

#[derive(Default)]
struct Counters {
    issued: AtomicU64,
    rotations: AtomicU64,
    fetch_errors: AtomicU64,
}

/// What one identity's rotation task publishes.
#[derive(Default)]
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    /// The last fetch error, cleared by the next success.
    error: Option<String>,
}

impl Slot {
    fn usable(&self) -> Option<Arc<WorkloadCert>> {
        self.cert
            .as_ref()
            .filter(|c| !c.is_expired(SystemTime::now()))
            .cloned()
    }
}

struct Entry {
    users: usize,
    slot: watch::Sender<Slot>,
    task: Option<AbortHandle>,
}

/// Keeps the certificates of the identities leased on this node. Shared as `Arc<SecretManager>`.
pub struct SecretManager {
    ca: Arc<dyn CertificateAuthority>,
    cfg: CertConfig,
    /// Fallback for `acquire` called outside a runtime: the runtime `new` ran in, if any.
    runtime: Option<Handle>,
    entries: Mutex<HashMap<Identity, Entry>>,
    counters: Arc<Counters>,
    bundle: TrustBundle,
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretManager")
            .field("ca", &self.ca)
            .field("cfg", &self.cfg)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SecretManager {
    pub fn new(ca: Arc<dyn CertificateAuthority>, cfg: CertConfig) -> Arc<SecretManager> {
        let bundle = TrustBundle::new(Arc::clone(&ca));
        Arc::new(SecretManager {
            ca,
            cfg,
            runtime: Handle::try_current().ok(),
            entries: Mutex::new(HashMap::new()),
            counters: Arc::default(),
            bundle,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    pub fn config(&self) -> &CertConfig {
        &self.cfg
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        // A panic while holding the lock leaves the map consistent (every update is one step).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers one user of `id`. The first user starts a task (on the current tokio runtime,
    /// else the one `new` ran in) that fetches the certificate and rotates it at half-life,
    /// retrying with backoff on CA errors and keeping the old certificate until it expires.
    /// Dropping the last lease for `id` drops the certificate and stops the task.
    pub fn acquire(self: &Arc<Self>, id: &Identity) -> CertLease {
        let mut entries = self.entries();
        match entries.entry(id.clone()) {
            MapEntry::Occupied(mut e) => e.get_mut().users += 1,
            MapEntry::Vacant(v) => {
                let (slot, _) = watch::channel(Slot::default());
                let runtime = Handle::try_current().ok().or_else(|| self.runtime.clone());
                let task = match runtime {
                    Some(rt) => {
                        let rotation = Rotation {
                            ca: Arc::clone(&self.ca),
                            identity: id.clone(),
                            ttl: self.cfg.ttl,
                            slot: slot.clone(),
                            counters: Arc::clone(&self.counters),
                        };
                        Some(rt.spawn(rotation.run()).abort_handle())
                    }
                    None => {
                        slot.send_modify(|s| {
                            s.error = Some("no tokio runtime to fetch the certificate in".into())
                        });
                        None
                    }
                };
                debug!(identity = %id, "certificate lease: first user");
                v.insert(Entry {
                    users: 1,
                    slot,
                    task,
                });
            }
        }
        CertLease {
            manager: Arc::clone(self),
            identity: id.clone(),
        }
    }

    fn release(&self, id: &Identity) {
        let mut entries = self.entries();
        let MapEntry::Occupied(mut e) = entries.entry(id.clone()) else {
            return;
        };
        e.get_mut().users -= 1;
        if e.get().users == 0 {
            let entry = e.remove();
            if let Some(task) = entry.task {
                task.abort();
            }
            debug!(identity = %id, "certificate lease: last user gone, certificate dropped");
        }
    }

    /// The current certificate, waiting for the first fetch if it is still in progress.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        let no_lease = || IdentityError::NoLease {
            identity: id.clone(),
        };
        let mut rx = self
            .entries()
            .get(id)
            .ok_or_else(no_lease)?
            .slot
            .subscribe();
        // Errors only when the last lease went away while waiting.
        let slot = rx
            .wait_for(|s| s.usable().is_some() || s.error.is_some())
            .await
            .map_err(|_| no_lease())?;
        match slot.usable() {
            Some(cert) => Ok(cert),
            None => Err(IdentityError::FetchFailed {
                identity: id.clone(),
                reason: slot.error.clone().unwrap_or_default(),
            }),
        }
    }

    /// The current, unexpired certificate without waiting. Read on every TLS handshake.
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.entries().get(id)?.slot.borrow().usable()
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        self.bundle.clone()
    }

    /// Every identity leased on this node and where its certificate stands, sorted by identity
    /// (for the admin `/config_dump`, as ztunnel's certificate dump).
    pub fn certificates(&self) -> Vec<(Identity, CertState)> {
        let mut out: Vec<(Identity, CertState)> = self
            .entries()
            .iter()
            .map(|(id, e)| {
                let slot = e.slot.borrow();
                let state = match (slot.usable(), &slot.error, &slot.cert) {
                    (Some(cert), _, _) => CertState::Available(cert),
                    (None, Some(error), _) => CertState::Unavailable(error.clone()),
                    (None, None, Some(_)) => CertState::Unavailable("expired".into()),
                    (None, None, None) => CertState::Initializing,
                };
                (id.clone(), state)
            })
            .collect();
        out.sort_by_key(|a| a.0.to_string());
        out
    }

    pub fn stats(&self) -> CertStats {
        CertStats {
            identities: self.entries().len(),
            issued_total: self.counters.issued.load(Ordering::Relaxed),
            rotations_total: self.counters.rotations.load(Ordering::Relaxed),
            fetch_errors_total: self.counters.fetch_errors.load(Ordering::Relaxed),
        }
    }
}

/// Where one identity's certificate stands (ztunnel's `CertState`).
#[derive(Debug, Clone)]
pub enum CertState {
    /// The first fetch is under way.
    Initializing,
    /// A current, unexpired certificate.
    Available(Arc<WorkloadCert>),
    /// No usable certificate: the last fetch error (retried with backoff), or expired.
    Unavailable(String),
}

/// One user of an identity's certificate; dropping it releases the certificate.
#[derive(Debug)]
pub struct CertLease {
    manager: Arc<SecretManager>,
    identity: Identity,
}

impl CertLease {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

impl Drop for CertLease {
    fn drop(&mut self) {
        self.manager.release(&self.identity);
    }
}

/// The fetch-and-rotate loop of one identity. Aborted when its last lease goes.
struct Rotation {
    ca: Arc<dyn CertificateAuthority>,
    identity: Identity,
    ttl: Duration,
    slot: watch::Sender<Slot>,
    counters: Arc<Counters>,
}

impl Rotation {
    async fn run(self) {
        let mut backoff = RETRY_BACKOFF.0;
        let mut rotating = false;
        loop {
            match issue(self.ca.as_ref(), &self.identity, self.ttl).await {
                Ok(cert) => {
                    let cert = Arc::new(cert);
                    let wait = cert
                        .refresh_at()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .max(MIN_REFRESH);
                    info!(identity = %self.identity, rotation = rotating, refresh_in = ?wait, "certificate issued");
                    // Publish before counting, so whoever sees the count also sees the cert.
                    self.slot.send_modify(|s| {
                        s.cert = Some(cert);
                        s.error = None;
                    });
                    self.counters.issued.fetch_add(1, Ordering::Relaxed);
                    if rotating {
                        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
                    }
                    rotating = true;
                    backoff = RETRY_BACKOFF.0;
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    warn!(identity = %self.identity, error = %e, retry_in = ?backoff, "certificate fetch failed");
                    self.slot.send_modify(|s| {
                        s.error = Some(e.to_string());
                        // Keep the old certificate for established and new connections until
                        // it expires; after that, nothing is better than an expired cert.
                        if s.usable().is_none() {
                            s.cert = None;
                        }
                    });
                    self.counters.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(RETRY_BACKOFF.1);
                }
            }
        }
    }
}

/// Generates a P-256 key, has the CA sign a CSR for it and checks what comes back.
async fn issue(
    ca: &dyn CertificateAuthority,
    identity: &Identity,
    ttl: Duration,
) -> Result<WorkloadCert, IdentityError> {
    let bad = |reason: String| IdentityError::BadCertificate {
        identity: identity.clone(),
        reason,
    };
    let rc = |what| move |source| IdentityError::Rcgen { what, source };
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc("workload key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(rc("identity as a URI SAN"))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .map_err(rc("certificate signing request"))?;
    let chain = ca.sign(csr.der(), identity, ttl).await?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad("the CA returned an empty chain".into()))?;
    if !cert_identities(leaf).contains(identity) {
        return Err(bad("the leaf does not carry the identity as URI SAN".into()));
    }
    let (not_before, not_after) = validity(leaf).map_err(bad)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|source| IdentityError::Key {
            identity: identity.clone(),
            source: Box::new(source),
        })?;
    let certified_key = CertifiedKey::new(chain.clone(), signing_key);
    certified_key
        .keys_match()
        .map_err(|e| bad(format!("the leaf is not for the key we sent: {e}")))?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        chain,
        not_before,
        not_after,
        certified_key: Arc::new(certified_key),
    })
}

fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|e| e.to_string())?;
    let v = x509.validity();
    Ok((
        SystemTime::from(v.not_before.to_datetime()),
        SystemTime::from(v.not_after.to_datetime()),
    ))
}

/// The roots peers are verified against. Cheap to clone; `roots()` is read on every handshake
/// and asks the CA for changes at most once per [`ROOTS_REFRESH_INTERVAL`] (the local CA answers
/// an unchanged root file with one `stat`).
#[derive(Clone)]
pub struct TrustBundle {
    inner: Arc<BundleInner>,
}

struct BundleInner {
    ca: Arc<dyn CertificateAuthority>,
    current: ArcSwap<Roots>,
    epoch: Instant,
    /// Milliseconds since `epoch` after which the next `roots()` checks the CA.
    next_check_ms: AtomicU64,
}

struct Roots {
    ders: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.inner.current.load().ders.len())
            .finish_non_exhaustive()
    }
}

impl TrustBundle {
    /// Loads the CA's roots now. If that fails the bundle starts empty (every peer is refused)
    /// and the next `roots()` call tries again.
    pub fn new(ca: Arc<dyn CertificateAuthority>) -> TrustBundle {
        let bundle = TrustBundle {
            inner: Arc::new(BundleInner {
                ca,
                current: ArcSwap::from_pointee(Roots {
                    ders: Vec::new(),
                    store: Arc::new(RootCertStore::empty()),
                }),
                epoch: Instant::now(),
                next_check_ms: AtomicU64::new(0),
            }),
        };
        if bundle.refresh() {
            bundle
                .inner
                .next_check_ms
                .store(ROOTS_REFRESH_INTERVAL.as_millis() as u64, Ordering::Relaxed);
        }
        bundle
    }

    /// The current roots, checking the CA for changes if the last check is old enough.
    pub fn roots(&self) -> Arc<RootCertStore> {
        let inner = &self.inner;
        let now_ms = inner.epoch.elapsed().as_millis() as u64;
        let next = inner.next_check_ms.load(Ordering::Relaxed);
        // One caller per interval wins the exchange and does the check.
        if now_ms >= next
            && inner
                .next_check_ms
                .compare_exchange(
                    next,
                    now_ms + ROOTS_REFRESH_INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.refresh();
        }
        Arc::clone(&inner.current.load().store)
    }

    /// The current roots as DER, without checking for changes.
    pub fn root_certs(&self) -> Vec<CertificateDer<'static>> {
        self.inner.current.load().ders.clone()
    }

    /// Asks the CA for its roots now; returns whether that worked. A failure keeps the last
    /// good roots.
    pub fn refresh(&self) -> bool {
        let ders = match self.inner.ca.roots() {
            Ok(ders) => ders,
            Err(e) => {
                warn!(error = %e, "trust bundle: cannot read the CA's roots; keeping the last ones");
                return false;
            }
        };
        if ders == self.inner.current.load().ders {
            return true;
        }
        let mut store = RootCertStore::empty();
        let (added, ignored) = store.add_parsable_certificates(ders.iter().cloned());
        if ignored > 0 {
            warn!(
                ignored,
                "trust bundle: some roots are not usable trust anchors"
            );
        }
        info!(roots = added, "trust bundle: roots changed");
        self.inner.current.store(Arc::new(Roots {
            ders,
            store: Arc::new(store),
        }));
        true
    }
}

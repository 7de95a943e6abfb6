//! DNS for ServiceEntries with `resolution: DNS` (or `DNS_ROUND_ROBIN`), on the control runtime
//! and never on the data path: each name a ServiceEntry needs is resolved with the node's
//! resolver (`/etc/resolv.conf`, `/etc/hosts`), kept, and resolved again when its answer's TTL
//! runs out (within [`MIN_REFRESH`]..=[`MAX_REFRESH`]; after a failure, [`RETRY`]). The control
//! loop asks for the names the current state needs ([`Dns::want`]) and rebuilds the snapshot
//! when an answer changed ([`Dns::take_changed`]). A name that does not resolve keeps its last
//! answer (as Envoy's DNS clusters do), or has no endpoints if it never resolved (requests to it
//! get 503 UH); either way it is reported.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The last good answer of every name wanted, lowercase names.
pub type DnsAnswers = std::collections::HashMap<String, Arc<[std::net::IpAddr]>>;

/// The shortest time an answer is kept (a TTL of 0 would mean a query per tick).
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// The longest: a changed record is noticed within this even with a long TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// After a failure, the next try.
pub const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Error, Clone)]
pub enum DnsError {
    #[error("reading the node's resolver configuration: {0}")]
    Config(String),
    #[error("resolving {name}: {reason}")]
    Lookup { name: String, reason: String },
}

/// An answer: the addresses, and how long they may be used.
#[derive(Debug, Clone)]
pub struct Answer {
    pub addrs: Vec<IpAddr>,
    pub ttl: Duration,
}

/// What resolves names (the node's resolver; a table in tests).
pub trait Lookup: Send + Sync + 'static {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, DnsError>> + Send + 'a>>;
}

/// The node's resolver (hickory, configured from `/etc/resolv.conf`).
pub struct SystemLookup(hickory_resolver::TokioResolver);

impl SystemLookup {
    pub fn new() -> Result<Self, DnsError> {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| DnsError::Config(e.to_string()))?;
        Ok(SystemLookup(resolver))
    }

    /// A resolver asking only the name server at `server` (UDP, then TCP).
    pub fn with_server(server: std::net::SocketAddr) -> Result<Self, DnsError> {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
        let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
            .into_iter()
            .map(|mut c| {
                c.port = server.port();
                c
            })
            .collect();
        let config = ResolverConfig::from_name_servers(vec![NameServerConfig::new(
            server.ip(),
            true,
            connections,
        )]);
        let resolver = hickory_resolver::TokioResolver::builder_with_config(
            config,
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        )
        .build()
        .map_err(|e| DnsError::Config(e.to_string()))?;
        Ok(SystemLookup(resolver))
    }
}

impl Lookup for SystemLookup {
    fn lookup<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Answer, DnsError>> + Send + 'a>> {
        Box::pin(async move {
            // Fully qualified: the search list must not turn `api.example.com` into
            // `api.example.com.default.svc.cluster.local`.
            let fqdn = if name.ends_with('.') {
                name.to_string()
            } else {
                format!("{name}.")
            };
            let found = self
                .0
                .lookup_ip(fqdn.as_str())
                .await
                .map_err(|e| DnsError::Lookup {
                    name: name.to_string(),
                    reason: e.to_string(),
                })?;
            let ttl = found
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            let mut addrs: Vec<IpAddr> = found.iter().collect();
            addrs.sort();
            addrs.dedup();
            Ok(Answer { addrs, ttl })
        })
    }
}

#[derive(Default)]
struct Inner {
    /// Name → its latest answer (absent until the first).
    answers: Mutex<HashMap<String, Arc<[IpAddr]>>>,
    /// Name → the last failure, while it lasts.
    failures: Mutex<HashMap<String, String>>,
    /// Name → the task resolving it.
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    changed: AtomicBool,
    /// Woken when `changed` is set.
    notify: tokio::sync::Notify,
}

impl Inner {
    fn mark_changed(&self) {
        self.changed.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// The names resolved for ServiceEntries, and their answers. Cheap to clone.
#[derive(Clone)]
pub struct Dns {
    lookup: Arc<dyn Lookup>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Dns {
    pub fn new(lookup: Arc<dyn Lookup>) -> Self {
        Dns {
            lookup,
            inner: Arc::default(),
        }
    }

    /// Resolves exactly `names` from now on: a task per new name (spawned on the current
    /// runtime, the control runtime), and names no longer wanted are forgotten.
    pub fn want(&self, names: &BTreeSet<String>) {
        let mut tasks = lock(&self.inner.tasks);
        let gone: Vec<String> = tasks
            .keys()
            .filter(|n| !names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(t) = tasks.remove(&name) {
                t.abort();
            }
            lock(&self.inner.answers).remove(&name);
            lock(&self.inner.failures).remove(&name);
            self.inner.mark_changed();
        }
        for name in names {
            if tasks.contains_key(name) {
                continue;
            }
            let task = tokio::spawn(resolve_forever(
                self.lookup.clone(),
                self.inner.clone(),
                name.clone(),
            ));
            tasks.insert(name.clone(), task);
        }
    }

    /// The answers now, for building a snapshot.
    pub fn answers(&self) -> DnsAnswers {
        lock(&self.inner.answers).clone()
    }

    /// Names that do not resolve now, with why.
    pub fn failures(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = lock(&self.inner.failures)
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        out.sort();
        out
    }

    /// Returns when an answer may have changed (check with [`Dns::take_changed`]).
    pub async fn changed(&self) {
        self.inner.notify.notified().await
    }

    /// Whether an answer changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.inner.changed.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for (_, t) in lock(&self.tasks).drain() {
            t.abort();
        }
    }
}

/// Resolves `name` now and again when its answer expires, until aborted.
async fn resolve_forever(lookup: Arc<dyn Lookup>, inner: Arc<Inner>, name: String) {
    loop {
        let wait = match lookup.lookup(&name).await {
            Ok(answer) => {
                let addrs: Arc<[IpAddr]> = answer.addrs.into();
                let previous = lock(&inner.answers).insert(name.clone(), addrs.clone());
                if lock(&inner.failures).remove(&name).is_some() {
                    info!(%name, "ServiceEntry host resolves again");
                    inner.mark_changed();
                }
                if previous.as_deref() != Some(&*addrs) {
                    debug!(%name, addrs = ?addrs, "ServiceEntry host resolved");
                    inner.mark_changed();
                }
                answer.ttl.clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(e) => {
                let reason = e.to_string();
                let first = lock(&inner.failures)
                    .insert(name.clone(), reason.clone())
                    .is_none();
                if first {
                    // As Envoy's DNS clusters: the last good answer stays until a new one.
                    let kept = lock(&inner.answers).contains_key(&name);
                    warn!(%name, error = %reason, kept_last_answer = kept, "ServiceEntry host does not resolve");
                    inner.mark_changed();
                }
                RETRY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests;

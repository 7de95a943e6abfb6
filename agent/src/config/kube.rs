//! The Kubernetes source: one watch per kind over the API server, every object parsed through the
//! same [`parse`] as the file source, emitted as [`SourceEvent`]s for `state::Store`. A (re-)list
//! becomes one `Replace` of that kind, so the store never sees a gap; a CRD that discovery
//! positively finds not served becomes an empty `Replace` (a discovery error never does). Watch
//! errors are counted, logged once per streak and retried promptly, and never end the watch.
//!
//! Watches are lean: no reflector cache (the store keeps the converted items), and managed fields
//! and the last-applied annotation are dropped before parsing.

mod discover;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject};
use ::kube::runtime::watcher::{self, watcher, Event};
use ::kube::Client;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{parse, Kind, Object, ObjectRef, Parsed, Rejected, SourceEvent};
use discover::Discovered;

/// `kubectl apply` keeps a full copy of the object here; ambit never reads it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// How often to look again for an Istio CRD that is not installed.
pub const DISCOVERY_RETRY: Duration = Duration::from_secs(30);

/// Retry delays after a failed list, watch or discovery: short enough that a change made right
/// after the API server returns reaches the agent within a few seconds (issue 9), jittered so the
/// nodes of a cluster do not retry in step. A 410 Expired relists at once (with jitter only).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
const EXPIRED_JITTER: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes credentials (in-cluster service account or KUBECONFIG)")]
    Credentials {
        #[source]
        source: ::kube::Error,
    },
}

impl KubeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            KubeError::Credentials { .. } => "credentials",
        }
    }
}

/// Where one kind's watch stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchState {
    /// Finding which version of the CRD is served.
    #[default]
    Discovering,
    /// Discovery failed (not the same as "not installed": nothing is known).
    DiscoveryFailed,
    /// Discovery positively saw the CRD is not served: listed as empty.
    NotInstalled,
    /// Listing (first list or a re-list).
    Listing,
    /// Listed, and watching for changes.
    Watching,
    /// The last list or watch attempt failed; retrying.
    Failing,
}

impl WatchState {
    pub const ALL: [WatchState; 6] = [
        WatchState::Discovering,
        WatchState::DiscoveryFailed,
        WatchState::NotInstalled,
        WatchState::Listing,
        WatchState::Watching,
        WatchState::Failing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WatchState::Discovering => "discovering",
            WatchState::DiscoveryFailed => "discovery_failed",
            WatchState::NotInstalled => "not_installed",
            WatchState::Listing => "listing",
            WatchState::Watching => "watching",
            WatchState::Failing => "failing",
        }
    }
}

/// Counters of one kind's watch.
#[derive(Debug, Default)]
struct KindStats {
    watch_errors: AtomicU64,
    lists: AtomicU64,
    relists: AtomicU64,
    discovery_errors: AtomicU64,
    /// Unix seconds of the last complete list (or of the last "not installed" finding); 0: never.
    last_sync: AtomicU64,
    /// Set once a watch runs: the served `apiVersion` it uses.
    api_version: Mutex<Option<String>>,
    state: Mutex<WatchState>,
    /// The error of the current failure streak, cleared on success.
    last_error: Mutex<Option<String>>,
}

impl KindStats {
    fn set_state(&self, state: WatchState) {
        *lock(&self.state) = state;
    }

    fn synced_now(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_sync.store(now, Ordering::Relaxed);
    }
}

/// Per-kind counters of a [`KubeSource`], shared with whoever reports them (status, metrics,
/// readiness).
#[derive(Debug)]
pub struct KubeStats {
    kinds: BTreeMap<Kind, KindStats>,
}

/// A copy of one kind's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KindCounters {
    /// Errors of the list or watch (each one retried after a short backoff).
    pub watch_errors: u64,
    /// Completed lists, the first included.
    pub lists: u64,
    /// Completed lists after the first (resource version expired, watch failed for good).
    pub relists: u64,
    /// Failed attempts to find which version of an Istio CRD is served.
    pub discovery_errors: u64,
    /// Unix seconds of the last complete list; 0 if never.
    pub last_sync_unix: u64,
    /// The `apiVersion` watched, once the watch started.
    pub api_version: Option<String>,
    pub state: WatchState,
    /// The error of the current failure streak (None when healthy).
    pub last_error: Option<String>,
}

impl KindCounters {
    /// The CRD was not installed at the last look.
    pub fn not_installed(&self) -> bool {
        self.state == WatchState::NotInstalled
    }
}

impl KubeStats {
    fn new() -> Self {
        KubeStats {
            kinds: Kind::ALL
                .iter()
                .map(|k| (*k, KindStats::default()))
                .collect(),
        }
    }

    /// Counters of a source that never ran (every kind discovering), for tests of their consumers.
    pub fn for_tests() -> Arc<Self> {
        Arc::new(KubeStats::new())
    }

    /// The counters of one kind.
    pub fn kind(&self, kind: Kind) -> KindCounters {
        let Some(s) = self.kinds.get(&kind) else {
            return KindCounters::default();
        };
        KindCounters {
            watch_errors: s.watch_errors.load(Ordering::Relaxed),
            lists: s.lists.load(Ordering::Relaxed),
            relists: s.relists.load(Ordering::Relaxed),
            discovery_errors: s.discovery_errors.load(Ordering::Relaxed),
            last_sync_unix: s.last_sync.load(Ordering::Relaxed),
            api_version: lock(&s.api_version).clone(),
            state: *lock(&s.state),
            last_error: lock(&s.last_error).clone(),
        }
    }

    /// Watch errors of one kind since start.
    pub fn watch_errors(&self, kind: Kind) -> u64 {
        self.kind(kind).watch_errors
    }

    /// Re-lists of one kind since start.
    pub fn relists(&self, kind: Kind) -> u64 {
        self.kind(kind).relists
    }

    /// Every kind's counters.
    pub fn all(&self) -> BTreeMap<Kind, KindCounters> {
        self.kinds.keys().map(|k| (*k, self.kind(*k))).collect()
    }

    fn get(&self, kind: Kind) -> &KindStats {
        // Every kind is inserted by `new`; the fallback only keeps this total.
        static NONE: std::sync::OnceLock<KindStats> = std::sync::OnceLock::new();
        self.kinds
            .get(&kind)
            .unwrap_or_else(|| NONE.get_or_init(KindStats::default))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exponential, jittered retry delays, reset by a success.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: RETRY_FIRST }
    }

    fn reset(&mut self) {
        self.next = RETRY_FIRST;
    }

    /// A delay in [d/2, d], then doubles d up to the cap.
    fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(RETRY_MAX);
        d.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// A failure streak of one kind: logged once at WARN when it starts and once at INFO when it
/// ends, the errors between at debug (issue 9: one problem, one line).
#[derive(Default)]
struct Streak {
    errors: u64,
}

impl Streak {
    fn fail(&mut self, stats: &KindStats, kind: Kind, what: &str, error: &dyn std::fmt::Display) {
        *lock(&stats.last_error) = Some(format!("{what}: {error}"));
        if self.errors == 0 {
            warn!(%kind, %error, "{what}; retrying with a short backoff");
        } else {
            debug!(%kind, %error, attempt = self.errors + 1, "{what}");
        }
        self.errors += 1;
    }

    fn recover(&mut self, stats: &KindStats, kind: Kind, what: &str) {
        if self.errors > 0 {
            info!(%kind, errors = self.errors, "{what} recovered");
            self.errors = 0;
        }
        *lock(&stats.last_error) = None;
    }
}

/// Watches the API server and sends what it sees to the store's channel.
pub struct KubeSource {
    client: Client,
    events: mpsc::Sender<SourceEvent>,
    kinds: Vec<Kind>,
    discovery_retry: Duration,
    stats: Arc<KubeStats>,
    /// Where the mesh config ConfigMap is read from (Istio's root namespace).
    root_namespace: String,
}

impl KubeSource {
    /// A source watching every kind ambit reads, cluster-wide.
    pub fn new(client: Client, events: mpsc::Sender<SourceEvent>) -> Self {
        KubeSource {
            client,
            events,
            kinds: Kind::ALL.to_vec(),
            discovery_retry: DISCOVERY_RETRY,
            stats: Arc::new(KubeStats::new()),
            root_namespace: super::mesh::DEFAULT_ROOT_NAMESPACE.to_string(),
        }
    }

    /// Reads the mesh config (the `istio` ConfigMap) from this namespace.
    pub fn with_root_namespace(mut self, namespace: &str) -> Self {
        self.root_namespace = namespace.to_string();
        self
    }

    /// A source with the in-cluster service account, or KUBECONFIG / `~/.kube/config` outside a
    /// cluster (`kube::Client::try_default`).
    pub async fn from_env(events: mpsc::Sender<SourceEvent>) -> Result<Self, KubeError> {
        crate::tls::install_process_default();
        let mut config =
            ::kube::Config::infer()
                .await
                .map_err(|source| KubeError::Credentials {
                    source: ::kube::Error::InferConfig(source),
                })?;
        // kube's client retries 429/503/504 itself, up to 15 times with delays growing to 1000 s,
        // so a 503 was invisible here for minutes. The watch loop retries, promptly and jittered.
        config.default_retry = false;
        let client =
            Client::try_from(config).map_err(|source| KubeError::Credentials { source })?;
        Ok(KubeSource::new(client, events))
    }

    /// Watches only these kinds (duplicates are ignored).
    pub fn with_kinds(mut self, kinds: &[Kind]) -> Self {
        let mut kinds = kinds.to_vec();
        kinds.sort();
        kinds.dedup();
        self.kinds = kinds;
        self
    }

    /// How long to wait before looking again for a CRD that is not installed.
    pub fn with_discovery_retry(mut self, every: Duration) -> Self {
        self.discovery_retry = every;
        self
    }

    pub fn stats(&self) -> Arc<KubeStats> {
        self.stats.clone()
    }

    /// Watches until the receiving end of the channel is dropped. Errors never end it.
    pub async fn run(self) {
        futures::future::join_all(self.kinds.iter().map(|k| self.run_kind(*k))).await;
        debug!("kube source stopped: the receiver is gone");
    }

    async fn run_kind(&self, kind: Kind) {
        let stats = self.stats.get(kind);
        let mut backoff = Backoff::new();
        let mut streak = Streak::default();
        // Whether the store has been told this kind is not installed (an empty Replace).
        let mut told_absent = false;
        loop {
            stats.set_state(WatchState::Discovering);
            let ar = match discover::resource(&self.client, kind).await {
                Discovered::Served(ar) => ar,
                Discovered::NotInstalled => {
                    streak.recover(stats, kind, "discovery");
                    backoff.reset();
                    if !told_absent {
                        info!(%kind, retry_secs = self.discovery_retry.as_secs(), "CRD not installed: no objects of this kind; looking again periodically");
                        // Positively not served: the kind is listed, and empty. A discovery error
                        // is never taken for this (the arm below).
                        let empty = SourceEvent::Replace {
                            kinds: vec![kind],
                            objects: Vec::new(),
                            rejected: Vec::new(),
                            origins: BTreeMap::new(),
                        };
                        if self.events.send(empty).await.is_err() {
                            return;
                        }
                        told_absent = true;
                        stats.synced_now();
                    }
                    stats.set_state(WatchState::NotInstalled);
                    if !self.wait(self.discovery_retry).await {
                        return;
                    }
                    continue;
                }
                Discovered::Failed(e) => {
                    stats.discovery_errors.fetch_add(1, Ordering::Relaxed);
                    stats.set_state(WatchState::DiscoveryFailed);
                    streak.fail(stats, kind, "cannot discover the served version", &e);
                    if !self.wait(backoff.delay()).await {
                        return;
                    }
                    continue;
                }
            };
            streak.recover(stats, kind, "discovery");
            backoff.reset();
            if told_absent {
                info!(%kind, api_version = %ar.api_version, "CRD installed");
                told_absent = false;
            }
            *lock(&stats.api_version) = Some(ar.api_version.clone());
            match self.watch(kind, &ar).await {
                WatchEnd::ReceiverGone => return,
                // The resource went away (CRD deleted): find it again.
                WatchEnd::Gone => {
                    *lock(&stats.api_version) = None;
                    continue;
                }
            }
        }
    }

    /// Sleeps, unless the receiver goes away first (false then).
    async fn wait(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.events.closed() => false,
        }
    }

    async fn watch(&self, kind: Kind, ar: &ApiResource) -> WatchEnd {
        let stats = self.stats.get(kind);
        // ConfigMaps: only the mesh config, in the root namespace (RBAC grants just that name).
        let api: Api<DynamicObject> = if kind == Kind::ConfigMap {
            Api::namespaced_with(self.client.clone(), &self.root_namespace, ar)
        } else {
            Api::all_with(self.client.clone(), ar)
        };
        // `Any`: the first list is served from the API server's watch cache (resourceVersion=0), as
        // client-go's informers do; cheap for the server with many pods. kube drops
        // resourceVersion=0 when a page size is set (a paginated consistent read from etcd
        // instead), and the server ignores the limit for cache reads anyway: no pages.
        let mut config = watcher::Config::default().any_semantic();
        config.page_size = None;
        if kind == Kind::ConfigMap {
            config = config.fields(&format!("metadata.name={}", super::mesh::MESH_CONFIG_MAP));
        }
        // No `default_backoff()`: its delays grow to 30 s, so after an API-server restart a change
        // took 20 s and more to arrive. Errors are paced here instead (see RETRY_*).
        let mut stream = std::pin::pin!(watcher(api, config));
        let mut listing: Option<Listing> = None;
        let mut consecutive_not_found = 0u32;
        let mut backoff = Backoff::new();
        let mut streak = Streak::default();
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                // Nobody listens any more: stop even if the watch is quiet.
                _ = self.events.closed() => return WatchEnd::ReceiverGone,
            };
            // `watcher` streams never end; if one did, start over.
            let Some(event) = event else {
                return WatchEnd::Gone;
            };
            match &event {
                // Init comes before the list request is made: only what follows proves success.
                Ok(Event::Init) | Err(_) => {}
                Ok(e) => {
                    streak.recover(stats, kind, "watch");
                    backoff.reset();
                    if !matches!(e, Event::InitApply(_)) {
                        // Listed, or resumed after an error without needing a list.
                        stats.set_state(WatchState::Watching);
                    }
                }
            }
            let out = match event {
                Ok(Event::Init) => {
                    stats.set_state(WatchState::Listing);
                    listing = Some(Listing::default());
                    None
                }
                Ok(Event::InitApply(o)) => {
                    listing
                        .get_or_insert_with(Listing::default)
                        .add(kind, parse_dynamic(ar, o));
                    None
                }
                Ok(Event::InitDone) => {
                    consecutive_not_found = 0;
                    let l = listing.take().unwrap_or_default();
                    if stats.lists.fetch_add(1, Ordering::Relaxed) > 0 {
                        stats.relists.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.synced_now();
                    debug!(%kind, objects = l.objects.len(), rejected = l.rejected.len(), "listed");
                    Some(SourceEvent::Replace {
                        kinds: vec![kind],
                        objects: l.objects,
                        rejected: l.rejected,
                        origins: BTreeMap::new(),
                    })
                }
                Ok(Event::Apply(o)) => match parse_dynamic(ar, o) {
                    Parsed::Object(o) => Some(SourceEvent::Apply(o)),
                    Parsed::Rejected(r) => Some(SourceEvent::Reject(r)),
                    Parsed::Ignored { api_version, kind } => {
                        debug!(%api_version, %kind, "ignoring an object ambit does not read");
                        None
                    }
                },
                Ok(Event::Delete(o)) => Some(SourceEvent::Delete(object_ref(kind, &o))),
                Err(e) => {
                    stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                    let delay = if is_expired(&e) {
                        // The API server restarted or compacted: nothing is wrong, relist now.
                        info!(%kind, "resource version expired; listing again");
                        EXPIRED_JITTER.mul_f64(fastrand::f64())
                    } else {
                        stats.set_state(WatchState::Failing);
                        streak.fail(stats, kind, "watch error", &e);
                        backoff.delay()
                    };
                    if discover::api_group(kind).is_some() && is_not_found(&e) {
                        consecutive_not_found += 1;
                        // A CRD deleted (or its version no longer served) answers 404 for good.
                        if consecutive_not_found >= 3 {
                            info!(%kind, "resource no longer served; discovering again");
                            return WatchEnd::Gone;
                        }
                    }
                    if !self.wait(delay).await {
                        return WatchEnd::ReceiverGone;
                    }
                    None
                }
            };
            if let Some(out) = out {
                if self.events.send(out).await.is_err() {
                    return WatchEnd::ReceiverGone;
                }
            }
        }
    }
}

enum WatchEnd {
    ReceiverGone,
    Gone,
}

/// Objects of one (re-)list, parsed as they arrive so only the typed objects are buffered.
#[derive(Default)]
struct Listing {
    objects: Vec<Object>,
    rejected: Vec<Rejected>,
}

impl Listing {
    fn add(&mut self, kind: Kind, parsed: Parsed) {
        match parsed {
            Parsed::Object(o) => self.objects.push(o),
            Parsed::Rejected(r) => self.rejected.push(r),
            Parsed::Ignored { api_version, .. } => {
                debug!(%kind, %api_version, "ignoring an object ambit does not read");
            }
        }
    }
}

/// 410 Gone: the resource version the watch resumed from is older than the server keeps.
fn is_expired(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::WatchStartFailed(::kube::Error::Api(s))
        | watcher::Error::WatchFailed(::kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    let inner = match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        watcher::Error::WatchError(s) => return s.code == 404,
        _ => return false,
    };
    // Not `Status::is_not_found`: kube 5.0 ignores the code when the body is not a Status.
    matches!(inner, ::kube::Error::Api(s) if s.code == 404)
}

/// The object as JSON, typed by the resource it was watched from (list items carry no
/// `apiVersion`/`kind`), without the fields ambit never reads, then [`parse`]d.
fn parse_dynamic(ar: &ApiResource, mut o: DynamicObject) -> Parsed {
    o.metadata.managed_fields = None;
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    let mut map = match std::mem::take(&mut o.data) {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    map.insert("apiVersion".into(), ar.api_version.clone().into());
    map.insert("kind".into(), ar.kind.clone().into());
    // ObjectMeta always serializes (string keys only); a failure would show as a missing name.
    let meta = serde_json::to_value(&o.metadata).unwrap_or_default();
    map.insert("metadata".into(), meta);
    parse(serde_json::Value::Object(map))
}

/// Names a deleted object the way [`parse`] names it.
fn object_ref(kind: Kind, o: &DynamicObject) -> ObjectRef {
    let namespace = if kind.is_namespaced() {
        o.metadata.namespace.as_deref().unwrap_or("default")
    } else {
        ""
    };
    ObjectRef::new(
        kind,
        namespace,
        o.metadata.name.as_deref().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;

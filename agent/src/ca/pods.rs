//! The CA's own Pod watch, indexed for node authorisation: each pod's UID, node and
//! ServiceAccount, and how many live pods run each ServiceAccount on each node (istiod's
//! `node+sa` index). Requests are refused until the first list is complete.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client};
use tracing::{info, warn};

/// What node authorisation needs of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub uid: String,
    pub node: String,
    pub service_account: String,
}

type PodKey = (String, String);
/// (node, namespace, service account).
type NodeSaKey = (String, String, String);

#[derive(Default)]
struct Index {
    pods: HashMap<PodKey, PodEntry>,
    node_sa: HashMap<NodeSaKey, usize>,
    synced: bool,
}

impl Index {
    fn insert(&mut self, key: PodKey, entry: Option<PodEntry>) {
        self.remove(&key);
        if let Some(e) = entry {
            *self
                .node_sa
                .entry((e.node.clone(), key.0.clone(), e.service_account.clone()))
                .or_default() += 1;
            self.pods.insert(key, e);
        }
    }

    fn remove(&mut self, key: &PodKey) {
        if let Some(old) = self.pods.remove(key) {
            let k = (old.node, key.0.clone(), old.service_account);
            if let Some(n) = self.node_sa.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.node_sa.remove(&k);
                }
            }
        }
    }
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct PodIndex {
    inner: Arc<RwLock<Index>>,
    /// Bumped after every change, for callers waiting for the watch to catch up.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for PodIndex {
    fn default() -> Self {
        PodIndex {
            inner: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl PodIndex {
    pub fn new() -> PodIndex {
        PodIndex::default()
    }

    /// Whether `cond` holds now or becomes true within `wait` as the watch delivers changes: an
    /// agent can learn of a new pod (and ask for its identity) before the CA's own watch has.
    pub async fn within(&self, wait: Duration, cond: impl Fn(&PodIndex) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.changes.subscribe();
        loop {
            changes.borrow_and_update();
            if cond(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return cond(self),
            }
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn synced(&self) -> bool {
        self.read().synced
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodEntry> {
        self.read()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Whether some live pod of `namespace`/`service_account` is scheduled on `node`.
    pub fn runs_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.read().node_sa.contains_key(&(
            node.to_owned(),
            namespace.to_owned(),
            service_account.to_owned(),
        ))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// A pod counts once it is scheduled and until it has finished: a completed pod holds no
/// workload that needs a certificate.
fn entry(pod: &Pod) -> Option<(PodKey, Option<PodEntry>)> {
    let ns = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let spec = pod.spec.as_ref();
    let node = spec
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty());
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let finished = matches!(phase, Some("Succeeded" | "Failed"));
    let entry = node.filter(|_| !finished).map(|node| PodEntry {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node,
        // Kubernetes: an unset serviceAccountName means `default`.
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    });
    Some(((ns, name), entry))
}

/// Keeps `index` in step with every Pod of the cluster until the task is dropped.
pub async fn watch(client: Client, index: PodIndex) {
    let api: Api<Pod> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // A re-list builds a fresh index and swaps it in at its end, so pods deleted while the
    // watch was down are dropped.
    let mut relist: Option<Index> = None;
    let mut errors = 0u32;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => relist = Some(Index::default()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(fresh), Some((key, e))) = (relist.as_mut(), entry(&pod)) {
                    fresh.insert(key, e);
                }
            }
            Ok(Event::InitDone) => {
                let mut fresh = relist.take().unwrap_or_default();
                fresh.synced = true;
                let n = fresh.pods.len();
                *index.write() = fresh;
                index.changed();
                info!(pods = n, "CA pod index synced");
                errors = 0;
            }
            Ok(Event::Apply(pod)) => {
                if let Some((key, e)) = entry(&pod) {
                    index.write().insert(key, e);
                    index.changed();
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some((key, _)) = entry(&pod) {
                    index.write().remove(&key);
                    index.changed();
                }
            }
            Err(e) => {
                errors += 1;
                // Once per streak of failures, not for each retry.
                if errors == 1 {
                    warn!(error = %e, "CA pod watch failed; retrying (the last index is kept)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

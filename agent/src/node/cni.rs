//! The agent's side of the CNI plugin (`ambit-cni`): the Unix socket it serves ([`bind`],
//! [`serve`]), the pods the runtime has reported ([`CniPods`]: their netns and addresses override
//! discovery, and a DEL keeps a pod from being enrolled again through `/proc` while its sandbox
//! goes), and the node state file the plugin reads while the agent is down ([`node_state`]).
//!
//! The control loop answers each call (`app::control`): an ADD once the pod is enrolled, so the
//! plugin returns to the runtime only when the pod's first packet is captured.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ambit_cni::proto::{self, Answer, NodePod, NodeState, PodRequest, Request};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::discovery::{pod_spec, Desired};
use crate::state::{State, Workload};

#[derive(Debug, Error)]
pub enum CniError {
    #[error("CNI run dir {path}: {source}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI node state {path}: {source}")]
    NodeState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One call of the plugin, with where its answer goes.
pub struct CniCall {
    pub request: Request,
    pub reply: oneshot::Sender<Answer>,
}

/// Binds the plugin's socket in `run_dir` (created 0755), replacing a stale one; only root may
/// connect (0600), as only the runtime executes the plugin.
pub fn bind(run_dir: &Path) -> Result<std::os::unix::net::UnixListener, CniError> {
    std::fs::create_dir_all(run_dir).map_err(|source| CniError::RunDir {
        path: run_dir.to_path_buf(),
        source,
    })?;
    let path = proto::socket_path(run_dir);
    let err = |source| CniError::Bind {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&path).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// How often [`serve`] looks whether the socket file is still its own (see there).
pub const RECLAIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the plugin: one request line per connection, answered by the control loop through
/// `calls`. Runs on the control runtime.
///
/// A successor agent (an upgrade) binds its own socket at the same path when it starts. If it
/// goes away without taking over, this agent serves on, but the path would lead to a dead socket
/// and every meshed pod of the node would be refused until the next restart; so whenever the
/// nobody answers at the path (probed every [`RECLAIM_INTERVAL`]), it is bound here again. While
/// anyone answers there (this agent, or a successor), it is left alone.
pub async fn serve(listener: std::os::unix::net::UnixListener, calls: mpsc::Sender<CniCall>) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let Some(mut listener) = register(listener) else {
        return;
    };
    let mut check = tokio::time::interval(RECLAIM_INTERVAL);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, calls.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "CNI socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = check.tick() => {
                let Some(path) = path.as_deref() else { continue };
                if UnixStream::connect(path).await.is_ok() {
                    // Served, by us or by a successor (the probe reads as an empty request).
                    continue;
                }
                let Some(dir) = path.parent() else { continue };
                match bind(dir).map(register) {
                    Ok(Some(l)) => {
                        warn!(socket = %path.display(), "CNI socket: the agent that replaced it is gone; serving it again");
                        listener = l;
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "CNI socket: cannot bind it again; meshed pods are refused until it is"),
                }
            }
        }
    }
}

fn register(listener: std::os::unix::net::UnixListener) -> Option<tokio::net::UnixListener> {
    tokio::net::UnixListener::from_std(listener)
        .inspect_err(|e| warn!(error = %e, "CNI socket: cannot register with the runtime; the plugin cannot reach the agent"))
        .ok()
}

/// How long a connection may take to send its request line (the plugin sends it at once).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn answer(stream: UnixStream, calls: mpsc::Sender<CniCall>) {
    // The socket file is 0600, but its dir is a hostPath: a process of another uid that reaches
    // the socket (a changed mode, a pod with the dir mounted) is still not heard, since a DEL
    // would take a pod out of the mesh.
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(proto::MAX_LINE + 1);
    let read = async {
        match peer {
            Ok(uid) if uid == me => {}
            Ok(uid) => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("peer uid {uid} is not the agent's ({me})"),
                ))
            }
            Err(e) => return Err(e),
        }
        tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no request line within {REQUEST_TIMEOUT:?}"),
                ))
            })
    };
    let answer = match read.await {
        Err(e) => Answer::Failed {
            message: format!("reading the request: {e}"),
        },
        Ok(n) if n as u64 > proto::MAX_LINE => Answer::Failed {
            message: format!("request longer than {} bytes", proto::MAX_LINE),
        },
        Ok(_) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Answer::Failed {
                message: format!("bad request: {e}"),
            },
            Ok(request) => {
                debug!(?request, "CNI call");
                let (reply, answered) = oneshot::channel();
                let stopping = || Answer::Failed {
                    message: "the agent is stopping".into(),
                };
                if calls.send(CniCall { request, reply }).await.is_err() {
                    stopping()
                } else {
                    answered.await.unwrap_or_else(|_| stopping())
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        // The plugin gave up (its timeout); it reported the failure to the runtime itself.
        debug!(error = %e, "CNI socket: the plugin left before the answer");
    }
}

/// What the runtime told us of one pod's sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Added {
    container_id: String,
    uid: Option<String>,
    netns: PathBuf,
    ips: Vec<IpAddr>,
}

/// The pods the runtime has reported by ADD (their netns and addresses are authoritative), and
/// those it has removed by DEL (not enrolled again until the next ADD, even while a process of
/// the sandbox is still found under `/proc`), by `namespace/name`.
#[derive(Debug, Default)]
pub struct CniPods {
    added: BTreeMap<String, Added>,
    deleted: BTreeSet<String>,
}

/// Where an ADD's pod stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// To be enrolled on this node: key `namespace/name`.
    Enrol(String),
    /// Not meshed: start it as it is.
    NotAmbient { pod: String, reason: String },
    /// Scheduled elsewhere: the agent of this node cannot vouch for it.
    OtherNode { pod: String, node: String },
}

impl CniPods {
    /// The pod a request names: by namespace/name (a UID given must match; a pod of the same name
    /// and another UID is an older object, not this sandbox's), else by address.
    pub fn find<'s>(state: &'s State, req: &PodRequest) -> Option<&'s Arc<Workload>> {
        match &req.pod {
            Some(p) => state
                .workloads
                .get(&crate::state::key(&p.namespace, &p.name))
                .filter(|w| match &p.uid {
                    Some(uid) => w.uid.is_empty() || w.uid == *uid,
                    None => true,
                }),
            None => req
                .ips
                .iter()
                .find_map(|ip| state.workload_by_ip.get(ip))
                .and_then(|k| state.workloads.get(k)),
        }
    }

    /// Istio's enrolment rule (`State::is_enrolled`) for the pod an ADD names.
    pub fn placement(state: &State, node: &str, w: &Workload) -> Placement {
        let pod = format!("{}/{}", w.namespace, w.name);
        if w.node.as_deref().is_some_and(|n| n != node) {
            return Placement::OtherNode {
                pod,
                node: w.node.clone().unwrap_or_default(),
            };
        }
        if state.is_enrolled(w) {
            return Placement::Enrol(pod);
        }
        let reason = if w.host_network {
            "it uses the host network".to_string()
        } else if !w.running {
            "it has finished".to_string()
        } else if w
            .labels
            .get(crate::config::DATAPLANE_MODE_LABEL)
            .is_some_and(|v| v == crate::config::DATAPLANE_MODE_NONE)
        {
            format!(
                "it is labelled {}={}",
                crate::config::DATAPLANE_MODE_LABEL,
                crate::config::DATAPLANE_MODE_NONE
            )
        } else if w.has_sidecar() {
            "it has an Istio sidecar (sidecar.istio.io/status)".to_string()
        } else {
            format!(
                "neither it nor namespace {} is labelled {}={}",
                w.namespace,
                crate::config::DATAPLANE_MODE_LABEL,
                crate::config::DATAPLANE_MODE_AMBIENT
            )
        };
        Placement::NotAmbient { pod, reason }
    }

    /// Records an ADD of pod `key`.
    pub fn add(&mut self, key: &str, req: &PodRequest) {
        self.deleted.remove(key);
        self.added.insert(
            key.to_string(),
            Added {
                container_id: req.container_id.clone(),
                uid: req.pod.as_ref().and_then(|p| p.uid.clone()),
                netns: PathBuf::from(&req.netns),
                ips: req.ips.clone(),
            },
        );
    }

    /// Records a DEL and returns the pod's key: the one its ADD reported (by container id), else
    /// the pod it names or has the addresses of. None: nothing of it is known, or it is a DEL of an
    /// older sandbox of a pod whose current one came by another ADD.
    pub fn delete(&mut self, state: &State, req: &PodRequest) -> Option<String> {
        let by_container = self
            .added
            .iter()
            .find(|(_, a)| a.container_id == req.container_id)
            .map(|(k, _)| k.clone());
        let key = match by_container {
            Some(key) => {
                self.added.remove(&key);
                key
            }
            None => {
                let w = Self::find(state, req)?;
                let key = format!("{}/{}", w.namespace, w.name);
                if self.added.contains_key(&key) {
                    return None;
                }
                key
            }
        };
        self.deleted.insert(key.clone());
        Some(key)
    }

    /// The netns an ADD reported for `key`.
    pub fn netns(&self, key: &str) -> Option<&Path> {
        self.added.get(key).map(|a| a.netns.as_path())
    }

    /// Forgets pods the source no longer has (deleted: nothing of them can come back).
    pub fn retain_known(&mut self, state: &State) {
        let known = |k: &String| {
            let (ns, name) = k.split_once('/').unwrap_or(("", k));
            state.workloads.contains_key(&crate::state::key(ns, name))
        };
        self.added.retain(|k, _| known(k));
        self.deleted.retain(|k| known(k));
    }

    /// Applies what the runtime reported to what discovery found: a reported pod is enrolled in
    /// the netns and with the addresses its ADD gave (the API server has no address for it yet
    /// when the plugin runs), and a removed one not at all.
    pub fn apply(&self, state: &State, node: &str, desired: &mut Desired) {
        if self.added.is_empty() && self.deleted.is_empty() {
            return;
        }
        let is = |ns: &str, name: &str, key: &str| {
            key.split_once('/')
                .is_some_and(|(n, m)| n == ns && m == name)
        };
        let mut specs = Vec::new();
        for w in state.enrolled_on(node) {
            let key = format!("{}/{}", w.namespace, w.name);
            let Some(added) = self.added.get(&key) else {
                continue;
            };
            if added
                .uid
                .as_ref()
                .is_some_and(|uid| !w.uid.is_empty() && *uid != w.uid)
            {
                // An ADD of an older pod of this name: the current one is discovery's.
                continue;
            }
            let mut spec = pod_spec(&w, added.netns.clone());
            if !added.ips.is_empty() {
                spec.ips = added.ips.clone();
            }
            specs.push((key, spec));
        }
        let replaced = specs.iter().map(|(k, _)| k);
        for key in self.deleted.iter().chain(replaced) {
            desired.pods.retain(|p| !is(&p.namespace, &p.name, key));
            desired.waiting.retain(|(ns, name, _)| !is(ns, name, key));
        }
        desired.pods.extend(specs.into_iter().map(|(_, spec)| spec));
    }
}

/// The node state the plugin reads while the agent is down: every namespace and whether it is
/// ambient, and the pods scheduled on `node` and whether each is enrolled.
pub fn node_state(state: &State, node: &str) -> NodeState {
    let namespaces = state
        .namespaces
        .iter()
        .map(|(name, ns)| {
            let ambient = ns
                .labels
                .get(crate::config::DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == crate::config::DATAPLANE_MODE_AMBIENT);
            (name.to_string(), ambient)
        })
        .collect();
    let mut pods: Vec<NodePod> = state
        .workloads
        .values()
        .filter(|w| w.node.as_deref() == Some(node))
        .map(|w| NodePod {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            uid: w.uid.clone(),
            ips: w.ips.clone(),
            ambient: state.is_enrolled(w),
        })
        .collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    NodeState {
        node: node.to_string(),
        namespaces,
        pods,
    }
}

/// Writes the node state (temp file + rename: the plugin never reads half of it).
pub fn write_node_state(run_dir: &Path, now: &NodeState) -> Result<(), CniError> {
    let path = proto::node_state_path(run_dir);
    let tmp = super::cni_install::temp_name(&path, proto::NODE_STATE_NAME);
    let err = |source| CniError::NodeState {
        path: path.clone(),
        source,
    };
    let json = serde_json::to_vec_pretty(now).map_err(|e| err(io::Error::other(e)))?;
    super::cni_install::write_new(&tmp, &json, 0o644).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

#[cfg(test)]
mod tests;

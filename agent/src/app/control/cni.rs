//! The plugin's calls in the control loop. An ADD is answered once its pod is enrolled (listeners
//! and capture entries made by the reconcile it triggers), or at once when the pod is not meshed;
//! a pod the config source has not shown yet is waited for up to [`POD_WAIT`], then refused (the
//! runtime retries). A DEL unenrols at once and keeps the pod out until its next ADD.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_cni::proto::{Answer, NodeState, PodRequest, Request};
use tokio::sync::{mpsc::Receiver, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use super::Control;
use crate::admin::problems::ProblemKey;
use crate::config::Kind;
use crate::node::cni::{node_state, write_node_state, CniCall, CniPods, Placement};
use crate::node::discovery::Desired;
use crate::state::State;

/// How long an ADD waits for the config source to show its pod: the kubelet starts a sandbox as
/// soon as the pod is bound, and the agent's watch sees the pod within moments of that.
pub(super) const POD_WAIT: Duration = Duration::from_secs(10);

/// The control loop's CNI side.
pub(super) struct CniLoop {
    calls: Receiver<CniCall>,
    run_dir: PathBuf,
    pods: CniPods,
    pending: Vec<PendingAdd>,
    /// The node state last written (written again only when it changes).
    written: Option<NodeState>,
    /// The last write failed (logged once until one succeeds).
    write_failed: bool,
}

struct PendingAdd {
    req: PodRequest,
    reply: oneshot::Sender<Answer>,
    since: Instant,
    /// Why its enrolment failed last (retried until [`POD_WAIT`]: e.g. a netns its worker cannot
    /// enter yet).
    failed: Option<String>,
    /// Its wait for the config source is logged (once).
    announced: bool,
}

impl CniLoop {
    pub(super) fn new(calls: Receiver<CniCall>, run_dir: &Path) -> Self {
        CniLoop {
            calls,
            run_dir: run_dir.to_path_buf(),
            pods: CniPods::default(),
            pending: Vec::new(),
            written: None,
            write_failed: false,
        }
    }

    /// When the oldest waiting ADD gives up.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.since + POD_WAIT).min()
    }

    /// Overrides discovery with what the runtime reported (see [`CniPods::apply`]).
    pub(super) fn apply(&mut self, state: &State, node: &str, desired: &mut Desired) {
        if state.is_complete() {
            self.pods.retain_known(state);
        }
        self.pods.apply(state, node, desired);
    }

    /// Writes the node state the plugin reads while the agent is down, if it changed.
    pub(super) fn publish(&mut self, state: &State, node: &str) {
        let now = node_state(state, node);
        if self.written.as_ref() == Some(&now) {
            return;
        }
        match write_node_state(&self.run_dir, &now) {
            Ok(()) => {
                self.written = Some(now);
                self.write_failed = false;
            }
            Err(e) if !self.write_failed => {
                warn!(error = %e, "the CNI plugin cannot tell non-ambient pods while the agent is down");
                self.write_failed = true;
            }
            Err(_) => {}
        }
    }
}

/// The next plugin call; never without a CNI socket.
pub(super) async fn next_call(cni: Option<&mut CniLoop>) -> Option<CniCall> {
    match cni {
        Some(c) => c.calls.recv().await,
        None => std::future::pending().await,
    }
}

impl Control {
    pub(super) fn cni_call(&mut self, call: CniCall) {
        let CniCall { request, reply } = call;
        let answer = match request {
            Request::Add(req) => {
                if let Some(cni) = self.cni.as_mut() {
                    cni.pending.push(PendingAdd {
                        req,
                        reply,
                        since: Instant::now(),
                        failed: None,
                        announced: false,
                    });
                }
                // Enrolled at once when the pod is known; otherwise whatever the source has
                // queued may hold it.
                self.cni_progress();
                if self.cni.as_ref().is_some_and(|c| !c.pending.is_empty()) {
                    self.tick();
                }
                return;
            }
            Request::Del(req) => self.cni_del(&req),
            Request::Check(req) => self.cni_check(&req),
        };
        let _ = reply.send(answer);
    }

    /// Answers the ADDs that can be answered now.
    pub(super) fn cni_progress(&mut self) {
        let Some(cni) = self.cni.as_mut() else {
            return;
        };
        if cni.pending.is_empty() {
            return;
        }
        let state = self.store.reader().load_full();
        let listed = state.synced.contains(&Kind::Pod) && state.synced.contains(&Kind::Namespace);
        let mut waiting = Vec::new();
        let mut enrolling = Vec::new();
        for mut add in std::mem::take(&mut cni.pending) {
            let who = add.req.describe();
            let found = if listed {
                CniPods::find(&state, &add.req)
            } else {
                None
            };
            let Some(w) = found else {
                if add.since.elapsed() < POD_WAIT {
                    if !add.announced {
                        info!(container = %add.req.container_id, "CNI ADD: waiting up to {POD_WAIT:?} for the config source to show {who}");
                        add.announced = true;
                    }
                    waiting.push(add);
                } else {
                    let why = if listed {
                        "is not in the agent's view of the cluster"
                    } else {
                        "cannot be looked up: the agent has not listed Pods and Namespaces yet"
                    };
                    let message = format!("{who} {why} after {POD_WAIT:?}");
                    warn!(container = %add.req.container_id, "CNI ADD refused: {message}");
                    let _ = add.reply.send(Answer::Failed { message });
                }
                continue;
            };
            match CniPods::placement(&state, &self.node_name, w) {
                Placement::NotAmbient { pod, reason } => {
                    info!(pod = %pod, reason = %reason, "CNI ADD: not meshed");
                    let _ = add.reply.send(Answer::NotAmbient { pod, reason });
                }
                Placement::OtherNode { pod, node } => {
                    let message = format!(
                        "pod {pod} is scheduled on node {node:?}, not on this agent's node {:?}",
                        self.node_name
                    );
                    let _ = add.reply.send(Answer::Failed { message });
                }
                Placement::Enrol(key) => {
                    cni.pods.add(&key, &add.req);
                    enrolling.push((key, add));
                }
            }
        }
        cni.pending = waiting;
        if enrolling.is_empty() {
            return;
        }
        self.reconcile();
        let enrolled = self.node.pods();
        for (key, mut add) in enrolling {
            let netns = Path::new(&add.req.netns);
            if enrolled.iter().any(|p| p.pod == key && p.netns == netns) {
                info!(pod = %key, netns = %netns.display(), took = ?add.since.elapsed(), "CNI ADD: enrolled");
                let _ = add.reply.send(Answer::Enrolled { pod: key });
                continue;
            }
            let problem = self.enrol_problems.iter().find(|p| {
                matches!(&p.key, ProblemKey::Pod { namespace, name } if key == format!("{namespace}/{name}"))
            });
            if let Some(p) = problem {
                add.failed = Some(p.message.clone());
            }
            if add.since.elapsed() < POD_WAIT {
                // Retried on the next tick (the control loop's backoff reconciles again).
                if let Some(cni) = self.cni.as_mut() {
                    cni.pending.push(add);
                }
                continue;
            }
            let message = add
                .failed
                .take()
                .unwrap_or_else(|| format!("pod {key} was not enrolled within {POD_WAIT:?}"));
            warn!(pod = %key, "CNI ADD refused: {message}");
            let _ = add.reply.send(Answer::Failed { message });
        }
    }

    /// Unenrols the pod now (the sandbox is going) and keeps it out until its next ADD.
    fn cni_del(&mut self, req: &PodRequest) -> Answer {
        if self.paused.load(std::sync::atomic::Ordering::Acquire) || self.node.handing_over() {
            // A successor holds this agent's listeners and decides from its own view: unenrolling
            // here would remove capture entries it serves, and it would never hear of this DEL.
            // The runtime retries the DEL, which reaches the successor's socket.
            return Answer::Failed {
                message: format!(
                    "{}: the agent is handing over to a new agent; retry",
                    req.describe()
                ),
            };
        }
        let state = self.store.reader().load_full();
        let Some(key) = self
            .cni
            .as_mut()
            .and_then(|cni| cni.pods.delete(&state, req))
        else {
            return Answer::Removed { pod: None };
        };
        self.reconcile();
        // Also while the view is incomplete (nothing is unenrolled by the reconcile then).
        if self.node.unenrol(&key) {
            info!(pod = %key, container = %req.container_id, "CNI DEL: unenrolled");
        } else if self.node.handing_over() {
            // A successor began taking over since the check above: the same as paused.
            return Answer::Failed {
                message: format!("pod {key}: the agent is handing over to a new agent; retry"),
            };
        }
        Answer::Removed { pod: Some(key) }
    }

    fn cni_check(&self, req: &PodRequest) -> Answer {
        let state = self.store.reader().load_full();
        let Some(w) = CniPods::find(&state, req) else {
            return Answer::Failed {
                message: format!(
                    "{} is not in the agent's view of the cluster",
                    req.describe()
                ),
            };
        };
        match CniPods::placement(&state, &self.node_name, w) {
            Placement::NotAmbient { pod, reason } => Answer::NotAmbient { pod, reason },
            Placement::OtherNode { pod, node } => Answer::Failed {
                message: format!("pod {pod} is scheduled on node {node:?}"),
            },
            Placement::Enrol(key) => {
                let netns = Path::new(&req.netns);
                if self
                    .node
                    .pods()
                    .iter()
                    .any(|p| p.pod == key && p.netns == netns)
                {
                    Answer::Enrolled { pod: key }
                } else {
                    Answer::Failed {
                        message: format!("pod {key} is not enrolled in {}", netns.display()),
                    }
                }
            }
        }
    }
}

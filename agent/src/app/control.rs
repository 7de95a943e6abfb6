//! The control loop: config source → store → one published snapshot → compiled policies →
//! desired pods → enrolment, then what is reported (problems, readiness, metrics, status).
//!
//! Fail closed through every gap (issue 9):
//! - nothing is enrolled before Pods and Namespaces have been listed, and nothing is unenrolled and
//!   no adopted pin pruned before EVERY kind has been (a pod missing from an incomplete view is
//!   not known to be gone); until then adopted pods keep their capture and refuse connections;
//! - a snapshot in which a policy kind is not listed yet makes every workload deny, and outbound
//!   connections are refused while any kind is missing (`policy::compile`, `proxy::outbound`);
//! - pods whose netns cannot be found yet, or whose enrolment failed, are retried with a backoff,
//!   and terminating pods are rechecked until their sandbox exits, independent of config changes.

mod cni;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;
use tracing::{error, info};

use super::status::{self, MapSizes};
use super::{AgentConfig, ConfigSource};
use crate::admin::problems::{Problem, ProblemKey, ProblemLog};
use crate::admin::AgentMetrics;
use crate::config::files::FileSource;
use crate::config::kube::{KubeStats, WatchState};
use crate::config::{Kind, ObjectRef, SourceEvent};
use crate::dns::{Dns, DnsAnswers, SystemLookup};
use crate::node::discovery::{
    desired_pods, AnnotatedNetns, CaptureScope, NetnsResolver, ProcNetns,
};
use crate::node::Node;
use crate::policy::PolicyNote;
use crate::proxy::ProxyInputs;
use crate::snapshot::Snapshot;
use crate::state::store::Store;
use crate::state::State;

/// First retry of a pod that could not be enrolled, doubled up to `RETRY_MAX`: a pod whose
/// sandbox appears is enrolled well within a second of it, while a pod that never gets one costs
/// a `/proc` scan every half second at most.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(500);
/// How often a terminating pod's sandbox is looked for.
const TERMINATING_RECHECK: Duration = Duration::from_millis(500);

/// Where objects come from.
pub(super) enum Source {
    /// Polled on every tick.
    Files(FileSource),
    /// Watch events arrive on a channel.
    Kube {
        events: Receiver<SourceEvent>,
        stats: Arc<KubeStats>,
    },
}

impl Source {
    pub(super) fn files(path: &Path) -> Self {
        Source::Files(FileSource::new(path))
    }

    pub(super) fn kube(events: Receiver<SourceEvent>, stats: Arc<KubeStats>) -> Self {
        Source::Kube { events, stats }
    }

    pub(super) fn kube_stats(&self) -> Option<Arc<KubeStats>> {
        match self {
            Source::Kube { stats, .. } => Some(stats.clone()),
            Source::Files(_) => None,
        }
    }
}

/// When to reconcile again without a config change.
#[derive(Debug, Default)]
struct Retry {
    /// Backoff of pods that could not be enrolled; None while there are none.
    backoff: Option<Duration>,
    at: Option<Instant>,
}

impl Retry {
    fn schedule(&mut self, failing: bool, terminating: bool) {
        let now = Instant::now();
        self.backoff =
            failing.then(|| self.backoff.map_or(RETRY_FIRST, |b| (b * 2).min(RETRY_MAX)));
        let recheck = terminating.then_some(TERMINATING_RECHECK);
        self.at = [self.backoff, recheck]
            .into_iter()
            .flatten()
            .min()
            .map(|d| now + d);
    }

    fn due(&self) -> bool {
        self.at.is_some_and(|at| Instant::now() >= at)
    }
}

pub(super) struct Control {
    node_name: String,
    poll_interval: Duration,
    status_file: Option<PathBuf>,
    root_namespace: String,
    node: Node,
    pi: Arc<ProxyInputs>,
    store: Store,
    metrics: Arc<AgentMetrics>,
    source: Source,
    resolver: Box<dyn NetnsResolver>,
    /// In a cluster, with the capture programs attached below the cgroup root: pods outside that
    /// cgroup are held back, not enrolled uncaptured.
    capture_scope: Option<CaptureScope>,
    /// Problems of the last reconcile: pods that could not be enrolled, and what an operator
    /// should know about the policies as compiled.
    enrol_problems: Vec<Problem>,
    policy_problems: Vec<Problem>,
    /// ServiceEntry hosts resolved by DNS (started at the first entry needing it), and which
    /// entries need each name (to name them when it does not resolve).
    dns: Option<Dns>,
    dns_users: BTreeMap<String, Vec<ObjectRef>>,
    dns_problems: Vec<Problem>,
    log: ProblemLog,
    retry: Retry,
    generation: u64,
    seq: u64,
    /// Adopted pins of pods no longer there have been removed (once, at the first complete view).
    pruned: bool,
    map_sizes: MapSizes,
    /// The CNI plugin's calls and what they reported; None without `--cni-dir`.
    cni: Option<cni::CniLoop>,
    /// Notified when a successor agent has taken over: the loop ends as on SIGTERM.
    stop: Arc<tokio::sync::Notify>,
    /// Set while a successor is taking over: pods are neither enrolled nor unenrolled.
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl Control {
    pub(super) fn new(
        cfg: &AgentConfig,
        node: Node,
        pi: Arc<ProxyInputs>,
        store: Store,
        metrics: Arc<AgentMetrics>,
        source: Source,
        cni: Option<(Receiver<crate::node::cni::CniCall>, PathBuf)>,
    ) -> Self {
        let capture_scope = match &cfg.source {
            ConfigSource::Kubernetes => CaptureScope::new(&cfg.capture.cgroup),
            ConfigSource::Files(_) => None,
        };
        let resolver: Box<dyn NetnsResolver> = match &cfg.source {
            ConfigSource::Files(_) => Box::new(AnnotatedNetns {
                dir: PathBuf::from("/var/run/netns"),
            }),
            ConfigSource::Kubernetes => Box::new(ProcNetns {
                proc_root: PathBuf::from("/proc"),
            }),
        };
        Control {
            node_name: cfg.node.clone(),
            poll_interval: cfg.poll_interval,
            status_file: cfg.status_file.clone(),
            root_namespace: cfg.root_namespace.clone(),
            node,
            pi,
            store,
            metrics,
            source,
            resolver,
            capture_scope,
            enrol_problems: Vec::new(),
            policy_problems: Vec::new(),
            dns: None,
            dns_users: BTreeMap::new(),
            dns_problems: Vec::new(),
            log: ProblemLog::default(),
            retry: Retry::default(),
            generation: 0,
            seq: 0,
            pruned: false,
            map_sizes: MapSizes::default(),
            cni: cni.map(|(calls, run_dir)| cni::CniLoop::new(calls, &run_dir)),
            stop: Arc::new(tokio::sync::Notify::new()),
            paused: Default::default(),
        }
    }

    /// Ends the loop when `stop` is notified, and leaves pods as they are while `paused`.
    pub(super) fn stop_on(
        &mut self,
        stop: Arc<tokio::sync::Notify>,
        paused: Arc<std::sync::atomic::AtomicBool>,
    ) {
        self.stop = stop;
        self.paused = paused;
    }

    pub(super) fn into_node(self) -> Node {
        self.node
    }

    /// Runs until SIGTERM or SIGINT, or a successor took over.
    pub(super) async fn run(&mut self) {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        let mut ticker = tokio::time::interval(self.poll_interval);
        loop {
            let retry_at = self.retry.at;
            let cni_wake = self.cni.as_ref().and_then(cni::CniLoop::wake_at);
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = self.stop.notified() => break,
                _ = ticker.tick() => {}
                _ = sleep_until(retry_at) => {}
                _ = dns_changed(self.dns.as_ref()) => {}
                _ = sleep_until(cni_wake) => {}
                Some(call) = cni::next_call(self.cni.as_mut()) => {
                    self.cni_call(call);
                    continue;
                }
                Some(event) = next_event(&mut self.source) => {
                    self.store.apply(event);
                    // Apply whatever else is queued before reconciling once.
                    if let Source::Kube { events, .. } = &mut self.source {
                        while let Ok(e) = events.try_recv() {
                            self.store.apply(e);
                        }
                    }
                }
            }
            self.tick();
        }
    }

    fn tick(&mut self) {
        if let Source::Files(files) = &mut self.source {
            if let Some(event) = files.poll() {
                self.store.apply(event);
            }
        }
        let resolved = self.dns.as_ref().is_some_and(Dns::take_changed);
        if self.store.publish() || self.retry.due() || resolved {
            self.reconcile();
        }
        self.report();
        self.cni_progress();
    }

    /// Applies the latest state to this node: the snapshot first (a pod enrolled below must find
    /// its compiled policies in it), then the pods.
    fn reconcile(&mut self) {
        self.generation += 1;
        let state = self.store.reader().load_full();
        let answers = self.resolve(&state);
        let snapshot = Snapshot::build_with_dns(
            state.clone(),
            &self.root_namespace,
            &self.node_name,
            &answers,
        );
        self.policy_problems = policy_problems(snapshot.policies.notes());
        self.policy_problems
            .extend(snapshot.telemetry_problems.iter().map(|e| Problem {
                key: ProblemKey::Object {
                    kind: e.object.kind.as_str(),
                    namespace: e.object.namespace.clone(),
                    name: e.object.name.clone(),
                    field: e.field.clone(),
                },
                message: format!("{e} (this Telemetry is not applied)"),
            }));
        self.policy_problems
            .extend(snapshot.route_problems.iter().map(|e| Problem {
                key: ProblemKey::Object {
                    kind: e.object.kind.as_str(),
                    namespace: e.object.namespace.clone(),
                    name: e.object.name.clone(),
                    field: e.field.clone(),
                },
                message: format!("{e} (accepted; the rest of it applies)"),
            }));
        let snapshot = Arc::new(snapshot);
        self.pi.snapshot.store(snapshot.clone());
        // Load-balancer state goes with its cluster; consistent-hash tables are built here, not
        // by the first request that needs one.
        self.pi.balancers.retain(|k| snapshot.has_cluster(k));
        for c in snapshot.hashed_clusters() {
            self.pi
                .balancers
                .prepare(&c.key, &c.policy.lb, &c.endpoints.v4);
            self.pi
                .balancers
                .prepare(&c.key, &c.policy.lb, &c.endpoints.v6);
        }
        if !(state.synced.contains(&Kind::Pod) && state.synced.contains(&Kind::Namespace)) {
            // Which pods to enrol is not known yet: touch nothing.
            self.retry = Retry::default();
            return;
        }
        if self.paused.load(std::sync::atomic::Ordering::Acquire) {
            // A successor holds these pods' listeners: a pod enrolled now would be missing from
            // what it took, one unenrolled would be served by it alone. Its own view decides;
            // if it goes away instead, what changed meanwhile is applied on a retry.
            self.retry.schedule(true, false);
            return;
        }
        let mut desired = desired_pods(&state, &self.node_name, self.resolver.as_ref());
        if let Some(cni) = self.cni.as_mut() {
            cni.apply(&state, &self.node_name, &mut desired);
            cni.publish(&state, &self.node_name);
        }
        // After the CNI's overlay: a pod its ADD reported is checked too.
        if let Some(scope) = &self.capture_scope {
            let node = &self.node;
            scope.hold_outside(
                &mut desired,
                |key| node.is_enrolled(key),
                |ns, name| {
                    state
                        .workloads
                        .get(&crate::state::key(ns, name))
                        .map(|w| w.uid.to_string())
                        .filter(|u| !u.is_empty())
                },
            );
        }
        let complete = state.is_complete();
        let errors = self.node.reconcile(&desired.pods, complete);
        let mut problems: Vec<Problem> = errors
            .into_iter()
            .map(|(spec, e)| Problem {
                key: ProblemKey::Pod {
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                },
                message: format!("Pod {}: cannot enrol: {e}", spec.key()),
            })
            .collect();
        problems.extend(
            desired
                .waiting
                .into_iter()
                .map(|(namespace, name, why)| Problem {
                    message: format!("Pod {namespace}/{name}: cannot enrol: {why}"),
                    key: ProblemKey::Pod { namespace, name },
                }),
        );
        problems.sort();
        self.retry
            .schedule(!problems.is_empty(), desired.terminating > 0);
        self.enrol_problems = problems;
        // Metric series of workloads no longer on this node go with them.
        let local: std::collections::HashSet<crate::state::IstioLabels> =
            desired.pods.iter().map(|p| (*p.istio).clone()).collect();
        self.pi.telemetry.retain_local(&local);
        if complete && !self.pruned {
            // Adopted state of pods that vanished while no agent ran: only a complete view can
            // tell a pod is gone.
            self.node.prune_adopted();
            self.pruned = true;
            info!(
                pods = self.node.pods().len(),
                "complete view of the cluster: serving"
            );
        }
    }

    /// Starts resolving the names `state`'s ServiceEntries need (and stops the others), and
    /// returns the answers there are. Resolution runs apart; a new answer reconciles again.
    fn resolve(&mut self, state: &State) -> DnsAnswers {
        self.dns_users = crate::routing::entries::dns_names(state);
        self.dns_problems.clear();
        if self.dns.is_none() && !self.dns_users.is_empty() {
            match SystemLookup::new() {
                Ok(lookup) => self.dns = Some(Dns::new(Arc::new(lookup))),
                Err(e) => {
                    for users in self.dns_users.values() {
                        self.dns_problems.extend(users.iter().map(|o| {
                            dns_problem(
                                o,
                                format!("{o}: cannot resolve its hosts: {e}; it has no endpoints"),
                            )
                        }));
                    }
                    return DnsAnswers::default();
                }
            }
        }
        let Some(dns) = &self.dns else {
            return DnsAnswers::default();
        };
        dns.want(&self.dns_users.keys().cloned().collect());
        dns.answers()
    }

    /// Problems, readiness, metrics and the status file, from the same values each tick.
    fn report(&mut self) {
        let problems = self.problems();
        self.log.update(&problems);
        self.metrics
            .set_problems(&problems, self.store.rejected_total());
        let state = self.store.reader().load();
        self.metrics.set_synced(
            Kind::ALL
                .into_iter()
                .map(|k| (k, state.synced.contains(&k)))
                .collect(),
        );
        let readiness = self.readiness(&state.unsynced());
        self.metrics.set_readiness(readiness.clone());
        self.metrics.set_enrolled_pods(self.node.pods().len());
        self.metrics.set_kernel(crate::admin::kernel_counters(
            &self.node.capture().kernel_stats(),
        ));
        self.metrics.alive();
        self.seq += 1;
        if let Some(path) = &self.status_file {
            let now = status::Snapshot {
                node_name: &self.node_name,
                seq: self.seq,
                generation: self.generation,
                readiness: &readiness,
                synced: state.synced.iter().copied().collect(),
                kube: self.source.kube_stats().map(|s| s.all()),
                problems: &problems,
                rejected_total: self.store.rejected_total(),
            };
            status::write(path, now, &self.node, &self.pi, &mut self.map_sizes);
        }
    }

    /// Every current problem: files that cannot be read, objects rejected (or accepted with a
    /// warning), pods that cannot be enrolled.
    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Source::Files(files) = &self.source {
            out.extend(files.file_errors.iter().map(|e| Problem {
                key: ProblemKey::File {
                    path: e.path.clone(),
                },
                message: e.to_string(),
            }));
        }
        out.extend(
            self.store
                .problems()
                .into_iter()
                .map(|(e, effect)| Problem {
                    message: format!("{e} ({})", effect.describe()),
                    key: ProblemKey::Object {
                        kind: e.object.kind.as_str(),
                        namespace: e.object.namespace,
                        name: e.object.name,
                        field: e.field,
                    },
                }),
        );
        out.extend(self.enrol_problems.iter().cloned());
        out.extend(self.policy_problems.iter().cloned());
        out.extend(self.dns_problems.iter().cloned());
        if let Some(dns) = &self.dns {
            for (name, why) in dns.failures() {
                for o in self.dns_users.get(&name).into_iter().flatten() {
                    out.push(dns_problem(
                        o,
                        format!("{o}: {name} does not resolve: {why} (the last answer, if any, is kept)"),
                    ));
                }
            }
        }
        out
    }

    /// Ready once every kind is listed and this view has been applied; otherwise why not, with
    /// what the source says about each missing kind.
    fn readiness(&self, unsynced: &[Kind]) -> Result<(), String> {
        if unsynced.is_empty() {
            return if self.pruned {
                Ok(())
            } else {
                Err("applying the first complete view".into())
            };
        }
        let detail: Vec<String> = match &self.source {
            Source::Files(files) => files
                .unavailable()
                .map(|why| vec![format!("config path: {why}")])
                .unwrap_or_default(),
            Source::Kube { stats, .. } => unsynced
                .iter()
                .map(|k| {
                    let c = stats.kind(*k);
                    match c.last_error {
                        Some(e) => format!("{k}: {}: {e}", c.state.as_str()),
                        None if c.state == WatchState::Listing => format!("{k}: listing"),
                        None => format!("{k}: {}", c.state.as_str()),
                    }
                })
                .collect(),
        };
        let kinds: Vec<&str> = unsynced.iter().map(|k| k.as_str()).collect();
        let mut why = format!(
            "waiting for the first complete list of {}; enrolled pods fail closed until then",
            kinds.join(", ")
        );
        if !detail.is_empty() {
            why.push_str(" (");
            why.push_str(&detail.join("; "));
            why.push(')');
        }
        Err(why)
    }
}

/// What an operator should know about the policies as compiled, as problems (logged once each).
/// A rejected policy failing closed is already reported as its rejection.
fn policy_problems(notes: &[PolicyNote]) -> Vec<Problem> {
    notes
        .iter()
        .filter_map(|note| {
            let (kind, policy) = match note {
                PolicyNote::FailClosed { .. } => return None,
                PolicyNote::TargetRefsAtWaypoint { policy }
                | PolicyNote::HttpAttributes { policy, .. } => (Kind::AuthorizationPolicy, policy),
                PolicyNote::PeerAuthnIgnored { policy, .. } => (Kind::PeerAuthentication, policy),
            };
            let (namespace, name) = policy.split_once('/').unwrap_or(("", policy));
            Some(Problem {
                key: ProblemKey::Object {
                    kind: kind.as_str(),
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    field: note.metric_label().to_string(),
                },
                message: note.to_string(),
            })
        })
        .collect()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A problem of one ServiceEntry about DNS.
fn dns_problem(o: &ObjectRef, message: String) -> Problem {
    Problem {
        key: ProblemKey::Object {
            kind: o.kind.as_str(),
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            field: "spec.resolution".into(),
        },
        message,
    }
}

/// Returns when a resolved name may have a new answer; never without a resolver.
async fn dns_changed(dns: Option<&Dns>) {
    match dns {
        Some(d) => d.changed().await,
        None => std::future::pending().await,
    }
}

async fn next_event(source: &mut Source) -> Option<SourceEvent> {
    match source {
        Source::Kube { events, .. } => events.recv().await,
        Source::Files(_) => std::future::pending().await,
    }
}

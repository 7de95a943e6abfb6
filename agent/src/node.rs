//! Pod lifecycle on this node: for each enrolled pod, a worker thread in its netns, the in-pod
//! listeners (15001 outbound, 15006 inbound plaintext, 15008 HBONE), the proxy stages serving them,
//! and the pod's entries in the capture maps. Unenrolment removes all of it.

pub mod adopt;
pub mod cni;
pub mod cni_install;
pub mod cni_kube;
pub mod discovery;
pub mod netns;
pub mod transparent;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use thiserror::Error;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::ebpf::{Capture, EbpfError, OrigDstTable, PodCapture};
use crate::identity::{CertLease, Identity};
use crate::proxy::accept::Handoff;
use crate::proxy::{
    inbound::Inbound, inbound_plain::InboundPlain, outbound::Outbound, OrigDstLookup, PodContext,
    ProxyInputs,
};
use crate::state::IstioLabels;
use netns::NetnsWorker;

/// How long unenrolment waits for a pod's accept loops to drop its listeners (they end at their
/// next poll, within moments unless a data-plane worker is stuck).
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("pod netns {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pod {pod}: listener {addr}: {source}")]
    Listener {
        pod: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("pod {pod}: {source}")]
    Capture {
        pod: String,
        #[source]
        source: EbpfError,
    },
    #[error("pod {pod}: client-address routing: {source}")]
    Transparent {
        pod: String,
        #[source]
        source: transparent::TransparentError,
    },
    #[error("pod {pod} has no IP address")]
    NoIp { pod: String },
    #[error("pod {pod}: not enrolled while a new agent is taking over this one's listeners")]
    HandingOver { pod: String },
}

/// A pod this node should capture, as the config source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub netns_path: PathBuf,
    pub excluded_outbound_ports: Vec<u16>,
    pub excluded_inbound_ports: Vec<u16>,
    /// Its identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
    pub service_account: String,
    /// The `baggage` header its tunnels carry.
    pub baggage: String,
    /// Its values in Istio's metric labels.
    pub istio: Arc<IstioLabels>,
}

impl PodSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

struct EnrolledPod {
    spec: PodSpec,
    ctx: Arc<PodContext>,
    tasks: Vec<JoinHandle<()>>,
    /// Keeps the service account's certificate while the pod is enrolled.
    _cert: CertLease,
    worker: Arc<NetnsWorker>,
    /// The pod's routing for transparent app connections; None when it could not be set up.
    transparent: Option<transparent::Held>,
}

/// An unenrolled pod's routing, kept while the proxy still relays connections there.
struct Draining {
    netns: PathBuf,
    held: transparent::Held,
    /// The old worker: runs the drain's looks, and the removal at shutdown.
    worker: Arc<NetnsWorker>,
}

/// Status of one enrolled pod, for the status file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub netns_cookie: u64,
}

/// The pods enrolled on this node and the capture they are enrolled in.
pub struct Node {
    capture: Capture,
    pi: Arc<ProxyInputs>,
    /// The data-plane workers' runtimes (at least one); every stage runs on each.
    workers: Vec<Handle>,
    pods: BTreeMap<String, EnrolledPod>,
    draining: Vec<Draining>,
    /// The enrolled pods' listeners, for a successor agent (upgrade).
    offer: adopt::Offer,
    /// Listeners a predecessor handed over, until their pods are enrolled.
    taken: adopt::Taken,
}

impl Node {
    pub fn new(capture: Capture, pi: Arc<ProxyInputs>, workers: Vec<Handle>) -> Self {
        assert!(
            !workers.is_empty(),
            "the data plane has at least one worker"
        );
        Node {
            capture,
            pi,
            workers,
            pods: BTreeMap::new(),
            draining: Vec::new(),
            offer: adopt::Offer::default(),
            taken: adopt::Taken::default(),
        }
    }

    /// Offers every enrolled pod's listeners in `offer` (for a successor), and serves pods with
    /// the listeners in `taken` (from a predecessor) instead of new ones.
    pub fn with_handover(mut self, offer: adopt::Offer, taken: adopt::Taken) -> Self {
        self.offer = offer;
        self.taken = taken;
        self
    }

    /// True while a successor is taking over: no pod is enrolled or unenrolled here.
    pub fn handing_over(&self) -> bool {
        self.offer.hold().is_none()
    }

    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    pub fn capture_mut(&mut self) -> &mut Capture {
        &mut self.capture
    }

    /// Whether the pod of `key` (`namespace/name`) is enrolled.
    pub fn is_enrolled(&self, key: &str) -> bool {
        self.pods.contains_key(key)
    }

    pub fn pods(&self) -> Vec<PodStatus> {
        self.pods
            .values()
            .map(|p| PodStatus {
                pod: p.spec.key(),
                ips: p.spec.ips.clone(),
                netns: p.spec.netns_path.clone(),
                netns_cookie: p.ctx.netns_cookie,
            })
            .collect()
    }

    /// Brings the enrolled set to `desired`: unenrols what is gone or changed, enrols what is new.
    /// With `may_unenrol` false (the agent's view is not complete yet) nothing is unenrolled or
    /// re-enrolled: a pod missing from an incomplete view is not known to be gone. One pod's
    /// failure is logged and does not stop the others. Returns the errors.
    pub fn reconcile<'d>(
        &mut self,
        desired: &'d [PodSpec],
        may_unenrol: bool,
    ) -> Vec<(&'d PodSpec, NodeError)> {
        let want: BTreeMap<String, &'d PodSpec> = desired.iter().map(|p| (p.key(), p)).collect();
        if may_unenrol {
            let stale: Vec<String> = self
                .pods
                .iter()
                .filter(|(k, p)| want.get(*k).is_none_or(|w| **w != p.spec))
                .map(|(k, _)| k.clone())
                .collect();
            for key in stale {
                self.unenrol(&key);
            }
        }
        let mut errors = Vec::new();
        for (key, spec) in want {
            if self.pods.contains_key(&key) {
                continue;
            }
            if let Err(e) = self.enrol(spec.clone()) {
                // Reported (and logged once) by the control loop, which retries it.
                debug!(pod = %key, error = %e, "enrolment failed");
                errors.push((spec, e));
            }
        }
        errors
    }

    /// Removes capture state left by a previous agent for netns no longer enrolled, and closes
    /// listeners a predecessor handed over that no pod claimed (which tells it to stop accepting).
    pub fn prune_adopted(&mut self) {
        self.taken.finish();
        let keep: Vec<u64> = self.pods.values().map(|p| p.ctx.netns_cookie).collect();
        for cookie in self.capture.enrolled_cookies() {
            if !keep.contains(&cookie) {
                info!(
                    netns_cookie = cookie,
                    "removing capture state of a pod no longer enrolled"
                );
                self.capture.unenrol(cookie);
            }
        }
        self.capture.prune_netns_links(&keep);
    }

    /// Enrols a pod: listeners in its netns, the proxy stages serving them, its certificate,
    /// then its capture entries (last, so capture never points at listeners not yet served).
    pub fn enrol(&mut self, spec: PodSpec) -> Result<(), NodeError> {
        let key = spec.key();
        if spec.ips.is_empty() {
            return Err(NodeError::NoIp { pod: key });
        }
        // Held to the end: a successor's snapshot has all of this pod or none of it.
        let offer = self.offer.clone();
        let Some(mut held) = offer.hold() else {
            return Err(NodeError::HandingOver { pod: key });
        };
        let worker = Arc::new(NetnsWorker::spawn(&spec.netns_path)?);
        let netns_id =
            adopt::NetnsId::of(worker.netns_file()).map_err(|source| NodeError::Netns {
                path: spec.netns_path.clone(),
                source,
            })?;
        let listeners = match Listeners::adopt(&spec, netns_id, &mut self.taken) {
            Some(adopted) => adopted,
            None => Listeners::make(&spec, &worker)?,
        };
        let offered = listeners
            .describe(&key, netns_id)
            .map_err(|source| NodeError::Netns {
                path: spec.netns_path.clone(),
                source,
            })?;
        let cookie =
            crate::ebpf::netns_cookie(listeners.outbound[0].as_fd()).map_err(|source| {
                NodeError::Netns {
                    path: spec.netns_path.clone(),
                    source,
                }
            })?;
        let ctx = Arc::new(self.pod_context(&spec, cookie, worker.clone()));
        let _guard = self.workers[0].enter();
        // Fetched in the background; the HBONE listener and the pool wait for it.
        let cert = self.pi.secrets.acquire(&ctx.identity);
        let (tasks, inbound_fds) = self.start_stages(&ctx, &spec, listeners)?;
        let capture = PodCapture {
            netns_cookie: cookie,
            ips: spec.ips.clone(),
            excluded_outbound_ports: spec.excluded_outbound_ports.clone(),
            excluded_inbound_ports: spec.excluded_inbound_ports.clone(),
        };
        let fds: Vec<_> = inbound_fds
            .iter()
            .map(|(ip, fd)| (*ip, fd.as_fd()))
            .collect();
        if let Err(source) = self
            .capture
            .enrol(&capture, worker.netns_file().as_fd(), &fds)
        {
            for t in &tasks {
                t.abort();
            }
            self.capture.unenrol(cookie);
            return Err(NodeError::Capture { pod: key, source });
        }
        let transparent = self.install_transparent(&key, &spec, &worker);
        held.set(&key, offered);
        // Its stages run: pods of this node may hand it their connections in-process.
        self.pi.local.insert(&self.pi, ctx.clone());
        info!(pod = %key, ips = ?spec.ips, netns_cookie = cookie, transparent = transparent.is_some(), "enrolled");
        self.pods.insert(
            key,
            EnrolledPod {
                spec,
                ctx,
                tasks,
                _cert: cert,
                worker,
                transparent,
            },
        );
        Ok(())
    }

    /// Lets the pod's app see its clients' addresses (last, after the stages: connections that
    /// come before it are dialled from the pod's own address, as is every connection of a pod
    /// where it fails, which is logged once and not retried). A re-enrolled netns whose routing
    /// is still in place (connections from the last enrolment) adopts it.
    fn install_transparent(
        &mut self,
        key: &str,
        spec: &PodSpec,
        worker: &NetnsWorker,
    ) -> Option<transparent::Held> {
        self.draining.retain(|d| !d.held.is_settled());
        if let Some(i) = self
            .draining
            .iter()
            .position(|d| d.netns == spec.netns_path)
        {
            let d = self.draining.swap_remove(i);
            if d.held.adopt() {
                worker.set_transparent(d.held.present());
                return Some(d.held);
            }
        }
        let v4 = spec.ips.iter().any(IpAddr::is_ipv4);
        let v6 = spec.ips.iter().any(IpAddr::is_ipv6);
        let turned_off = self
            .pi
            .snapshot
            .load_full()
            .state
            .workloads
            .get(&crate::state::key(&spec.namespace, &spec.name))
            .and_then(|w| w.annotations.get(transparent::ORIGINAL_SOURCE_ANNOTATION))
            .filter(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "false" | "off"))
            .cloned();
        let installed = match turned_off {
            Some(value) => Ok(Err(transparent::TransparentError::TurnedOff { value })),
            None => worker.run(move || transparent::install(v4, v6)),
        };
        let installed = installed
            .map_err(|source| NodeError::Netns {
                path: spec.netns_path.clone(),
                source,
            })
            .and_then(|r| {
                r.map_err(|source| NodeError::Transparent {
                    pod: key.to_string(),
                    source,
                })
            });
        match installed {
            Ok(setup) => {
                let held = transparent::Held::new(setup);
                worker.set_transparent(held.present());
                Some(held)
            }
            Err(e) => {
                warn!(pod = %key, error = %e, "the app will see connections from its own pod address, not the client's");
                None
            }
        }
    }

    /// The routing of an unenrolled pod stays while the proxy still relays connections that need
    /// it (they are not cut by unenrolment, and an HBONE connection accepted before goes on
    /// serving streams), and goes after the last of them, or at once when the agent stops.
    fn release_transparent(&mut self, key: &str, pod: &EnrolledPod, now: bool) {
        let Some(held) = pod.transparent.clone() else {
            return;
        };
        held.release();
        if now {
            return remove_now(key, &held, &pod.worker);
        }
        let ips = pod.spec.ips.clone();
        if let Err(e) = transparent::drain(held.clone(), key.to_string(), ips, pod.worker.clone()) {
            warn!(pod = %key, error = %e, "no drain thread; removing the transparent routing now");
            return remove_now(key, &held, &pod.worker);
        }
        self.draining.push(Draining {
            netns: pod.spec.netns_path.clone(),
            held,
            worker: pod.worker.clone(),
        });
    }

    fn pod_context(&self, spec: &PodSpec, cookie: u64, worker: Arc<NetnsWorker>) -> PodContext {
        PodContext {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            ips: spec.ips.clone(),
            netns_cookie: cookie,
            sockets: worker,
            identity: Identity::new(
                self.pi.secrets.trust_domain(),
                &spec.namespace,
                &spec.service_account,
            ),
            istio: spec.istio.clone(),
            baggage: http::HeaderValue::from_str(&spec.baggage)
                .inspect_err(|_| warn!(pod = %spec.key(), baggage = %spec.baggage, "labels make an invalid baggage header; tunnels go without it"))
                .ok(),
            trace_workload: Default::default(),
        }
    }

    /// Starts the outbound, inbound (HBONE) and plaintext-inbound stages on every data-plane
    /// worker, each accepting on its own descriptor of the same listener (a connection stays on
    /// the worker that accepted it); returns their tasks and the plaintext listeners' fds by pod
    /// IP (for sk_lookup).
    #[allow(clippy::type_complexity)]
    fn start_stages(
        &self,
        ctx: &Arc<PodContext>,
        spec: &PodSpec,
        listeners: Listeners,
    ) -> Result<(Vec<JoinHandle<()>>, Vec<(IpAddr, std::os::fd::OwnedFd)>), NodeError> {
        let key = spec.key();
        let listener_error = |l: &std::net::TcpListener, source| NodeError::Listener {
            pod: key.clone(),
            addr: l
                .local_addr()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        };
        // One tokio listener per worker, registered with that worker's runtime.
        let per_worker = |l: &std::net::TcpListener| {
            self.workers
                .iter()
                .map(|rt| {
                    let _in_worker = rt.enter();
                    l.try_clone()
                        .and_then(tokio::net::TcpListener::from_std)
                        .map(|t| (rt, t))
                        .map_err(|e| listener_error(l, e))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        // Every descriptor is made before any stage starts, so a failure leaves nothing running.
        let mut inbound_fds = Vec::new();
        for (is_v4, l) in &listeners.inbound {
            for ip in spec.ips.iter().filter(|ip| ip.is_ipv4() == *is_v4) {
                let fd = l
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| NodeError::Listener {
                        pod: key.clone(),
                        addr: SocketAddr::new(*ip, INBOUND_PORT),
                        source,
                    })?;
                inbound_fds.push((*ip, fd));
            }
        }
        let all = |ls: &mut dyn Iterator<Item = &std::net::TcpListener>| {
            ls.map(per_worker).collect::<Result<Vec<_>, _>>()
        };
        let outbound = all(&mut listeners.outbound.iter())?;
        let inbound = all(&mut listeners.inbound.iter().map(|(_, l)| l))?;
        let hbone = all(&mut listeners.hbone.iter())?;

        let (pi, pod) = (&self.pi, ctx);
        let mut tasks = Vec::new();
        // Each listener's loops (one per worker) can hand connections to each other.
        let with_handoffs = |per_listener: Vec<Vec<_>>| {
            per_listener.into_iter().flat_map(|loops: Vec<_>| {
                let handoffs = Handoff::group(loops.len());
                loops.into_iter().zip(handoffs)
            })
        };
        for ((rt, listener), handoff) in with_handoffs(outbound) {
            let stage = Outbound {
                pi: pi.clone(),
                pod: pod.clone(),
                listener,
                handoff,
            };
            tasks.push(rt.spawn(stage.run()));
        }
        for ((rt, listener), handoff) in with_handoffs(inbound) {
            let stage = InboundPlain {
                pi: pi.clone(),
                pod: pod.clone(),
                listener,
                handoff,
            };
            tasks.push(rt.spawn(stage.run()));
        }
        for ((rt, listener), handoff) in with_handoffs(hbone) {
            let stage = Inbound {
                pi: pi.clone(),
                pod: pod.clone(),
                listener,
                handoff,
            };
            tasks.push(rt.spawn(stage.run()));
        }
        Ok((tasks, inbound_fds))
    }

    /// Unenrols pod `key`; false when it is not enrolled, or a successor is taking over (which
    /// then decides: the pod stays as it handed it).
    pub fn unenrol(&mut self, key: &str) -> bool {
        self.unenrol_as(key, false)
    }

    /// `stopping`: the agent is exiting, and every connection with it.
    fn unenrol_as(&mut self, key: &str, stopping: bool) -> bool {
        let offer = self.offer.clone();
        let Some(mut held) = offer.hold() else {
            debug!(pod = %key, "not unenrolled: a successor is taking over");
            return false;
        };
        let Some(mut pod) = self.pods.remove(key) else {
            return false;
        };
        held.remove(key);
        // Capture off first, so no new connection is sent to listeners about to close, nor handed
        // over in-process.
        self.capture.unenrol(pod.ctx.netns_cookie);
        self.pi.local.remove(&pod.ctx);
        // Aborting the accept loops closes the listeners; relays already running keep their sockets
        // and finish on their own, so established connections are not cut.
        let tasks = std::mem::take(&mut pod.tasks);
        for t in &tasks {
            t.abort();
        }
        self.wait_closed(key, tasks);
        self.release_transparent(key, &pod, stopping);
        drop(held);
        info!(pod = %key, "unenrolled");
        true
    }

    /// Waits (up to [`CLOSE_WAIT`]) until the aborted accept loops have ended: each owns one of
    /// the pod's listeners, which closes only when its worker drops the loop. Without this the
    /// netns could be enrolled again (a CNI DEL then ADD of the same sandbox) while the old
    /// listeners still hold their ports, and fail with "address already in use"; and a DEL is
    /// answered once the pod's listeners are gone, as the plugin is promised. The loops run on
    /// the data-plane workers, never on the control runtime that calls this.
    fn wait_closed(&self, key: &str, tasks: Vec<JoinHandle<()>>) {
        if tasks.is_empty() {
            return;
        }
        let (done, closed) = std::sync::mpsc::sync_channel::<()>(1);
        self.workers[0].spawn(async move {
            for t in tasks {
                // Err(cancelled) once the loop (and its listener) is dropped.
                let _ = t.await;
            }
            let _ = done.send(());
        });
        match closed.recv_timeout(CLOSE_WAIT) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => warn!(
                pod = %key,
                "its listeners are still open {CLOSE_WAIT:?} after unenrolment; enrolling its \
                 netns again may fail with \"address in use\" until they close"
            ),
            // The data plane is stopping: its runtimes drop every loop.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                debug!(pod = %key, "data plane stopped before its listeners were seen closed")
            }
        }
    }

    /// At the agent's exit: every pod, and every routing still draining, goes now.
    pub fn unenrol_all(&mut self) {
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for k in keys {
            self.unenrol_as(&k, true);
        }
        for d in std::mem::take(&mut self.draining) {
            remove_now(&d.netns.display().to_string(), &d.held, &d.worker);
        }
    }
}

fn remove_now(key: &str, held: &transparent::Held, worker: &NetnsWorker) {
    let Some(setup) = held.take() else {
        return;
    };
    match worker.run(move || setup.remove()) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(pod = %key, error = %e, "removing the transparent routing"),
        Err(e) => debug!(pod = %key, error = %e, "pod netns gone before its routing was removed"),
    }
}

struct Listeners {
    outbound: Vec<std::net::TcpListener>,
    /// (is IPv4, listener)
    inbound: Vec<(bool, std::net::TcpListener)>,
    hbone: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// Makes the pod's listeners on its netns worker.
    fn make(spec: &PodSpec, worker: &NetnsWorker) -> Result<Listeners, NodeError> {
        let planned = planned(spec);
        worker
            .run(move || make_listeners(&planned))
            .map_err(|source| NodeError::Netns {
                path: spec.netns_path.clone(),
                source,
            })?
            .map_err(|(addr, source)| NodeError::Listener {
                pod: spec.key(),
                addr,
                source,
            })
    }

    /// The pod's listeners as a predecessor agent handed them over, if it handed all of them.
    fn adopt(spec: &PodSpec, netns: adopt::NetnsId, taken: &mut adopt::Taken) -> Option<Listeners> {
        let handed = taken.pod(&spec.key(), netns, &planned(spec))?;
        Some(Listeners::from_parts(handed.into_iter().map(
            |(role, _, fd)| {
                let l = std::net::TcpListener::from(fd);
                (role, l)
            },
        )))
    }

    fn from_parts(parts: impl IntoIterator<Item = (adopt::Role, std::net::TcpListener)>) -> Self {
        let mut l = Listeners {
            outbound: Vec::new(),
            inbound: Vec::new(),
            hbone: Vec::new(),
        };
        for (role, listener) in parts {
            match role {
                adopt::Role::Outbound => l.outbound.push(listener),
                adopt::Role::Inbound => {
                    let v4 = listener.local_addr().is_ok_and(|a| a.is_ipv4());
                    l.inbound.push((v4, listener));
                }
                adopt::Role::Hbone => l.hbone.push(listener),
                adopt::Role::Admin | adopt::Role::Debug | adopt::Role::Readiness => {}
            }
        }
        // The IPv4 outbound listener goes first: its netns cookie identifies the pod.
        l.outbound
            .sort_by_key(|o| o.local_addr().map_or(true, |a| a.is_ipv6()));
        l.inbound.sort_by_key(|(v4, _)| !*v4);
        l.hbone
            .sort_by_key(|o| o.local_addr().map_or(true, |a| a.is_ipv6()));
        l
    }

    /// Every listener with a new descriptor of it, for the offer to a successor.
    fn describe(&self, key: &str, netns: adopt::NetnsId) -> io::Result<Vec<adopt::Handed>> {
        let roles = self
            .outbound
            .iter()
            .map(|l| (adopt::Role::Outbound, l))
            .chain(self.inbound.iter().map(|(_, l)| (adopt::Role::Inbound, l)))
            .chain(self.hbone.iter().map(|l| (adopt::Role::Hbone, l)));
        roles
            .map(|(role, l)| adopt::describe(Some(key), Some(netns), role, l, l.local_addr()?))
            .collect()
    }
}

/// The listeners a pod gets. Outbound and inbound listen on loopback only: they are reached
/// through capture, never directly from outside the pod. The IPv4 outbound listener always
/// exists: dual-stack sockets connecting to IPv4-mapped addresses are sent there, and its netns
/// cookie identifies the pod.
fn planned(spec: &PodSpec) -> Vec<(adopt::Role, SocketAddr)> {
    use adopt::Role;
    let v4 = spec.ips.iter().any(IpAddr::is_ipv4);
    let v6 = spec.ips.iter().any(IpAddr::is_ipv6);
    let mut p = vec![(
        Role::Outbound,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
    )];
    if v6 {
        p.push((
            Role::Outbound,
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
        ));
    }
    if v4 {
        p.push((
            Role::Inbound,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), INBOUND_PORT),
        ));
        p.push((
            Role::Hbone,
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), HBONE_PORT),
        ));
    }
    if v6 {
        p.push((
            Role::Inbound,
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), INBOUND_PORT),
        ));
        p.push((
            Role::Hbone,
            SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), HBONE_PORT),
        ));
    }
    p
}

/// Runs on the pod's netns worker. IPv6 listeners are IPv6-only (the IPv4 ones serve IPv4).
fn make_listeners(
    planned: &[(adopt::Role, SocketAddr)],
) -> Result<Listeners, (SocketAddr, io::Error)> {
    let made = planned
        .iter()
        .map(|(role, addr)| {
            netns::listen(*addr, addr.is_ipv6())
                .map(|l| (*role, l))
                .map_err(|e| (*addr, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Listeners::from_parts(made))
}

/// The eBPF original-destination map is where the outbound stage learns where a captured
/// connection was going.
impl OrigDstLookup for OrigDstTable {
    fn take(&self, netns_cookie: u64, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        OrigDstTable::take(self, netns_cookie, peer, local)
            .ok()
            .flatten()
    }
}

//! Listeners that move from one agent process to the next in an upgrade: what each one is (pod,
//! netns, role, address), the set this agent offers a successor, and the set it took from a
//! predecessor and hands to each pod's enrolment. Moving the listening sockets themselves (not
//! binding new ones) is what keeps an upgrade from refusing connections: a socket is one kernel
//! object, so what queues in its backlog while ownership moves is accepted by the next owner, and
//! the capture maps, which hold references to these same sockets, need no change.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// A network namespace as the filesystem names it (device and inode of its nsfs file): the same
/// for every path that opens it, in every process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// The netns the calling thread is in.
    pub fn current() -> io::Result<NetnsId> {
        NetnsId::of(&File::open("/proc/thread-self/ns/net")?)
    }

    pub fn of(netns: &File) -> io::Result<NetnsId> {
        let m = netns.metadata()?;
        Ok(NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A pod's 15001.
    Outbound,
    /// A pod's 15006.
    Inbound,
    /// A pod's 15008.
    Hbone,
    /// The agent's `/metrics` and `/healthz` endpoint.
    Admin,
    /// The agent's debug endpoint.
    Debug,
    /// The agent's `/healthz/ready` on Istio's health port (15021).
    Readiness,
}

/// One listener as the handover message describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Described {
    /// `namespace/name` of the pod it serves; None for the agent's own listeners.
    pub pod: Option<String>,
    pub netns: Option<NetnsId>,
    pub role: Role,
    pub addr: SocketAddr,
}

/// A listening socket and what it is.
#[derive(Debug)]
pub struct Handed {
    pub what: Described,
    pub fd: OwnedFd,
}

impl Handed {
    /// A second descriptor of the same socket.
    pub fn dup(&self) -> io::Result<Handed> {
        Ok(Handed {
            what: self.what.clone(),
            fd: self.fd.try_clone()?,
        })
    }
}

/// The listeners this agent serves, by owner (a pod's key, or a name for the agent's own), for a
/// successor to take. Each entry holds its own descriptor of the socket (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Offer(Arc<Mutex<BTreeMap<String, Vec<Handed>>>>);

impl Offer {
    pub fn set(&self, owner: &str, listeners: Vec<Handed>) {
        self.lock().insert(owner.to_string(), listeners);
    }

    pub fn remove(&self, owner: &str) {
        self.lock().remove(owner);
    }

    /// Offers nothing more (the agent is stopping): the offer's descriptors must not keep a
    /// listener open, or the kernel would go on completing handshakes nobody accepts.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Every listener offered now, each a new descriptor (the offer keeps its own).
    pub fn snapshot(&self) -> io::Result<Vec<Handed>> {
        self.lock().values().flatten().map(Handed::dup).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<Handed>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Called once the agent has a complete view: every taken listener is either serving its pod or
/// dropped. Tells the predecessor to stop accepting.
pub type OnAdopted = Box<dyn FnOnce(AdoptionReport) + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdoptionReport {
    /// Listeners now served by this agent.
    pub adopted: usize,
    /// Listeners of pods this agent does not enrol (gone, or changed), closed here.
    pub unclaimed: usize,
}

/// Listeners taken from a predecessor, waiting for the enrolment of their pods.
#[derive(Default)]
pub struct Taken {
    pending: Vec<Handed>,
    adopted: usize,
    on_done: Option<OnAdopted>,
}

impl std::fmt::Debug for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taken")
            .field("pending", &self.pending.len())
            .field("adopted", &self.adopted)
            .finish()
    }
}

impl Taken {
    pub fn new(listeners: Vec<Handed>, on_done: OnAdopted) -> Taken {
        Taken {
            pending: listeners,
            adopted: 0,
            on_done: Some(on_done),
        }
    }

    /// The agent's own listener for `role` on `addr` in `netns` (the one this agent runs in), if
    /// one was handed over. In a cluster each agent pod has a netns of its own: the old pod's
    /// listener is not ours to serve, and it goes with the old pod.
    pub fn own(&mut self, role: Role, addr: SocketAddr, netns: NetnsId) -> Option<OwnedFd> {
        let i = self.pending.iter().position(|h| {
            h.what.pod.is_none()
                && h.what.role == role
                && h.what.addr == addr
                && h.what.netns == Some(netns)
        })?;
        self.adopted += 1;
        Some(self.pending.swap_remove(i).fd)
    }

    /// The listeners of pod `key` in `netns`, if exactly `planned` were handed over; None (and
    /// those handed over closed here) otherwise: the pod then gets listeners of its own.
    pub fn pod(
        &mut self,
        key: &str,
        netns: NetnsId,
        planned: &[(Role, SocketAddr)],
    ) -> Option<Vec<(Role, SocketAddr, OwnedFd)>> {
        let (mine, rest): (Vec<Handed>, Vec<Handed>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|h| h.what.pod.as_deref() == Some(key));
        self.pending = rest;
        if mine.is_empty() {
            return None;
        }
        let mut got: Vec<(Role, SocketAddr)> =
            mine.iter().map(|h| (h.what.role, h.what.addr)).collect();
        let mut want = planned.to_vec();
        got.sort();
        want.sort();
        if got != want || mine.iter().any(|h| h.what.netns != Some(netns)) {
            warn!(pod = %key, handed = ?got, planned = ?want, "listeners handed over do not fit the pod now; it gets new ones");
            return None;
        }
        self.adopted += mine.len();
        debug!(pod = %key, listeners = mine.len(), "adopting the listeners handed over");
        Some(
            mine.into_iter()
                .map(|h| (h.what.role, h.what.addr, h.fd))
                .collect(),
        )
    }

    /// Closes what no pod claimed and reports (once).
    pub fn finish(&mut self) {
        let Some(done) = self.on_done.take() else {
            return;
        };
        let report = AdoptionReport {
            adopted: self.adopted,
            unclaimed: self.pending.len(),
        };
        for h in self.pending.drain(..) {
            debug!(listener = ?h.what, "no pod claimed this listener; closing it");
        }
        info!(
            adopted = report.adopted,
            unclaimed = report.unclaimed,
            "listeners handed over are served here"
        );
        done(report);
    }
}

/// Describes `listener` (its own address) for an offer, with a new descriptor of it.
pub fn describe(
    pod: Option<&str>,
    netns: Option<NetnsId>,
    role: Role,
    listener: &impl AsFd,
    addr: SocketAddr,
) -> io::Result<Handed> {
    Ok(Handed {
        what: Described {
            pod: pod.map(str::to_string),
            netns,
            role,
            addr,
        },
        fd: listener.as_fd().try_clone_to_owned()?,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const NS: NetnsId = NetnsId { dev: 4, ino: 7 };

    fn handed(pod: &str, netns: NetnsId, role: Role) -> (Handed, SocketAddr) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let addr = l.local_addr().expect("addr");
        (
            describe(Some(pod), Some(netns), role, &l, addr).expect("describe"),
            addr,
        )
    }

    #[test]
    fn a_pod_adopts_exactly_its_planned_listeners_in_its_netns_and_the_rest_is_reported() {
        let (a1, a1_addr) = handed("mesh/a", NS, Role::Outbound);
        let (a2, a2_addr) = handed("mesh/a", NS, Role::Hbone);
        let (b, b_addr) = handed("mesh/b", NS, Role::Outbound);
        let (c, c_addr) = handed("mesh/c", NetnsId { dev: 4, ino: 8 }, Role::Outbound);
        let (d, _) = handed("mesh/d", NS, Role::Outbound);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut taken = Taken::new(vec![a1, a2, b, c, d], {
            let (reports, calls) = (reports.clone(), calls.clone());
            Box::new(move |r| {
                calls.fetch_add(1, Ordering::SeqCst);
                reports.lock().unwrap().push(r);
            })
        });
        let got = taken
            .pod(
                "mesh/a",
                NS,
                &[(Role::Hbone, a2_addr), (Role::Outbound, a1_addr)],
            )
            .expect("mesh/a adopts both");
        assert_eq!(got.len(), 2);
        assert!(
            taken
                .pod("mesh/a", NS, &[(Role::Outbound, a1_addr)])
                .is_none(),
            "taken once"
        );
        // A pod whose listeners changed (one more planned) gets new ones.
        assert!(taken
            .pod(
                "mesh/b",
                NS,
                &[(Role::Outbound, b_addr), (Role::Hbone, b_addr)]
            )
            .is_none());
        // Same name, another netns (the pod was recreated): not adopted.
        assert!(taken
            .pod("mesh/c", NS, &[(Role::Outbound, c_addr)])
            .is_none());
        taken.finish();
        taken.finish();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "reported once");
        assert_eq!(
            reports.lock().unwrap()[0],
            AdoptionReport {
                adopted: 2,
                unclaimed: 1
            },
            "mesh/d was never claimed; b and c were closed when they did not fit"
        );
    }
}

//! Load balancing over a cluster's endpoints as an Istio sidecar (Envoy) does it, per request
//! (HTTP) or per connection (TCP): ROUND_ROBIN, RANDOM, LEAST_REQUEST (Envoy's power of two
//! choices), PASSTHROUGH, and consistent hashing on a header, cookie, source IP or query
//! parameter over a ring hash or a Maglev table.
//!
//! [`Balancers`] owns the state that must outlive config snapshots (Istio: load-balancer state
//! survives config changes that don't remove the endpoint set): per cluster and address family,
//! the round-robin cursor, each endpoint's requests in flight, and the built ring or table, which
//! is rebuilt only when the endpoint set or the ring settings change.
//!
//! Cost on the data path: one lock-free load of the registry and a lookup by [`ClusterKey`], one
//! pointer comparison of the endpoint list (a new snapshot's equal list is compared once, then
//! adopted), then per policy a shared atomic increment (round robin), one or two random numbers
//! (random, least request) or a hash and a binary search or table index (consistent hash); the
//! [`ActiveRequest`] guard is an `Arc` clone and an atomic add. Nothing allocates except a
//! multi-valued hash header, a generated cookie, and the slow paths (first pick of a cluster, a
//! changed endpoint list, a ring to build).
//!
//! Outlier detection ([`outlier`]): an ejected endpoint is skipped by every policy. While no
//! endpoint of a family is ejected, a pick costs one more atomic load; with outlierDetection
//! unset, nothing is tracked and a [`Picked::report`] does nothing.

mod hash;
mod maglev;
mod outlier;
mod ring;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;

use crate::config::istio::destination_rule::OutlierDetection;
use crate::routing::{ClusterKey, HashRing, LbPolicy, TrafficPolicy};
use crate::state::PortEndpoints;

pub use outlier::{ClusterEjections, Ejected, EjectionsTotal, ManualClock, Outcome};
use outlier::{ClusterOutlier, FamilyOutlier, HostMonitor, Settings};

/// The load balancers of every cluster this node's clients send to. Cheap to clone (one `Arc`).
#[derive(Debug, Clone, Default)]
pub struct Balancers {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Copy-on-write: the data path only loads it; a new cluster or `retain` replaces it.
    clusters: ArcSwap<HashMap<ClusterKey, Arc<ClusterState>>>,
    /// Serialises the writers of `clusters`.
    write: Mutex<()>,
    rng: Rng,
    clock: outlier::Clock,
}

/// What a pick looks at besides the endpoints. For a TCP connection, [`PickContext::connection`].
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// The request's headers as the client sent them: Envoy's router picks the host before it
    /// applies the route's header edits and rewrites (`finalizeRequestHeaders`). None for TCP.
    pub headers: Option<&'a http::HeaderMap>,
    /// The query of the path as sent (before any rewrite): everything after its first `?`, not
    /// decoded.
    pub query: Option<&'a str>,
    /// The downstream peer (the app's address and port): the source IP key hashes its IP; a
    /// generated cookie hashes it with `destination`, so it is the same per connection.
    pub source: SocketAddr,
    /// The original destination the app dialled: PASSTHROUGH's pick.
    pub destination: SocketAddr,
}

impl<'a> PickContext<'a> {
    /// A connection's context, with no request to look at.
    pub fn connection(source: SocketAddr, destination: SocketAddr) -> PickContext<'static> {
        PickContext {
            headers: None,
            query: None,
            source,
            destination,
        }
    }
}

/// The endpoint picked for one request or connection.
#[derive(Debug)]
pub struct Picked {
    pub addr: SocketAddr,
    /// Envoy: a cookie generated for consistent hashing (the cookie was absent and the rule has a
    /// ttl); add it to the response as a `Set-Cookie` header.
    pub set_cookie: Option<HeaderValue>,
    /// Counts the request as in flight on `addr` until dropped: hold it until the response (or
    /// the connection) is done; LEAST_REQUEST picks by it.
    pub active: ActiveRequest,
}

impl Picked {
    /// Reports what became of the request (or connection) to the outlier detector of its
    /// cluster; nothing for a passthrough pick or a cluster without outlierDetection.
    pub fn report(&self, outcome: Outcome) {
        self.active.report(outcome);
    }
}

/// A request in flight on one endpoint of one cluster; dropping it ends the request.
#[derive(Debug, Default)]
pub struct ActiveRequest {
    /// None for a passthrough pick (no endpoint of the cluster).
    endpoint: Option<Arc<Endpoint>>,
    /// Where reports go; None without outlierDetection.
    outlier: Option<Tracker>,
}

/// The cluster, family and outlier settings of a pick, for its reports.
#[derive(Debug)]
struct Tracker {
    cluster: Arc<ClusterState>,
    family: usize,
    settings: Settings,
}

impl ActiveRequest {
    fn start(endpoint: &Arc<Endpoint>, outlier: Option<Tracker>) -> ActiveRequest {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest {
            endpoint: Some(endpoint.clone()),
            outlier,
        }
    }

    /// See [`Picked::report`].
    pub fn report(&self, outcome: Outcome) {
        let (Some(endpoint), Some(t)) = (&self.endpoint, &self.outlier) else {
            return;
        };
        for detector in endpoint
            .outlier
            .count(&t.settings, outcome)
            .into_iter()
            .flatten()
        {
            t.cluster.eject(t.family, endpoint, detector, &t.settings);
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancers {
    pub fn new() -> Balancers {
        Balancers::default()
    }

    /// Balancers whose random choices (and round-robin starting points) come from `seed`, for
    /// reproducible tests.
    pub fn with_seed(seed: u64) -> Balancers {
        Balancers {
            inner: Arc::new(Inner {
                rng: Rng::Seeded(AtomicU64::new(seed)),
                ..Inner::default()
            }),
        }
    }

    /// Seeded balancers whose outlier detection runs on a clock moved by hand, for tests.
    pub fn with_manual_clock(seed: u64) -> (Balancers, ManualClock) {
        let (clock, hand) = outlier::Clock::manual();
        let balancers = Balancers {
            inner: Arc::new(Inner {
                rng: Rng::Seeded(AtomicU64::new(seed)),
                clock,
                ..Inner::default()
            }),
        };
        (balancers, hand)
    }

    /// Picks the endpoint of `cluster` for one request (or connection) by `policy`'s load
    /// balancer among `endpoints` (one address family, as [`endpoints_for`] gives them), skipping
    /// the endpoints its outlier detection ejected. None when there is no endpoint (or every one
    /// is ejected and minHealthPercent is 0: Envoy's "no healthy upstream"); PASSTHROUGH picks
    /// the original destination.
    pub fn pick(
        &self,
        cluster: &ClusterKey,
        policy: &TrafficPolicy,
        endpoints: &Arc<[SocketAddr]>,
        ctx: &PickContext<'_>,
    ) -> Option<Picked> {
        let outlier = policy.outlier_detection.as_ref();
        self.pick_by(cluster, &policy.lb, outlier, endpoints, ctx)
    }

    fn pick_by(
        &self,
        cluster: &ClusterKey,
        policy: &LbPolicy,
        outlier: Option<&OutlierDetection>,
        endpoints: &Arc<[SocketAddr]>,
        ctx: &PickContext<'_>,
    ) -> Option<Picked> {
        if *policy == LbPolicy::Passthrough {
            // Istio PASSTHROUGH: "forward the connection to the original IP address requested".
            return Some(Picked {
                addr: ctx.destination,
                set_cookie: None,
                active: ActiveRequest::default(),
            });
        }
        if endpoints.is_empty() {
            return None;
        }
        let rng = &self.inner.rng;
        let clusters = self.inner.clusters.load();
        let settings = outlier.map(Settings::from_istio);
        match clusters.get(cluster) {
            Some(state) => state.pick(policy, settings, endpoints, ctx, rng),
            None => self
                .insert(cluster)
                .pick(policy, settings, endpoints, ctx, rng),
        }
    }

    /// Builds what `pick` would build for this endpoint list and policy (the ring or Maglev
    /// table), so that the data path finds it ready: call it from the control side after
    /// publishing a snapshot. Large rings (up to 8M entries) take a second to build.
    pub fn prepare(&self, cluster: &ClusterKey, policy: &LbPolicy, endpoints: &Arc<[SocketAddr]>) {
        if endpoints.is_empty() || *policy == LbPolicy::Passthrough {
            return;
        }
        let state = self.state(cluster);
        let family = state.family(endpoints);
        let hosts = family.hosts(endpoints);
        if let LbPolicy::ConsistentHash { ring, .. } = policy {
            family.table(&hosts, *ring);
        }
    }

    /// Drops the state of the clusters for which `live` is false (clusters gone from the config).
    pub fn retain(&self, live: impl Fn(&ClusterKey) -> bool) {
        let _write = lock(&self.inner.write);
        let current = self.inner.clusters.load();
        if current.keys().all(&live) {
            return;
        }
        let kept = current
            .iter()
            .filter(|(key, _)| live(key))
            .map(|(key, state)| (key.clone(), state.clone()))
            .collect();
        self.inner.clusters.store(Arc::new(kept));
    }

    /// How many clusters have state.
    pub fn len(&self) -> usize {
        self.inner.clusters.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The requests in flight on `addr` in `cluster` (0 when unknown), for the admin side and
    /// tests.
    pub fn active_requests(&self, cluster: &ClusterKey, addr: SocketAddr) -> u64 {
        let clusters = self.inner.clusters.load();
        let Some(state) = clusters.get(cluster) else {
            return 0;
        };
        let family = &state.families[family_index(addr)];
        [family.current.load(), family.previous.load()]
            .iter()
            .filter_map(|hosts| {
                let hosts = hosts.as_deref()?;
                let i = hosts.list.iter().position(|a| *a == addr)?;
                Some(hosts.endpoints[i].active.load(Ordering::Relaxed))
            })
            .next()
            .unwrap_or(0)
    }

    fn state(&self, cluster: &ClusterKey) -> Arc<ClusterState> {
        match self.inner.clusters.load().get(cluster) {
            Some(state) => state.clone(),
            None => self.insert(cluster),
        }
    }

    /// The slow path of a cluster's first pick.
    fn insert(&self, cluster: &ClusterKey) -> Arc<ClusterState> {
        let _write = lock(&self.inner.write);
        let current = self.inner.clusters.load();
        if let Some(state) = current.get(cluster) {
            return state.clone();
        }
        let state = Arc::new(ClusterState::new(&self.inner.rng, &self.inner.clock));
        let mut next = HashMap::clone(&current);
        next.insert(cluster.clone(), state.clone());
        self.inner.clusters.store(Arc::new(next));
        state
    }
}

/// The endpoints of `endpoints`' family matching `dst`'s (else the other family's), as
/// [`PortEndpoints::for_family_of`] chooses them, as the `Arc` that [`Balancers::pick`] takes.
pub fn endpoints_for(endpoints: &PortEndpoints, dst: SocketAddr) -> &Arc<[SocketAddr]> {
    let (same, other) = if dst.is_ipv4() {
        (&endpoints.v4, &endpoints.v6)
    } else {
        (&endpoints.v6, &endpoints.v4)
    };
    if same.is_empty() {
        other
    } else {
        same
    }
}

/// One cluster's state: IPv4 and IPv6 endpoints are balanced apart, as they are different lists
/// (a dual-stack Service's clients of each family would otherwise rebuild each other's ring).
#[derive(Debug)]
struct ClusterState {
    families: [Family; 2],
    outlier: ClusterOutlier,
}

#[derive(Debug)]
struct Family {
    /// The endpoint list last picked from, with its counters and hash table.
    current: ArcSwapOption<Hosts>,
    /// The list before it: a connection that keeps an older snapshot still picks from it, and
    /// is served without rebuilding a ring back and forth.
    previous: ArcSwapOption<Hosts>,
    /// Envoy round robin: `hosts[rr_index++ % hosts.size()]`, the index starting at a random
    /// seed and kept when the hosts change.
    round_robin: AtomicU64,
    /// Serialises rebuilding `hosts` and its table.
    rebuild: Mutex<()>,
    outlier: FamilyOutlier,
}

#[derive(Debug)]
struct Hosts {
    /// The caller's list, kept so that the same list is recognised by pointer.
    list: Arc<[SocketAddr]>,
    /// Per endpoint of `list`, carried over by address when the list changes.
    endpoints: Box<[Arc<Endpoint>]>,
    /// The ring or Maglev table over `list`, built on the first consistent-hash pick.
    table: ArcSwapOption<Table>,
}

#[derive(Debug, Default)]
struct Endpoint {
    /// Envoy's `rq_active` for this host in this cluster.
    active: AtomicU64,
    outlier: HostMonitor,
}

#[derive(Debug)]
enum Table {
    Ring {
        configured: HashRing,
        ring: ring::Ring,
    },
    Maglev {
        configured: HashRing,
        table: maglev::Maglev,
    },
}

impl Table {
    fn build(list: &[SocketAddr], configured: HashRing) -> Table {
        match configured {
            HashRing::RingHash { minimum_ring_size } => Table::Ring {
                configured,
                ring: ring::Ring::build(list, minimum_ring_size),
            },
            HashRing::Maglev { table_size } => Table::Maglev {
                configured,
                table: maglev::Maglev::build(list, table_size),
            },
        }
    }

    fn configured(&self) -> HashRing {
        match self {
            Table::Ring { configured, .. } | Table::Maglev { configured, .. } => *configured,
        }
    }

    fn host(&self, hash: u64) -> Option<usize> {
        match self {
            Table::Ring { ring, .. } => ring.host(hash),
            Table::Maglev { table, .. } => table.host(hash),
        }
    }

    /// The host for `hash` among those `skip` does not exclude: see [`ring::Ring::host_skipping`]
    /// and [`maglev::Maglev::host_skipping`].
    fn host_skipping(&self, hash: u64, skip: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Table::Ring { ring, .. } => ring.host_skipping(hash, skip),
            Table::Maglev { table, .. } => table.host_skipping(hash, skip),
        }
    }
}

impl ClusterState {
    fn new(rng: &Rng, clock: &outlier::Clock) -> ClusterState {
        ClusterState {
            families: [Family::new(rng), Family::new(rng)],
            outlier: ClusterOutlier::new(clock.clone()),
        }
    }

    fn family(&self, endpoints: &[SocketAddr]) -> &Family {
        &self.families[Self::family_of(endpoints)]
    }

    fn family_of(endpoints: &[SocketAddr]) -> usize {
        endpoints.first().map_or(0, |addr| family_index(*addr))
    }

    fn pick(
        self: &Arc<Self>,
        policy: &LbPolicy,
        settings: Option<Settings>,
        endpoints: &Arc<[SocketAddr]>,
        ctx: &PickContext<'_>,
        rng: &Rng,
    ) -> Option<Picked> {
        let family_idx = Self::family_of(endpoints);
        let family = &self.families[family_idx];
        let is_list = |hosts: &&Hosts| Arc::ptr_eq(&hosts.list, endpoints);
        let (current, previous, refreshed);
        current = family.current.load();
        let hosts: &Hosts = match current.as_deref().filter(is_list) {
            Some(hosts) => hosts,
            None => {
                previous = family.previous.load();
                match previous.as_deref().filter(is_list) {
                    Some(hosts) => hosts,
                    None => {
                        refreshed = family.hosts(endpoints);
                        &refreshed
                    }
                }
            }
        };
        let count = hosts.endpoints.len();
        if count == 0 {
            return None;
        }
        // Some(healthy): pick among the `healthy` endpoints not ejected.
        let healthy = match &settings {
            Some(s) if family.outlier.ejected.load(Ordering::Acquire) != 0 => {
                self.healthy(family, hosts, s)?
            }
            _ => None,
        };
        let n = healthy.unwrap_or(count);
        let nth = |k: usize| match healthy {
            None => k,
            Some(_) => nth_healthy(hosts, k).unwrap_or(k % count),
        };
        let mut set_cookie = None;
        let index = match policy {
            // Envoy balances over the healthy hosts: the same cursor modulo their number.
            LbPolicy::RoundRobin => {
                let cursor = family.round_robin.fetch_add(1, Ordering::Relaxed);
                nth((cursor % n as u64) as usize)
            }
            LbPolicy::Random => nth(rng.below(n)),
            // Envoy LEAST_REQUEST with equal weights (`choice_count` 2): two random hosts, drawn
            // independently (they may be the same), the one with fewer active requests; a tie
            // keeps the first.
            LbPolicy::LeastRequest => {
                let first = nth(rng.below(n));
                let second = nth(rng.below(n));
                let active = |i: usize| hosts.endpoints[i].active.load(Ordering::Relaxed);
                if active(second) < active(first) {
                    second
                } else {
                    first
                }
            }
            LbPolicy::ConsistentHash { key, ring } => {
                let request = hash::request_hash(key, ctx);
                set_cookie = request.set_cookie;
                // Envoy: "If there is no hash in the context, just choose a random value".
                let hash = request.hash.unwrap_or_else(|| rng.next());
                let table = hosts.table.load();
                let pick = |table: &Table| match healthy {
                    None => table.host(hash),
                    Some(_) => table.host_skipping(hash, |i| hosts.endpoints[i].outlier.marked()),
                };
                match table.as_deref() {
                    Some(table) if table.configured() == *ring => pick(table)?,
                    _ => pick(&family.table(hosts, *ring))?,
                }
            }
            LbPolicy::Passthrough => {
                return Some(Picked {
                    addr: ctx.destination,
                    set_cookie: None,
                    active: ActiveRequest::default(),
                })
            }
        };
        let (addr, endpoint) = (hosts.list.get(index)?, hosts.endpoints.get(index)?);
        let tracker = settings.map(|settings| Tracker {
            cluster: self.clone(),
            family: family_idx,
            settings,
        });
        Some(Picked {
            addr: *addr,
            set_cookie,
            active: ActiveRequest::start(endpoint, tracker),
        })
    }
}

/// The `k`th endpoint of `hosts` that is not ejected.
fn nth_healthy(hosts: &Hosts, k: usize) -> Option<usize> {
    (0..hosts.endpoints.len())
        .filter(|&i| !hosts.endpoints[i].outlier.marked())
        .nth(k)
}

impl Family {
    fn new(rng: &Rng) -> Family {
        Family {
            current: ArcSwapOption::empty(),
            previous: ArcSwapOption::empty(),
            round_robin: AtomicU64::new(rng.next()),
            rebuild: Mutex::new(()),
            outlier: FamilyOutlier::default(),
        }
    }

    /// The hosts for `list`: the current or previous ones if it is the same list; those adopting
    /// it if it is an equal list (a new snapshot's); else new ones, which become current, keeping
    /// the counters of the addresses that stay.
    fn hosts(&self, list: &Arc<[SocketAddr]>) -> Arc<Hosts> {
        let _rebuild = lock(&self.rebuild);
        let current = self.current.load_full();
        let previous = self.previous.load_full();
        for hosts in [&current, &previous].into_iter().flatten() {
            if Arc::ptr_eq(&hosts.list, list) {
                return hosts.clone();
            }
        }
        for (slot, hosts) in [(&self.current, &current), (&self.previous, &previous)] {
            if let Some(hosts) = hosts.as_ref().filter(|h| *h.list == **list) {
                let adopted = Arc::new(Hosts {
                    list: list.clone(),
                    endpoints: hosts.endpoints.clone(),
                    table: ArcSwapOption::new(hosts.table.load_full()),
                });
                slot.store(Some(adopted.clone()));
                return adopted;
            }
        }
        // Istio: state survives config changes; an endpoint's requests in flight stay counted.
        let known: HashMap<SocketAddr, &Arc<Endpoint>> = [&previous, &current]
            .into_iter()
            .flatten()
            .flat_map(|h| h.list.iter().copied().zip(h.endpoints.iter()))
            .collect();
        let next = Arc::new(Hosts {
            list: list.clone(),
            endpoints: list
                .iter()
                .map(|addr| known.get(addr).map_or_else(Arc::default, |e| Arc::clone(e)))
                .collect(),
            table: ArcSwapOption::empty(),
        });
        // The ejections of the endpoints that leave both lists end (Envoy drops a removed host's
        // monitor), so that the family's count of ejected endpoints stays theirs.
        let _outlier = lock(&self.outlier.lock);
        if let Some(dropped) = &previous {
            for endpoint in dropped.endpoints.iter() {
                let kept = |h: &Hosts| h.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint));
                if !current.as_deref().is_some_and(kept) && !kept(&next) {
                    endpoint.outlier.forget(&self.outlier);
                }
            }
        }
        self.previous.store(current);
        self.current.store(Some(next.clone()));
        next
    }

    /// The ring or Maglev table of `hosts` for `ring`, built if missing or built for other
    /// settings.
    fn table(&self, hosts: &Hosts, ring: HashRing) -> Arc<Table> {
        let _rebuild = lock(&self.rebuild);
        if let Some(table) = hosts.table.load_full() {
            if table.configured() == ring {
                return table;
            }
        }
        let table = Arc::new(Table::build(&hosts.list, ring));
        hosts.table.store(Some(table.clone()));
        table
    }
}

fn family_index(addr: SocketAddr) -> usize {
    usize::from(addr.is_ipv6())
}

/// A poisoned lock only means another thread panicked while holding it; what it guards (nothing,
/// or a rebuild about to be redone) is still sound.
fn lock(mutex: &Mutex<()>) -> MutexGuard<'_, ()> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where random choices come from: the thread's generator, or a seeded sequence for tests.
#[derive(Debug, Default)]
enum Rng {
    #[default]
    Thread,
    Seeded(AtomicU64),
}

impl Rng {
    fn next(&self) -> u64 {
        match self {
            Rng::Thread => fastrand::u64(..),
            Rng::Seeded(state) => {
                // splitmix64 over a shared counter: reproducible single-threaded, lock-free.
                const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
                let mut z = state
                    .fetch_add(GAMMA, Ordering::Relaxed)
                    .wrapping_add(GAMMA);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^ (z >> 31)
            }
        }
    }

    /// Envoy: `random() % size`.
    fn below(&self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

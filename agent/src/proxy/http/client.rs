//! Upstream HTTP connections, reused across requests and across the client connections of one
//! source pod, per endpoint: HTTP/1.1 with keep-alive (one request at a time per connection,
//! several connections when requests overlap) or HTTP/2 (ONE multiplexed connection per key,
//! shared by every request, opened once even when many requests arrive together). Each goes
//! inside an HBONE tunnel to a meshed endpoint (HTTP carried in the CONNECT stream, as a waypoint
//! does), or over plain TCP from the pod to an endpoint outside the mesh. A connection that closed
//! or failed is noticed when it is checked out and replaced.
//!
//! Idle connections go after the cluster's `connectionPool.http.idleTimeout` (Istio: "the period
//! in which there are no active requests", default 1 hour, `0s` never), and at most
//! [`MAX_IDLE_HTTP1`] idle HTTP/1.1 connections are kept per key; a background sweep (one task per
//! pool, started with its first connection) closes them when no request comes to do it.
//!
//! A connection is not reused once the HBONE connection under it goes away (the peer's GOAWAY),
//! nor once this agent drains: its request in flight finishes, then this side closes it, so no
//! request meets an HTTP/1.1 connection the draining peer closed (`ending`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::breaker::{Breaker, Limited, Slot};
use crate::identity::Identity;
use crate::proxy::hbone::pool::GoingAway;
use crate::proxy::{connect, PodContext, ProxyInputs};

/// The body type requests are carried in upstream (a try's body fails with its own error when
/// a newer try took it over, see `replay`).
pub type Body = BoxBody<Bytes, super::replay::BoxError>;

/// HTTP version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// Where one pooled connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    /// The data-plane worker whose connection it is (`proxy::worker`): each worker pools its own.
    pub worker: usize,
    /// The source pod (its netns): connections leave from it, so they are its own.
    pub src_netns: u64,
    pub endpoint: SocketAddr,
    /// Inside an HBONE tunnel to a workload of this identity; None: plain TCP.
    pub tunnel: Option<Identity>,
    pub version: Version,
}

/// Istio `connectionPool.http.idleTimeout`: "If not set, the default is 1 hour."
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Idle HTTP/1.1 connections kept per key (source pod, endpoint, tunnel, version). Envoy keeps
/// every idle connection until its idle timeout; a node proxy serves many pods, so ambit bounds
/// what a burst leaves behind, well above what a client keeps busy: a cap below the client's
/// concurrency closes connections the next request needs, and each request then pays a new
/// upstream connection (the L7 bench saw a quarter of the requests do so with a cap of 16 at 64
/// concurrent clients).
pub const MAX_IDLE_HTTP1: usize = 256;

/// The pool's settings for one request's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// None: idle connections stay (Istio's `0s`).
    pub idle_timeout: Option<Duration>,
    /// `connectionPool.tcp.connectTimeout`.
    pub connect_timeout: Duration,
    /// `connectionPool.tcp.maxConnectionDuration`: a connection is not reused past it.
    pub max_connection_duration: Option<Duration>,
    /// `connectionPool.tcp.tcpKeepalive`, on plain TCP connections to endpoints outside the mesh.
    pub keepalive: Option<connect::Keepalive>,
}

/// Istio: "TCP connection timeout ... Default is 10s."
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connection_duration: None,
            keepalive: None,
        }
    }
}

impl PoolSettings {
    /// The settings of a cluster's DestinationRule (`connectionPool.http`), Istio's defaults
    /// otherwise.
    pub fn of(cluster: Option<&crate::routing::Cluster>) -> PoolSettings {
        let pool = cluster.and_then(|c| c.policy.connection_pool.as_ref());
        let idle = pool
            .and_then(|p| p.http.as_ref())
            .and_then(|h| h.idle_timeout);
        let tcp = pool.and_then(|p| p.tcp.as_ref());
        PoolSettings {
            idle_timeout: match idle {
                None => Some(DEFAULT_IDLE_TIMEOUT),
                Some(d) if d.is_zero() => None,
                Some(d) => Some(d),
            },
            connect_timeout: tcp.map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.connect_timeout()),
            max_connection_duration: tcp
                .and_then(|t| t.max_connection_duration)
                .filter(|d| !d.is_zero()),
            keepalive: tcp
                .and_then(|t| t.tcp_keepalive.as_ref())
                .map(connect::Keepalive::of),
        }
    }
}

/// Requests in flight on one connection, since when it has had none, and how many it served.
#[derive(Debug)]
struct ConnState {
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    served: AtomicU64,
    created: Instant,
    /// Its place under the cluster's `maxConnections` (HTTP/1.1).
    slot: Mutex<Option<Slot>>,
    /// The cluster's breaker, told when the connection becomes free.
    breaker: Option<Arc<Breaker>>,
    /// Not to be reused: the HBONE connection under it went away, or the pool let it go.
    going_away: AtomicBool,
}

impl ConnState {
    fn new(breaker: Option<Arc<Breaker>>) -> Arc<ConnState> {
        Arc::new(ConnState {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            served: AtomicU64::new(0),
            created: Instant::now(),
            slot: Mutex::new(None),
            breaker,
            going_away: AtomicBool::new(false),
        })
    }

    fn going_away(&self) -> bool {
        self.going_away.load(Ordering::Acquire)
    }

    fn lease(self: &Arc<Self>, request: Option<Slot>) -> Lease {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.served.fetch_add(1, Ordering::AcqRel);
        Lease {
            conn: self.clone(),
            _request: request,
        }
    }

    /// It served `max` requests (`maxRequestsPerConnection`; 0: no limit).
    fn spent(&self, max: u64) -> bool {
        max > 0 && self.served.load(Ordering::Acquire) >= max
    }

    /// Idle for longer than `timeout`.
    fn idle_longer_than(&self, timeout: Option<Duration>, now: Instant) -> bool {
        let Some(timeout) = timeout else {
            return false;
        };
        self.active.load(Ordering::Acquire) == 0
            && now.saturating_duration_since(
                *self
                    .idle_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ) >= timeout
    }
}

/// A request in flight on a pooled connection: hold it until the response has been read (the
/// connection is idle, for the idle timeout, from when the last lease of it is dropped). It also
/// holds the request's place under the cluster's `http2MaxRequests`.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<ConnState>,
    _request: Option<Slot>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Instant::now();
            if let Some(b) = &self.conn.breaker {
                Limited::notify_free(b);
            }
        }
    }
}

struct Conn<S> {
    sender: S,
    state: Arc<ConnState>,
}

/// The one HTTP/2 connection of a key, opened by the first request that needs it while the
/// others wait for it.
#[derive(Default)]
struct H2Slot(
    tokio::sync::OnceCell<Conn<http2::SendRequest<Body>>>,
    /// Requests that chose it and have no lease on it yet (it may still be opening).
    AtomicUsize,
);

impl H2Slot {
    /// Requests on it or bound for it.
    fn load(&self) -> usize {
        self.1.load(Ordering::Acquire)
            + self
                .0
                .get()
                .map_or(0, |c| c.state.active.load(Ordering::Acquire))
    }

    /// Still worth waiting on or sending on: not opened yet, or open and not going away.
    fn usable(&self) -> bool {
        self.0
            .get()
            .is_none_or(|c| !c.sender.is_closed() && !c.state.going_away())
    }
}

#[derive(Default)]
struct Entry {
    http1: Vec<Conn<http1::SendRequest<Body>>>,
    /// One connection, or more when `maxConcurrentStreams` (or `maxRequestsPerConnection`) fills
    /// one.
    http2: Vec<Arc<H2Slot>>,
    /// Idle connections of the source-side relay (`raw`).
    raw: Vec<RawConn>,
    settings: PoolSettings,
    /// The breaker of the cluster whose requests last used the key, if it has limits.
    breaker: Option<Arc<Breaker>>,
    /// When a request last pruned it.
    pruned: Option<Instant>,
}

/// How often the request path prunes one key's connections.
const PRUNE_EVERY: Duration = Duration::from_millis(100);

impl Entry {
    /// Drops closed connections, those idle past the timeout, and idle HTTP/1.1 connections
    /// beyond [`MAX_IDLE_HTTP1`] (the longest idle first). Whether anything is left.
    fn prune(&mut self, now: Instant) -> bool {
        let timeout = self.settings.idle_timeout;
        let max_age = self.settings.max_connection_duration;
        // `maxConnectionDuration`: an older connection is not reused (its request in flight, if
        // any, finishes).
        let too_old = |state: &ConnState| {
            max_age.is_some_and(|d| now.saturating_duration_since(state.created) >= d)
        };
        self.http1.retain(|c| {
            !c.sender.is_closed()
                && !c.state.going_away()
                && !c.state.idle_longer_than(timeout, now)
                && !too_old(&c.state)
        });
        let idle = |c: &Conn<http1::SendRequest<Body>>| {
            c.sender.is_ready() && c.state.active.load(Ordering::Acquire) == 0
        };
        let mut n_idle = self.http1.iter().filter(|c| idle(c)).count();
        if n_idle > MAX_IDLE_HTTP1 {
            // Most recently used last: keep the warm ones. Each key is read once: requests on
            // other tasks move `idle_since` while this sorts, and a key that changes mid-sort
            // breaks the order's totality (the standard sort then panics).
            self.http1.sort_by_cached_key(|c| {
                *c.state
                    .idle_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            });
            self.http1.retain(|c| {
                if n_idle > MAX_IDLE_HTTP1 && idle(c) {
                    n_idle -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.http2.retain(|slot| match slot.0.get() {
            Some(c) => {
                !(c.sender.is_closed()
                    || c.state.going_away()
                    || c.state.idle_longer_than(timeout, now)
                    || too_old(&c.state))
            }
            // Being opened: a request waits on it.
            None => Arc::strong_count(slot) > 1,
        });
        self.prune_raw(now);
        !self.http1.is_empty() || !self.http2.is_empty() || !self.raw.is_empty()
    }
}

#[derive(Default)]
struct Inner {
    /// foldhash: the key holds identities (strings), hashed on every request.
    conns: Mutex<HashMap<UpstreamKey, Entry, foldhash::fast::RandomState>>,
    sweeping: AtomicBool,
    /// The sweep's current pause, in milliseconds (0: not started).
    sweep_every_ms: AtomicU64,
    /// Wakes the sweep when a key with a shorter idle timeout than its pause appears.
    wake: Arc<tokio::sync::Notify>,
    opened: AtomicU64,
    /// Connections let go because the HBONE connection under them went away.
    let_go: AtomicU64,
}

/// The node's upstream HTTP connections (cheap to clone).
#[derive(Clone, Default)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

/// The upstream's response, and the lease that keeps its connection busy until it is dropped.
pub type Sent = (http::Response<hyper::body::Incoming>, Lease);

impl Upstreams {
    /// Sends `req` on a pooled connection to `key.endpoint`, opening one if none is free. A
    /// request that a stale connection could not even start is sent again on a new connection
    /// (it never reached the upstream).
    pub async fn send(
        &self,
        pi: &ProxyInputs,
        pod: &PodContext,
        key: &UpstreamKey,
        settings: PoolSettings,
        limited: Option<&Limited>,
        req: http::Request<Body>,
    ) -> Result<Sent, UpstreamError> {
        let mut req = req;
        let mut resent = false;
        let up = Up {
            pi,
            pod,
            key,
            settings,
            limited,
            reuse: !pi.drain.is_draining(),
        };
        loop {
            // The request's place under `http2MaxRequests`, held by its lease.
            let request = limited.map(Limited::request).transpose()?;
            let attempt = match key.version {
                Version::Http1 => self.send_http1(&up, request, req).await?,
                Version::Http2 => self.send_http2(&up, request, req).await?,
            };
            match attempt {
                Ok(sent) => return Ok(sent),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !resent => {
                        debug!(endpoint = %key.endpoint, error = %e.error(), "pooled connection closed; sending on a new one");
                        resent = true;
                        req = unsent;
                    }
                    _ => {
                        return Err(UpstreamError::Request {
                            endpoint: key.endpoint,
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
    }

    async fn send_http1(
        &self,
        up: &Up<'_>,
        request: Option<Slot>,
        req: http::Request<Body>,
    ) -> Result<Attempt, UpstreamError> {
        let (key, settings) = (up.key, up.settings);
        let mut conn = self.http1_conn(up).await?;
        let lease = conn.state.lease(request);
        let sent = conn.sender.try_send_request(req);
        let max = up
            .limited
            .map_or(0, |l| l.limits.max_requests_per_connection);
        // Back in the pool at once: it is free again (`is_ready`) once its response has been
        // read. One that served `maxRequestsPerConnection` is not, nor one going away (looked
        // at under the pool's lock, which letting it go takes too): dropping its sender closes
        // it after this response.
        if !conn.state.spent(max) && up.reuse {
            self.with_entry(key, settings, up.limited, |e| {
                if !conn.state.going_away() {
                    e.http1.push(conn);
                }
            });
        }
        Ok(sent.await.map(|resp| (resp, lease)))
    }

    /// A free HTTP/1.1 connection for the request: a pooled one, else a new one while the
    /// cluster's `maxConnections` allows, else (within `http1MaxPendingRequests`) the first one
    /// to become free or allowed.
    async fn http1_conn(
        &self,
        up: &Up<'_>,
    ) -> Result<Conn<http1::SendRequest<Body>>, UpstreamError> {
        let Some(limited) = up.limited else {
            if let Some(c) = self.checkout_http1(up, None) {
                return Ok(c);
            }
            return self.open_http1(up, None).await;
        };
        let mut pending = None;
        loop {
            let freed = limited.freed();
            if let Some(c) = self.checkout_http1(up, Some(limited)) {
                return Ok(c);
            }
            if let Some(slot) = limited.connection() {
                // Envoy counts a request as pending until its connection is ready ("queued while
                // waiting for a ready connection pool connection"): it keeps its pending place
                // while the new connection is made.
                return self.open_http1(up, Some(slot)).await;
            }
            if pending.is_none() {
                pending = Some(limited.pending()?);
            }
            // An idle connection of the cluster pooled elsewhere (another endpoint, another
            // worker) is closed to make room, as Envoy's pool does for a pending request.
            self.close_one_idle(&limited.breaker);
            freed.await;
        }
    }

    async fn open_http1(
        &self,
        up: &Up<'_>,
        slot: Option<Slot>,
    ) -> Result<Conn<http1::SendRequest<Body>>, UpstreamError> {
        let (io, going_away) = self.connect(up).await?;
        let endpoint = up.key.endpoint;
        let (sender, driver) = http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Handshake { endpoint, source })?;
        let breaker = up.limited.map(|l| l.breaker.clone());
        let ended = breaker.clone();
        // The connection counts under `maxConnections` while it is pooled or serving: its slot
        // goes with its state, when it left the pool (closed, idle, going away, or
        // `maxRequestsPerConnection` spent) and its last response has been read.
        let state = ConnState::new(breaker);
        *state.slot.lock().unwrap_or_else(PoisonError::into_inner) = slot;
        let let_go = ending::let_go_on(&self.inner, up.key, &state);
        tokio::spawn(async move {
            if let Err(e) =
                ending::drive(Box::pin(driver.with_upgrades()), going_away, let_go).await
            {
                debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended");
            }
            // Requests waiting for a connection look again (this one may be pruned now).
            if let Some(b) = ended {
                Limited::notify_free(&b);
            }
        });
        Ok(Conn { sender, state })
    }

    /// Closes one idle HTTP/1.1 connection of the breaker's cluster, if there is one.
    fn close_one_idle(&self, breaker: &Arc<Breaker>) {
        let mut conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for e in conns.values_mut() {
            if !e.breaker.as_ref().is_some_and(|b| Arc::ptr_eq(b, breaker)) {
                continue;
            }
            if let Some(i) = e
                .http1
                .iter()
                .position(|c| c.sender.is_ready() && c.state.active.load(Ordering::Acquire) == 0)
            {
                e.http1.swap_remove(i);
                return;
            }
        }
    }

    async fn send_http2(
        &self,
        up: &Up<'_>,
        request: Option<Slot>,
        req: http::Request<Body>,
    ) -> Result<Attempt, UpstreamError> {
        let (key, settings) = (up.key, up.settings);
        let max = up
            .limited
            .map_or(0, |l| l.limits.max_requests_per_connection);
        // `maxConcurrentStreams`: requests in flight on one connection (0: no limit of ours;
        // the upstream's SETTINGS bound it too).
        let streams = up.limited.map_or(0, |l| l.limits.max_concurrent_streams);
        let fits = |slot: &Arc<H2Slot>| {
            slot.usable()
                && slot.0.get().is_none_or(|c| !c.state.spent(max))
                && (streams == 0 || slot.load() < streams)
        };
        let slot = self.with_entry(key, settings, up.limited, |e| {
            let slot = match e.http2.iter().find(|s| fits(s)) {
                Some(slot) => slot.clone(),
                None => {
                    let slot = Arc::<H2Slot>::default();
                    e.http2.push(slot.clone());
                    slot
                }
            };
            slot.1.fetch_add(1, Ordering::AcqRel);
            slot
        });
        // Bound for the slot until the lease is taken (or the open fails).
        struct Chosen<'a>(&'a AtomicUsize);
        impl Drop for Chosen<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let chosen = Chosen(&slot.1);
        let conn = slot
            .0
            .get_or_try_init(|| async {
                let cx = match up.limited {
                    Some(l) => Some(l.connection().ok_or_else(|| UpstreamError::Overflow {
                        cluster: l.cluster.to_string(),
                        limit: "maxConnections",
                    })?),
                    None => None,
                };
                let (io, going_away) = self.connect(up).await?;
                let endpoint = key.endpoint;
                let (sender, driver) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake::<_, Body>(TokioIo::new(io))
                    .await
                    .map_err(|source| UpstreamError::Handshake { endpoint, source })?;
                let state = ConnState::new(up.limited.map(|l| l.breaker.clone()));
                let let_go = ending::let_go_on(&self.inner, key, &state);
                tokio::spawn(async move {
                    let _cx = cx;
                    if let Err(e) = ending::drive(Box::pin(driver), going_away, let_go).await {
                        debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                Ok::<_, UpstreamError>(Conn { sender, state })
            })
            .await?;
        // Multiplexed: every request sends on a clone of the one sender.
        let lease = conn.state.lease(request);
        drop(chosen);
        let mut sender = conn.sender.clone();
        Ok(sender.try_send_request(req).await.map(|resp| (resp, lease)))
    }

    /// A free HTTP/1.1 connection for the request's key, after pruning the key's connections
    /// (none while this agent drains: it reuses no connection).
    fn checkout_http1(
        &self,
        up: &Up<'_>,
        limited: Option<&Limited>,
    ) -> Option<Conn<http1::SendRequest<Body>>> {
        if !up.reuse {
            return None;
        }
        self.with_entry(up.key, up.settings, limited, |e| {
            // Pruning looks at every connection of the key: at most every PRUNE_EVERY on the
            // request path (the sweep does the rest), or when too many are kept.
            let now = Instant::now();
            if e.pruned
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY)
                || e.http1.len() > MAX_IDLE_HTTP1
            {
                e.prune(now);
                e.pruned = Some(now);
            }
            let i = e
                .http1
                .iter()
                .position(|c| c.sender.is_ready() && !c.state.going_away())?;
            Some(e.http1.swap_remove(i))
        })
    }

    fn with_entry<T>(
        &self,
        key: &UpstreamKey,
        settings: PoolSettings,
        limited: Option<&Limited>,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> T {
        let mut conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = match conns.get_mut(key) {
            Some(e) if e.settings == settings => e,
            Some(e) => {
                self.wake_sweep(settings);
                e
            }
            None => {
                self.wake_sweep(settings);
                conns.entry(key.clone()).or_default()
            }
        };
        entry.settings = settings;
        entry.breaker = limited.map(|l| l.breaker.clone());
        f(entry)
    }

    /// Wakes the sweep if `settings` need it sooner than it would wake.
    fn wake_sweep(&self, settings: PoolSettings) {
        let every = self.inner.sweep_every_ms.load(Ordering::Acquire);
        if settings
            .idle_timeout
            .is_some_and(|t| every > 0 && ending::sweep_interval(t).as_millis() < u128::from(every))
        {
            self.inner.wake.notify_one();
        }
    }

    /// Drops the connections of source pods for which `keep` is false (pods that left the node):
    /// their idle connections close now, those with a request in flight when it ends.
    pub fn retain(&self, keep: impl Fn(u64) -> bool) {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| keep(k.src_netns));
    }

    /// Upstream connections pooled now (open or being opened; for the status and tests).
    pub fn connections(&self) -> usize {
        let conns = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        conns
            .values()
            .map(|e| e.http1.len() + e.http2.len() + e.raw.len())
            .sum()
    }

    /// Upstream connections opened since the start.
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Upstream connections let go since the start because the HBONE connection under them
    /// went away (the peer's GOAWAY).
    pub fn let_go(&self) -> u64 {
        self.inner.let_go.load(Ordering::Relaxed)
    }

    /// Closes what is idle past its timeout now (the background sweep does it on its own).
    pub fn sweep(&self) {
        ending::sweep(&self.inner);
    }

    /// The upstream connection of one request: an HBONE stream or a TCP connection. Starts the
    /// sweep with the pool's first connection.
    async fn connect(&self, up: &Up<'_>) -> Result<(Io, Option<GoingAway>), UpstreamError> {
        if !self.inner.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(ending::sweeper(
                Arc::downgrade(&self.inner),
                up.pi.drain.clone(),
            ));
        }
        let (pi, pod, key) = (up.pi, up.pod, up.key);
        let endpoint = key.endpoint;
        let connecting = async {
            Ok::<_, UpstreamError>(match &key.tunnel {
                Some(identity) => io::meshed(pi, pod, endpoint, identity.clone()).await?,
                None => (
                    Io::Tcp(
                        connect::direct_with(pod, endpoint, up.settings.keepalive)
                            .await
                            .map_err(|source| UpstreamError::Connect { endpoint, source })?,
                    ),
                    None,
                ),
            })
        };
        // `connectionPool.tcp.connectTimeout` (Istio: default 10s), for the TCP connection and,
        // to a meshed endpoint, the HBONE tunnel's.
        let after = up.settings.connect_timeout;
        let io = tokio::time::timeout(after, connecting)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { endpoint, after })??;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        Ok(io)
    }
}

/// One request's way to the upstream, as the pool's steps need it.
struct Up<'a> {
    pi: &'a ProxyInputs,
    pod: &'a PodContext,
    key: &'a UpstreamKey,
    settings: PoolSettings,
    limited: Option<&'a Limited>,
    /// False while this agent drains: no connection is reused.
    reuse: bool,
}

/// What one send on one connection gave: the response, or hyper's error (with the request back
/// when it was never sent).
type Attempt = Result<Sent, hyper::client::conn::TrySendError<http::Request<Body>>>;

mod ending;
mod error;
mod io;
mod raw;

pub use error::UpstreamError;
pub use io::tunnel;
use io::Io;
pub use raw::RawConn;

//! HBONE client side: mTLS HTTP/2 connections to peers' port 15008, pooled and multiplexed.
//!
//! A connection is keyed by (source pod netns and IP, source identity, destination identity,
//! destination address), so a stream never travels with another workload's certificate or from
//! another pod's address. A connection carries at most `max_streams` streams; the next concurrent
//! stream opens a new connection. Only one connection per key is being opened at a time, so a burst
//! of streams shares the first connection instead of racing to open many. A connection without
//! streams for `idle_timeout` is closed (0 = as soon as its last stream ends: no reuse).
//!
//! When the peer sends GOAWAY (its agent drains), the connection leaves the pool at once and
//! every stream on it is told ([`GoingAway`]): what a stream carries (an HTTP/1.1 or HTTP/2
//! connection of the L7 client) is then not reused, so the side that would send the next request
//! is the one that closes, and no request meets a connection the draining peer closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tracing::debug;

use super::coalesce::{coalesce, Coalesced, Flushed};
use super::settings::{buffered, keepalive, Buffered, CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use super::stream::Stream;
use crate::identity::{Identity, SecretManager};
use crate::proxy::SocketFactory;

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_streams: u16,
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams: 100,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("no certificate for source identity {id}: {message}")]
    Certificate { id: Identity, message: String },
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {dst} (expected identity {expected}): {source}")]
    Tls {
        dst: SocketAddr,
        expected: Identity,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 with {dst}: {source}")]
    H2 {
        dst: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{dst} answered CONNECT {authority} with status {status}")]
    Status {
        dst: SocketAddr,
        authority: String,
        status: http::StatusCode,
    },
    #[error("bad CONNECT request for {authority}: {message}")]
    Request { authority: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The data-plane worker whose connection it is (`proxy::worker`): each worker pools its own.
    pub worker: usize,
    pub src_netns: u64,
    pub src_ip: IpAddr,
    pub src_id: Identity,
    pub dst_id: Identity,
    /// The peer's HBONE address (pod IP, port 15008).
    pub dst: SocketAddr,
}

/// One CONNECT request's extra headers.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Original destination, `ip:port` (the `:authority`).
    pub authority: SocketAddr,
    /// The app's address as the source sees it; port 0 when no one port is the client's (an L7
    /// upstream connection carries the requests of many downstream connections).
    pub forwarded_for: SocketAddr,
    pub baggage: Option<http::HeaderValue>,
}

struct Conn {
    id: u64,
    /// Taken out when the pool drains: with no handle left, h2 sends GOAWAY once the last stream
    /// has ended and closes the connection.
    sender: Mutex<Option<SendRequest<Bytes>>>,
    /// Set with `closed` by a drain: the connection is still polled until its streams end.
    draining: AtomicBool,
    /// Streams open on this connection; changed under the pool lock when taken.
    active: AtomicU64,
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
    wake: Notify,
    /// Set once the connection takes no new stream (the peer sent GOAWAY, it failed, or this
    /// agent drains) or has ended: what its streams carry is not to be reused.
    going_away: watch::Sender<bool>,
}

impl Conn {
    /// No new stream; the connection is polled until its streams have ended, then closes.
    fn wind_down(&self) {
        self.draining.store(true, Ordering::Release);
        self.closed.store(true, Ordering::Release);
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.going_away.send_replace(true);
        self.wake.notify_one();
    }
}

/// Tells a stream's user when the HBONE connection under it goes away: the peer sent GOAWAY (its
/// agent drains), the connection failed, this agent drains, or it ended. Streams already open
/// are still served; an HTTP connection carried in one should finish its request in flight and
/// then be closed by this side rather than reused.
#[derive(Debug, Clone)]
pub struct GoingAway(watch::Receiver<bool>);

impl GoingAway {
    /// Whether it has gone away already.
    pub fn now(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once it goes away (at once if it has).
    pub async fn wait(&mut self) {
        // An error: the connection's state is gone, so is the connection.
        let _ = self.0.wait_for(|gone| *gone).await;
    }
}

impl Stream {
    /// The signal of the HBONE connection this client-side stream goes on (None on the server
    /// side).
    pub fn going_away(&self) -> Option<GoingAway> {
        self.slot
            .as_ref()
            .map(|slot| GoingAway(slot.0.going_away.subscribe()))
    }
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<Conn>>,
    /// Held while a connection for this key is being opened.
    opening: Arc<tokio::sync::Mutex<()>>,
}

type ClientConfigs = HashMap<(Identity, Identity), Arc<rustls::ClientConfig>>;

/// The pool's own counters (in the status file and metrics).
#[derive(Debug, Default, serde::Serialize)]
pub struct PoolStats {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connect_failed: AtomicU64,
    pub streams_opened: AtomicU64,
    /// Streams that went on an already-open connection.
    pub streams_reused: AtomicU64,
}

struct Inner {
    cfg: PoolConfig,
    secrets: Arc<SecretManager>,
    metrics: PoolStats,
    entries: Mutex<HashMap<PoolKey, Entry>>,
    tls: Mutex<ClientConfigs>,
    next_id: AtomicU64,
}

/// The node's HBONE connection pool (cheap to clone).
#[derive(Clone)]
pub struct Pool(Arc<Inner>);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("cfg", &self.0.cfg).finish()
    }
}

/// A stream's place on a pooled connection; freed when the stream ends.
pub struct Slot(Arc<Conn>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Ok(mut t) = self.0.idle_since.lock() {
                *t = Instant::now();
            }
            self.0.wake.notify_one();
        }
    }
}

impl Pool {
    pub fn new(cfg: PoolConfig, secrets: Arc<SecretManager>) -> Self {
        Pool(Arc::new(Inner {
            cfg,
            secrets,
            metrics: PoolStats::default(),
            entries: Mutex::new(HashMap::new()),
            tls: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }))
    }

    pub fn stats(&self) -> &PoolStats {
        &self.0.metrics
    }

    /// Open connections in the pool.
    pub fn connections(&self) -> usize {
        self.0
            .entries
            .lock()
            .map(|e| e.values().map(|e| e.conns.len()).sum())
            .unwrap_or(0)
    }

    /// Opens a CONNECT stream to `key.dst` for `req`, reusing a pooled connection when one has
    /// room. `sockets` makes sockets in the source pod: new connections leave from the pod.
    pub async fn connect(
        &self,
        key: &PoolKey,
        sockets: &dyn SocketFactory,
        req: &ConnectRequest,
    ) -> Result<Stream, PoolError> {
        // A pooled connection can die between checkout and use (peer restarted): retry once on a
        // fresh one before failing the app's connection.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = self.checkout(key, sockets).await?;
            match send_connect(&conn, key, req).await {
                Ok((send, recv)) => {
                    inc(&self.0.metrics.streams_opened);
                    return Ok(Stream {
                        send,
                        recv,
                        slot: Some(Slot(conn)),
                    });
                }
                Err(SendError::Connection(source)) if attempts < 2 => {
                    debug!(dst = %key.dst, error = %source, "pooled HBONE connection failed; retrying on a new one");
                    self.retire(key, &conn);
                    drop(Slot(conn));
                }
                Err(e) => {
                    drop(Slot(conn.clone()));
                    return Err(match e {
                        SendError::Connection(source) => {
                            self.retire(key, &conn);
                            PoolError::H2 {
                                dst: key.dst,
                                source,
                            }
                        }
                        SendError::Pool(e) => e,
                    });
                }
            }
        }
    }

    /// A connection with a free stream slot (the slot is taken), opening one if needed.
    async fn checkout(
        &self,
        key: &PoolKey,
        sockets: &dyn SocketFactory,
    ) -> Result<Arc<Conn>, PoolError> {
        if let Some(c) = self.try_reserve(key) {
            return Ok(c);
        }
        let opening = {
            let mut entries = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.entry(key.clone()).or_default().opening.clone()
        };
        let _guard = opening.lock().await;
        // Someone may have opened one while we waited.
        if let Some(c) = self.try_reserve(key) {
            return Ok(c);
        }
        let conn = self
            .open(key, sockets)
            .await
            .inspect_err(|_| inc(&self.0.metrics.connect_failed))?;
        let mut entries = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
        conn.active.fetch_add(1, Ordering::AcqRel);
        entries
            .entry(key.clone())
            .or_default()
            .conns
            .push(conn.clone());
        Ok(conn)
    }

    fn try_reserve(&self, key: &PoolKey) -> Option<Arc<Conn>> {
        let entries = self.0.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(key)?;
        let max = u64::from(self.0.cfg.max_streams.max(1));
        let conn = entry.conns.iter().find(|c| {
            !c.closed.load(Ordering::Acquire) && c.active.load(Ordering::Acquire) < max
        })?;
        conn.active.fetch_add(1, Ordering::AcqRel);
        inc(&self.0.metrics.streams_reused);
        Some(conn.clone())
    }

    /// The agent is stopping: every pooled connection takes no new stream, and closes with GOAWAY
    /// once its last stream has ended. Streams opened later go on new connections.
    pub fn drain(&self) {
        let entries =
            std::mem::take(&mut *self.0.entries.lock().unwrap_or_else(|e| e.into_inner()));
        for conn in entries.into_values().flat_map(|e| e.conns) {
            conn.wind_down();
        }
    }

    /// Takes `conn` out of the pool (it failed, or the peer sent GOAWAY); streams on it finish on
    /// their own: a peer that drains still serves them.
    fn retire(&self, key: &PoolKey, conn: &Arc<Conn>) {
        retire(&self.0, key, conn);
    }

    fn client_config(&self, key: &PoolKey) -> Arc<rustls::ClientConfig> {
        let mut cache = self.0.tls.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((key.src_id.clone(), key.dst_id.clone()))
            .or_insert_with(|| {
                crate::tls::client_config(
                    self.0.secrets.clone(),
                    key.src_id.clone(),
                    key.dst_id.clone(),
                )
            })
            .clone()
    }

    async fn open(
        &self,
        key: &PoolKey,
        sockets: &dyn SocketFactory,
    ) -> Result<Arc<Conn>, PoolError> {
        // The source's certificate must exist before the handshake presents it.
        self.0
            .secrets
            .fetch(&key.src_id)
            .await
            .map_err(|e| PoolError::Certificate {
                id: key.src_id.clone(),
                message: e.to_string(),
            })?;
        let connect_err = |source| PoolError::Connect {
            dst: key.dst,
            source,
        };
        let socket = sockets
            .upstream(key.dst, Some(key.src_ip))
            .await
            .map_err(connect_err)?;
        let tcp = socket.connect(key.dst).await.map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        // No SNI (the client config disables it); the name only satisfies the API.
        let tls = tokio_rustls::TlsConnector::from(self.client_config(key))
            .connect(ServerName::IpAddress(key.dst.ip().into()), buffered(tcp))
            .await
            .map_err(|source| {
                // Reported by the caller (the access log, the stage's error); one line, not two.
                debug!(dst = %key.dst, expected = %key.dst_id, error = %source, "HBONE TLS handshake failed");
                PoolError::Tls {
                    dst: key.dst,
                    expected: key.dst_id.clone(),
                    source,
                }
            })?;
        let (io, flusher) = coalesce(tls);
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .initial_max_send_streams(usize::from(self.0.cfg.max_streams.max(1)))
            .max_send_buffer_size(STREAM_WINDOW as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(io);
        let (sender, connection) =
            flusher
                .after(handshake)
                .await
                .map_err(|source| PoolError::H2 {
                    dst: key.dst,
                    source,
                })?;
        // A handle of our own, never sent on, to see the peer's GOAWAY as soon as it is read.
        let probe = sender.clone();
        let conn = Arc::new(Conn {
            id: self.0.next_id.fetch_add(1, Ordering::Relaxed),
            sender: Mutex::new(Some(sender)),
            draining: AtomicBool::new(false),
            active: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
            going_away: watch::channel(false).0,
        });
        inc(&self.0.metrics.connections_opened);
        debug!(conn = conn.id, src = %key.src_id, dst = %key.dst, dst_id = %key.dst_id, "HBONE connection opened");
        tokio::spawn(drive(
            flusher.wrap(connection),
            conn.clone(),
            probe,
            Arc::downgrade(&self.0),
            key.clone(),
        ));
        Ok(conn)
    }
}

/// What a pooled connection's HTTP/2 runs on, below its write buffer (`coalesce`).
type Tls = tokio_rustls::client::TlsStream<Buffered>;

/// Takes `conn` out of `inner`'s pool and winds it down.
fn retire(inner: &Inner, key: &PoolKey, conn: &Arc<Conn>) {
    conn.wind_down();
    let mut entries = inner.entries.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = entries.get_mut(key) {
        e.conns.retain(|c| !Arc::ptr_eq(c, conn));
    }
}

/// Whether the peer sent GOAWAY (or the connection failed): h2 then refuses new streams, which
/// `probe` (a handle never sent on) shows without waiting.
fn peer_going_away(probe: &mut SendRequest<Bytes>) -> Option<h2::Error> {
    match probe.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Err(e)) => Some(e),
        _ => None,
    }
}

/// Polls the connection, and closes it once idle for the pool's timeout. After each poll it
/// looks whether the peer sent GOAWAY: the connection then leaves the pool and its streams are
/// told ([`GoingAway`]).
async fn drive(
    connection: Flushed<h2::client::Connection<Coalesced<Tls>>, Tls>,
    conn: Arc<Conn>,
    probe: SendRequest<Bytes>,
    pool: Weak<Inner>,
    key: PoolKey,
) {
    tokio::pin!(connection);
    // Dropped once the connection winds down: h2 closes it only when no handle is left.
    let mut probe = Some(probe);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let idle = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut went_away = None;
        let polled = std::future::poll_fn(|cx| {
            let polled = connection.as_mut().poll(cx);
            if polled.is_pending() {
                if let Some(e) = probe.as_mut().and_then(peer_going_away) {
                    went_away = Some(e);
                    return Poll::Ready(Ok(false));
                }
            }
            polled.map(|r| r.map(|()| true))
        });
        tokio::select! {
            res = polled => match res {
                Ok(false) => {}
                Ok(true) => break,
                Err(e) => {
                    debug!(conn = conn.id, error = %e, "HBONE connection ended");
                    break;
                }
            },
            _ = conn.wake.notified() => {}
            _ = idle => {}
        }
        if let Some(e) = went_away {
            debug!(conn = conn.id, dst = %key.dst, error = %e, "HBONE peer going away: no new stream on this connection");
            drop(probe.take());
            match pool.upgrade() {
                Some(inner) => retire(&inner, &key, &conn),
                None => conn.wind_down(),
            }
        }
        if conn.draining.load(Ordering::Acquire) {
            drop(probe.take());
            // Polled to its end: h2 closes it (GOAWAY NO_ERROR) after the last stream.
            if let Err(e) = (&mut connection).await {
                debug!(conn = conn.id, error = %e, "drained HBONE connection ended");
            }
            break;
        }
        if conn.closed.load(Ordering::Acquire) {
            break;
        }
        let Some(inner) = pool.upgrade() else { break };
        // Decided under the pool lock, so no stream is handed out on a connection being closed.
        let entries = inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        if conn.active.load(Ordering::Acquire) == 0 {
            let since = *conn.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            let timeout = inner.cfg.idle_timeout;
            if since.elapsed() >= timeout {
                conn.closed.store(true, Ordering::Release);
                drop(entries);
                debug!(conn = conn.id, "closing idle HBONE connection");
                break;
            }
            deadline = Some(tokio::time::Instant::from_std(since + timeout));
        } else {
            deadline = None;
        }
    }
    conn.closed.store(true, Ordering::Release);
    conn.going_away.send_replace(true);
    if let Some(inner) = pool.upgrade() {
        {
            let mut entries = inner.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = entries.get_mut(&key) {
                e.conns.retain(|c| !Arc::ptr_eq(c, &conn));
                if e.conns.is_empty() && Arc::strong_count(&e.opening) == 1 {
                    entries.remove(&key);
                }
            }
        }
        inc(&inner.metrics.connections_closed);
    }
}

enum SendError {
    /// The connection failed (closed, GOAWAY): another connection may work.
    Connection(h2::Error),
    Pool(PoolError),
}

/// RFC 7239 `for=`: the node quoted, as it has a `:` (and an IPv6 address's brackets); without a
/// port when it is unknown (0).
fn forwarded(node: SocketAddr) -> String {
    match (node.port(), node.ip()) {
        (0, std::net::IpAddr::V4(ip)) => format!("for=\"{ip}\""),
        (0, std::net::IpAddr::V6(ip)) => format!("for=\"[{ip}]\""),
        _ => format!("for=\"{node}\""),
    }
}

#[cfg(test)]
#[test]
fn forwarded_names_the_port_only_when_known() {
    let v4: SocketAddr = "10.0.0.7:41000".parse().expect("addr");
    let v6: SocketAddr = "[fd00::7]:41000".parse().expect("addr");
    assert_eq!(forwarded(v4), "for=\"10.0.0.7:41000\"");
    assert_eq!(forwarded(v6), "for=\"[fd00::7]:41000\"");
    assert_eq!(forwarded(SocketAddr::new(v4.ip(), 0)), "for=\"10.0.0.7\"");
    assert_eq!(forwarded(SocketAddr::new(v6.ip(), 0)), "for=\"[fd00::7]\"");
}

async fn send_connect(
    conn: &Conn,
    key: &PoolKey,
    req: &ConnectRequest,
) -> Result<(SendStream<Bytes>, RecvStream), SendError> {
    let authority = req.authority.to_string();
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.as_str())
        .header("forwarded", forwarded(req.forwarded_for))
        .header("traceparent", traceparent());
    if let Some(baggage) = &req.baggage {
        request = request.header("baggage", baggage.clone());
    }
    let request = request.body(()).map_err(|e| {
        SendError::Pool(PoolError::Request {
            authority: authority.clone(),
            message: e.to_string(),
        })
    })?;
    let sender = conn
        .sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        // Drained meanwhile: like a GOAWAY, another connection may work.
        .ok_or(SendError::Connection(h2::Reason::REFUSED_STREAM.into()))?;
    let mut sender = sender.ready().await.map_err(SendError::Connection)?;
    let (response, send) = sender
        .send_request(request, false)
        .map_err(SendError::Connection)?;
    let response = response.await.map_err(|e| {
        // REFUSED_STREAM: the peer did not process it (RFC 9113 §8.7), e.g. it arrived after the
        // peer's last GOAWAY: safe to send again on another connection.
        if e.is_reset() && e.reason() != Some(h2::Reason::REFUSED_STREAM) {
            SendError::Pool(PoolError::H2 {
                dst: key.dst,
                source: e,
            })
        } else {
            SendError::Connection(e)
        }
    })?;
    if response.status() != http::StatusCode::OK {
        return Err(SendError::Pool(PoolError::Status {
            dst: key.dst,
            authority,
            status: response.status(),
        }));
    }
    Ok((send, response.into_body()))
}

/// A W3C trace context for the tunnel (a new trace; not sampled).
fn traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-00",
        fastrand::u64(1..),
        fastrand::u64(..),
        fastrand::u64(1..)
    )
}

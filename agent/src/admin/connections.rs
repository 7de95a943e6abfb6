//! The live connections the proxy serves, for `/debug/connections` and `ambit zc connections`.
//! The proxy registers each connection when it starts proxying it and keeps the returned
//! [`ConnectionGuard`] for as long as it lasts; dropping the guard removes the entry. A register and
//! a drop each take one of [`SHARDS`] short locks chosen by the entry's id, so data-plane workers
//! rarely meet on the same lock; the admin side reads the shards one at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Lock shards: more than the data-plane workers there usually are.
const SHARDS: usize = 16;

/// Which way the proxied connection goes, as ztunnel's connection dump names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    /// From an enrolled pod's app, captured (15001).
    Outbound,
    /// To an enrolled pod, over HBONE (15008) or plaintext (15006).
    Inbound,
}

/// How the connection travels between the nodes, as istioctl's PROTOCOL column says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// Plain TCP (a destination outside the mesh, or a plaintext inbound connection).
    Tcp,
    /// mTLS HTTP/2 CONNECT.
    Hbone,
    /// An app's HTTP connection, routed per request (each request goes on over HBONE or
    /// plaintext, on pooled connections).
    Http,
}

/// What the proxy knows of a connection when it starts proxying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// The enrolled pod the connection belongs to, `namespace/name`.
    pub workload: String,
    pub direction: Direction,
    pub protocol: Protocol,
    /// The peer that opened it (the app for outbound; the client for inbound).
    pub src: SocketAddr,
    /// Where the proxy sends it (the chosen endpoint, or the HBONE peer's 15008 address).
    pub dst: SocketAddr,
    /// What the client asked for (its original destination: a Service VIP or a pod), if known.
    pub original_dst: Option<SocketAddr>,
}

/// Bytes a connection moved so far, updated by the proxy if it can do so cheaply.
#[derive(Debug, Default)]
pub struct ConnectionBytes {
    /// From the client towards the destination.
    pub sent: AtomicU64,
    /// From the destination back to the client.
    pub received: AtomicU64,
}

/// One connection as `/debug/connections` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionView {
    #[serde(flatten)]
    pub info: ConnectionInfo,
    /// When it was registered, RFC 3339.
    pub since: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug)]
struct Entry {
    info: ConnectionInfo,
    since: SystemTime,
    bytes: Arc<ConnectionBytes>,
}

#[derive(Debug)]
struct Inner {
    next: AtomicU64,
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
}

/// The registry, shared as `Arc<Connections>` (a clone shares it too).
#[derive(Debug, Clone)]
pub struct Connections {
    inner: Arc<Inner>,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            inner: Arc::new(Inner {
                next: AtomicU64::new(0),
                shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            }),
        }
    }
}

/// Keeps a connection listed; dropping it removes the entry.
#[derive(Debug)]
#[must_use = "the connection is listed only while the guard lives"]
pub struct ConnectionGuard {
    inner: Arc<Inner>,
    id: u64,
    bytes: Arc<ConnectionBytes>,
}

impl ConnectionGuard {
    /// The counters to add the connection's bytes to (relaxed atomics).
    pub fn bytes(&self) -> &ConnectionBytes {
        &self.bytes
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        shard(&self.inner, self.id).remove(&self.id);
    }
}

fn shard(inner: &Inner, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
    // Each update is one insert or remove: a panic elsewhere cannot leave a shard half-changed.
    inner.shards[(id % SHARDS as u64) as usize]
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

impl Connections {
    pub fn new() -> Connections {
        Connections::default()
    }

    /// Lists a connection until the returned guard is dropped.
    pub fn register(&self, info: ConnectionInfo) -> ConnectionGuard {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let bytes = Arc::new(ConnectionBytes::default());
        let entry = Entry {
            info,
            since: SystemTime::now(),
            bytes: bytes.clone(),
        };
        shard(&self.inner, id).insert(id, entry);
        ConnectionGuard {
            inner: self.inner.clone(),
            id,
            bytes,
        }
    }

    /// How many connections are listed now.
    pub fn len(&self) -> usize {
        (0..SHARDS as u64)
            .map(|i| shard(&self.inner, i).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every listed connection, oldest first (ties in registration order).
    pub fn snapshot(&self) -> Vec<ConnectionView> {
        let mut out: Vec<(SystemTime, u64, ConnectionView)> = Vec::new();
        for i in 0..SHARDS as u64 {
            for (id, e) in shard(&self.inner, i).iter() {
                out.push((
                    e.since,
                    *id,
                    ConnectionView {
                        info: e.info.clone(),
                        since: humantime::format_rfc3339_millis(e.since).to_string(),
                        bytes_sent: e.bytes.sent.load(Ordering::Relaxed),
                        bytes_received: e.bytes.received.load(Ordering::Relaxed),
                    },
                ));
            }
        }
        out.sort_by_key(|(since, id, _)| (*since, *id));
        out.into_iter().map(|(_, _, v)| v).collect()
    }
}

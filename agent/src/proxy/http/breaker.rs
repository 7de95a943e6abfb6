//! A DestinationRule's `connectionPool` limits as Envoy's circuit breakers apply them, per
//! cluster for this node's proxy (Envoy applies them per proxy, shared by its workers; a node
//! proxy is one proxy for all its pods, so the limits are per source node and cluster):
//! - `tcp.maxConnections`: upstream connections open to the cluster's endpoints;
//! - `http.http1MaxPendingRequests`: requests waiting for a connection (beyond: 503 `UO` at once);
//! - `http.http2MaxRequests`: requests in flight to the cluster (beyond: 503 `UO`);
//! - `http.maxRetries`: retries in flight (beyond: the try's result stands, not retried);
//! - `http.maxRequestsPerConnection`: a connection is closed after that many requests;
//! - `http.maxConcurrentStreams`: another HTTP/2 connection is opened when one carries that many.
//!
//! Istio's defaults are all 2^32−1 (unlimited): a cluster without `connectionPool` has no breaker
//! and costs nothing here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;

use super::client::UpstreamError;
use crate::routing::{Cluster, ClusterKey};

/// Istio's "default 2^32-1" for every limit.
const UNLIMITED: usize = u32::MAX as usize;

/// One cluster's limits, from its traffic policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_pending: usize,
    pub max_requests: usize,
    pub max_retries: usize,
    /// 0: unlimited.
    pub max_requests_per_connection: u64,
    /// `http.maxConcurrentStreams`: requests in flight on one HTTP/2 upstream connection before
    /// another is opened (0: unlimited; Istio's default 2^31−1).
    pub max_concurrent_streams: usize,
}

impl Limits {
    /// The cluster's limits; None when its policy sets no connection pool (no breaker at all).
    pub fn of(cluster: &Cluster) -> Option<Limits> {
        let pool = cluster.policy.connection_pool.as_ref()?;
        let limit = |v: i32| match usize::try_from(v) {
            Ok(0) | Err(_) => UNLIMITED,
            Ok(n) => n,
        };
        let tcp = pool.tcp.as_ref();
        let http = pool.http.as_ref();
        Some(Limits {
            max_connections: tcp.map_or(UNLIMITED, |t| limit(t.max_connections)),
            max_pending: http.map_or(UNLIMITED, |h| limit(h.http1_max_pending_requests)),
            max_requests: http.map_or(UNLIMITED, |h| limit(h.http2_max_requests)),
            max_retries: http.map_or(UNLIMITED, |h| limit(h.max_retries)),
            max_requests_per_connection: http
                .and_then(|h| u64::try_from(h.max_requests_per_connection).ok())
                .unwrap_or(0),
            max_concurrent_streams: http
                .and_then(|h| usize::try_from(h.max_concurrent_streams).ok())
                .unwrap_or(0),
        })
    }
}

/// What one cluster has in use now, and what overflowed so far.
#[derive(Debug, Default)]
pub struct Breaker {
    connections: AtomicUsize,
    pending: AtomicUsize,
    requests: AtomicUsize,
    retries: AtomicUsize,
    /// A connection closed or became free: pending requests look again.
    freed: Notify,
    pub overflows: Overflows,
}

/// Envoy's `upstream_cx_overflow`, `upstream_rq_pending_overflow`, `upstream_rq_retry_overflow`
/// (and `upstream_rq_overflow` for the request limit).
#[derive(Debug, Default)]
pub struct Overflows {
    pub connections: AtomicU64,
    pub pending: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
}

/// A cluster's breaker with its limits: what the request path carries.
#[derive(Debug, Clone)]
pub struct Limited {
    pub breaker: Arc<Breaker>,
    pub limits: Limits,
    pub cluster: ClusterKey,
    overflowed: Family<OverflowLabels, Counter>,
}

/// Labels of `ambit_http_pool_overflow_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct OverflowLabels {
    /// `outbound|port|subset|host`.
    pub cluster: String,
    /// The DestinationRule field whose limit was reached.
    pub limit: String,
}

/// Holds one unit of a limit until dropped.
#[derive(Debug)]
pub struct Slot {
    breaker: Arc<Breaker>,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Connection,
    Pending,
    Request,
    Retry,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let b = &self.breaker;
        match self.kind {
            Kind::Connection => {
                b.connections.fetch_sub(1, Ordering::AcqRel);
                b.freed.notify_waiters();
            }
            Kind::Pending => {
                b.pending.fetch_sub(1, Ordering::AcqRel);
            }
            Kind::Request => {
                b.requests.fetch_sub(1, Ordering::AcqRel);
            }
            Kind::Retry => {
                b.retries.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Limited {
    fn take(&self, kind: Kind) -> Option<Slot> {
        let b = &self.breaker;
        let (count, max, overflow) = match kind {
            Kind::Connection => (
                &b.connections,
                self.limits.max_connections,
                &b.overflows.connections,
            ),
            Kind::Pending => (&b.pending, self.limits.max_pending, &b.overflows.pending),
            Kind::Request => (&b.requests, self.limits.max_requests, &b.overflows.requests),
            Kind::Retry => (&b.retries, self.limits.max_retries, &b.overflows.retries),
        };
        let taken = count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            overflow.fetch_add(1, Ordering::Relaxed);
            let limit = match kind {
                Kind::Connection => "maxConnections",
                Kind::Pending => "http1MaxPendingRequests",
                Kind::Request => "http2MaxRequests",
                Kind::Retry => "maxRetries",
            };
            self.overflowed
                .get_or_create(&OverflowLabels {
                    cluster: self.cluster.to_string(),
                    limit: limit.to_string(),
                })
                .inc();
            return None;
        }
        Some(Slot {
            breaker: b.clone(),
            kind,
        })
    }

    /// A request in flight (`http2MaxRequests`), or `UO`.
    pub fn request(&self) -> Result<Slot, UpstreamError> {
        self.take(Kind::Request)
            .ok_or_else(|| self.overflow("http2MaxRequests"))
    }

    /// A new connection (`maxConnections`); None when the cluster has all it may have.
    pub fn connection(&self) -> Option<Slot> {
        self.take(Kind::Connection)
    }

    /// A place among the requests waiting for a connection (`http1MaxPendingRequests`), or `UO`.
    pub fn pending(&self) -> Result<Slot, UpstreamError> {
        self.take(Kind::Pending)
            .ok_or_else(|| self.overflow("http1MaxPendingRequests"))
    }

    /// A retry in flight (`maxRetries`); None: the try's result stands.
    pub fn retry(&self) -> Option<Slot> {
        self.take(Kind::Retry)
    }

    /// Resolves when a connection of the cluster closes or becomes free. Create it before
    /// looking for a connection, so that a release in between is not missed.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.breaker.freed.notified()
    }

    /// Wakes requests waiting for a connection (one became free).
    pub fn notify_free(breaker: &Breaker) {
        breaker.freed.notify_waiters();
    }

    fn overflow(&self, limit: &'static str) -> UpstreamError {
        UpstreamError::Overflow {
            cluster: self.cluster.to_string(),
            limit,
        }
    }
}

impl Breaker {
    /// (connections, pending, requests, retries) now.
    pub fn in_use(&self) -> (usize, usize, usize, usize) {
        (
            self.connections.load(Ordering::Acquire),
            self.pending.load(Ordering::Acquire),
            self.requests.load(Ordering::Acquire),
            self.retries.load(Ordering::Acquire),
        )
    }
}

/// The breakers of every cluster with limits, node-wide (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Breakers {
    inner: Arc<Mutex<HashMap<ClusterKey, Arc<Breaker>>>>,
    overflowed: Family<OverflowLabels, Counter>,
}

impl Breakers {
    /// The cluster's breaker and limits; None when it has no limits.
    pub fn of(&self, cluster: &Cluster) -> Option<Limited> {
        let limits = Limits::of(cluster)?;
        Some(self.limited(&cluster.key, limits))
    }

    /// The breaker of the cluster `key`, with `limits`.
    pub fn limited(&self, key: &ClusterKey, limits: Limits) -> Limited {
        let breaker = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        Limited {
            breaker,
            limits,
            cluster: key.clone(),
            overflowed: self.overflowed.clone(),
        }
    }

    /// `ambit_http_pool_overflow_total{cluster,limit}`: requests (or retries) a limit refused.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ambit_http_pool_overflow",
            "Requests a DestinationRule connectionPool limit refused (503 UO; for maxRetries, a retry not made), by cluster and limit (Envoy's upstream_cx/rq_pending/rq/rq_retry overflow)",
            self.overflowed.clone(),
        );
    }

    /// Per cluster: overflows so far (connections, pending, requests, retries), for `/metrics`.
    pub fn overflows(&self) -> Vec<(String, [u64; 4])> {
        let map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(String, [u64; 4])> = map
            .iter()
            .map(|(k, b)| {
                let o = &b.overflows;
                (
                    k.to_string(),
                    [
                        o.connections.load(Ordering::Relaxed),
                        o.pending.load(Ordering::Relaxed),
                        o.requests.load(Ordering::Relaxed),
                        o.retries.load(Ordering::Relaxed),
                    ],
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Drops the breakers of clusters for which `live` is false.
    pub fn retain(&self, live: impl Fn(&ClusterKey) -> bool) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| live(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(max: usize) -> Limited {
        Limited {
            breaker: Arc::default(),
            limits: Limits {
                max_connections: max,
                max_pending: max,
                max_requests: max,
                max_retries: max,
                max_requests_per_connection: 0,
                max_concurrent_streams: 0,
            },
            cluster: ClusterKey {
                host: "h".into(),
                subset: None,
                port: 80,
            },
            overflowed: Family::default(),
        }
    }

    #[test]
    fn each_limit_overflows_past_its_maximum_and_frees_on_drop() {
        let l = limited(2);
        let a = l.request().unwrap();
        let _b = l.request().unwrap();
        let e = l.request().unwrap_err();
        assert_eq!(e.response_flag(), "UO");
        assert!(e.to_string().contains("http2MaxRequests"), "{e}");
        drop(a);
        assert!(l.request().is_ok());
        let _c1 = l.connection().unwrap();
        let _c2 = l.connection().unwrap();
        assert!(l.connection().is_none());
        let _p = l.pending().unwrap();
        let _p2 = l.pending().unwrap();
        assert!(l.pending().is_err());
        let o = &l.breaker.overflows;
        assert_eq!(o.requests.load(Ordering::Relaxed), 1);
        assert_eq!(o.connections.load(Ordering::Relaxed), 1);
        assert_eq!(o.pending.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_closed_connection_wakes_the_waiters() {
        let l = limited(1);
        let slot = l.connection().unwrap();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                loop {
                    let freed = l.freed();
                    if let Some(s) = l.connection() {
                        return s;
                    }
                    freed.await;
                }
            })
        };
        tokio::task::yield_now().await;
        drop(slot);
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(l.breaker.in_use().0, 1);
        drop(got);
        assert_eq!(l.breaker.in_use().0, 0);
    }
}

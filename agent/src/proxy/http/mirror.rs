//! Istio's `mirror`/`mirrors` (Envoy's request shadowing): for each mirror, a share of requests
//! is copied, fire-and-forget, to the mirror's cluster with `-shadow` added to the host of the
//! authority (`reviews:9080` → `reviews-shadow:9080`), and the mirror's response is discarded.
//!
//! A mirror never delays or fails the request it copies: the copy's body is fed from the app's
//! body as the primary reads it, through a bounded queue that the primary never waits on; a
//! mirror that falls behind by more than [`MIRROR_QUEUE`] chunks is cut off (its request fails)
//! and the primary goes on. A mirror is one try, with no retries, counted in
//! `ambit_proxy_http_mirrored_total` and `..._mirror_failed_total`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Uri;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tracing::debug;

use super::client::{self, UpstreamError};
use super::forward::Template;
use super::outbound::HttpConn;
use super::replay::BoxError;
use super::{fault, target};
use crate::proxy::Counters;
use crate::routing::HttpRoute;
use crate::snapshot::Snapshot;

/// Body chunks a mirror may lag behind the primary before it is cut off.
pub const MIRROR_QUEUE: usize = 64;

/// Starts the copies of this request to the route's mirrors (each by its percentage); returns
/// the body the primary reads, which feeds the copies.
pub fn start(
    conn: &Arc<HttpConn>,
    snap: &Arc<Snapshot>,
    route: &HttpRoute,
    template: &Template,
    version: client::Version,
    downstream: client::Body,
) -> client::Body {
    let empty = downstream.is_end_stream();
    let mut feeds = Vec::new();
    for m in route.mirrors.iter().filter(|m| fault::hit(m.percentage)) {
        let mut req =
            template.request(http_body_util::Empty::new().map_err(|n| match n {}).boxed());
        shadow_authority(&mut req);
        let body = if empty {
            http_body_util::Empty::new().map_err(|n| match n {}).boxed()
        } else {
            let (tx, rx) = mpsc::channel(MIRROR_QUEUE);
            let ended = Arc::new(AtomicBool::new(false));
            feeds.push(Feed {
                tx,
                ended: ended.clone(),
            });
            Fed { rx, ended }.boxed()
        };
        *req.body_mut() = body;
        Counters::inc(&conn.pi.counters.http_mirrored);
        let (conn, snap, cluster) = (conn.clone(), snap.clone(), m.cluster.clone());
        tokio::spawn(async move {
            if let Err(e) = send(&conn, &snap, &cluster, version, req).await {
                Counters::inc(&conn.pi.counters.http_mirror_failed);
                debug!(pod = %conn.pod.name, cluster = %cluster, error = %e, "mirror request failed");
            }
        });
    }
    if feeds.is_empty() {
        downstream
    } else {
        Tee {
            inner: downstream,
            feeds,
        }
        .boxed()
    }
}

/// Sends one copy and reads its response to the end (discarded).
async fn send(
    conn: &HttpConn,
    snap: &Snapshot,
    key: &crate::routing::ClusterKey,
    version: client::Version,
    req: http::Request<client::Body>,
) -> Result<(), MirrorError> {
    let namespace = conn.pod.namespace.as_str();
    let cluster = target::cluster(snap, namespace, key, conn.dst.0.port())
        .map_err(|_| MirrorError::NoCluster)?;
    let picked = conn
        .pick(Some(&cluster), req.headers(), req.uri().query(), &[])
        .map_err(|()| MirrorError::NoEndpoint)?;
    let endpoint = picked.as_ref().map_or(conn.dst.0, |p| p.addr);
    let tunnel = match crate::proxy::outbound::to_workload(
        &snap.state,
        conn.pi.secrets.trust_domain(),
        endpoint,
        snap.state.workload_by_ip(endpoint.ip()),
        cluster.service.clone(),
    ) {
        crate::proxy::outbound::Route::Hbone { identity, .. } => Some(identity),
        crate::proxy::outbound::Route::Direct { .. } => None,
    };
    let (resp, _lease) = conn
        .send_to(Some(&cluster), endpoint, tunnel, version, req)
        .await?;
    let _active = picked;
    resp.into_body()
        .collect()
        .await
        .map(drop)
        .map_err(|e| MirrorError::Response(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
enum MirrorError {
    #[error("the mirror's host has no cluster")]
    NoCluster,
    #[error("the mirror's cluster has no endpoint")]
    NoEndpoint,
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("reading the mirror's response: {0}")]
    Response(String),
}

/// Envoy's shadow host: `-shadow` after the host, before any port.
fn shadow_authority(req: &mut http::Request<client::Body>) {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(authority) = authority else {
        return;
    };
    let shadow = shadow_host(&authority);
    if req.uri().authority().is_some() {
        let mut parts = req.uri().clone().into_parts();
        if let Ok(a) = shadow.parse() {
            parts.authority = Some(a);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    if req.headers().contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::try_from(shadow) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
}

/// `host[:port]` with `-shadow` added to the host (`[v6]:port` kept bracketed).
pub fn shadow_host(authority: &str) -> String {
    let split = if authority.starts_with('[') {
        authority.find(']').map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    match split {
        Some(i) if i < authority.len() => {
            format!("{}-shadow{}", &authority[..i], &authority[i..])
        }
        _ => format!("{authority}-shadow"),
    }
}

/// One mirror's end of the copy.
struct Feed {
    tx: mpsc::Sender<Frame<Bytes>>,
    ended: Arc<AtomicBool>,
}

/// The primary's body, copying each frame to the mirrors that keep up.
struct Tee {
    inner: client::Body,
    feeds: Vec<Feed>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let (data, trailers) = (frame.data_ref().cloned(), frame.trailers_ref().cloned());
                let copy = || match (&data, &trailers) {
                    (Some(d), _) => Some(Frame::data(d.clone())),
                    (None, Some(t)) => Some(Frame::trailers(t.clone())),
                    (None, None) => None,
                };
                // A full or closed queue cuts that mirror off (dropping its sender ends its body
                // without `ended`, which fails it).
                self.feeds
                    .retain(|f| copy().is_none_or(|c| f.tx.try_send(c).is_ok()));
            }
            Poll::Ready(None) => {
                for f in self.feeds.drain(..) {
                    f.ended.store(true, Ordering::Release);
                }
            }
            // The app's body failed: so do the copies (their senders drop unended).
            Poll::Ready(Some(Err(_))) => self.feeds.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A mirror's request body, fed by the primary's [`Tee`].
struct Fed {
    rx: mpsc::Receiver<Frame<Bytes>>,
    ended: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the mirror fell behind the request it copies and was cut off")]
struct CutOff;

impl Body for Fed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if self.ended.load(Ordering::Acquire) => Poll::Ready(None),
            Poll::Ready(None) => Poll::Ready(Some(Err(CutOff.into()))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_host_goes_before_the_port() {
        assert_eq!(shadow_host("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(shadow_host("[fd00::1]:80"), "[fd00::1]-shadow:80");
        assert_eq!(shadow_host("10.0.0.1:80"), "10.0.0.1-shadow:80");
    }

    #[tokio::test]
    async fn a_mirror_that_keeps_up_gets_the_whole_body_and_a_slow_one_is_cut_off() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..(MIRROR_QUEUE + 10))
            .map(|i| Ok(Frame::data(Bytes::from(format!("{i},")))))
            .collect();
        let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks)).boxed();
        let (tx_fast, rx_fast) = mpsc::channel(MIRROR_QUEUE * 2);
        let (tx_slow, rx_slow) = mpsc::channel(MIRROR_QUEUE);
        let (fast_end, slow_end) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let tee = Tee {
            inner,
            feeds: vec![
                Feed {
                    tx: tx_fast,
                    ended: fast_end.clone(),
                },
                Feed {
                    tx: tx_slow,
                    ended: slow_end.clone(),
                },
            ],
        };
        // The primary reads everything without waiting on either mirror.
        let primary = tee.collect().await.unwrap().to_bytes();
        let fast = Fed {
            rx: rx_fast,
            ended: fast_end,
        }
        .collect()
        .await
        .unwrap()
        .to_bytes();
        assert_eq!(fast, primary);
        let slow = Fed {
            rx: rx_slow,
            ended: slow_end,
        }
        .collect()
        .await;
        assert!(
            slow.is_err(),
            "a mirror that missed chunks must fail, not send a short body"
        );
    }
}

//! Upstream HTTP connections, reused across requests and across the client connections of one
//! source pod, per endpoint: HTTP/1.1 with keep-alive (one request at a time per connection,
//! several connections when requests overlap) or HTTP/2 (one multiplexed connection). Each goes
//! inside an HBONE tunnel to a meshed endpoint (HTTP carried in the CONNECT stream, as a waypoint
//! does), or over plain TCP from the pod to an endpoint outside the mesh. A connection that closed
//! or failed is noticed when it is checked out and replaced.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use thiserror::Error;
use tracing::debug;

use crate::identity::Identity;
use crate::proxy::hbone::{ConnectRequest, PoolError, PoolKey};
use crate::proxy::{connect, PodContext, ProxyInputs};

/// The body type requests and responses are carried in upstream.
pub type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: crate::proxy::Error,
    },
    #[error("HBONE tunnel to {endpoint}: {source}")]
    Tunnel {
        endpoint: SocketAddr,
        #[source]
        source: Box<PoolError>,
    },
    #[error("HTTP handshake with {endpoint}: {source}")]
    Handshake {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("request to {endpoint}: {source}")]
    Request {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Envoy's response flag: UF when no connection could be made, UR when the upstream reset or
    /// closed mid-request, UPE when it answered something that is not HTTP.
    /// Envoy's `%RESPONSE_CODE_DETAILS%` for the reply made in its place.
    pub fn details(&self) -> &'static str {
        match self.response_flag() {
            "UPE" => "upstream_reset_before_response_started{protocol_error}",
            "UR" => "upstream_reset_before_response_started{connection_termination}",
            _ => "upstream_reset_before_response_started{connection_failure}",
        }
    }

    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Tunnel { .. }
            | UpstreamError::Handshake { .. } => "UF",
            UpstreamError::Request { source, .. } if source.is_parse() => "UPE",
            UpstreamError::Request { .. } => "UR",
        }
    }
}

/// HTTP version spoken to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http1,
    Http2,
}

/// Where one pooled connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    /// The source pod (its netns): connections leave from it, so they are its own.
    pub src_netns: u64,
    pub endpoint: SocketAddr,
    /// Inside an HBONE tunnel to a workload of this identity; None: plain TCP.
    pub tunnel: Option<Identity>,
    pub version: Version,
}

enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

/// The node's upstream HTTP connections (cheap to clone).
#[derive(Clone, Default)]
pub struct Upstreams {
    conns: Arc<Mutex<HashMap<UpstreamKey, Vec<Sender>>>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Sends `req` on a pooled connection to `key.endpoint`, opening one if none is free. A
    /// request that a stale keep-alive connection could not even start is sent again on a new
    /// connection (it never reached the upstream).
    pub async fn send(
        &self,
        pi: &ProxyInputs,
        pod: &PodContext,
        key: &UpstreamKey,
        req: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let mut req = req;
        let mut resent = false;
        loop {
            let sender = match self.checkout(key) {
                Some(s) => s,
                None => self.open(pi, pod, key).await?,
            };
            // Back in the pool at once: an HTTP/1.1 connection is reused once its response has
            // been read, an HTTP/2 one right away.
            let sent = match sender {
                Sender::Http1(mut s) => {
                    let sent = s.try_send_request(req);
                    self.checkin(key, Sender::Http1(s));
                    sent.await
                }
                Sender::Http2(mut s) => {
                    let sent = s.try_send_request(req);
                    self.checkin(key, Sender::Http2(s));
                    sent.await
                }
            };
            match sent {
                Ok(resp) => return Ok(resp),
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

    /// A ready connection for `key`, dropping those that closed.
    fn checkout(&self, key: &UpstreamKey) -> Option<Sender> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let list = conns.get_mut(key)?;
        list.retain(|s| match s {
            Sender::Http1(s) => !s.is_closed(),
            Sender::Http2(s) => !s.is_closed(),
        });
        let i = list.iter().position(|s| match s {
            Sender::Http1(s) => s.is_ready(),
            // HTTP/2 multiplexes: the one connection is shared.
            Sender::Http2(s) => s.is_ready(),
        })?;
        Some(list.swap_remove(i))
    }

    fn checkin(&self, key: &UpstreamKey, sender: Sender) {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.entry(key.clone()).or_default().push(sender);
    }

    /// Upstream connections open now (for the status and tests).
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.values().map(Vec::len).sum()
    }

    async fn open(
        &self,
        pi: &ProxyInputs,
        pod: &PodContext,
        key: &UpstreamKey,
    ) -> Result<Sender, UpstreamError> {
        let endpoint = key.endpoint;
        let handshake_err = |source| UpstreamError::Handshake { endpoint, source };
        macro_rules! handshake {
            ($io:expr) => {{
                let io = TokioIo::new($io);
                match key.version {
                    Version::Http1 => {
                        let (sender, conn) = http1::Builder::new()
                            .handshake::<_, Body>(io)
                            .await
                            .map_err(handshake_err)?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.with_upgrades().await {
                                debug!(%endpoint, error = %e, "upstream HTTP/1.1 connection ended");
                            }
                        });
                        Sender::Http1(sender)
                    }
                    Version::Http2 => {
                        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                            .handshake::<_, Body>(io)
                            .await
                            .map_err(handshake_err)?;
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                debug!(%endpoint, error = %e, "upstream HTTP/2 connection ended");
                            }
                        });
                        Sender::Http2(sender)
                    }
                }
            }};
        }
        Ok(match &key.tunnel {
            Some(identity) => {
                let stream = tunnel(pi, pod, endpoint, identity.clone()).await?;
                handshake!(stream.into_io())
            }
            None => {
                let tcp = connect::direct(pod, endpoint)
                    .await
                    .map_err(|source| UpstreamError::Connect { endpoint, source })?;
                handshake!(tcp)
            }
        })
    }
}

/// Opens an HBONE stream from `pod` to `endpoint` (a workload running as `identity`).
pub async fn tunnel(
    pi: &ProxyInputs,
    pod: &PodContext,
    endpoint: SocketAddr,
    identity: Identity,
) -> Result<crate::proxy::hbone::Stream, UpstreamError> {
    let Some(src_ip) = pod.ip_like(endpoint.ip()) else {
        return Err(UpstreamError::Connect {
            endpoint,
            source: crate::proxy::Error::NoSourceAddress { dst: endpoint },
        });
    };
    let key = PoolKey {
        src_netns: pod.netns_cookie,
        src_ip,
        src_id: pod.identity.clone(),
        dst_id: identity,
        dst: SocketAddr::new(endpoint.ip(), ambit_common::HBONE_PORT),
    };
    let req = ConnectRequest {
        authority: endpoint,
        forwarded_for: SocketAddr::new(src_ip, 0),
        baggage: pod.baggage.clone(),
    };
    pi.pool
        .connect(&key, pod.sockets.as_ref(), &req)
        .await
        .map_err(|source| UpstreamError::Tunnel {
            endpoint,
            source: Box::new(source),
        })
}

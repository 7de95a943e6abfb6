//! The upstream byte stream of a pooled connection (an HBONE stream or plain TCP), and the HBONE
//! tunnel that makes the former.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::UpstreamError;
use crate::identity::Identity;
use crate::proxy::hbone::pool::GoingAway;
use crate::proxy::hbone::{ConnectRequest, PoolKey};
use crate::proxy::{PodContext, ProxyInputs};

/// An upstream byte stream.
pub(in crate::proxy::http) enum Io {
    Hbone(crate::proxy::hbone::H2Stream),
    Tcp(tokio::net::TcpStream),
    /// To a pod of this node, whose inbound stage reads the other end (`proxy::local`).
    Local(tokio::io::DuplexStream),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(s) => Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Hbone(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Hbone(s) => s.is_write_vectored(),
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Local(s) => s.is_write_vectored(),
        }
    }
}

/// The byte stream from `pod` to `endpoint` (a workload running as `identity`): in-process to a
/// pod of this node (`proxy::local`), else an HBONE stream, with its HBONE connection's
/// [`GoingAway`] signal.
pub(super) async fn meshed(
    pi: &ProxyInputs,
    pod: &PodContext,
    endpoint: SocketAddr,
    identity: Identity,
) -> Result<(Io, Option<GoingAway>), UpstreamError> {
    if let Some(local) = pi.local.serving(endpoint.ip()) {
        if let Some(piped) = crate::proxy::local::pipe(pi, pod, local, endpoint).await {
            return piped.map(|pipe| (Io::Local(pipe), None)).map_err(|source| {
                UpstreamError::Tunnel {
                    endpoint,
                    source: Box::new(source),
                }
            });
        }
    }
    let stream = tunnel(pi, pod, endpoint, identity).await?;
    let going_away = stream.going_away();
    Ok((Io::Hbone(stream.into_io()), going_away))
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
        worker: crate::proxy::worker::current(),
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

//! Same-node traffic: a meshed connection whose endpoint is a pod enrolled on this node is handed
//! to that pod's inbound stage in-process, instead of an mTLS HTTP/2 CONNECT over the node's own
//! network to the pod's 15008 and back into this same process (ztunnel's "node local fast path"
//! of its shared mode did the same, keeping RBAC and both reporters' metrics).
//!
//! What HBONE gives the inbound stage is kept: the CONNECT target as `hbone::target` resolves
//! it, the source pod's identity as the verified peer identity (known here, nothing to verify
//! over the wire), the client pod's address as the peer (the app sees the client's IP, as over
//! HBONE), AuthorizationPolicy at the destination, `reporter="destination"` telemetry with
//! `connection_security_policy="mutual_tls"` (ztunnel's fast path reported the same), access
//! logs, the live-connection registry and destination-side L7. A refusal looks to the client app
//! as it does over HBONE (its connection reset) and to the source's telemetry as the answer HBONE
//! would have given (`PoolError::Status`).
//!
//! The bytes: an L4 connection goes from the client's socket straight to the app's
//! ([`handoff`], one copy each way); an HTTP client at the source (source-side L7) gets an
//! in-process pipe the destination's HTTP server reads ([`pipe`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_common::HBONE_PORT;
use arc_swap::ArcSwap;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::addr::{canonical, PeerAddr};
use super::copy::{self, Duplex};
use super::hbone::target::{self, Reached};
use super::hbone::PoolError;
use super::http::inbound::Downstream;
use super::inbound::{self, Admitted};
use super::{reset, Counters, Error, PodContext, ProxyInputs};

/// Buffer of each direction of a [`pipe`].
const PIPE_BUF: usize = 64 * 1024;

/// The pods of this node whose inbound stage runs, by address: where a meshed connection can be
/// handed over in-process. Empty when the shortcut is off (`--same-node-shortcut=false`).
pub struct LocalPods {
    enabled: bool,
    pods: ArcSwap<HashMap<IpAddr, Arc<PodContext>>>,
    /// For the pipe's inbound task, which outlives the call that made it.
    inputs: OnceLock<Weak<ProxyInputs>>,
}

impl std::fmt::Debug for LocalPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPods")
            .field("enabled", &self.enabled)
            .field("addresses", &self.pods.load().len())
            .finish()
    }
}

impl LocalPods {
    pub fn new(enabled: bool) -> Self {
        LocalPods {
            enabled,
            pods: ArcSwap::default(),
            inputs: OnceLock::new(),
        }
    }

    /// `pod`'s inbound stage runs on this node (`pi` is the proxy both belong to).
    pub fn insert(&self, pi: &Arc<ProxyInputs>, pod: Arc<PodContext>) {
        if self.enabled {
            let _ = self.inputs.set(Arc::downgrade(pi));
        }
        self.add(pod);
    }

    fn add(&self, pod: Arc<PodContext>) {
        if !self.enabled {
            return;
        }
        self.pods.rcu(|pods| {
            let mut pods = HashMap::clone(pods);
            for ip in &pod.ips {
                pods.insert(canonical(*ip), pod.clone());
            }
            pods
        });
    }

    /// `pod` is being unenrolled: its new connections go over HBONE (and find it gone).
    pub fn remove(&self, pod: &Arc<PodContext>) {
        self.pods.rcu(|pods| {
            let mut pods = HashMap::clone(pods);
            pods.retain(|_, p| !Arc::ptr_eq(p, pod));
            pods
        });
    }

    /// The pod of this node at `ip`, when the shortcut is on and its inbound stage runs.
    pub fn serving(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        if !self.enabled {
            return None;
        }
        self.pods.load().get(&canonical(ip)).cloned()
    }

    fn inputs(&self) -> Option<Arc<ProxyInputs>> {
        self.inputs.get().and_then(Weak::upgrade)
    }
}

/// Carries the captured connection `stream` of `src`'s app (at `client`, the app's own address)
/// to `endpoint` in `dst`, a pod of this node: decided as an HBONE stream would be, then relayed
/// from the client's socket to the app's. A refusal resets `stream`, as a refused tunnel does,
/// and so does a decision (the app's connect) longer than `connect_timeout`, which bounds the
/// tunnel's opening over HBONE.
pub(super) async fn handoff(
    pi: &Arc<ProxyInputs>,
    src: &PodContext,
    dst: Arc<PodContext>,
    stream: TcpStream,
    client: SocketAddr,
    endpoint: SocketAddr,
    connect_timeout: Duration,
) -> Result<copy::Outcome, Error> {
    let deciding = decide(pi, src, &dst, PeerAddr(client), endpoint);
    let failed = match tokio::time::timeout(connect_timeout, deciding).await {
        Ok(Ok(admitted)) => {
            debug!(src = %src.name, dst = %dst.name, %client, %endpoint, "same-node connection handed over");
            return Ok(inbound::carry(admitted, stream).await);
        }
        Ok(Err(source)) => Error::Tunnel {
            dst: endpoint,
            source: Box::new(source),
        },
        Err(_) => super::connect::timed_out(endpoint, connect_timeout),
    };
    Counters::inc(&pi.counters.outbound_hbone_failed);
    reset(stream);
    Err(failed)
}

/// For the HTTP client of `src` (source-side L7): a byte stream to `endpoint` in `dst`, a pod of
/// this node, whose other end the pod's inbound stage carries (destination-side L7 included).
/// None when this proxy is going away: the caller goes over HBONE.
pub async fn pipe(
    pi: &ProxyInputs,
    src: &PodContext,
    dst: Arc<PodContext>,
    endpoint: SocketAddr,
) -> Option<Result<DuplexStream, PoolError>> {
    let pi = pi.local.inputs()?;
    // As an HBONE stream of this client arrives: from the pod's address, no port of its own.
    let Some(ip) = src.ip_like(endpoint.ip()) else {
        return Some(Err(PoolError::Request {
            authority: endpoint.to_string(),
            message: format!("pod {} has no address of this family", src.name),
        }));
    };
    let client = PeerAddr(SocketAddr::new(ip, 0));
    let admitted = match decide(&pi, src, &dst, client, endpoint).await {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    let (near, far) = tokio::io::duplex(PIPE_BUF);
    tokio::spawn(async move {
        let outcome = inbound::carry(admitted, Pipe(far)).await;
        super::outbound::finish(&pi, &outcome);
    });
    Some(Ok(near))
}

/// The inbound stage's decision for a connection of `src` to `endpoint` in `dst`: its
/// admission, or the status HBONE would have answered, as the pool reports it.
async fn decide(
    pi: &Arc<ProxyInputs>,
    src: &PodContext,
    dst: &Arc<PodContext>,
    client: PeerAddr,
    endpoint: SocketAddr,
) -> Result<Admitted, PoolError> {
    Counters::inc(&pi.counters.same_node_handoffs);
    let authority = endpoint.to_string();
    // The CONNECT the client's proxy would have sent, resolved as the server resolves it.
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.as_str())
        .body(())
        .map_err(|e| PoolError::Request {
            authority: authority.clone(),
            message: e.to_string(),
        })?;
    let hbone = SocketAddr::new(endpoint.ip(), HBONE_PORT);
    let reached = Reached {
        namespace: &dst.namespace,
        name: &dst.name,
        ips: &dst.ips,
        local: hbone,
        own: &pi.own_ports,
    };
    let snap = pi.snapshot.load_full();
    let status = match target::resolve(&req, reached, &snap) {
        Ok(t) => match inbound::admit(pi, dst, &snap, &src.identity, client, t).await {
            Ok(admitted) => return Ok(admitted),
            Err(status) => status,
        },
        Err(e) => {
            Counters::inc(&pi.counters.hbone_inbound_streams);
            inbound::refused(pi, dst, client, &src.identity, req.method(), req.uri(), &e)
        }
    };
    Err(PoolError::Status {
        dst: hbone,
        authority,
        status,
    })
}

/// The client's socket as the inbound stage's downstream.
impl Downstream for TcpStream {
    type Io = Prefixed<TcpStream>;

    async fn next_bytes(&mut self) -> Option<Bytes> {
        next_bytes(self).await
    }

    fn into_io_after(self, first: Bytes) -> Prefixed<TcpStream> {
        Prefixed { first, inner: self }
    }

    fn abort(self) {
        reset(self);
    }
}

async fn next_bytes<R: AsyncRead + Unpin>(r: &mut R) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    match r.read_buf(&mut buf).await {
        Ok(n) if n > 0 => Some(buf.freeze()),
        _ => None,
    }
}

/// `inner`, with `first` (bytes already read from it) read before the rest.
pub struct Prefixed<T> {
    first: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(first: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { first, inner }
    }

    /// Whether every byte read before has been read again.
    pub fn unread_is_empty(&self) -> bool {
        self.first.is_empty()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.first.has_remaining() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The far end of a [`pipe`], as the inbound stage's downstream.
pub struct Pipe(DuplexStream);

pub struct PipeRead(tokio::io::ReadHalf<DuplexStream>);

pub struct PipeWrite(tokio::io::WriteHalf<DuplexStream>);

impl copy::ReadHalf for PipeRead {
    async fn read(&mut self) -> io::Result<Option<Bytes>> {
        let mut buf = BytesMut::with_capacity(PIPE_BUF);
        let n = self.0.read_buf(&mut buf).await?;
        Ok((n > 0).then(|| buf.freeze()))
    }
}

impl copy::WriteHalf for PipeWrite {
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0.shutdown().await
    }
}

impl Duplex for Pipe {
    type Read = PipeRead;
    type Write = PipeWrite;

    fn split(self) -> (PipeRead, PipeWrite) {
        let (r, w) = tokio::io::split(self.0);
        (PipeRead(r), PipeWrite(w))
    }

    /// A pipe has no reset: dropped, it ends both ways, and the HTTP client sees its connection
    /// closed.
    fn reset(_read: PipeRead, _write: PipeWrite) {}
}

impl Downstream for Pipe {
    type Io = Prefixed<DuplexStream>;
    /// This agent's own upstream pool, which lets its connections go when the agent drains.
    const CLIENT_CLOSES: bool = true;

    async fn next_bytes(&mut self) -> Option<Bytes> {
        next_bytes(&mut self.0).await
    }

    fn into_io_after(self, first: Bytes) -> Prefixed<DuplexStream> {
        Prefixed {
            first,
            inner: self.0,
        }
    }

    fn abort(self) {}
}

#[cfg(test)]
mod tests;

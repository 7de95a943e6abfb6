//! Connections the proxy makes in a pod: to a destination outside the mesh (source: the pod's own
//! address, as the app's direct connection would have had) and to the pod's own app (source: the
//! client's address).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::addr::canonical;
use super::{Error, PodContext};

/// Connects from inside the pod to `dst` (outside the mesh); the kernel picks the source address.
pub async fn direct(pod: &PodContext, dst: SocketAddr) -> Result<TcpStream, Error> {
    connect(pod, dst, None).await
}

/// [`direct`], with the DestinationRule's `tcpKeepalive` on the socket.
pub async fn direct_with(
    pod: &PodContext,
    dst: SocketAddr,
    keepalive: Option<Keepalive>,
) -> Result<TcpStream, Error> {
    let stream = connect(pod, dst, None).await?;
    if let Some(k) = keepalive {
        k.apply(&stream)
            .map_err(|source| Error::Connect { dst, source })?;
    }
    Ok(stream)
}

/// The error of a connect that did not finish within `connectTimeout`.
pub fn timed_out(dst: SocketAddr, after: Duration) -> Error {
    Error::Connect {
        dst,
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {after:?} (connectTimeout)"),
        ),
    }
}

/// `connectionPool.tcp.tcpKeepalive`: SO_KEEPALIVE with the fields given; Istio: "unset fields
/// fall back to the OS" (Linux: 9 probes, 7200s, 75s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

impl Keepalive {
    pub fn of(k: &crate::config::istio::destination_rule::TcpKeepalive) -> Keepalive {
        Keepalive {
            probes: (k.probes > 0).then_some(k.probes),
            time: k.time.filter(|d| !d.is_zero()),
            interval: k.interval.filter(|d| !d.is_zero()),
        }
    }

    pub fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        let mut ka = socket2::TcpKeepalive::new();
        if let Some(t) = self.time {
            ka = ka.with_time(t);
        }
        if let Some(i) = self.interval {
            ka = ka.with_interval(i);
        }
        if let Some(p) = self.probes {
            ka = ka.with_retries(p);
        }
        socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
    }
}

/// Connects to the app at `dst` from inside the pod, from the client's address as Istio's data
/// plane does (ztunnel binds the downstream peer's IP with port 0, and dials plainly when that is
/// the destination itself). sk_lookup skips it by the route it takes (TRANSPARENT_MARK). A pod
/// without that setup is dialled from its own IP, which sk_lookup never steers either.
///
/// `client`'s port is 0 unless the client's own connection to `dst` is in the pod (plaintext
/// inbound): see [`super::SocketFactory::app_upstream`].
pub async fn app(
    pod: &PodContext,
    dst: SocketAddr,
    client: SocketAddr,
) -> Result<TcpStream, Error> {
    let client = SocketAddr::new(canonical(client.ip()), client.port());
    if client.ip() != dst.ip() && client.is_ipv4() == dst.is_ipv4() {
        let err = |source| Error::Connect { dst, source };
        if let Some(socket) = pod.sockets.app_upstream(dst, client).await.map_err(err)? {
            return socket.connect(dst).await.map_err(err);
        }
    }
    tracing::debug!(pod = %pod.name, %dst, %client, "app dialled from the pod's own address");
    let bind = pod.ip_like(dst.ip()).or(Some(dst.ip()));
    connect(pod, dst, bind).await
}

/// Logs a failed connect to the app: the client only sees its connection reset (it was accepted
/// by the proxy before the app was tried, as with ztunnel), so the server side says why. One line
/// a second at most, node-wide, naming how many were left out, so a refusing app cannot flood the
/// log.
pub fn log_app_unreachable(pod: &PodContext, dst: SocketAddr, client: SocketAddr, error: &Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT_SECOND: AtomicU64 = AtomicU64::new(0);
    static LEFT_OUT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let next = NEXT_SECOND.load(Ordering::Relaxed);
    if now < next
        || NEXT_SECOND
            .compare_exchange(next, now + 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        LEFT_OUT.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let left_out = LEFT_OUT.swap(0, Ordering::Relaxed);
    tracing::warn!(pod = %pod.name, namespace = %pod.namespace, %dst, %client, %error, also_failed_since_last_line = left_out, "app unreachable: the client's connection is reset");
}

async fn connect(
    pod: &PodContext,
    dst: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, Error> {
    let err = |source| Error::Connect { dst, source };
    let socket = pod.sockets.upstream(dst, bind).await.map_err(err)?;
    let stream = socket.connect(dst).await.map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_sets_what_the_destination_rule_gives() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let k = Keepalive {
            probes: Some(3),
            time: Some(Duration::from_secs(60)),
            interval: Some(Duration::from_secs(5)),
        };
        k.apply(&stream).unwrap();
        let s = socket2::SockRef::from(&stream);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(s.keepalive_retries().unwrap(), 3);
    }
}
